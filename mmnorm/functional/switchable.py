# Copyright (c) mmnorm contributors. All rights reserved.
r"""Switchable Normalization (SN), functional form.

Luo, Peng, Ren, Zhang. *Do Normalization Layers in a Deep ConvNet Really Need to Be Distinct?*
(2019), Eq. (1); Luo et al. *Differentiable Learning-to-Normalize via Switchable Normalization*
(ICLR 2019). Written from the papers; no code of the authors' (CC-BY-NC) repository is used.

For an input :math:`x` shaped ``(N, C, *)`` and :math:`\Omega = \{IN, LN, BN\}`:

.. math::
    y = \gamma \frac{x - \sum_{z\in\Omega} \lambda^\mu_z \mu_z}
                   {\sqrt{\sum_{z\in\Omega} \lambda^\sigma_z \sigma^2_z + \epsilon}} + \beta
    \quad (\text{mix='var'}), \qquad
    y = \gamma \frac{x - \sum_{z} \lambda^\mu_z \mu_z}
                   {\sum_{z} \lambda^\sigma_z \sqrt{\sigma^2_z + \epsilon}} + \beta
    \quad (\text{mix='std'}, \text{Eq. (1) literally}),

with :math:`\lambda^\mu = \mathrm{softmax}(\text{mean\_logits})`,
:math:`\lambda^\sigma = \mathrm{softmax}(\text{var\_logits})`. IN statistics are per (sample,
channel) over space, LN per sample over channels and space, BN per channel over the batch and
space; all variances are biased. LN and BN statistics are pooled from the IN moments (law of total
variance), so the moments of the input serve all three.

The layer is a per-(n, c) affine map of the centered input (:mod:`.moments`):
:math:`a = \gamma / \sigma_{mix}` and :math:`b = a\,\sum_{z \ne IN} \lambda^\mu_z (\mu_{IN} -
\mu_z) + \beta`, the output at the row mean (the IN term of the mixed mean cancels).
"""
import functools
import math
import numbers
import operator
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .arguments import check_eps, check_flag, check_positive_int
from .moments import (LOW_PRECISION, Coefficients, bessel_factor, compiled_call, compiled_rows,
                      eager_form, is_tracing, needs_grad, normalize_rows, pool,
                      static_shape_checks)
from .row_affine import instance_layer_batch_moments, row_affine, simple_passes
from .running_stats import (BatchStats, batch_statistics, update_running_stats,
                            update_running_stats_of)

__all__ = ['switchable_norm', 'mix_normalizers', 'softmax_ratios', 'check_norm_input',
           'check_param_sizes', 'check_unit_interval', 'check_eps', 'MIX_MODES', 'NORMALIZERS',
           'stacked_ratios', 'wide_ratio_inputs', 'check_ratio_groups', 'ratios_per_channel',
           'check_running_stats']

MIX_MODES = ('var', 'std')

#: Omega, in the order of the ratios: the first two always, BN when there are three ratios.
NORMALIZERS = ('IN', 'LN', 'BN')

#: ``ratio_fn(*ratio_inputs) -> (mean_ratios, var_ratios)``, each ``(|Omega|,)``, or
#: ``(G, |Omega|)`` with one row per group of channels: plain differentiable tensor code over
#: the last dim, a module-level function (it runs inside the compiled coefficient function, see
#: :class:`~mmnorm.functional.moments.CoefficientFn`).
RatioFn = Callable[..., Tuple[Tensor, Tensor]]


@static_shape_checks
def check_norm_input(input: Tensor, num_features: Optional[int] = None) -> None:
    """Raise a clear error for an input that is not ``(N, C, *)`` with ``C == num_features``."""
    if not isinstance(input, Tensor):
        raise TypeError(f'expected a Tensor, got {type(input).__name__}')
    if input.dim() < 2:
        raise ValueError(f'expected an input shaped (N, C, *) with at least 2 dims, got shape '
                         f'{tuple(input.shape)}')
    if num_features is not None and input.shape[1] != num_features:
        raise ValueError(f'expected {num_features} channels (dim 1), got input shaped '
                         f'{tuple(input.shape)}')
    if not input.is_floating_point():
        raise TypeError(f'expected a floating-point input, got {input.dtype}')


@static_shape_checks
def check_param_sizes(function: str, **sizes) -> None:
    """Raise a clear error for a parameter or buffer whose shape is not ``(size,)``.

    ``sizes`` maps each argument name to ``(tensor or None, expected size, what the size is)``.
    Broadcasting would otherwise accept a size-1 tensor silently, and other sizes fail deep
    inside with an unrelated reshape error; ``F.batch_norm`` / ``F.group_norm`` check the same.
    """
    for name, (tensor, size, meaning) in sizes.items():
        if tensor is not None and tuple(tensor.shape) != (size, ):
            raise ValueError(f'{function}: {name} should have shape ({size},) ({meaning}), got '
                             f'{tuple(tensor.shape)}')


def check_unit_interval(value: Union[float, Tensor], name: str, meaning: str) -> None:
    """Refuse ``value`` outside [0, 1], naming it and what it means.

    Python numbers are always checked; a tensor when it lives on the CPU (reading an
    accelerator's value would synchronize every step: layers and hooks check where they set it).
    """
    if isinstance(value, Tensor):
        if value.numel() != 1:  # (its shape is known without reading it)
            raise ValueError(f'{name} must be a number or a one-element tensor ({meaning}), got '
                             f'a tensor shaped {tuple(value.shape)}')
        # (an export's fake tensors, and tracers', have no value to read either)
        if value.device.type != 'cpu' or is_tracing() or type(value) not in (
                Tensor, torch.nn.Parameter):
            return
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f'{name} must be a number ({meaning}), got {value!r}')
    if not 0.0 <= value <= 1.0:
        raise ValueError(f'{name} must be in [0, 1] ({meaning}), got {value!r}')


def check_running_stats(function: str, running_mean: Optional[Tensor],
                        running_var: Optional[Tensor], momentum) -> None:
    """Refuse running statistics given without their partner (both or neither, as
    ``F.batch_norm``), and a momentum (pass 0.0 where none is used) that is neither a number in
    [0, 1] nor a tensor (the layers' ``momentum=None``, a cumulative average, arrives as the
    tensor ``1 / steps``)."""
    if (running_mean is None) != (running_var is None):
        raise ValueError(f'{function}: running_mean and running_var must both be given or both '
                         'be None')
    if running_mean is not None and not isinstance(momentum, Tensor):
        check_unit_interval(momentum, 'momentum', 'the weight of the new batch in the running '
                            'statistics; for a cumulative average pass 1 / steps')


def check_ratio_groups(channels: int, groups: int) -> int:
    """Refuse ``groups`` ratio groups that do not split ``channels`` into equal contiguous
    groups, naming both; returns ``groups`` as an int."""
    groups = check_positive_int(groups, 'ratio_groups')
    if channels % groups:
        raise ValueError(f'ratio_groups={groups} does not divide the {channels} channels into '
                         'equal groups: choose a divisor of the channel count')
    return groups


def ratios_per_channel(ratios: Tensor, channels: int) -> Tensor:
    """Ratios ``(..., G, K)`` of ``G`` contiguous groups of channels as ``(..., C, K)``, one row
    per channel (channel ``c`` takes group ``c // (C / G)``'s row); its gradient sums each
    group's rows. An expand and a reshape, which every exporter writes as such."""
    groups, k = ratios.shape[-2:]
    shape = ratios.shape[:-2]
    return ratios.unsqueeze(-2).expand(*shape, groups, channels // groups, k) \
        .reshape(*shape, channels, k)


def softmax_ratios(mean_logits: Tensor, var_logits: Optional[Tensor] = None
                   ) -> Tuple[Tensor, Tensor]:
    """SN's ratio function: ``(softmax(mean_logits), softmax(var_logits))`` over the last dim
    (one vector ``(K,)`` per layer, or one row per group of channels ``(G, K)``); one logits
    tensor (SN_tied) gives the same ratios for means and variances."""
    mean_ratios = torch.softmax(mean_logits, -1)
    return mean_ratios, mean_ratios if var_logits is None else torch.softmax(var_logits, -1)


def elementwise_softmax(logits: Tensor) -> Tensor:
    """``torch.softmax(logits, -1)`` for a few entries (``K`` <= 3, a normalizer's ratios) in
    elementwise ops over the ``K`` columns: ``exp(z_k - max z) / sum exp(z - max z)`` with the
    max and the sum unrolled, no reduction, so that Inductor fuses the ratios' forward and
    backward into the passes around them (the layers' light form under ``torch.compile``: 41
    kernels per SN training step with ``torch.softmax``, 37 without)."""
    columns = logits.unbind(-1)
    top = functools.reduce(torch.maximum, columns)
    exps = [torch.exp(c - top) for c in columns]
    total = functools.reduce(operator.add, exps)
    return torch.stack([e / total for e in exps], -1)


def _stacked_softmax_ratios(mean_logits: Tensor, var_logits: Optional[Tensor] = None
                            ) -> Tensor:
    """:func:`softmax_ratios` as one ``(2, ...)`` tensor, in one softmax (in elementwise ops,
    :func:`elementwise_softmax`, where ``torch.compile`` traces the light form)."""
    logits = mean_logits if var_logits is None else torch.stack([mean_logits, var_logits])
    if torch.compiler.is_dynamo_compiling() and logits.shape[-1] <= 3:
        ratios = elementwise_softmax(logits)
    else:
        ratios = torch.softmax(logits, -1)
    return ratios.expand(2, *mean_logits.shape) if var_logits is None else ratios


softmax_ratios.stacked = _stacked_softmax_ratios


def _batched_softmax_ratios(inputs: Sequence[Sequence[Tensor]], training: Sequence[bool]
                            ) -> List[Tuple[Tensor, None]]:
    """:func:`_stacked_softmax_ratios` of many layers at once (one ``cat`` and one softmax for
    all of them): ``inputs`` holds each layer's logits (one tensor for SN_tied, two for SN), all
    with the same number of normalizers, dtype and device. Returns each layer's stacked ratios
    and no state (``training`` is unused: softmax ratios keep none)."""
    k = inputs[0][0].shape[-1]
    rows = torch.cat([logits.reshape(-1, k) for layer in inputs for logits in layer])
    sizes = [sum(logits.numel() for logits in layer) // k for layer in inputs]
    ratios = torch.softmax(rows, -1).split(sizes)
    return [(r.view(2, *layer[0].shape) if len(layer) == 2
             else r.view(layer[0].shape).expand(2, *layer[0].shape), None)
            for r, layer in zip(ratios, inputs)]


softmax_ratios.batched = _batched_softmax_ratios


def wide_ratio_inputs(ratio_inputs: Sequence[Tensor]) -> Tuple[Tensor, ...]:
    """``ratio_inputs`` with float16/bfloat16 tensors as float32 (differentiable casts; others
    as they are): the ratios of a half-precision layer are computed in float32, as its
    statistics are. Rounded to half precision, they no longer sum to 1 (softmax's bfloat16
    ratios summed to 0.999 or 1.001), and the mixed mean is off by that times the input's
    mean (4.0 on outputs of size 1 for inputs near 1000)."""
    return tuple(t.float() if t.dtype in LOW_PRECISION else t for t in ratio_inputs)


def stacked_ratios(ratio_fn: RatioFn, ratio_inputs: Sequence[Tensor]) -> Tensor:
    """``ratio_fn(*ratio_inputs)`` as one ``(2, |Omega|)`` (or ``(2, G, |Omega|)``) tensor
    (means, variances), by the function's own ``stacked`` form where it has one (fewer ops),
    else stacked; in float32 for half-precision inputs (:func:`wide_ratio_inputs`)."""
    ratio_inputs = wide_ratio_inputs(ratio_inputs)
    stacked = getattr(ratio_fn, 'stacked', None)
    if stacked is not None:
        return stacked(*ratio_inputs)
    return torch.stack(ratio_fn(*ratio_inputs))


def _coefficients(mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                  bn_mean: Optional[Tensor], bn_var: Optional[Tensor], bessel: Optional[Tensor],
                  *ratio_inputs: Tensor,
                  ratio_fn: RatioFn, eps: float, mix: str, in_unbiased: bool, batch: bool,
                  process_group, length: int) -> Tuple[Tensor, Tensor, dict]:
    """SN's coefficient function (see :class:`~mmnorm.functional.moments.CoefficientFn`).

    ``mean``/``var``: IN moments ``(N, C)``. Ratios ``(G, K)`` weigh each group's channels by
    its own row. ``bn_mean``/``bn_var``: constant BN statistics
    (eval), or ``None`` with ``batch=True`` to pool them from the moments (training); ``aux``
    then returns them (:class:`~mmnorm.functional.running_stats.BatchStats`) for the running
    buffers. The ratios ``ratio_fn(*ratio_inputs)`` are returned in ``aux`` too.
    ``bessel``: with ``in_unbiased``, the input's :func:`~.moments.bessel_factor`.
    """
    dtype = mean.dtype
    if in_unbiased:  # the SN authors' IN variance, with Bessel's correction
        var = var * bessel.to(dtype)
    stats = [(mean, var), pool(mean, var, 1)]                     # IN (N, C), LN (N, 1)
    mean_ratios, var_ratios = ratio_fn(*(r.to(dtype) if r.is_floating_point() else r
                                         for r in ratio_inputs))
    aux = {'mean_ratios': mean_ratios, 'var_ratios': var_ratios}
    if mean_ratios.dim() == 2:  # one row per group of channels: one per channel, (C, K)
        mean_ratios, var_ratios = (ratios_per_channel(r, mean.shape[1])
                                   for r in (mean_ratios, var_ratios))
    mean_ratios, var_ratios = mean_ratios.unbind(-1), var_ratios.unbind(-1)
    if len(mean_ratios) == 3:
        if batch:
            batch_stats = batch_statistics(mean, var, length, process_group)
            bn_mean, bn_var = batch_stats.mean, batch_stats.var
            aux.update(batch_stats.as_aux())
        stats.append((bn_mean.to(dtype), bn_var.to(dtype)))        # BN (C,)
    # Row mean minus the mixed mean: the IN term cancels, the others are small differences.
    deviation = sum(r * (mean - mu) for r, (mu, _) in zip(mean_ratios[1:], stats[1:]))
    if mix == 'var':
        inv_std = torch.rsqrt(sum(r * v for r, (_, v) in zip(var_ratios, stats)) + eps)
    else:
        inv_std = sum(r * torch.sqrt(v + eps) for r, (_, v) in zip(var_ratios, stats)).reciprocal()
    scale = inv_std * weight.to(dtype) if weight is not None else inv_std
    shift = scale * deviation
    if bias is not None:
        shift = shift + bias.to(dtype)
    return scale, shift, aux


@static_shape_checks
def _num_ratios(first: Tensor, channels: int) -> int:
    """The number of normalizers (2 or 3) that ratio parameters ``first`` mix, refusing a
    shape that is neither ``(K,)`` nor ``(G, K)`` with ``G`` dividing ``channels``."""
    num_ratios = int(first.shape[-1]) if first.dim() in (1, 2) else None
    if num_ratios not in (2, 3) or (first.dim() == 2 and first.shape[0] < 1):
        raise ValueError('the ratio parameters must have 3 entries (IN, LN, BN) or 2 (IN, LN), '
                         'one vector (K,) or one row per group of channels (G, K); got shape '
                         f'{tuple(first.shape)}')
    if first.dim() == 2:
        check_ratio_groups(int(channels), int(first.shape[0]))  # (tensors under jit.trace)
    return num_ratios


def mix_normalizers(input: Tensor, ratio_fn: RatioFn, ratio_inputs: Sequence[Tensor],
                    weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                    running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
                    training: bool = True, momentum: float = 0.1, eps: float = 1e-5,
                    mix: str = 'var', in_unbiased: bool = False, process_group=None,
                    ratios: Optional[Tensor] = None) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    r"""Normalize with IN, LN (and BN) statistics mixed by ``ratio_fn(*ratio_inputs)``.

    The computation shared by SN (softmax ratios, :func:`switchable_norm`) and its variants
    (e.g. SparsestMax ratios); the arguments after ``ratio_inputs`` are those of
    :func:`switchable_norm`.

    Args:
        ratio_fn (callable): ``(*ratio_inputs) -> (mean_ratios, var_ratios)``, each
            ``(|Omega|,)`` in the order (IN, LN[, BN]), or ``(G, |Omega|)``: one row for each
            of ``G`` contiguous groups of channels (``C`` divisible by ``G``); a module-level
            function of plain differentiable tensor ops (it runs inside the compiled
            coefficient function).
        ratio_inputs (sequence): its tensors; the first holds one entry per normalizer in its
            last dim, so its size says whether BN is in Omega (3) or not (2), and its rows
            (if 2-d) the number of groups.
        ratios (Tensor, optional): ``ratio_fn(*ratio_inputs)`` already computed, stacked
            ``(2, |Omega|)`` or ``(2, G, |Omega|)``
            (:func:`~mmnorm.functional.switchable.stacked_ratios`), for a caller that knows
            they have not changed since it computed them (PyTorch's version counters do not
            say: fused optimizers and ``.data`` updates leave them, so the layers compute
            their ratios every call). Defaults to None (computed here).

    Returns:
        tuple: the output, and the ``(mean_ratios, var_ratios)`` it used (detached).
    """
    check_norm_input(input)
    check_eps(eps, 'switchable_norm / sparse_switchable_norm')
    training = check_flag(training, 'training')
    in_unbiased = check_flag(in_unbiased, 'in_unbiased')
    channels = input.shape[1]
    check_param_sizes('switchable_norm', weight=(weight, channels, 'one per channel C'),
                      bias=(bias, channels, 'one per channel C'),
                      running_mean=(running_mean, channels, 'one per channel C'),
                      running_var=(running_var, channels, 'one per channel C'))
    check_running_stats('switchable_norm / sparse_switchable_norm', running_mean, running_var,
                        momentum if training else 0.0)
    if mix not in MIX_MODES:
        raise ValueError(f"mix must be one of {MIX_MODES}, got {mix!r}")
    using_bn = _num_ratios(ratio_inputs[0], channels) == 3
    batch = using_bn and (training or running_mean is None)
    bn_mean, bn_var = (running_mean, running_var) if using_bn and not batch else (None, None)
    coefficients = Coefficients(_coefficients, dict(
        ratio_fn=ratio_fn, eps=eps, mix=mix, batch=batch, in_unbiased=bool(in_unbiased)),
        process_group if batch else None)
    tensors = (weight, bias, bn_mean, bn_var, bessel_factor(input) if in_unbiased else None,
               *ratio_inputs)
    form = eager_form(input, coefficients)
    # The light form (mix='var'), compiled or not; the plain form otherwise.
    light = mix == 'var' and not in_unbiased
    light_args = (input, weight, bias, bn_mean, bn_var, *ratio_inputs)
    light_options = dict(ratio_fn=ratio_fn, eps=eps, batch=batch)
    result = None
    if form == 'compiled':
        result = compiled_call('light', _light_form, *light_args, **light_options) if light \
            else compiled_rows(input, coefficients, tensors)
        if result is None:  # it failed now: this call runs what later ones do
            form = eager_form(input, coefficients)
    if light and (result is not None or form == 'light'):
        out, aux = result if result is not None else _light_form(*light_args, **light_options,
                                                                  ratios=ratios)
        if batch and training and running_mean is not None:
            update_running_stats_of(running_mean, running_var, aux['batch_mean'],
                                    aux['batch_var'], input.shape[0] * math.prod(input.shape[2:]),
                                    momentum)
        return out, tuple(aux['ratios'].unbind())
    if result is None:
        result = normalize_rows(input, coefficients, tensors,
                                'public' if form == 'light' else form)
    out, aux = result
    if batch and training and running_mean is not None:
        # (with the authors' IN variance, their update of the running variance: the batch's
        # as they compute it, no second correction)
        update_running_stats(running_mean, running_var, BatchStats.from_aux(aux), momentum,
                             bessel=not in_unbiased)
    return out, (aux['mean_ratios'], aux['var_ratios'])


def _light_form(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                bn_mean: Optional[Tensor], bn_var: Optional[Tensor], *ratio_inputs: Tensor,
                ratio_fn: RatioFn, eps: float, batch: bool, ratios: Optional[Tensor] = None
                ) -> Tuple[Tensor, dict]:
    """:func:`mix_normalizers`'s light form (``mix='var'``): the ratios, then
    :func:`~mmnorm.functional.row_affine.row_affine` with SN's kernel. Returns the output and
    ``aux``: the batch statistics (``batch``) and the stacked ratios (detached). A module-level
    function of tensors and constant options, so that the compiled form compiles it as it is
    (``ratios``, already computed, only in eager calls)."""
    if ratios is None:
        ratios = stacked_ratios(ratio_fn, ratio_inputs)
    # Grouped ratios (2, G, K) reach the kernel as (G, 2, K), a view: the kernel broadcasts
    # each group's row over its channels (no (C, 2, K) copy, nor its gradient's sum).
    tensors = (weight, bias, bn_mean, bn_var,
               ratios if ratios.dim() == 2 else ratios.transpose(0, 1))
    out, aux = row_affine(x, _SwitchableKernel(eps, batch, needs_grad(x, tensors)), tensors)
    return out, {**aux, 'ratios': ratios.detach()}


def switchable_norm(input: Tensor, mean_logits: Tensor, var_logits: Tensor,
                    weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                    running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
                    training: bool = True, momentum: float = 0.1, eps: float = 1e-5,
                    mix: str = 'var', in_unbiased: bool = False, process_group=None) -> Tensor:
    r"""Switchable Normalization over IN, LN (and BN), see the module docstring for the equation.

    Args:
        input (Tensor): ``(N, C, *)``, any number of spatial dims.
        mean_logits (Tensor): ratio logits for the means, ``(3,)`` for (IN, LN, BN) or ``(2,)``
            for (IN, LN) (SN without BN, e.g. one sample per GPU); ``(G, 3)`` or ``(G, 2)`` for
            one ratio vector per group of ``C / G`` contiguous channels (group-wise SN).
        var_logits (Tensor): ratio logits for the variances, same size. Pass the *same* tensor as
            ``mean_logits`` for tied ratios (SN_tied).
        weight (Tensor, optional): per-channel scale :math:`\gamma`, ``(C,)``.
        bias (Tensor, optional): per-channel shift :math:`\beta`, ``(C,)``.
        running_mean (Tensor, optional): ``(C,)`` running BN mean.
        running_var (Tensor, optional): ``(C,)`` running BN (unbiased) variance.
        training (bool): use the batch's BN statistics and, when running buffers are given, update
            them; otherwise the BN branch uses the running buffers. IN and LN are always computed
            per sample. Defaults to True.
        momentum (float | Tensor): PyTorch convention, ``running = (1 - m) * running + m *
            batch``. Defaults to 0.1.
        eps (float): added to the variance(s). Defaults to 1e-5.
        mix (str): ``'var'`` mixes variances then takes one square root (the SN authors'
            formulation); ``'std'`` mixes standard deviations (Eq. (1) literally).
            Defaults to ``'var'``.
        in_unbiased (bool): compute the IN variance with Bessel's correction ÷(H·W−1) before LN
            and BN are pooled from it, as the SN authors' released code does. Only for converted
            checkpoints. Defaults to False.
        process_group (optional): when given, the BN statistics of a training step are those of
            the whole group's batch (synchronized SN, see
            :func:`~mmnorm.functional.running_stats.batch_statistics`). Defaults to None (this
            process's batch).

    Returns:
        Tensor: normalized input, same shape and dtype. Statistics and the affine map are
        computed in float32 for float16/bfloat16 inputs.
    """
    for name, logits in (('mean_logits', mean_logits), ('var_logits', var_logits)):
        if not isinstance(logits, Tensor) or not logits.is_floating_point():
            raise TypeError(f'{name} must be a floating-point tensor, got '
                            f'{getattr(logits, "dtype", type(logits).__name__)}')
    if mean_logits.dim() not in (1, 2) or mean_logits.shape[-1] not in (2, 3) \
            or var_logits.shape != mean_logits.shape:
        raise ValueError('mean_logits and var_logits must both have 3 entries (IN, LN, BN) or '
                         'both 2 (IN, LN) in their last dim, shaped (K,) or (G, K); got shapes '
                         f'{tuple(mean_logits.shape)} and {tuple(var_logits.shape)}')
    logits = (mean_logits, ) if var_logits is mean_logits else (mean_logits, var_logits)
    return mix_normalizers(input, softmax_ratios, logits, weight, bias, running_mean,
                           running_var, training, momentum, eps, mix, in_unbiased,
                           process_group)[0]


class _SwitchableKernel:
    """SN's ``(N, C)`` math for the light eager form (:mod:`.row_affine`), ``mix='var'``.

    Statistics: the means and variances of IN ``(N, C)``, LN ``(N, 1)`` (and BN ``(1, C)``),
    each from one reduction of the input (BN's are the constant ``bn_mean`` / ``bn_var`` in
    eval); ratios ``(2, K)``, or ``(G, 2, K)`` (group-wise ratios: group ``g``'s row for its
    ``C / G`` contiguous channels); mixed ``(mu, s2) = sum_k S_k ratios_k``;
    ``A = w / sqrt(s2 + eps)``, ``B = bias - A mu``.

    Two op structures of the same math. Where launches count, the statistics are broadcast and
    stacked ``(N, C, 2, K)`` so that each step is one op over all normalizers. Where simple
    passes are faster (:func:`~.row_affine.simple_passes`, the CPU), that stack is six times
    the ``(N, C)`` bytes, which at RoI features (N·C = 131k rows) cost more than the passes over
    the input: there eager calls add each normalizer's term at its own shape (LN ``(N, 1)``, BN
    ``(1, C)``), a few more, smaller ops. (``torch.compile`` traces the stacked structure: it
    fuses the stack away, and Dynamo refuses saved statistics that are views of the moments.)
    """

    def __init__(self, eps: float, batch: bool, track: bool = True):
        # track: a gradient will be taken (the state for the backward is wanted)
        self.eps, self.batch, self.track = eps, batch, track

    def forward(self, x: Tensor, rows: Tuple[Tensor, Tensor], weight: Optional[Tensor],
                bias: Optional[Tensor], bn_mean: Optional[Tensor], bn_var: Optional[Tensor],
                ratios: Tensor):
        n, c = x.shape[:2]
        k = ratios.shape[-1]
        batch = k == 3 and self.batch
        (m, v), (m_ln, v_ln), *bn = instance_layer_batch_moments(x, batch=batch, rows=rows)
        aux: dict = {}
        means, variances = [m, m_ln], [v, v_ln]
        if k == 3:
            if batch:
                m_bn, v_bn = bn[0]
                aux = {'batch_mean': m_bn.view(c), 'batch_var': v_bn.view(c)}
            else:
                m_bn, v_bn = bn_mean.to(x.dtype).view(1, c), bn_var.to(x.dtype).view(1, c)
            means.append(m_bn)
            variances.append(v_bn)
        ratios_x = ratios.to(x.dtype)
        if simple_passes(x) and not is_tracing():
            if ratios.dim() == 3:  # the CPU's passes take one row per channel
                ratios_x = _per_channel(ratios_x, c)
            mu, s2 = (_mixed(stats, ratios_x[..., j, :]) for j, stats in
                      enumerate((means, variances)))
            r = torch.rsqrt(s2 + self.eps)
            if k == 3 and not batch and self.track:  # saved: copies, not the buffers themselves
                means[2], variances[2] = means[2].clone(), variances[2].clone()
            # Each normalizer's statistics at its own shape, means then variances.
            stats = tuple(t for pair in zip(means, variances) for t in pair)
            saved_mean = mu
        else:
            flat = torch.stack(torch.broadcast_tensors(*means, *variances), -1)
            # (N, C, 2), or (N, G, C / G, 2) with group-wise ratios
            mixed = _by_group(flat.view(n, c, 2, k), ratios_x, lambda t, r: (t * r).sum(-1),
                              keep=True)
            mu, s2 = mixed.view(n, c, 2).unbind(-1)
            r = torch.rsqrt(s2 + self.eps)
            stats = (flat, )
            saved_mean = mixed  # not a view of it (see below)
        A = r * weight.to(x.dtype) if weight is not None else r
        B = torch.addcmul(bias.to(x.dtype), A, mu, value=-1) if bias is not None \
            else torch.mul(A, mu).neg_()
        # Where torch.compile traces it (the stacked structure), saved as computed, not as views.
        return A, B, (ratios, r, A, weight, saved_mean, *stats), aux

    def backward(self, state, grad_A: Tensor, grad_B: Tensor, needs, length: int):
        ratios, r, A, weight, mu, *stats = state
        k = ratios.shape[-1]
        if len(stats) == 1:  # stacked: the mixed (mean, variance)
            mu = mu.view(A.shape + (2, ))[..., 0]
        grad_a = torch.addcmul(grad_A, grad_B, mu, value=-1)      # dL/dA through B = b - A mu
        t = grad_a * r
        g_weight = t.sum(0) if needs[0] else None
        g_bias = grad_B.sum(0) if needs[1] else None
        # G = (-dL/dmu, -2 dL/ds2): dL/dmu = -A gB; dL/ds2 = -0.5 gA w r^3 = -0.5 t A r.
        bn_shared = k == 3 and self.batch
        if len(stats) > 1:  # the CPU's: each normalizer's statistics at their own shape
            P, Q, grads = _unstacked_backward(
                stats, ratios if ratios.dim() == 2 else _per_channel(ratios, A.shape[1]),
                grad_B * A, t.mul_(r).mul_(A), needs, length, bn_shared, g_weight, g_bias)
            if grads[4] is not None and ratios.dim() == 3:  # each group's channels' sum
                grads = grads[:4] + (grads[4].view(ratios.shape[0], -1, 2, k).sum(1), )
            return P, Q, grads
        flat = stats[0]
        stats = flat.view(flat.shape[:2] + (2, k))
        G = torch.stack([grad_B, t * r], -1).mul_(A.unsqueeze(-1))
        g_ratios = None
        if needs[4]:  # summed over the rows that share a ratio: all, or a group's
            products = G.unsqueeze(-1) * stats
            g_ratios = products.sum((0, 1)) if ratios.dim() == 2 else \
                products.view(products.shape[0], ratios.shape[0], -1, 2, k).sum((0, 2))
            g_ratios[..., 1, :].mul_(0.5)
            g_ratios = g_ratios.neg_().to(ratios.dtype)
        # dL/dS_jk = dL/dmixed_j ratios_jk. A statistic k (mean m_k, variance v_k over L_k
        # values) adds (dL/dm_k + 2 dL/dv_k (x - m_k)) / L_k to dx; with H = G ratios / L,
        # that is H_0k + H_1k (x - m_k) summed over the k and the values that share m_k.
        H = _by_group(G.unsqueeze(-1), ratios.to(G.dtype) * (-1.0 / length),
                      lambda t, r: t * r)
        for k in _single_value_stats(A.shape, length, H.shape[-1]):
            H[..., 1, k] = 0
        shared = [H[..., 0], H[..., 1].mean(1, keepdim=True)]
        if bn_shared:
            shared.append(H[..., 2].mean(0, keepdim=True))
        # (expand, not broadcast_tensors: autograd's vectorized backward has no batching rule
        # for the latter)
        H = torch.stack([t.expand(shared[0].shape) for t in shared], -1)   # (N, C, 2, K')
        H[..., 0, :].addcmul_(H[..., 1, :], stats[..., 0, :H.shape[-1]], value=-1)
        Q, P = H.sum(-1).unbind(-1)
        return P, Q, (g_weight, g_bias, None, None, g_ratios)


def _per_channel(ratios: Tensor, channels: int) -> Tensor:
    """Group-wise ratios ``(G, 2, K)`` as ``(C, 2, K)``, one row per channel (a copy)."""
    return ratios_per_channel(ratios.transpose(0, 1), channels).transpose(0, 1)


def _by_group(t: Tensor, ratios: Tensor, fn, keep: bool = False) -> Tensor:
    """``fn(t, ratios)`` for ``t`` ``(N, C, 2, K)`` (or ``K = 1``) and ratios ``(2, K)``; for
    group-wise ratios ``(G, 2, K)``, ``fn`` of ``t`` seen as ``(N, G, C / G, 2, K)`` and the
    ratios as ``(G, 1, 2, K)``, its result seen again with ``C`` channels (``keep``: as
    ``fn`` returns it)."""
    if ratios.dim() == 2:
        return fn(t, ratios)
    n, c = t.shape[:2]
    g = ratios.shape[0]
    out = fn(t.view(n, g, c // g, *t.shape[2:]), ratios.unsqueeze(1))
    return out if keep else out.reshape(n, c, *out.shape[3:])


def _mixed(stats: Sequence[Tensor], ratios: Tensor) -> Tensor:
    """``sum_k stats[k] * ratios[..., k]`` as a new ``(N, C)`` tensor, each statistic at its
    own shape (``(N, C)`` first, then ``(N, 1)``, ``(1, C)``); ``ratios`` ``(K,)`` or
    ``(C, K)``."""
    mixed = stats[0] * ratios[..., 0]
    for i in range(1, len(stats)):
        mixed = torch.addcmul(mixed, stats[i], ratios[..., i])
    return mixed


def _unstacked_backward(stats, ratios: Tensor, G0: Tensor, G1: Tensor, needs, length: int,
                        bn_shared: bool, g_weight, g_bias):
    """:meth:`_SwitchableKernel.backward` where simple passes are faster: the same sums as the
    stacked form's, each normalizer's term at its own shape. ``G0 = -dL/dmu``, ``G1 =
    -2 dL/ds2``; ``stats`` the means and variances of IN, LN (and BN), interleaved."""
    means, variances = stats[0::2], stats[1::2]
    g_ratios = None
    if needs[4]:  # summed over the rows that share a ratio: all, or the samples
        dims = (0, 1) if ratios.dim() == 2 else 0
        g_ratios = torch.stack([torch.stack([(G * s).sum(dims) for s in group], -1)
                                for G, group in ((G0, means), (G1, variances))], -2)
        g_ratios[..., 1, :].mul_(0.5)
        g_ratios = g_ratios.neg_().to(ratios.dtype)
    c = ratios.to(G0.dtype) * (-1.0 / length)
    # H_jk = G_j c_jk over the values that share statistic k: IN per row, LN the sample's
    # channels, BN (batch statistics only) the channel's samples; Q = sum_k H_0k - H_1k m_k,
    # P = sum_k H_1k.
    P = Q = None
    single = _single_value_stats(G0.shape, length, 3 if bn_shared else 2)
    for k, share in enumerate((lambda h: h, lambda h: h.mean(1, keepdim=True),
                               lambda h: h.mean(0, keepdim=True))[:3 if bn_shared else 2]):
        h0 = share(G0 * c[..., 0, k])
        if k in single:
            Q = h0 if Q is None else Q + h0
            continue
        h1 = share(G1 * c[..., 1, k])
        q = torch.addcmul(h0, h1, means[k], value=-1)
        P = h1 if P is None else P + h1
        Q = q if Q is None else Q + q
    return (G1.new_zeros(()) if P is None else P), Q, (g_weight, g_bias, None, None, g_ratios)


def _single_value_stats(shape: Sequence[int], length: int, k: int) -> Tuple[int, ...]:
    """Which of IN, LN, BN (the first ``k``) are over one value for rows ``shape`` ``(N, C)``
    of ``length`` values: their variance is the constant 0, so its term ``H_1k (x - m_k)``
    adds nothing to ``dx``, exactly. Left out, not computed: its ``H_1k`` grows as the mixed
    variance's ``r^3`` where the variance comes from such a statistic (IN's at ``H x W = 1``),
    and ``P x + Q`` would cancel it against ``-H_1k m_k`` in float32 (1-3% of ``dx``)."""
    counts = (length, shape[1] * length, shape[0] * length)[:k]
    return tuple(i for i, count in enumerate(counts) if count == 1)
