# Copyright (c) mmnorm contributors. All rights reserved.
r"""The light eager form: one normalizer step in a handful of large operations.

Every mmnorm normalizer is, per (sample, channel) row, an affine map of its input,

.. math::
    y_{ncl} = A_{nc}\,x_{ncl} + B_{nc}, \qquad (A, B) = f(\text{statistics of } x, \theta),

where the statistics are means and biased variances over some of the input's dims (IN: per
row; LN: per sample; BN: per channel; their moments are full-size reductions) and :math:`f` is
a small computation on ``(N, C)`` tensors. Whatever :math:`f` is, the gradient of the input
has the same shape, because every statistic :math:`s` with mean :math:`\mu_s` over
:math:`L_s` values contributes :math:`(\partial\mathcal L/\partial\mu_s +
2\,\partial\mathcal L/\partial\sigma^2_s\,(x - \mu_s)) / L_s`:

.. math::
    \frac{\partial\mathcal L}{\partial A} = \sum_l dy\,x, \quad
    \frac{\partial\mathcal L}{\partial B} = \sum_l dy, \quad
    dx = A\,dy + P\,x + Q,

with :math:`(P, Q)` per row from the vector-Jacobian product of :math:`f`. So one training step
is: the statistics (one reduction per kind), :math:`f`, one elementwise pass for :math:`y`;
backward two reductions, :math:`f`'s VJP, one elementwise pass for :math:`dx`. A
:class:`RowAffineKernel` is a normalizer's :math:`f` and its VJP, written on whole ``(N, C)``
tensors so that each is a few vectorized ops (on a GPU every op is a kernel launch, and at the
feature-map sizes of detection heads launches, not arithmetic, bound a normalization layer).

This form serves eager calls on this process's batch. The plain form
(:func:`~mmnorm.functional.moments.normalize_rows`) is the specification: it is what tracing
(``torch.export``, ONNX, an outer ``torch.compile``) and the synchronized layers run, and the
tests hold the two to 1e-10 in float64. Statistics and :math:`(A, B)` are computed in float32
for float16/bfloat16 inputs, and the output is rounded once, at the end.
"""
import math
from typing import Any, Dict, NamedTuple, Optional, Protocol, Sequence, Tuple

import torch
from torch import Tensor

from .moments import (LOW_PRECISION, batched_gradient, differentiable_grads, needs_grad,
                      sum_of_squares)
from .moments import _centered_moments as corrected_moments

__all__ = ['RowAffineKernel', 'row_affine', 'spatial_dims', 'stat_moments',
           'FEW_LAUNCHES_NOT_NEEDED', 'instance_layer_batch_moments', 'simple_passes']

def spatial_dims(x: Tensor) -> Tuple[int, ...]:
    """The dims after ``(N, C)``."""
    return tuple(range(2, x.dim()))


#: Device types whose kernels favour more, simpler passes over the full-size tensors. On the CPU
#: ATen's ``var_mean`` is a scalar Welford loop, about 100x slower than ``mean`` (14 ms against
#: 0.1 ms for 1.6 M floats on one thread), and ``addcmul`` with per-row operands is 3x slower
#: than ``mul`` then ``add_``; kernel launches cost nothing there. On CUDA each op is a launch,
#: so the fewest ops win: ``var_mean`` is one fused reduction and ``addcmul`` one pass.
FEW_LAUNCHES_NOT_NEEDED = ('cpu', )


def simple_passes(x: Tensor) -> bool:
    """Whether ``x``'s device favours more, simpler passes over fewer kernels
    (:data:`FEW_LAUNCHES_NOT_NEEDED`)."""
    return x.device.type in FEW_LAUNCHES_NOT_NEEDED


class Centering(NamedTuple):
    """The CPU's first pass over a row: ``values = x - mean + delta`` (a new tensor, which the
    caller may reuse), with ``delta`` the rounding error of the first-pass mean (corrected
    moments) or None (0)."""
    values: Tensor
    delta: Optional[Tensor]


def _centered_moments(x: Tensor, dims: Sequence[int]
                      ) -> Tuple[Tensor, Tensor, Optional[Centering]]:
    """``(mean, biased variance, centering)`` of ``x`` over ``dims`` (kept, size 1): one
    reduction (``torch.var_mean``, no centering), or where simple passes are faster
    (:data:`FEW_LAUNCHES_NOT_NEEDED`) the two-pass algorithm, the mean then the norm of the
    centered values."""
    dims = tuple(dims)
    if not simple_passes(x):
        var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
        return mean, var, None
    mean = x.mean(dims, keepdim=True)
    centered = x - mean
    var = sum_of_squares(centered, dims) / (x.numel() // max(mean.numel(), 1))
    return mean, var, Centering(centered, None)


def stat_moments(x: Tensor, dims: Sequence[int]) -> Tuple[Tensor, Tensor]:
    """``(mean, biased variance)`` of ``x`` over ``dims`` (kept, size 1): one reduction
    (``torch.var_mean``), or the two-pass algorithm (the mean, then the norm of the centered
    values) where simple passes are faster (:data:`FEW_LAUNCHES_NOT_NEEDED`)."""
    return _centered_moments(x, dims)[:2]


def instance_layer_batch_moments(x: Tensor, layer: bool = True, batch: bool = True,
                                 rows: Optional[Tuple[Tensor, Tensor]] = None
                                 ) -> Tuple[Tuple[Tensor, Tensor], ...]:
    """The ``(mean, biased variance)`` of ``x`` ``(N, C, *)`` per (sample, channel) ``(N, C)``,
    and if asked per sample ``(N, 1)`` (LN) and per channel ``(1, C)`` (BN), in that order.

    Each is one reduction of ``x`` (:func:`stat_moments`) where launches count; where simple
    passes are faster (:data:`FEW_LAUNCHES_NOT_NEEDED`) the LN and BN moments are pooled from
    the per-row ones by the law of total variance, a few ops on ``(N, C)`` tensors. ``rows``,
    the per-row moments ``(N, C)`` when the caller has them (:func:`row_affine` does), are used
    as they are.
    """
    n, c = x.shape[:2]
    dims = spatial_dims(x)
    inst = rows if rows is not None else tuple(t.view(n, c) for t in stat_moments(x, dims))
    result = [inst]
    for wanted, dim, shape in ((layer, 1, (n, 1)), (batch, 0, (1, c))):
        if not wanted:
            continue
        if simple_passes(x):
            mean = inst[0].mean(dim, keepdim=True)
            deviation = inst[0] - mean
            result.append((mean, torch.addcmul(inst[1], deviation, deviation).mean(
                dim, keepdim=True)))
        else:
            result.append(tuple(t.view(shape) for t in stat_moments(x, (dim, ) + dims)))
    return tuple(result)


def _row_moments(x: Tensor, corrected: bool
                 ) -> Tuple[Tuple[Tensor, Tensor], Optional[Centering]]:
    """The per-row ``(mean, biased variance)`` ``(N, C)`` of ``x`` and, where simple passes
    are faster, its :class:`Centering`, else None. ``corrected``: the plain form's corrected
    two-pass algorithm (:func:`~.moments.channel_moments`; one more reduction), whose mean is
    exact for rows of equal values, as a shift about the mean needs."""
    n, c = x.shape[:2]
    if corrected and simple_passes(x):
        mean, var, centered, delta = corrected_moments(x)
        return (mean, var), Centering(centered, delta)
    mean, var, centering = _centered_moments(x, spatial_dims(x))
    return (mean.view(n, c), var.view(n, c)), centering


def _output(x: Tensor, A: Tensor, B: Tensor, mean: Tensor, centering: Optional[Centering],
            centered_shift: bool) -> Tensor:
    """``A x + B`` per row (``A (x - mean) + B`` for a kernel's ``centered_shift``), a new
    tensor in ``x``'s layout: one ``addcmul`` where launches count; else written over the
    centering's values, ``x - mean + delta`` (no new full-size tensor: on the CPU a fresh one
    costs page faults as well as a pass)."""
    if centering is None:
        shift = torch.addcmul(B, A, mean, value=-1) if centered_shift else B
        return torch.addcmul(_rows(shift, x), x, _rows(A, x))
    values, delta = centering
    # y = A values + (B - A delta), and + A mean for a shift about 0
    if not centered_shift:
        B = torch.addcmul(B, A, mean)
    if delta is not None:
        B = torch.addcmul(B, A, delta, value=-1)
    if torch.compiler.is_compiling():  # a fresh tensor (see _RowAffine.forward); fused anyway
        return torch.addcmul(_rows(B, x), values, _rows(A, x))
    return values.mul_(_rows(A, x)).add_(_rows(B, x))


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``sum_l a * b`` per (n, c) row: one batched matrix-vector product on contiguous
    inputs, else a product and a sum."""
    n, c = a.shape[:2]
    if a.is_contiguous() and b.is_contiguous():
        return torch.bmm(a.view(n * c, 1, -1), b.view(n * c, -1, 1)).view(n, c)
    return (a * b).sum(spatial_dims(a))


class RowAffineKernel(Protocol):
    """A normalizer's ``(N, C)`` math for :func:`row_affine`: ``f`` and its vector-Jacobian
    product, each a few vectorized tensor ops (no data-dependent Python control flow).

    ``forward(x, rows, *tensors)`` gets the input (float32 or wider), its per-row ``(mean,
    biased variance)`` ``(N, C)`` and the caller's tensors; it computes any other statistics
    it needs (:func:`instance_layer_batch_moments`, :func:`stat_moments`) and returns
    ``(A, B, state, aux)``: ``A``, ``B`` ``(N, C)``; ``state`` whatever ``backward`` needs
    (``None`` when no gradient is wanted); ``aux`` a dict of detached tensors for the caller
    (batch statistics, ratios).

    A kernel whose attribute ``centered_shift`` is True gives the shift about the row's mean,
    ``y = A (x - m) + B`` (a row of equal values then gets ``B`` exactly), and its backward
    gets :math:`\\sum_l dy\\,(x - m)` for ``grad_A``; :func:`row_affine` adds the mean's own
    share.

    ``backward(state, grad_A, grad_B, needs, length)`` gets :math:`\\sum_l dy\\,x` and
    :math:`\\sum_l dy` ``(N, C)`` and ``needs`` (which of ``tensors`` want a gradient); returns
    ``(P, Q, grads)``: ``dx = A dy + P x + Q`` with ``P``, ``Q`` broadcastable to ``(N, C)``,
    and one gradient (or ``None``) per tensor. ``state`` is a tuple of tensors (or ``None``),
    saved through autograd; ``length`` is the number of values per row.
    """

    def forward(self, x: Tensor, rows: Tuple[Tensor, Tensor], *tensors: Optional[Tensor]
                ) -> Tuple[Tensor, Tensor, Any, Dict[str, Tensor]]:
        ...

    def backward(self, state: Sequence[Optional[Tensor]], grad_A: Tensor, grad_B: Tensor,
                 needs: Sequence[bool], length: int
                 ) -> Tuple[Tensor, Tensor, Tuple[Optional[Tensor], ...]]:
        ...


def _centered_shift(kernel) -> bool:
    return getattr(kernel, 'centered_shift', False)


def _rows(t: Tensor, x: Tensor) -> Tensor:
    """``(N, C)`` shaped to broadcast against ``x`` ``(N, C, *)``."""
    return t.reshape(t.shape + (1, ) * (x.dim() - 2))


def _wide(x: Tensor) -> Tensor:
    return x.float() if x.dtype in LOW_PRECISION else x


class _RowAffine(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x: Tensor, kernel: RowAffineKernel, aux_keys: list,
                *tensors: Optional[Tensor]):
        ctx.set_materialize_grads(False)  # the aux outputs get no gradient: make none
        wide = _wide(x)
        rows, centering = _row_moments(wide, _centered_shift(kernel))
        A, B, state, aux = kernel.forward(wide, rows, *tensors)
        # A new tensor in the input's layout, never a view (callers may modify it in place).
        out = _output(wide, A, B, rows[0], centering, _centered_shift(kernel))
        ctx.kernel = kernel
        # For a double backward only (create_graph=True): the caller's tensors, to run the map
        # again under autograd. Not under torch.compile (it does not differentiate twice).
        ctx.tensors = None if torch.compiler.is_compiling() else tensors
        # Saved through autograd (not on ctx): torch.compile traces this Function too. A
        # centered shift's backward needs the mean.
        ctx.save_for_backward(x, A, rows[0] if _centered_shift(kernel) else None, *state)
        aux_keys.extend(aux)  # an autograd.Function returns tensors: the names travel aside
        ctx.mark_non_differentiable(*aux.values())
        # Under torch.compile the output aliases no intermediate (_output writes a fresh tensor
        # there, and no no-op .to()): torch 2.11's gave such outputs of a Function zero gradients.
        return (out if out.dtype == x.dtype else out.to(x.dtype), *aux.values())

    @staticmethod
    def backward(ctx, grad_out: Tensor, *_):
        x, A, mean, *state = ctx.saved_tensors
        if grad_out is None:
            return (None, None, None, *[None] * len(ctx.needs_input_grad[3:]))
        if torch.is_grad_enabled():  # create_graph=True: a gradient that is differentiable
            if ctx.tensors is None:
                raise RuntimeError('mmnorm: a double backward (create_graph=True) through a '
                                   'layer run under torch.compile is not supported')
            grads = differentiable_grads(
                lambda x, *tensors: _affine_map(x, ctx.kernel, tensors), (x, *ctx.tensors),
                (ctx.needs_input_grad[0], *ctx.needs_input_grad[3:]), grad_out)
            return (grads[0], None, None, *grads[1:])
        wide, dy = _wide(x), _wide(grad_out)
        dims, length = spatial_dims(x), math.prod(x.shape[2:])
        centered_shift = _centered_shift(ctx.kernel)
        grad_B = dy.sum(dims)
        # Buffers reused only for a plain gradient, not a batch of them (vectorized Jacobians).
        if simple_passes(x) and not batched_gradient(grad_out):
            # the product's buffer is reused for dx: no new full-size tensor
            # (a centered shift: sum dy (x - m), exact for rows of equal values)
            product = (wide - _rows(mean, x)).mul_(dy) if centered_shift else dy * wide
            grad_A = product.sum(dims)
        else:  # one batched matrix-vector product on contiguous inputs, else a product
            product, grad_A = None, _row_dot(dy, wide)
            if centered_shift:
                grad_A = torch.addcmul(grad_A, mean, grad_B, value=-1)
        P, Q, grads = ctx.kernel.backward(state, grad_A, grad_B, ctx.needs_input_grad[3:],
                                          length)
        if centered_shift:  # y = A (x - m) + B: the mean's own share, -A sum(dy) / L
            Q = torch.addcmul(Q, A, grad_B, value=-1.0 / length)
        grad_x = None
        if ctx.needs_input_grad[0]:
            if product is None:
                grad_x = torch.addcmul(_rows(Q, x), wide, _rows(P, x))
            else:
                grad_x = torch.mul(wide, _rows(P, x), out=product).add_(_rows(Q, x))
            grad_x = grad_x.addcmul_(dy, _rows(A, x)).to(x.dtype)
        return (grad_x, None, None, *grads)


def _affine_map(x: Tensor, kernel: RowAffineKernel, tensors: Sequence[Optional[Tensor]]
                ) -> Tensor:
    """The map of :class:`_RowAffine`'s forward in differentiable ops (out of place), the
    statistics computed again, for a double backward. ``kernel.recompute`` (when it has one)
    is its forward without side effects."""
    wide = _wide(x)
    centered_shift = _centered_shift(kernel)
    rows, _ = _row_moments(wide, centered_shift)
    forward = getattr(kernel, 'recompute', kernel.forward)
    A, B = forward(wide, rows, *tensors)[:2]
    if centered_shift:
        B = torch.addcmul(B, A, rows[0], value=-1)
    return torch.addcmul(_rows(B, x), wide, _rows(A, x)).to(x.dtype)


def row_affine(x: Tensor, kernel: RowAffineKernel, tensors: Sequence[Optional[Tensor]]
               ) -> Tuple[Tensor, Dict[str, Tensor]]:
    """``y = A x + B`` per (n, c) row with ``(A, B)`` from ``kernel`` (see the module doc).

    Eager calls only (not traced), on inputs ``(N, C, *)`` with at least one spatial dim and
    one value. Returns ``y`` (a new tensor shaped, typed and laid out like ``x``) and the
    kernel's ``aux`` dict (detached).
    """
    if not needs_grad(x, tensors):
        wide = _wide(x)
        rows, centering = _row_moments(wide, _centered_shift(kernel))
        A, B, _, aux = kernel.forward(wide, rows, *tensors)
        out = _output(wide, A, B, rows[0], centering, _centered_shift(kernel))
        return out.to(x.dtype), aux
    aux_keys: list = []
    out, *aux = _RowAffine.apply(x, kernel, aux_keys, *tensors)
    # Detached although marked non-differentiable: torch 2.11's torch.compile took them for
    # outputs that need a gradient and failed to differentiate its graph.
    return out, {key: value.detach() for key, value in zip(aux_keys, aux)}


