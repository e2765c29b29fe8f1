# Copyright (c) mmnorm contributors. All rights reserved.
r"""The computational core shared by every normalizer in mmnorm.

SN, SN_tied and BCN all have the same structure: every statistic they use (IN, LN, BN, group
statistics, and their mixtures) is a function of the per-(sample, channel) moments

.. math::
    m_{nc} = \frac{1}{L}\sum_l x_{ncl}, \qquad v_{nc} = \frac{1}{L}\sum_l (x_{ncl} - m_{nc})^2,

and the output is a per-(sample, channel) affine map of the input,

.. math::
    y_{ncl} = a_{nc}\, x_{ncl} + b_{nc}, \qquad (a, b) = f(m, v, \theta),

where :math:`f` ("the coefficient function") is a small computation on ``(N, C)`` tensors and the
layer's parameters :math:`\theta`. So, like GroupNorm, a layer needs one read of ``x`` for the
moments and one fused pass for the output. :class:`MomentAffineFunction` implements exactly that,
with a backward of the same cost: one fused pass for the per-(n, c) sums :math:`\sum_l dy` and
:math:`\sum_l dy\,x`, the analytic backward of :math:`f` on ``(N, C)`` tensors, and one elementwise pass

.. math::
    dx = a\,dy + \frac{2\,\partial v}{L}(x - m) + \frac{\partial m}{L}.

Only ``x`` itself (no copy) and ``(N, C)``-sized tensors are kept for backward.

The heavy passes use PyTorch's batch-norm kernels on the ``(1, N*C, L)`` view of the input, whose
"channels" are our (n, c) rows: their fused, parallel per-channel reductions and affine pass are
the fastest CPU primitives for per-row statistics and per-row affine maps.
"""
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    'channel_moments', 'input_moments', 'moment_affine', 'MomentAffineFunction', 'CoefficientRule',
    'softmax_backward', 'LOW_PRECISION'
]

#: dtypes whose statistics are computed in float32 (then the output is cast back).
LOW_PRECISION = (torch.float16, torch.bfloat16)

def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in LOW_PRECISION else dtype


def _row_sums(a: Tensor, b: Tensor, shift: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-row ``sum(a)`` and ``sum(a * (b - shift))`` of ``(R, L)`` views, in one fused pass.

    batch_norm's backward reduces exactly ``sum(dy)`` and ``sum(dy * (x - mean) * invstd)`` per
    channel; with the rows as channels and ``invstd = 1`` that is what we need, without
    materializing a temporary product.
    """
    rows, length = a.shape
    if rows == 0 or length == 0:  # the kernel divides by the size; nothing to sum anyway
        zeros = a.new_zeros(rows)
        return zeros, zeros.clone()
    _, sum_prod, sum_a = torch.ops.aten.native_batch_norm_backward(
        a.view(1, rows, length), b.view(1, rows, length), None, None, None, shift,
        torch.ones_like(shift), True, 0.0, [False, True, True])
    return sum_a, sum_prod


#: Rows whose ``mean^2 > _SUMSQ_SAFE_RATIO * var`` are re-done with a stable reduction: there the
#: one-pass ``E[x^2] - E[x]^2`` would lose more than ~1e-5 of the variance in float32.
_SUMSQ_SAFE_RATIO = 100.0


def _stable_moments(rows: Tensor) -> Tuple[Tensor, Tensor]:
    """Mean and biased variance of ``(R, L)`` rows with GroupNorm's stable (Welford) kernel."""
    r, length = rows.shape
    _, mean, rstd = torch.ops.aten.native_group_norm(rows.view(1, r, length), None, None, 1, r,
                                                     length, r, 0.0)
    # rstd = 1 / sqrt(var + 0): a zero variance gives inf and maps back to exactly 0.
    return mean.view(r), rstd.reciprocal().square().view(r)


def channel_moments(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-(sample, channel) mean and biased variance of ``x`` shaped ``(N, C, L)``.

    Computed in float32 (or wider) whatever the input dtype. On CPU, one fused pass of sums and
    sums of squares; the few rows where that would be inaccurate (mean large against the spread)
    are recomputed with a stable reduction, so every row is accurate to ~1e-5 of its variance.
    Elsewhere (no host-device sync wanted) the stable reduction is used for all rows.

    Returns:
        tuple[Tensor, Tensor]: ``(mean, var)``, each shaped ``(N, C)``.
    """
    n, c, length = x.shape
    xs = x.to(_stat_dtype(x.dtype)).reshape(n * c, length)
    if xs.numel() == 0:
        zeros = xs.new_zeros(n, c)
        return zeros, zeros.clone()
    if xs.device.type != 'cpu':
        mean, var = _stable_moments(xs)
        return mean.view(n, c), var.view(n, c)
    zeros = xs.new_zeros(n * c)
    total, sum_sq = _row_sums(xs, xs, zeros)          # sum(x), sum(x * (x - 0))
    mean = total / length
    var = (sum_sq / length - mean.square()).clamp_(min=0)
    risky = mean.square() > _SUMSQ_SAFE_RATIO * var
    if bool(risky.any()):
        index = risky.nonzero().squeeze(1)
        mean[index], var[index] = _stable_moments(xs.index_select(0, index))
    return mean.view(n, c), var.view(n, c)


def _spatial_size(input: Tensor) -> int:
    size = 1
    for d in input.shape[2:]:
        size *= d
    return size


def input_moments(input: Tensor) -> Tuple[Tensor, Tensor, Tensor, int]:
    """``(input, mean, var, length)`` for a non-empty ``(N, C, *)`` input.

    The returned input is contiguous (a no-op for the usual layouts), so that every later reshape
    to ``(N, C, L)`` is a view; ``mean``/``var`` are its detached per-(n, c) moments and
    ``length = L`` the number of values per (n, c).
    """
    input = input.contiguous()
    n, c = input.shape[:2]
    x = input.view(n, c, _spatial_size(input))
    with torch.no_grad():
        mean, var = channel_moments(x)
    return input, mean, var, x.shape[-1]


def _row_affine(x: Tensor, scale: Tensor, shift: Tensor, out: Optional[Tensor] = None
                ) -> Tensor:
    """``scale[r] * x[r] + shift[r]`` for ``(R, L)`` rows, as one fused pass.

    Batch norm in eval mode with running mean 0, running variance 1 and eps 0 is exactly this map
    (``(x - 0) / sqrt(1 + 0) * w + b``), and its CPU kernel is one parallel pass. ``out`` (any
    contiguous tensor with ``R * L`` elements) receives the result; it is returned as given.
    """
    rows, length = x.shape
    if out is None:
        out = torch.empty_like(x)
    target = out.view(1, rows, length)
    if scale.dtype != x.dtype:  # mixed precision: no fused kernel for mixed dtypes
        torch.mul(x, scale.to(x.dtype)[:, None], out=target[0])
        target[0].add_(shift.to(x.dtype)[:, None])
        return out
    torch.ops.aten.native_batch_norm.out(
        x.view(1, rows, length), scale, shift, torch.zeros_like(scale), torch.ones_like(scale),
        False, 0.0, 0.0, out=target, save_mean=scale.new_empty(0),
        save_invstd=scale.new_empty(0))
    return out


def _affine(x: Tensor, scale: Tensor, shift: Tensor, shape: torch.Size) -> Tensor:
    """``scale * x + shift`` per (n, c) row of ``x`` ``(N, C, L)``, as a new tensor of ``shape``.

    The result is a fresh tensor, not a view: a caller may modify it in place (e.g. ``ReLU(
    inplace=True)`` after the norm), which autograd forbids on views of a Function's output.
    """
    n, c, length = x.shape
    out = torch.empty(shape, dtype=x.dtype, device=x.device)
    return _row_affine(x.reshape(n * c, length), scale.reshape(-1).to(x.dtype),
                       shift.reshape(-1).to(x.dtype), out)


class CoefficientRule:
    """The coefficient function ``(scale, shift) = f(mean, var, *tensors)`` of a layer, with its
    analytic backward. All tensors are ``(N, C)``-sized or smaller.

    Subclasses implement :meth:`forward` (no autograd) and :meth:`backward` (vector-Jacobian
    product). Writing the backward by hand keeps the per-step work on ``(N, C)`` tensors to a few
    fused operations, which matters when ``N*C`` is large (RoI features: ``L = 7*7``).
    """

    def forward(self, mean: Tensor, var: Tensor, tensors: Sequence[Optional[Tensor]]
                ) -> Tuple[Tensor, Tensor, Any]:
        """Return ``(scale, shift, state)``; ``state`` is what :meth:`backward` needs."""
        raise NotImplementedError

    def backward(self, state: Any, grad_scale: Tensor, grad_shift: Tensor,
                 needs: Sequence[bool]) -> Tuple[Tensor, Tensor, List[Optional[Tensor]]]:
        """Return ``(grad_mean, grad_var, grads of tensors)``; ``needs[i]`` says whether
        ``tensors[i]`` wants a gradient (others may be ``None``). May be called more than once
        with the same ``state``."""
        raise NotImplementedError


def softmax_backward(probs: Tensor, grad_probs: Tensor) -> Tensor:
    """Vector-Jacobian product of ``softmax`` over a 1-d tensor."""
    return probs * (grad_probs - (probs * grad_probs).sum())


class MomentAffineFunction(torch.autograd.Function):
    """``y = a * x + b`` with ``(a, b, _) = rule.forward(mean, var, tensors)``.

    ``mean`` and ``var`` must be the (detached) output of :func:`channel_moments` on ``x``: they
    are passed in so that the caller can also use them (e.g. to update running statistics)
    without a second pass over ``x``. Gradients flow to ``x`` through the moments and the affine
    map, and to every tensor in ``tensors`` that requires grad.
    """

    @staticmethod
    def forward(ctx, input: Tensor, mean: Tensor, var: Tensor, rule: CoefficientRule,
                *tensors: Optional[Tensor]) -> Tensor:
        scale, shift, state = rule.forward(mean, var, tensors)
        ctx.rule, ctx.state = rule, state
        ctx.save_for_backward(input, mean, scale)
        return _affine(_rows(input, mean), scale, shift, input.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        input, mean, scale = ctx.saved_tensors
        x = _rows(input, mean)
        n, c, length = x.shape
        stat_dtype = _stat_dtype(x.dtype)
        dy = grad_out.to(stat_dtype).reshape(n * c, length)
        xs = x.to(stat_dtype).reshape(n * c, length)
        flat_mean = mean.reshape(-1)
        sum_dy, sum_dy_dev = _row_sums(dy, xs, flat_mean)     # sum(dy), sum(dy (x - m))
        sum_dyx = sum_dy_dev + flat_mean * sum_dy
        param_needs = ctx.needs_input_grad[4:]
        d_mean, d_var, grad_tensors = ctx.rule.backward(
            ctx.state, sum_dyx.view(n, c), sum_dy.view(n, c), param_needs)

        grad_x = None
        if ctx.needs_input_grad[0]:
            # dx = a dy + c1 x + c0, with c1 = 2 dv / L and c0 = dm / L - c1 m.
            c1 = (2.0 / length) * d_var.reshape(-1)
            c0 = d_mean.reshape(-1) / length - c1 * flat_mean
            grad_x = _row_affine(xs, c1.to(stat_dtype), c0.to(stat_dtype))
            grad_x.addcmul_(dy, scale.reshape(-1, 1).to(stat_dtype))
            grad_x = grad_x.view(input.shape).to(x.dtype)
        grad_tensors = [g if need else None for g, need in zip(grad_tensors, param_needs)]
        return (grad_x, None, None, None, *grad_tensors)


def _rows(input: Tensor, mean: Tensor) -> Tensor:
    """``input`` as ``(N, C, L)``, with ``(N, C)`` taken from the moments."""
    return input.reshape(mean.shape[0], mean.shape[1], _spatial_size(input))


def moment_affine(input: Tensor, mean: Tensor, var: Tensor, rule: CoefficientRule,
                  tensors: Sequence[Optional[Tensor]]) -> Tensor:
    """Apply :class:`MomentAffineFunction`; see its docstring.

    Args:
        input (Tensor): ``(N, C, *)``.
        mean (Tensor): ``channel_moments(input.reshape(N, C, -1))[0]``.
        var (Tensor): ``channel_moments(input.reshape(N, C, -1))[1]``.
        rule (CoefficientRule): the layer's coefficient function.
        tensors (sequence): parameters/buffers passed to ``rule`` (``None`` allowed).

    Returns:
        Tensor: ``scale * input + shift`` per (n, c), a new tensor shaped and typed like
        ``input``.
    """
    if not torch.is_grad_enabled() or not (
            input.requires_grad or any(t is not None and t.requires_grad for t in tensors)):
        # Inference: no graph, no saved tensors.
        scale, shift, _ = rule.forward(mean, var, tensors)
        return _affine(_rows(input, mean), scale, shift, input.shape)
    return MomentAffineFunction.apply(input, mean, var, rule, *tensors)
