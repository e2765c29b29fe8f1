# Copyright (c) mmnorm contributors. All rights reserved.
"""Batch statistics derived from per-(sample, channel) moments, and running-buffer updates.

Every layer keeps its batch-normalization statistics the PyTorch way: ``running_mean`` and
``running_var`` shaped ``(C,)``, updated as ``running = (1 - momentum) * running +
momentum * batch`` with the *unbiased* batch variance, while normalization itself uses the biased
one. Tools that work on ``nn.BatchNorm`` buffers (precise BN, ``momentum=1.0`` refreshes) therefore
work on mmnorm layers too.

Pooled statistics use the law of total variance, ``Var = E[var] + E[(mean - E[mean])^2]``, not
``E[x^2] - E[x]^2``: no catastrophic cancellation when means are large against the spread.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ['pool', 'pool_backward', 'LocalBatchStats', 'update_running_stats',
           'unbiased_factor']


def pool(mean: Tensor, var: Tensor, dim: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Mean and biased variance of the union of equally sized groups, reduced over ``dim``.

    Returns:
        ``(pooled_mean, pooled_var, deviation)`` with the reduced dim kept (size 1), and
        ``deviation = mean - pooled_mean`` (needed by :func:`pool_backward`).
    """
    pooled_mean = mean.mean(dim, keepdim=True)
    deviation = mean - pooled_mean
    pooled_var = var.mean(dim, keepdim=True) + deviation.square().mean(dim, keepdim=True)
    return pooled_mean, pooled_var, deviation


def pool_backward(grad_mean: Tensor, grad_var: Tensor, deviation: Tensor, dim: int
                  ) -> Tuple[Tensor, Tensor]:
    """Gradients w.r.t. the group moments given those w.r.t. :func:`pool`'s outputs.

    ``d pooled_var / d mean_i = 2 * deviation_i / n`` (the term through ``pooled_mean`` vanishes
    because deviations sum to zero). The variance gradient is returned as a broadcast view.
    """
    size = deviation.shape[dim]
    grad_group_mean = torch.addcmul(grad_mean / size, deviation, grad_var, value=2.0 / size)
    return grad_group_mean, (grad_var / size).expand_as(deviation)


class LocalBatchStats:
    """BN statistics of this process's batch from per-(n, c) moments (pooled over the batch).

    The synchronized layers substitute an object with the same interface that all-reduces
    (:class:`mmnorm.layers.sync.SyncBatchStats`).

    Args:
        length (int): number of values per (n, c) row (the spatial size).
    """

    def __init__(self, length: int):
        self.length = length
        self.count = 0

    def forward(self, mean: Tensor, var: Tensor) -> Tuple[Tensor, Tensor, object]:
        """``(batch_mean, batch_var)`` shaped ``(C,)`` and the state for :meth:`backward`."""
        self.count = mean.shape[0] * self.length
        batch_mean, batch_var, deviation = pool(mean, var, 0)
        return batch_mean.squeeze(0), batch_var.squeeze(0), deviation

    def backward(self, state: object, grad_mean: Tensor, grad_var: Tensor
                 ) -> Tuple[Tensor, Tensor]:
        """Gradients w.r.t. the per-(n, c) ``(mean, var)``."""
        return pool_backward(grad_mean.unsqueeze(0), grad_var.unsqueeze(0), state, 0)


def unbiased_factor(count: int) -> Optional[float]:
    """Bessel's correction ``n / (n - 1)``; ``None`` when ``n <= 1`` (unbiased variance undefined)."""
    return count / (count - 1) if count > 1 else None


@torch.no_grad()
def update_running_stats(running_mean: Tensor, running_var: Tensor, batch_mean: Tensor,
                         batch_var: Tensor, count: int, momentum: float) -> None:
    """``running = (1 - momentum) * running + momentum * batch`` in place.

    ``batch_var`` is the biased variance of ``count`` values per channel; the running variance
    tracks the unbiased one (PyTorch convention). With ``count == 1`` the unbiased variance is
    undefined: the running mean is updated and the running variance is left unchanged.
    """
    running_mean.lerp_(batch_mean.to(running_mean.dtype), momentum)
    factor = unbiased_factor(count)
    if factor is not None:
        running_var.lerp_((batch_var * factor).to(running_var.dtype), momentum)
