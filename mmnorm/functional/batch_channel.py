# Copyright (c) mmnorm contributors. All rights reserved.
r"""Batch-Channel Normalization (BCN), functional form.

Qiao, Wang, Liu, Shen, Yuille. *Rethinking Normalization and Elimination Singularity in Neural
Networks* (2020), Eq. (13)-(16) and Algorithm 1. Written from the paper.

.. math::
    \dot x_{\cdot c} = \gamma^b_c \frac{x_{\cdot c} - \hat\mu_c}{\hat\sigma_c} + \beta^b_c
    \quad (13), \qquad
    y_{bg} = \gamma^c_g \frac{\dot x_{bg} - \mu_{bg}}{\sigma_{bg}} + \beta^c_g \quad (15),

i.e. ``BCN(x) = GN(BN(x))`` (Eq. 16): a batch normalization with a per-channel affine followed by
a group normalization into ``G`` groups with a **per-group** affine (Eq. 15, as in the paper; GN's
usual affine is per channel). :math:`\hat\sigma_c = \sqrt{\hat\sigma^2_c + \epsilon}`.

Large batch: :math:`\hat\mu, \hat\sigma^2` are the batch statistics (training) or running averages
(eval). Micro batch (``estimate=True``, Algorithm 1): they are *estimates*, initialised to 0 and 1,
updated in training at rate :math:`r` before normalizing, and used as constants (no gradient):

1. :math:`\dot\mu_c = \frac{1}{BHW}\sum x_{bchw}`
2. :math:`\dot\sigma^2_c = \frac{1}{BHW}\sum (x_{bchw} - \hat\mu_c)^2` (about the previous estimate)
3. :math:`\hat\mu_c \leftarrow \hat\mu_c + r(\dot\mu_c - \hat\mu_c)`
4. :math:`\hat\sigma^2_c \leftarrow \hat\sigma^2_c + r(\dot\sigma^2_c - \hat\sigma^2_c)`

The paper sets :math:`r` to the learning rate (:class:`mmnorm.engine.EstimateRateHook` does so).

Because the BN step is a per-channel affine map, the group statistics of :math:`\dot x` follow from
the per-(n, c) moments of :math:`x`, and the whole layer is one per-(n, c) affine map of the
centered input (:mod:`.moments`): with :math:`\alpha_c = \gamma^b_c / \hat\sigma_c` and
:math:`d_{nc} = \alpha_c (m_{nc} - \hat\mu_c) + \beta^b_c` (:math:`\dot x` at the row mean),
:math:`a = k_{ng}\alpha_c` and :math:`b = k_{ng}(d_{nc} - \mu_{ng}) + \beta^c_g`, where
:math:`k_{ng} = \gamma^c_g / \sigma_{ng}`.
"""
import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .arguments import check_flag, check_positive_int
from .moments import (LOW_PRECISION, Coefficients, compiled_call, compiled_rows,
                      differentiable_grads, eager_channel_moments, eager_form, is_tracing,
                      needs_grad, normalize_rows, pool, stat_dtype, static_shape_checks)
from .row_affine import row_affine, simple_passes, stat_moments
from .running_stats import BatchStats, batch_statistics, update_running_stats
from .switchable import (check_eps, check_norm_input, check_param_sizes, check_running_stats,
                         check_unit_interval)

__all__ = ['batch_channel_norm', 'batch_norm_step', 'check_num_groups', 'check_rate',
           'update_estimates']


@static_shape_checks
def check_num_groups(num_channels: int, num_groups: int) -> int:
    """Raise a clear error unless ``num_groups`` is a positive divisor of ``num_channels``;
    returns it as an int."""
    num_groups = check_positive_int(num_groups, 'num_groups')
    if num_channels % num_groups:
        raise ValueError(f'num_groups={num_groups} does not divide the number of channels '
                         f'{num_channels}; choose a divisor of {num_channels}')
    return num_groups


def batch_norm_step(mean: Tensor, var: Tensor, bn_mean: Tensor, bn_var: Tensor,
                    bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], eps: float
                    ) -> Tuple[Tensor, Tensor, Tensor]:
    """Eq. (13) as the per-channel affine map ``x_dot = alpha * (x - bn_mean) + bn_bias``,
    applied to moments: returns ``(alpha (C,), mean of x_dot, variance of x_dot)`` for moments
    ``mean``, ``var`` of ``x`` (any shape ending in ``C``), in their dtype. The statistics the
    group normalization of Eq. (15) sees."""
    dtype = mean.dtype
    alpha = torch.rsqrt(bn_var.to(dtype) + eps)
    if bn_weight is not None:
        alpha = alpha * bn_weight.to(dtype)
    dot_mean = alpha * (mean - bn_mean.to(dtype))
    if bn_bias is not None:
        dot_mean = dot_mean + bn_bias.to(dtype)
    return alpha, dot_mean, alpha.square() * var


def _coefficients(mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                  bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                  bn_mean: Optional[Tensor], bn_var: Optional[Tensor], *, num_groups: int,
                  eps: float, batch: bool, process_group, length: int
                  ) -> Tuple[Tensor, Tensor, dict]:
    """BCN's coefficient function (see :class:`~mmnorm.functional.moments.CoefficientFn`).

    ``bn_mean``/``bn_var``: constant BN statistics (eval, or the estimates of Algorithm 1), or
    ``None`` with ``batch=True`` to pool them from the moments; ``aux`` then returns them
    (:class:`~mmnorm.functional.running_stats.BatchStats`) for the running buffers.
    """
    n, c = mean.shape
    g = num_groups
    d = c // g  # explicit sizes: N may be 0
    dtype = mean.dtype
    aux: dict = {}
    if batch:
        batch_stats = batch_statistics(mean, var, length, process_group)
        bn_mean, bn_var = batch_stats.mean, batch_stats.var
        aux = batch_stats.as_aux()
    alpha, dot_mean, dot_var = batch_norm_step(mean, var, bn_mean, bn_var, bn_weight, bn_bias,
                                               eps)
    dot_mean = dot_mean.view(n, g, d)
    # Eq. (15): group statistics of x_dot from its per-(n, c) moments.
    group_mean, group_var = pool(dot_mean, dot_var.view(n, g, d), 2)
    k = torch.rsqrt(group_var + eps)                                       # (N, G, 1)
    if weight is not None:
        k = k * weight.to(dtype).view(1, g, 1)
    scale = k * alpha.view(1, g, d)
    shift = k * (dot_mean - group_mean)
    if bias is not None:
        shift = shift + bias.to(dtype).view(1, g, 1)
    return scale.reshape(n, c), shift.reshape(n, c), aux


@torch.no_grad()
def update_estimates(estimate_mean: Tensor, estimate_var: Tensor, mean: Tensor, var: Tensor,
                     rate: Union[float, Tensor]) -> Tuple[Tensor, Tensor]:
    """Algorithm 1, steps 1-4, from per-(n, c) moments ``(N, C)``; updates the estimates in place
    and returns their new values. An empty batch changes nothing."""
    if mean.shape[0] == 0:
        return estimate_mean.clone(), estimate_var.clone()
    if isinstance(rate, Tensor):
        rate = rate.to(mean.dtype)
    old_mean = estimate_mean.to(mean.dtype)
    batch_mean = pool(mean, var, 0)[0][0]                                      # step 1
    batch_var = (var + (mean - old_mean).square()).mean(0)                     # step 2
    new_mean = old_mean.lerp(batch_mean, rate)                                 # step 3
    new_var = estimate_var.to(mean.dtype).lerp(batch_var, rate)                # step 4
    estimate_mean.copy_(new_mean)
    estimate_var.copy_(new_var)
    return new_mean, new_var


@torch.compiler.disable
def _move_estimates(estimate_mean: Tensor, estimate_var: Tensor, x: Tensor,
                    rate: Union[float, Tensor]) -> Tuple[Tensor, Tensor]:
    """Algorithm 1's update, always run eagerly: returns the moved estimates as new tensors
    (the buffers are updated in place too).

    Under ``torch.compile`` this is a graph break on purpose. Inside one graph, the min-cut
    partitioner of torch <= 2.13 may recompute the moved estimates in the backward from the
    buffers, which the forward has already overwritten, and return wrong gradients (an open
    PyTorch issue: pytorch/pytorch#197039). Given to the graph as inputs, they are values nothing
    mutates.
    """
    check_rate(rate)
    if x.numel() == 0:  # no values (no samples, or empty maps): the estimates stay
        return estimate_mean.clone(), estimate_var.clone()
    with torch.no_grad():
        return update_estimates(estimate_mean, estimate_var, *eager_channel_moments(x), rate)


def _native_serves(x: Tensor, batch: bool, momentum, running_mean: Optional[Tensor],
                   bn_mean: Optional[Tensor], params) -> bool:
    """Whether the light form (:func:`_bn_then_gn`) computes this call: batch statistics of
    more than one value per channel (``F.batch_norm`` refuses one), a Python momentum, and
    buffers and parameters in the dtype the statistics are computed in."""
    dtype = stat_dtype(x.dtype)
    if batch and (x.shape[0] * math.prod(x.shape[2:]) <= 1 or isinstance(momentum, Tensor)):
        return False
    tensors = [t for t in (*params, running_mean, bn_mean) if t is not None]
    return all(t.dtype == dtype for t in tensors)


def _group_norm_serves(x: Tensor, num_groups: int) -> bool:
    """Whether ``F.group_norm`` takes ``x``: it refuses groups of one value (``N = 1``, one
    channel per group, ``H·W = 1``: "Expected more than 1 value per channel"), which the plain
    form maps to the group's shift."""
    return (x.shape[1] // num_groups) * math.prod(x.shape[2:]) > 1


def _compiles_to_norms(x: Tensor) -> bool:
    """Whether a compiled BCN (``torch.compile`` of a model, and mmnorm's compiled form) is
    ATen's batch then group normalization (:func:`_bn_then_gn`) rather than the plain form:
    where kernel launches count (28 Inductor kernels per training step of (8, 64, 28, 28)
    against 44 and 59 for the plain form under the two routes). Where simple passes are faster
    (:func:`~.row_affine.simple_passes`, the CPU) the plain form: Inductor's CPU code for the
    two normalizations' backward took 1.5-2.5x the plain form's time per training step."""
    return not simple_passes(x)


def _bn_then_gn(x: Tensor, num_groups: int, eps: float, tensors, batch: bool,
                running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
                momentum: float = 0.0) -> Tensor:
    """``GN(BN(x))`` by ATen's batch and group normalization kernels (statistics in float32 or
    wider), the per-group affine of Eq. (15) given to the group normalization per channel.

    ``tensors``: ``(weight, bias, bn_weight, bn_bias, bn_mean, bn_var)``. ``batch``: BN
    statistics of this batch (``running_mean`` / ``running_var`` updated in place when given);
    else ``bn_mean`` / ``bn_var`` are the statistics (constants).
    """
    weight, bias, bn_weight, bn_bias, bn_mean, bn_var = tensors
    wide = x.float() if x.dtype in LOW_PRECISION else x
    channels = x.shape[1]
    per_channel = [None if t is None else
                   t.unsqueeze(1).expand(num_groups, channels // num_groups).reshape(channels)
                   for t in (weight, bias)]
    if batch:
        bn_mean, bn_var = running_mean, running_var
    dot = F.batch_norm(wide, bn_mean, bn_var, bn_weight, bn_bias, batch, momentum, eps)
    return F.group_norm(dot, num_groups, *per_channel, eps).to(x.dtype)


def _batch_channel_light(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                         bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                         bn_mean: Optional[Tensor], bn_var: Optional[Tensor], *,
                         num_groups: int, eps: float, batch: bool
                         ) -> Tuple[Tensor, Optional[list]]:
    """:func:`_bn_then_gn` without side effects, for mmnorm's compiled form
    (:func:`~mmnorm.functional.moments.compiled_call`). With ``batch``, also returns the batch's
    ``[mean, unbiased variance]`` (from buffers made in the graph, which ``F.batch_norm`` fills
    at momentum 1) for the caller to move the running buffers with.

    The running buffers and the momentum stay out of the graph: the compiled form may run a new
    graph twice (its backward probe) or give it up after a first run, and a training step and
    its recomputation under activation checkpointing (which passes no buffers) must run one
    graph, saving the same tensors; a momentum schedule would compile a graph per value."""
    stats = None
    if batch:
        channels, dtype = x.shape[1], stat_dtype(x.dtype)
        stats = [torch.zeros(channels, dtype=dtype, device=x.device),
                 torch.ones(channels, dtype=dtype, device=x.device)]
    out = _bn_then_gn(x, num_groups, eps, (weight, bias, bn_weight, bn_bias, bn_mean, bn_var),
                      batch, *(stats or (None, None)), 1.0)
    return out, stats


class _BatchThenGroupNorm(torch.autograd.Function):
    """BCN's light training form where launches count (on the CPU a training step with batch
    statistics is :func:`~.row_affine.row_affine`'s per-row map instead):
    :func:`_bn_then_gn` run without a graph, and again in the backward to differentiate it.
    Only the input is saved, as for the other layers (the batch-normalized activation the
    group normalization's backward needs would double the layer's saved memory); the second
    run costs one forward of two fused kernels."""

    @staticmethod
    def forward(ctx, x: Tensor, spec: tuple, running_mean: Optional[Tensor],
                running_var: Optional[Tensor], *tensors: Optional[Tensor]) -> Tensor:
        num_groups, eps, batch, momentum = spec
        ctx.spec = spec
        ctx.save_for_backward(x, *tensors)
        return _bn_then_gn(x, num_groups, eps, tensors, batch, running_mean, running_var,
                           momentum)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        num_groups, eps, batch, _ = ctx.spec
        x, *tensors = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[4:])
        if torch.is_grad_enabled():  # create_graph=True: a gradient that is differentiable
            grads = differentiable_grads(
                lambda *inputs: _bn_then_gn(inputs[0], num_groups, eps, inputs[1:], batch),
                (x, *tensors), needs, grad_out)
            return (grads[0], None, None, None, *grads[1:])
        with torch.enable_grad():
            leaves = [None if t is None else t.detach().requires_grad_(need)
                      for t, need in zip((x, *tensors), needs)]
            # The batch statistics come out the same; the running buffers are not passed again.
            out = _bn_then_gn(leaves[0], num_groups, eps, leaves[1:], batch)
            wanted = [t for t in leaves if t is not None and t.requires_grad]
            found = iter(torch.autograd.grad(out, wanted, grad_out))
        grads = [next(found) if t is not None and t.requires_grad else None for t in leaves]
        return (grads[0], None, None, None, *grads[1:])


@torch.no_grad()
def _move_estimates_light(estimate_mean: Tensor, estimate_var: Tensor, x: Tensor,
                          rate: Union[float, Tensor]) -> Tuple[Tensor, Tensor]:
    """Algorithm 1's update from the batch's per-channel moments (one reduction where launches
    count): the mean of ``(x - old mean)^2`` is ``var + (mean - old mean)^2``. Returns the
    moved estimates as new tensors (what normalizes: nothing mutates them before backward) and
    updates the buffers in place."""
    check_rate(rate)
    if x.numel() == 0:  # (as _move_estimates)
        return estimate_mean.clone(), estimate_var.clone()
    wide = x.float() if x.dtype in LOW_PRECISION else x
    if isinstance(rate, Tensor):
        rate = rate.to(wide.dtype)
    dims = (0, ) + tuple(range(2, x.dim()))
    mean, var = (t.view(-1) for t in stat_moments(wide, dims))
    old_mean = estimate_mean.to(wide.dtype)
    deviation = mean - old_mean
    new_mean = old_mean.lerp(mean, rate)
    new_var = estimate_var.to(wide.dtype).lerp(torch.addcmul(var, deviation, deviation), rate)
    estimate_mean.copy_(new_mean)
    estimate_var.copy_(new_var)
    return new_mean, new_var


class _BatchChannelKernel:
    r"""BCN's ``(N, C)`` math for the CPU's per-row affine map (:func:`~.row_affine.row_affine`),
    with its vector-Jacobian product written out (autograd over the same few dozen ``(N, C)``
    ops costs more than the passes over the input at small maps and at RoI features).

    Forward, as :func:`_coefficients` (module docstring): BN statistics :math:`\mu_c,
    \sigma^2_c` (the batch's, pooled from the per-row moments, or constants),
    :math:`\rho = (\sigma^2 + \epsilon)^{-1/2}`, :math:`\alpha = \gamma^b\rho`,
    :math:`d = \alpha(m - \mu) + \beta^b`, :math:`e = \alpha^2 v`; group statistics
    :math:`M, V` of :math:`(d, e)` (:func:`~.moments.pool`), :math:`r = (V + \epsilon)^{-1/2}`,
    :math:`k = \gamma^c r`; ``A = k alpha``, ``B = k (d - M) + beta^c`` (a centered shift).

    Backward, from :math:`g_A, g_B`: :math:`g_k = \sum_{c \in g} g_A\alpha + g_B(d - M)`,
    :math:`g_V = -\tfrac12 g_k \gamma^c r^3`; :math:`g_d = k g_B + 2 g_V (d - M)/D - k
    \sum_{c\in g} g_B / D` and :math:`g_e = g_V / D` (``D`` channels per group);
    :math:`g_\alpha = \sum_n k g_A + 2 g_e \alpha v + g_d (m - \mu)`, :math:`g_m = \alpha
    g_d`, :math:`g_v = \alpha^2 g_e`, :math:`g_\mu = -\sum_n g_m`, :math:`g_{\sigma^2} =
    -\tfrac12 g_\alpha \gamma^b \rho^3`; the batch's statistics pass theirs on to every row,
    :math:`g_m \mathrel{+}= (g_\mu + 2 g_{\sigma^2}(m - \mu))/N`, :math:`g_v
    \mathrel{+}= g_{\sigma^2}/N`. ``P = 2 g_v / L``, ``Q = g_m / L - P m``. The tests hold it
    to the plain form (autograd) to 1e-10 in float64.
    """

    centered_shift = True

    def __init__(self, num_groups: int, eps: float, batch: bool, track: bool = True):
        self.num_groups, self.eps, self.batch, self.track = num_groups, eps, batch, track

    def forward(self, x: Tensor, rows: Tuple[Tensor, Tensor], weight: Optional[Tensor],
                bias: Optional[Tensor], bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                bn_mean: Optional[Tensor], bn_var: Optional[Tensor]):
        m, v = rows
        n, c = m.shape
        g = self.num_groups
        dtype = m.dtype
        aux: dict = {}
        if self.batch:
            batch_stats = batch_statistics(m, v, math.prod(x.shape[2:]))
            mu, var = batch_stats.mean, batch_stats.var
            aux = batch_stats.as_aux()
        else:
            mu, var = bn_mean.to(dtype), bn_var.to(dtype)
        rho = torch.rsqrt(var + self.eps)
        alpha = rho * bn_weight.to(dtype) if bn_weight is not None else rho
        centered = m - mu
        dot = alpha * centered
        if bn_bias is not None:
            dot = dot + bn_bias.to(dtype)
        dot = dot.view(n, g, c // g)
        e = (alpha.square() * v).view(n, g, c // g)
        group_mean, group_var = pool(dot, e, 2)
        r = torch.rsqrt(group_var + self.eps)                              # (N, G, 1)
        k = r * weight.to(dtype).view(1, g, 1) if weight is not None else r
        deviation = dot - group_mean
        A = (k * alpha.view(1, g, -1)).view(n, c)
        B = k * deviation
        if bias is not None:
            B = B + bias.to(dtype).view(1, g, 1)
        state = (m, v, centered, alpha, rho, deviation, r, k, weight, bn_weight) \
            if self.track else None
        return A, B.view(n, c), state, aux

    def backward(self, state, grad_A: Tensor, grad_B: Tensor, needs: Sequence[bool],
                 length: int):
        m, v, centered, alpha, rho, deviation, r, k, weight, bn_weight = state
        n, c = grad_A.shape
        g = self.num_groups
        d = c // g
        ga, gb = grad_A.view(n, g, d), grad_B.view(n, g, d)
        alpha3 = alpha.view(1, g, d)
        gk = (ga * alpha3 + gb * deviation).sum(2, keepdim=True)          # (N, G, 1)
        g_weight = (gk * r).sum((0, 2)) if needs[0] and weight is not None else None
        g_bias = gb.sum((0, 2)) if needs[1] else None
        gr = gk * weight.to(r.dtype).view(1, g, 1) if weight is not None else gk
        gV = gr * r.pow(3) * -0.5                                          # (N, G, 1)
        gd = (k * gb).add_(gV * (2.0 / d) * deviation) \
            .sub_(k * gb.sum(2, keepdim=True) / d).view(n, c)
        ge = (gV / d).expand(n, g, d).reshape(n, c)
        g_alpha = (ga * k).view(n, c).addcmul_(ge * 2 * alpha, v).addcmul_(gd, centered).sum(0)
        g_bn_bias = gd.sum(0) if needs[3] else None
        gm = gd * alpha
        gv = ge * alpha.square()
        g_bn_weight = g_alpha * rho if needs[2] and bn_weight is not None else None
        g_rho = g_alpha * bn_weight.to(rho.dtype) if bn_weight is not None else g_alpha
        g_var = g_rho * rho.pow(3) * -0.5                                  # (C,)
        g_mu = -gm.sum(0)
        if self.batch:  # the batch's statistics, pooled from every row's moments
            gm = gm + (g_mu + 2 * g_var * centered) / n
            gv = gv + g_var / n
        P = gv * (2.0 / length)
        Q = torch.addcmul(gm / length, P, m, value=-1)
        return P, Q, (g_weight, g_bias, g_bn_weight, g_bn_bias,
                      g_mu if needs[4] and not self.batch else None,
                      g_var if needs[5] and not self.batch else None)


class _EstimatingKernel(_BatchChannelKernel):
    """Algorithm 1 in the CPU's per-row affine map (:func:`~.row_affine.row_affine`): the
    estimates (the last two tensors) move from the per-row moments the map computes anyway
    (:func:`update_estimates`: no pass over the input of its own), then normalize as
    constants."""

    def __init__(self, num_groups: int, eps: float, track: bool, rate: Union[float, Tensor]):
        check_rate(rate)
        super().__init__(num_groups, eps, False, track)
        self.rate = rate

    def forward(self, x: Tensor, rows: Tuple[Tensor, Tensor], *tensors: Optional[Tensor]):
        *params, estimate_mean, estimate_var = tensors
        self.moved = update_estimates(estimate_mean, estimate_var, *rows, self.rate)
        return super().forward(x, rows, *params, *self.moved)

    def recompute(self, x: Tensor, rows: Tuple[Tensor, Tensor], *tensors: Optional[Tensor]):
        """The forward again, for a double backward: the estimates as the forward moved them
        (constants), not moved a second time."""
        return super().forward(x, rows, *tensors[:-2], *self.moved)


def check_rate(rate: Union[float, Tensor], name: str = 'rate') -> None:
    """Refuse an estimate update rate outside [0, 1]: beyond 1 the estimates overshoot the
    batch statistics and the variance can turn negative (NaN outputs); below 0 they move away.

    Python numbers are always checked; a tensor rate when it lives on the CPU (reading an
    accelerator's value would synchronize every step: layers and hooks check where they set it).
    """
    check_unit_interval(rate, name, 'BCN Algorithm 1 sets it to the learning rate')


def batch_channel_norm(input: Tensor, num_groups: int, weight: Optional[Tensor] = None,
                       bias: Optional[Tensor] = None, bn_weight: Optional[Tensor] = None,
                       bn_bias: Optional[Tensor] = None, running_mean: Optional[Tensor] = None,
                       running_var: Optional[Tensor] = None, training: bool = True,
                       momentum: Union[float, Tensor] = 0.1, eps: float = 1e-5,
                       estimate: bool = False, rate: Union[float, Tensor] = 0.0,
                       process_group=None) -> Tensor:
    r"""Batch-Channel Normalization, see the module docstring for the equations.

    Args:
        input (Tensor): ``(N, C, *)``, any number of spatial dims.
        num_groups (int): number of channel groups ``G`` of the channel normalization.
        weight (Tensor, optional): per-group scale :math:`\gamma^c`, ``(G,)``.
        bias (Tensor, optional): per-group shift :math:`\beta^c`, ``(G,)``.
        bn_weight (Tensor, optional): per-channel scale :math:`\gamma^b`, ``(C,)``.
        bn_bias (Tensor, optional): per-channel shift :math:`\beta^b`, ``(C,)``.
        running_mean (Tensor, optional): ``(C,)`` running mean, or the estimate
            :math:`\hat\mu` when ``estimate=True``.
        running_var (Tensor, optional): ``(C,)`` running (unbiased) variance, or the estimate
            :math:`\hat\sigma^2` when ``estimate=True``.
        training (bool): training mode. Large batch: use and (if given) update batch
            statistics. Estimated: update the estimates (Algorithm 1) before normalizing with
            them; ``False`` normalizes with the estimates as they are. Defaults to True.
        momentum (float | Tensor): PyTorch-convention momentum of the running buffers (large
            batch only). Defaults to 0.1.
        eps (float): added to both variances. Defaults to 1e-5.
        estimate (bool): micro-batch form (Algorithm 1); requires the running buffers.
            Defaults to False.
        rate (float | Tensor): update rate :math:`r` of the estimates, in [0, 1] (a 0-dim
            tensor avoids a host-device sync). Defaults to 0.
        process_group (optional): large-batch training only: BN statistics of the whole group's
            batch (synchronized BCN). Defaults to None (this process's batch).

    Returns:
        Tensor: normalized input, same shape and dtype.
    """
    check_norm_input(input)
    check_eps(eps, 'batch_channel_norm')
    num_groups = check_num_groups(input.shape[1], num_groups)
    training, estimate = check_flag(training, 'training'), check_flag(estimate, 'estimate')
    channels, per_channel, per_group = input.shape[1], 'one per channel C', 'one per group G'
    check_param_sizes('batch_channel_norm', weight=(weight, num_groups, per_group),
                      bias=(bias, num_groups, per_group),
                      bn_weight=(bn_weight, channels, per_channel),
                      bn_bias=(bn_bias, channels, per_channel),
                      running_mean=(running_mean, channels, per_channel),
                      running_var=(running_var, channels, per_channel))
    check_running_stats('batch_channel_norm', running_mean, running_var,
                        momentum if training and not estimate else 0.0)
    if estimate and running_mean is None:
        raise ValueError('estimate=True needs the running_mean/running_var estimate buffers')
    batch = not estimate and (training or running_mean is None)
    bn_mean, bn_var = (None, None) if batch else (running_mean, running_var)
    coefficients = Coefficients(_coefficients, dict(num_groups=num_groups, eps=eps, batch=batch),
                                process_group if batch else None)
    tensors = (weight, bias, bn_weight, bn_bias, bn_mean, bn_var)
    form = eager_form(input, coefficients)
    if form == 'light' and is_tracing() and not _compiles_to_norms(input):
        form = 'traced'

    def light_serves() -> bool:
        return form == 'light' and _native_serves(
            input, batch, momentum, running_mean, running_mean if estimate else bn_mean,
            tensors[:4])

    # The CPU, batch statistics or estimates: one per-row affine map in the SN family's passes
    # (ATen's CPU batch normalization, and the backward's second run of both norms, cost 2-3x
    # that), with or without a gradient (a reentrant checkpoint's first run has none): the same
    # numbers either way. Estimated BCN takes it in training, its estimates moved from the
    # per-row moments, and wherever a gradient may be taken (a checkpoint's recomputation of a
    # training step passes training=False); an eval forward without autograd keeps ATen's norms
    # (fewer passes than the map's moments when nothing is differentiated).
    one_map = (form == 'light' and simple_passes(input) and not is_tracing() and light_serves()
               and (batch or estimate and (training or torch.is_grad_enabled())))
    if estimate and training and not one_map:
        # Algorithm 1 updates the estimates first and normalizes with the new values, which are
        # constants for autograd.
        # (_move_estimates leaves a compiled graph on purpose; see its docstring.)
        move = _move_estimates_light if light_serves() and not is_tracing() else _move_estimates
        bn_mean, bn_var = move(running_mean, running_var, input, rate)
        tensors = tensors[:4] + (bn_mean, bn_var)
    result = None
    if form == 'compiled':
        # GN(BN(x)) as ATen's two normalizations where they serve, as torch.compile of a model
        # traces it; else the plain form.
        if _compiles_to_norms(input) and _group_norm_serves(input, num_groups) and \
                _native_serves(input, batch, momentum, running_mean,
                               running_mean if estimate else bn_mean, tensors[:4]):
            compiled = compiled_call('batch_channel_light', _batch_channel_light, input,
                                     *tensors, num_groups=num_groups, eps=eps, batch=batch)
            if compiled is not None:
                out, stats = compiled
                if batch and training and running_mean is not None:
                    with torch.no_grad():
                        running_mean.lerp_(stats[0], momentum)
                        running_var.lerp_(stats[1], momentum)
                return out
        else:
            result = compiled_rows(input, coefficients, tensors)
        if result is None:  # it failed now: this call runs what later ones do
            form = eager_form(input, coefficients)
    if result is None and light_serves() and (one_map or _group_norm_serves(input, num_groups)):
        track = needs_grad(input, tensors)
        if one_map:
            kernel = (_EstimatingKernel(num_groups, eps, track, rate)
                      if estimate and training
                      else _BatchChannelKernel(num_groups, eps, batch, track))
            result = row_affine(input, kernel, tensors)
        else:
            update = batch and training and running_mean is not None
            running = (running_mean, running_var) if update else (None, None)
            # Under torch.compile autograd differentiates F.batch_norm and F.group_norm
            # itself: the Function's backward calls torch.autograd.grad, which Dynamo does
            # not trace.
            if track and not is_tracing():
                return _BatchThenGroupNorm.apply(input, (num_groups, eps, batch, momentum),
                                                 *running, *tensors)
            return _bn_then_gn(input, num_groups, eps, tensors, batch, *running, momentum)
    if result is None:
        result = normalize_rows(input, coefficients, tensors,
                                'public' if form == 'light' else form)
    out, aux = result
    if batch and training and running_mean is not None:
        update_running_stats(running_mean, running_var, BatchStats.from_aux(aux), momentum)
    return out
