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
from typing import Any, Dict, Optional, Protocol, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .moments import LOW_PRECISION

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


def stat_moments(x: Tensor, dims: Sequence[int]) -> Tuple[Tensor, Tensor]:
    """``(mean, biased variance)`` of ``x`` over ``dims`` (kept, size 1): one reduction
    (``torch.var_mean``), or the two-pass algorithm (the mean, then the norm of the centered
    values) where simple passes are faster (:data:`FEW_LAUNCHES_NOT_NEEDED`)."""
    dims = tuple(dims)
    if not simple_passes(x):
        var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
        return mean, var
    mean = x.mean(dims, keepdim=True)
    norm = torch.linalg.vector_norm(x - mean, dim=dims, keepdim=True)
    return mean, norm.square_().div_(x.numel() // max(mean.numel(), 1))


def instance_layer_batch_moments(x: Tensor, layer: bool = True, batch: bool = True
                                 ) -> Tuple[Tuple[Tensor, Tensor], ...]:
    """The ``(mean, biased variance)`` of ``x`` ``(N, C, *)`` per (sample, channel) ``(N, C)``,
    and if asked per sample ``(N, 1)`` (LN) and per channel ``(1, C)`` (BN), in that order.

    Each is one reduction of ``x`` (:func:`stat_moments`) where launches count; where simple
    passes are faster (:data:`FEW_LAUNCHES_NOT_NEEDED`) the LN and BN moments are pooled from
    the per-row ones by the law of total variance, a few ops on ``(N, C)`` tensors.
    """
    n, c = x.shape[:2]
    dims = spatial_dims(x)
    inst = tuple(t.view(n, c) for t in stat_moments(x, dims))
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


def _affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``scale * x + shift`` with per-row ``scale``, ``shift`` (a new tensor in ``x``'s layout)."""
    if simple_passes(x):
        return (x * scale).add_(shift)
    return torch.addcmul(shift, x, scale)


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``sum_l a * b`` per (n, c) row: one batched matrix-vector product on contiguous inputs
    where launches count, else a product and a sum."""
    n, c = a.shape[:2]
    if not simple_passes(a) and a.is_contiguous() and b.is_contiguous():
        return torch.bmm(a.view(n * c, 1, -1), b.view(n * c, -1, 1)).view(n, c)
    return (a * b).sum(spatial_dims(a))


class RowAffineKernel(Protocol):
    """A normalizer's ``(N, C)`` math for :func:`row_affine`: ``f`` and its vector-Jacobian
    product, each a few vectorized tensor ops (no data-dependent Python control flow).

    ``forward(x, *tensors)`` gets the input (float32 or wider) and the caller's tensors; it
    computes the statistics it needs (:func:`stat_moments`) and returns ``(A, B, state, aux)``:
    ``A``, ``B`` ``(N, C)``; ``state`` whatever ``backward`` needs (``None`` when no gradient
    is wanted); ``aux`` a dict of detached tensors for the caller (batch statistics, ratios).

    ``backward(state, grad_A, grad_B, needs, length)`` gets :math:`\\sum_l dy\\,x` and
    :math:`\\sum_l dy` ``(N, C)`` and ``needs`` (which of ``tensors`` want a gradient); returns
    ``(P, Q, grads)``: ``dx = A dy + P x + Q`` with ``P``, ``Q`` broadcastable to ``(N, C)``,
    and one gradient (or ``None``) per tensor. ``state`` is a tuple of tensors (or ``None``),
    saved through autograd; ``length`` is the number of values per row.
    """

    def forward(self, x: Tensor, *tensors: Optional[Tensor]
                ) -> Tuple[Tensor, Tensor, Any, Dict[str, Tensor]]:
        ...

    def backward(self, state: Sequence[Optional[Tensor]], grad_A: Tensor, grad_B: Tensor,
                 needs: Sequence[bool], length: int
                 ) -> Tuple[Tensor, Tensor, Tuple[Optional[Tensor], ...]]:
        ...


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
        A, B, state, aux = kernel.forward(wide, *tensors)
        # A new tensor in the input's layout, never a view (callers may modify it in place).
        out = _affine(wide, _rows(A, x), _rows(B, x))
        ctx.kernel = kernel
        # Saved through autograd (not on ctx): torch.compile traces this Function too.
        ctx.save_for_backward(x, A, *state)
        aux_keys.extend(aux)  # an autograd.Function returns tensors: the names travel aside
        ctx.mark_non_differentiable(*aux.values())
        return (out.to(x.dtype), *aux.values())

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor, *_):
        x, A, *state = ctx.saved_tensors
        if grad_out is None:
            return (None, None, None, *[None] * len(ctx.needs_input_grad[3:]))
        wide, dy = _wide(x), _wide(grad_out)
        dims = spatial_dims(x)
        grad_B = dy.sum(dims)
        grad_A = _row_dot(dy, wide)
        P, Q, grads = ctx.kernel.backward(state, grad_A, grad_B, ctx.needs_input_grad[3:],
                                          math.prod(x.shape[2:]))
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _affine(wide, _rows(P, x), _rows(Q, x))
            if simple_passes(x):
                grad_x.add_(dy * _rows(A, x))
            else:
                grad_x.addcmul_(dy, _rows(A, x))
            grad_x = grad_x.to(x.dtype)
        return (grad_x, None, None, *grads)


def row_affine(x: Tensor, kernel: RowAffineKernel, tensors: Sequence[Optional[Tensor]]
               ) -> Tuple[Tensor, Dict[str, Tensor]]:
    """``y = A x + B`` per (n, c) row with ``(A, B)`` from ``kernel`` (see the module doc).

    Eager calls only (not traced), on inputs ``(N, C, *)`` with at least one spatial dim and
    one value. Returns ``y`` (a new tensor shaped, typed and laid out like ``x``) and the
    kernel's ``aux`` dict (detached).
    """
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or any(t is not None and t.requires_grad for t in tensors))
    if not needs_grad:
        wide = _wide(x)
        A, B, _, aux = kernel.forward(wide, *tensors)
        return _affine(wide, _rows(A, x), _rows(B, x)).to(x.dtype), aux
    aux_keys: list = []
    out, *aux = _RowAffine.apply(x, kernel, aux_keys, *tensors)
    return out, dict(zip(aux_keys, aux))


