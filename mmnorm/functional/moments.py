# Copyright (c) mmnorm contributors. All rights reserved.
r"""The computational core shared by every normalizer in mmnorm.

SN, SN_tied and BCN have one structure. Every statistic they use (IN, LN, BN, group statistics
and their mixtures) is a function of the per-(sample, channel) moments of the input viewed as
``(N, C, L)`` rows,

.. math::
    m_{nc} = \frac{1}{L}\sum_l x_{ncl}, \qquad v_{nc} = \frac{1}{L}\sum_l (x_{ncl} - m_{nc})^2,

and the output is a per-row affine map of the *centered* input,

.. math::
    y_{ncl} = a_{nc}\,(x_{ncl} - m_{nc}) + b_{nc}, \qquad (a, b) = f(m, v, \theta),

where the *coefficient function* :math:`f` is a small computation on ``(N, C)`` tensors and the
layer's parameters :math:`\theta` (``b`` is the output at the row mean). Centering makes a
channel whose values are all equal map to exactly ``b`` whatever the size of ``a`` (BCN's batch
step has ``a ~ 1/sqrt(eps)`` on zero-variance channels).

:func:`normalize_rows` computes this with plain public tensor ops, in two ways that give the same
numbers:

- the **traced form** (inference, ``torch.export`` / ONNX, ``torch.compile``, TorchScript
  tracing): moments, :math:`f` and the affine map as ordinary differentiable ops, nothing else;
- the **eager training form** (:class:`_RowNormFunction`): the same forward, with a backward that
  touches the full-size tensors in a few fused passes. It gets the gradient of :math:`f` from
  ``torch.autograd.grad`` on the small ``(N, C)`` graph built in the forward, so no calculus is
  written by hand; only the two textbook full-size rules are:

  .. math::
      \frac{\partial \mathcal L}{\partial a} = \sum_l dy\,(x - m), \quad
      \frac{\partial \mathcal L}{\partial b} = \sum_l dy, \quad
      dx = a\,(dy - \overline{dy}) + \frac{2\,\partial v}{L}(x - m) + \frac{\partial m}{L},

  where :math:`\partial m, \partial v` are the gradients reaching the moments through :math:`f`.

Statistics, coefficients and the affine map are computed in float32 for float16/bfloat16 inputs
(float64 stays float64) and rounded to the input dtype once, at the end.
"""
import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ['LOW_PRECISION', 'stat_dtype', 'as_rows', 'channel_moments', 'pool',
           'normalize_rows', 'CoefficientFn', 'is_tracing', 'in_recomputation']

#: dtypes whose statistics and affine map are computed in float32.
LOW_PRECISION = (torch.float16, torch.bfloat16)

#: ``f(mean, var, *tensors) -> (scale, shift, aux)``: ``scale``/``shift`` broadcast to
#: ``(N, C)``; ``aux`` is a tuple of tensors computed on the way (e.g. the batch statistics, for
#: the running buffers) returned to the caller without gradient.
CoefficientFn = Callable[..., Tuple[Tensor, Tensor, Tuple[Tensor, ...]]]


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in: float32 for float16/bfloat16, else ``dtype``."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def as_rows(input: Tensor) -> Tensor:
    """``input`` ``(N, C, *)`` as ``(N, C, L)`` rows (a view when contiguous; N may be 0)."""
    return input.reshape(input.shape[0], input.shape[1], math.prod(input.shape[2:]))


def _per_row(t: Tensor, input: Tensor) -> Tensor:
    """``(N, C)`` coefficients shaped to broadcast against ``input`` ``(N, C, *)``."""
    return t.reshape(t.shape + (1, ) * (input.dim() - 2))


def channel_moments(input: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-(n, c) mean and biased variance of ``input`` ``(N, C, *)``, in :func:`stat_dtype`.

    One stable (Welford) reduction over the spatial dims, in any memory format; differentiable.
    An input without spatial dims has ``mean = input``, ``var = 0``; empty rows get 0, 0.
    """
    x = input.to(stat_dtype(input.dtype))
    if input.dim() == 2:
        return x, torch.zeros_like(x)
    if input.numel() == 0:
        zeros = x.new_zeros(x.shape[:2])
        return zeros, zeros
    var, mean = torch.var_mean(x, dim=tuple(range(2, x.dim())), correction=0)
    return mean, var


def pool(mean: Tensor, var: Tensor, dim: int) -> Tuple[Tensor, Tensor]:
    """Mean and biased variance of the union of equally sized groups, reduced over ``dim``
    (kept, size 1), by the law of total variance: ``Var = E[var] + E[(mean - E[mean])^2]``.

    The pooled mean is taken relative to the first group's, ``m_0 + E[m - m_0]``, so groups with
    equal means pool to exactly that mean (a constant channel stays exactly centered). An empty
    ``dim`` pools to 0, 0.
    """
    size = mean.shape[dim]
    first = mean.narrow(dim, 0, min(size, 1)).sum(dim, keepdim=True)
    count = max(size, 1)
    pooled_mean = first + (mean - first).sum(dim, keepdim=True) / count
    deviation = mean - pooled_mean
    pooled_var = (var.sum(dim, keepdim=True) + deviation.square().sum(dim, keepdim=True)) / count
    return pooled_mean, pooled_var


def is_tracing() -> bool:
    """True under ``torch.compile`` / ``torch.export`` and TorchScript tracing: only plain
    tensor ops (the traced form of :func:`normalize_rows`) are used there."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def in_recomputation() -> bool:
    """True while autograd recomputes a checkpointed forward (``torch.utils.checkpoint``,
    ``with_cp=True``), reentrant or not.

    Both kinds of activation checkpointing re-run the forward from inside the backward pass, and
    a forward never otherwise runs there. The layers use this to leave their running statistics
    and BCN's estimates alone the second time (``torch.autograd.graph`` uses the same graph-task
    query for the same purpose). Always False while tracing.
    """
    if is_tracing():
        return False
    return torch._C._current_graph_task_id() != -1


def _centered(input: Tensor, mean: Tensor) -> Tensor:
    """``input - mean`` per (n, c), in the statistics dtype (a new tensor, memory format kept)."""
    return input.to(mean.dtype) - _per_row(mean, input)


def _affine(centered: Tensor, scale: Tensor, shift: Tensor, dtype: torch.dtype) -> Tensor:
    """``scale * centered + shift`` per (n, c), rounded to ``dtype`` once. A new tensor, never
    a view, so callers may modify it in place (``ReLU(inplace=True)``, ``out += identity``)."""
    return torch.addcmul(_per_row(shift, centered), centered, _per_row(scale, centered)).to(dtype)


def _traced_form(input: Tensor, coefficients: CoefficientFn, tensors: Sequence[Optional[Tensor]]
                 ) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    mean, var = channel_moments(input)
    scale, shift, aux = coefficients(mean, var, *tensors)
    scale, shift = scale.expand_as(mean), shift.expand_as(mean)
    out = _affine(_centered(input, mean), scale, shift, input.dtype)
    return out, tuple(a.detach() for a in aux)


class _RowNormFunction(torch.autograd.Function):
    """Eager training form of :func:`normalize_rows` (see the module docstring).

    Saves only the centered input (or, for float16/bfloat16, the input itself, recentered in
    backward) and ``(N, C)``-sized tensors.
    """

    @staticmethod
    def forward(ctx, x: Tensor, coefficients: CoefficientFn,
                moments: Optional[Tuple[Tensor, Tensor]], *tensors: Optional[Tensor]):
        x = x.contiguous()  # row views of x and of the incoming gradient in backward
        mean, var = channel_moments(x) if moments is None else moments
        leaves = [mean.detach().requires_grad_(), var.detach().requires_grad_()]
        leaves += [t.detach().requires_grad_(t.requires_grad) if t is not None else None
                   for t in tensors]
        with torch.enable_grad():
            scale, shift, aux = coefficients(*leaves)
            scale, shift = scale.expand_as(mean), shift.expand_as(mean)
        centered = _centered(x, mean.detach())
        out = _affine(centered, scale.detach(), shift.detach(), x.dtype)
        ctx.graph = (leaves, scale, shift)
        ctx.low_precision = centered.dtype != x.dtype
        # Keep one full-size tensor: the centered input, unless it is wider than the input.
        ctx.save_for_backward(x if ctx.low_precision else centered, mean.detach())
        aux = tuple(a.detach() for a in aux)
        ctx.mark_non_differentiable(*aux)
        return (out, *aux)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor, *_):
        saved, mean = ctx.saved_tensors
        leaves, scale, shift = ctx.graph
        centered = as_rows(_centered(saved, mean) if ctx.low_precision else saved)
        dy = as_rows(grad_out.to(mean.dtype).contiguous())
        grad_shift = dy.sum(-1)
        grad_scale = torch.linalg.vecdot(dy, centered)
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad((scale, shift), wanted, (grad_scale, grad_shift),
                                         retain_graph=True, allow_unused=True))
        found = {id(t): next(grads) for t in wanted}

        def grad_of(t: Optional[Tensor]) -> Optional[Tensor]:
            if t is None or not t.requires_grad:
                return None
            g = found[id(t)]
            return torch.zeros_like(t) if g is None else g

        grad_x = None
        if ctx.needs_input_grad[0]:
            length = centered.shape[-1]
            grad_mean, grad_var = grad_of(leaves[0]), grad_of(leaves[1])
            # dx = a (dy - mean(dy)) + (2 dv / L)(x - m) + dm / L. Centering dy keeps the
            # gradient exactly 0 where the output does not depend on x (e.g. BCN at N=1, L=1).
            grad_x = dy - (grad_shift / max(length, 1)).unsqueeze(-1)
            grad_x.mul_(scale.detach().unsqueeze(-1))
            grad_x.addcmul_(centered, (2.0 / max(length, 1)) * grad_var.unsqueeze(-1))
            grad_x.add_((grad_mean / max(length, 1)).unsqueeze(-1))
            grad_x = grad_x.to(grad_out.dtype).view(saved.shape)
        return (grad_x, None, None, *[grad_of(t) for t in leaves[2:]])


def normalize_rows(x: Tensor, coefficients: CoefficientFn, tensors: Sequence[Optional[Tensor]],
                   moments: Optional[Tuple[Tensor, Tensor]] = None
                   ) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    """``y = a * (x - m) + b`` per (n, c), with ``(a, b, aux) = coefficients(m, v, *tensors)``.

    Args:
        x (Tensor): ``(N, C, *)``, any number of spatial dims.
        coefficients (callable): the layer's coefficient function (:data:`CoefficientFn`):
            plain differentiable tensor code on ``(N, C)``-sized tensors.
        tensors (sequence): its parameters and buffers (``None`` allowed); gradients reach those
            that require grad.
        moments (tuple, optional): ``channel_moments(x)`` if the caller already has them
            (detached); saves a pass over ``x`` in eager training. The traced form recomputes
            them, differentiably.

    Returns:
        tuple: ``y`` (a new tensor shaped and typed like ``x``, not a view) and ``aux``
        (detached).
    """
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or any(t is not None and t.requires_grad for t in tensors))
    if not needs_grad or is_tracing():
        return _traced_form(x, coefficients, tensors)
    out, *aux = _RowNormFunction.apply(x, coefficients, moments, *tensors)
    return out, tuple(aux)

