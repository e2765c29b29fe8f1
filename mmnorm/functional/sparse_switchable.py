# Copyright (c) mmnorm contributors. All rights reserved.
r"""Sparse Switchable Normalization (SSN), functional form: SN whose ratios come from SparsestMax.

Shao, Meng, Li, Zhang, Li, Wang, Luo. *SSN: Learning Sparse Switchable Normalization via
SparsestMax* (CVPR 2019). Written from the paper and from reading the authors' released
``sparsestmax`` (switchablenorms/Sparse_SwitchNorm, ``utils/ssn_utils.py`` at HEAD; an older
``regulated_sparsemax`` in its history differs, and is not followed); none of their code is used.

SSN is SN (:func:`~mmnorm.functional.mix_normalizers`) with ratios
:math:`\lambda = \mathrm{SparsestMax}(z; r)` of ratio parameters :math:`z \in \mathbb{R}^{|\Omega|}`
(not logits) and a radius :math:`r \in [0, 1]` that grows from 0 to 1 over training:

1. :math:`p = \mathrm{sparsemax}(z)`, the Euclidean projection of :math:`z` onto the probability
   simplex :math:`\Delta` (Martins & Astudillo, 2016). If :math:`p` is one-hot, it is the result.
2. Let :math:`u` be the centre of the face of :math:`\Delta` that :math:`p` lies on (uniform over
   the support of :math:`p`). If :math:`\|p - u\| \ge r`, :math:`p` is the result.
3. Otherwise :math:`p` is pushed out to the sphere of radius :math:`r` around :math:`u`,
   :math:`p' = u + r\,(p - u)/\|p - u\|`. If :math:`p' \ge 0`, :math:`p'` is the result.
4. Otherwise :math:`p'` left the simplex: project it again (step 1 with :math:`z = p'`), onto a
   face of smaller support with centre :math:`u'`, on which the sphere leaves one of radius
   :math:`\sqrt{r^2 - \|u' - u\|^2}` around :math:`u'` (:math:`u'` is the projection of
   :math:`u` onto that face), and repeat.

At :math:`r = 0` SparsestMax is sparsemax; for :math:`r` beyond the distance from the simplex's
centre to a vertex (:math:`\sqrt{2/3}` for three normalizers, :math:`\sqrt{1/2}` for two) every
result is one-hot, so :math:`r = 1` makes each layer one plain normalizer. The authors' layer
hard-codes :math:`|\Omega| = 3`; the algorithm above is the paper's for any :math:`|\Omega|`, and
mmnorm uses it for :math:`\Omega = \{IN, LN\}` too (SSN without BN).

Each step strictly shrinks the support, so :math:`|\Omega|` rounds always suffice: they are
unrolled with ``torch.where`` (no data-dependent Python control flow, so the ratios trace, export
and compile), and a round that is not taken gets no gradient. Two cases the authors' code leaves
undefined are defined here: a support of one entry is exactly one-hot (their floating-point test
``max - min == 1`` can miss it and push a rounding error out to the sphere), and a point at the
centre up to rounding (:math:`p = u`, no direction to push; their code divides by zero, or pushes
along the rounding error) stays where it is.

**Frozen ratios.** As in the authors' layer, a ratio vector that becomes one-hot in training is
"fixed": from that step on it is the one-hot vector, without gradient. The choice is kept in the
buffers ``mean_choice`` / ``var_choice`` (the index of the chosen normalizer, ``-1`` while free)
and is saved with the weights.
"""
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .arguments import check_flag
from .moments import LOW_PRECISION, is_tracing, stat_dtype, static_shape_checks
from .sparsestmax_fast import FAST_DTYPES, elementwise_sparsestmax, fast_sparsestmax
from .sparsestmax_kernel import fix_choices_, kernel_sparsestmax
from .switchable import check_norm_input, check_unit_interval, mix_normalizers

__all__ = ['sparsemax', 'sparsestmax', 'sparsest_ratios', 'sparse_switchable_norm',
           'update_choices', 'update_choice_pair', 'fixed_choices', 'check_radius',
           'check_choices']


def sparsemax(scores: Tensor) -> Tensor:
    """Euclidean projection of ``scores`` onto the probability simplex, along the last dim
    (Martins & Astudillo, 2016): ``max(scores - tau, 0)`` with ``tau`` such that the result sums
    to 1. A support of one entry is returned exactly one-hot. Differentiable.

    The support is found by pairwise comparisons instead of a sort: entry ``i`` is in it iff
    ``1 + r_i z_i > s_i``, with ``r_i`` the number and ``s_i`` the sum of the entries ``>= z_i``
    (the sorted algorithm's test at ``z_i``'s rank; tied entries share it). For the few ratios of
    a normalizer that is a handful of elementwise ops, which an exporter folds into constants
    where the scores are (an exported graph with a sort per layer made ONNX's optimizer take
    minutes for a ResNet-50).

    The scores are shifted so that the largest is 0, and the largest entries are always in the
    support (``tau`` is below them): unshifted, ``1 + z`` is ``z`` for a top score past
    ``2^24`` in float32 (256 in bfloat16), which left the support empty and the result
    infinite. Float16 and bfloat16 scores are projected in float32 and the result rounded once
    (in their own precision the rounding of ``tau`` moved results by up to 0.67).
    """
    if scores.dtype in LOW_PRECISION:
        return sparsemax(scores.float()).to(scores.dtype)
    # Shifted so that the top is 0 (the projection is shift-invariant): the tests and tau then
    # round with the scores' spread, not their size ([3e8, 3e8, 0] in float32 gave zeros).
    scores = scores - scores.amax(-1, keepdim=True)
    winner = scores == 0
    at_least = (scores.unsqueeze(-2) >= scores.unsqueeze(-1)).to(scores.dtype)  # [.., i, j]
    rank = at_least.sum(-1)
    in_support = (1 + rank * scores > (at_least * scores.unsqueeze(-2)).sum(-1)) | winner
    support = in_support.sum(-1, keepdim=True)
    tau = ((scores * in_support).sum(-1, keepdim=True) - 1) / support.to(scores.dtype)
    projected = torch.clamp(scores - tau, min=0)
    return torch.where(support == 1, winner.to(scores.dtype), projected)


@static_shape_checks
def _checked_radius(scores: Tensor, radius) -> Tensor:
    """:func:`sparsestmax`'s arguments checked; the radius as a tensor of ``scores``' dtype and
    device."""
    if not isinstance(scores, Tensor) or scores.dim() == 0 or scores.shape[-1] == 0:
        raise ValueError('sparsestmax: scores must be a tensor shaped (..., K) with K >= 1, got '
                         f'{getattr(scores, "shape", scores)!r}')
    if not scores.is_floating_point():
        raise TypeError(f'sparsestmax: scores must be floating point, got {scores.dtype}')
    if not isinstance(radius, Tensor):
        check_radius(radius)  # (a tensor's value is checked where it is set)
    radius = radius.to(scores) if isinstance(radius, Tensor) else torch.as_tensor(
        radius, dtype=scores.dtype, device=scores.device)
    if radius.dim() and radius.shape[-1] != 1:
        raise ValueError('sparsestmax: radius must be a number or broadcastable to (..., 1) (one '
                         f'per vector), got shape {tuple(radius.shape)}')
    return radius


def sparsestmax(scores: Tensor, radius: Tensor) -> Tensor:
    """SparsestMax (see the module docstring) of ``scores`` ``(..., K)`` at ``radius`` (a
    tensor broadcastable to ``(..., 1)``, in [0, 1]). Differentiable in ``scores``; the radius
    is a constant of the step. Float16 and bfloat16 scores are computed in float32 and the
    result rounded once (in their own precision the rounds moved results by up to 0.67, and
    the centre's tolerance, 8 epsilons, was 0.06 in bfloat16)."""
    if isinstance(scores, Tensor) and scores.dtype in LOW_PRECISION:  # (before the radius
        return sparsestmax(scores.float(), radius).to(scores.dtype)  # takes their dtype)
    radius = _checked_radius(scores, radius)
    point, centre, result, done = scores, None, None, None
    for _ in range(scores.shape[-1]):  # each round shrinks the support: K rounds suffice
        projected = sparsemax(point)
        in_support = projected > 0
        size = in_support.sum(-1, keepdim=True)
        face_centre = in_support.to(scores.dtype) / size
        if centre is not None:  # the sphere restricted to the smaller face
            radius = torch.clamp(radius.square() - (face_centre - centre).square().sum(
                -1, keepdim=True), min=0).sqrt()
        # Within the face the offset sums to 0; rounding leaves a part along the face's normal
        # (1 on the support), which is removed so that the push stays on the face.
        offset = projected - face_centre
        offset = offset - in_support * (offset.sum(-1, keepdim=True) / size)
        # At the centre (up to rounding) there is no direction to push: the point stays. The
        # norm is taken of 1 there: a norm's derivatives at 0 are 0/0, and a double backward
        # multiplied them by the zero a later round's unused branch gets (NaN).
        square = offset.square().sum(-1, keepdim=True)
        centred = square <= (8 * torch.finfo(scores.dtype).eps) ** 2
        safe = torch.where(centred, 1.0, square).sqrt()
        stays = (size == 1) | (safe >= radius) | centred
        pushed = face_centre + radius * offset / safe
        inside = pushed.amin(-1, keepdim=True) >= 0
        here = torch.where(stays, projected, pushed.clamp(0, 1))
        finished = stays | inside
        result = here if result is None else torch.where(done, result, here)
        done = finished if done is None else done | finished
        point, centre = pushed, face_centre
    return result


def _frozen(ratios: Tensor, choice: Tensor) -> Tensor:
    """``ratios`` ``(..., K)``, or the one-hot vector of a fixed ``choice`` ``(...)`` (>= 0); a
    vector one-hot now is used without gradient, as the authors' layer fixes it in the same
    step. Each row (a group of channels' vector) is frozen on its own."""
    choice = choice.unsqueeze(-1)
    hot = (torch.arange(ratios.shape[-1], device=ratios.device) == choice).to(ratios.dtype)
    one_hot_now = (ratios > 0).sum(-1, keepdim=True) == 1
    return torch.where(choice >= 0, hot, torch.where(one_hot_now, ratios.detach(), ratios))


def sparsest_ratios(mean_scores: Tensor, var_scores: Tensor, radius: Tensor,
                    mean_choice: Tensor, var_choice: Tensor) -> Tuple[Tensor, Tensor]:
    """SSN's ratio function: SparsestMax of each score vector at ``radius``, or the one-hot
    vector of a fixed choice (``mean_choice`` / ``var_choice`` >= 0). Scores ``(K,)`` with 0-dim
    choices, or ``(G, K)`` with choices ``(G,)``: every group follows the same radius and is
    fixed on its own."""
    return (_frozen(sparsestmax(mean_scores, radius), mean_choice),
            _frozen(sparsestmax(var_scores, radius), var_choice))


def _stacked_sparsest_ratios(mean_scores: Tensor, var_scores: Tensor, radius: Tensor,
                             mean_choice: Tensor, var_choice: Tensor) -> Tensor:
    """:func:`sparsest_ratios` as one ``(2, ...)`` tensor: one SparsestMax of both score
    tensors. Only the light form calls it. For 2 or 3 normalizers in float32/float64 it
    takes the closed form, the same values and gradients in fewer ops: eagerly
    :func:`~.sparsestmax_fast.fast_sparsestmax` (a few ATen ops), under ``torch.compile``
    :func:`~.sparsestmax_fast.elementwise_sparsestmax` (elementwise ops, which Inductor fuses
    into a few kernels; the fast form's Function saves a Jacobian it builds in its forward,
    which a traced Function may not). Exporters, ``torch.jit.trace`` and eager ``torch.func``
    transforms trace the plain form, whose ratios are :func:`sparsestmax`'s."""
    radius = torch.as_tensor(radius, device=mean_scores.device)
    # One kernel on a GPU (sparsestmax_kernel), the two score tensors as they are.
    ratios = kernel_sparsestmax(mean_scores, var_scores, radius.to(mean_scores.dtype),
                                mean_choice, var_choice)
    if ratios is not None:
        return ratios.view(2, *mean_scores.shape)
    scores = torch.stack([mean_scores, var_scores])
    choices = torch.stack([mean_choice, var_choice])
    if scores.shape[-1] in (2, 3) and scores.dtype in FAST_DTYPES and radius.dim() == 0:
        if not is_tracing():
            return fast_sparsestmax(scores, radius, choices)
        # (Dynamo: the light form under torch.compile; exporters trace the plain form, which
        # never calls this. Not is_exporting(): torch 2.11's Dynamo folds it to True.)
        if torch.compiler.is_dynamo_compiling():
            return elementwise_sparsestmax(scores, radius, choices)
    return _frozen(sparsestmax(scores, radius), choices)


sparsest_ratios.stacked = _stacked_sparsest_ratios


def _batched_sparsest_ratios(inputs: Sequence[Sequence[Tensor]], training: Sequence[bool]
                             ) -> List[Tuple[Tensor, Optional[Tensor]]]:
    """:func:`_stacked_sparsest_ratios` of many layers at once: every layer's score vectors
    (means', then variances', each group's row) as the rows of one tensor, each row with its
    layer's radius and choice, through one SparsestMax. ``inputs`` holds each layer's
    ``(mean_scores, var_scores, radius, mean_choice, var_choice)``, all with the same number of
    normalizers, dtype and device. Returns each layer's stacked ratios and, for the layers in
    ``training`` mode, the choices ``(2, ...)`` its training step fixes with them
    (:func:`fixed_choices`, of all rows at once; the layer writes them if it takes the ratios).
    """
    k = inputs[0][0].shape[-1]
    rows = torch.cat([scores.reshape(-1, k) for layer in inputs for scores in layer[:2]])
    sizes = [2 * layer[0].numel() // k for layer in inputs]
    radius = torch.cat([layer[2].reshape(1, 1).expand(size, 1)
                        for layer, size in zip(inputs, sizes)]).to(rows.dtype)
    choices = torch.cat([choice.reshape(-1) for layer in inputs for choice in layer[3:]])
    if k in (2, 3) and rows.dtype in FAST_DTYPES:
        ratios = fast_sparsestmax(rows, radius, choices)
    else:
        ratios = _frozen(sparsestmax(rows, radius), choices)
    fixed = fixed_choices(ratios.detach(), choices).split(sizes) if any(training) else \
        [None] * len(inputs)
    return [(r.view(2, *layer[0].shape),
             new.view(2, *layer[3].shape) if train else None)
            for r, new, layer, train in zip(ratios.split(sizes), fixed, inputs, training)]


sparsest_ratios.batched = _batched_sparsest_ratios


def fixed_choices(ratios: Tensor, choice: Tensor) -> Tensor:
    """The choices after a training step with ``ratios``: a free ``choice`` (-1) becomes the
    argmax of its ratios when they are one-hot; a fixed choice never changes. ``ratios``
    ``(..., K)`` and ``choice`` ``(...)``: each vector is fixed on its own. Tensor ops only (no
    host sync)."""
    one_hot = (ratios > 0).sum(-1) == 1
    return torch.where(one_hot & (choice < 0), ratios.argmax(-1), choice)


@torch.no_grad()
def update_choices(ratios: Tensor, choice: Tensor) -> None:
    """:func:`fixed_choices`, in place in ``choice``."""
    choice.copy_(fixed_choices(ratios, choice))


@torch.no_grad()
def update_choice_pair(mean_ratios: Tensor, var_ratios: Tensor, mean_choice: Tensor,
                       var_choice: Tensor) -> None:
    """:func:`update_choices` of the means' and the variances' choices at once (half the ops:
    a training step runs this once per layer; one kernel where the SparsestMax kernel runs)."""
    if fix_choices_(mean_ratios, var_ratios, mean_choice, var_choice):
        return
    new = fixed_choices(torch.stack([mean_ratios, var_ratios]),
                        torch.stack([mean_choice, var_choice]))
    mean_choice.copy_(new[0])
    var_choice.copy_(new[1])


def check_radius(radius) -> None:
    """Refuse a radius outside [0, 1] (Python numbers; a tensor when it lives on the CPU)."""
    check_unit_interval(radius, 'the SparsestMax radius', 'the training progress')


def check_choices(choice: Tensor, shape: Tuple[int, ...], size: int, name: str) -> None:
    """Refuse fixed choices that are not integers shaped ``shape`` in ``[-1, size - 1]`` (-1:
    free). Their values are read where they live on the CPU (a load, the functional form on the
    CPU); an accelerator's are not (that would synchronize)."""
    if not isinstance(choice, Tensor) or choice.is_floating_point() or choice.is_complex() \
            or choice.dtype == torch.bool:
        raise TypeError(f'{name} must be an integer tensor (the index of the fixed normalizer, '
                        f'-1 while free), got {choice!r}')
    if tuple(choice.shape) != tuple(shape):
        raise ValueError(f'{name} must have shape {tuple(shape)} (one per ratio vector), got '
                         f'{tuple(choice.shape)}')
    if choice.device.type == 'cpu' and choice.numel() and not is_tracing() and not (
            bool((choice >= -1).all()) and bool((choice < size).all())):
        raise ValueError(f'{name} must hold -1 (free) or the index of one of the {size} '
                         f'normalizers, got {choice.tolist()}')


def sparse_switchable_norm(input: Tensor, mean_scores: Tensor, var_scores: Tensor,
                           radius: Tensor, mean_choice: Optional[Tensor] = None,
                           var_choice: Optional[Tensor] = None,
                           weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                           running_mean: Optional[Tensor] = None,
                           running_var: Optional[Tensor] = None, training: bool = True,
                           momentum: float = 0.1, eps: float = 1e-5, mix: str = 'var',
                           in_unbiased: bool = False, process_group=None,
                           fix_choices: bool = False) -> Tensor:
    r"""Sparse Switchable Normalization: SN with SparsestMax ratios (see the module docstring).

    Args:
        input (Tensor): ``(N, C, *)``, any number of spatial dims.
        mean_scores (Tensor): ratio parameters of the means (SparsestMax's input), ``(3,)`` for
            (IN, LN, BN) or ``(2,)`` for (IN, LN); ``(G, 3)`` / ``(G, 2)`` for one vector per
            group of ``C / G`` contiguous channels.
        var_scores (Tensor): ratio parameters of the variances, same size.
        radius (Tensor | float): SparsestMax radius in [0, 1] (0-dim tensor: no host sync).
        mean_choice (Tensor, optional): long, the index of the fixed normalizer of the
            means or -1 while free: 0-dim, or ``(G,)`` for grouped scores. Defaults to None
            (free).
        var_choice (Tensor, optional): the same for the variances.
        fix_choices (bool): update the choices in place when the ratios are one-hot (a training
            step, as the authors' layer does). Defaults to False.

    The other arguments are :func:`~mmnorm.functional.switchable_norm`'s.

    Returns:
        Tensor: normalized input, same shape and dtype.
    """
    check_norm_input(input)
    for name, scores in (('mean_scores', mean_scores), ('var_scores', var_scores)):
        if not isinstance(scores, Tensor) or not scores.is_floating_point():
            raise TypeError(f'{name} must be a floating-point tensor, got '
                            f'{getattr(scores, "dtype", type(scores).__name__)}')
    fix_choices = check_flag(fix_choices, 'fix_choices')
    if mean_scores.shape != var_scores.shape:
        raise ValueError(f'mean_scores and var_scores must have the same shape, got '
                         f'{tuple(mean_scores.shape)} and {tuple(var_scores.shape)}')
    check_radius(radius)
    free = torch.full(mean_scores.shape[:-1], -1, dtype=torch.long, device=mean_scores.device)
    mean_choice = free if mean_choice is None else mean_choice
    var_choice = free.clone() if var_choice is None else var_choice
    for name, choice in (('mean_choice', mean_choice), ('var_choice', var_choice)):
        check_choices(choice, mean_scores.shape[:-1], mean_scores.shape[-1], name)
    radius = torch.as_tensor(radius, dtype=stat_dtype(mean_scores.dtype),
                             device=mean_scores.device)
    out, (mean_ratios, var_ratios) = mix_normalizers(
        input, sparsest_ratios, (mean_scores, var_scores, radius, mean_choice, var_choice),
        weight, bias, running_mean, running_var, training, momentum, eps, mix, in_unbiased,
        process_group)
    if fix_choices:
        update_choice_pair(mean_ratios, var_ratios, mean_choice, var_choice)
    return out
