# Copyright (c) mmnorm contributors. All rights reserved.
"""Batch statistics from per-(sample, channel) moments, and running-buffer updates.

Every layer keeps its batch-normalization statistics the PyTorch way: ``running_mean`` and
``running_var`` shaped ``(C,)``, updated as ``running = (1 - momentum) * running +
momentum * batch`` with the *unbiased* batch variance, while normalization itself uses the biased
one. Tools that work on ``nn.BatchNorm`` buffers (precise BN, ``momentum=1.0`` refreshes) therefore
work on mmnorm layers too.

Pooled statistics use the law of total variance (:func:`~mmnorm.functional.moments.pool`), not
``E[x^2] - E[x]^2``: no catastrophic cancellation when means are large against the spread.
"""
from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .moments import pool

__all__ = ['batch_statistics', 'update_running_stats', 'update_from_batch', 'unbiased_factor']

Count = Union[int, Tensor]


def _all_reduce_sum(tensor: Tensor, group) -> Tensor:
    # Differentiable: the backward all-reduces the incoming gradient. Imported here because
    # torch.distributed.nn pulls in RPC modules that a non-distributed run never needs.
    from torch.distributed.nn.functional import all_reduce
    return all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


def batch_statistics(mean: Tensor, var: Tensor, length: int, process_group=None
                     ) -> Tuple[Tensor, Tensor, Count]:
    """BN statistics ``(batch_mean, batch_var, count)`` from per-(n, c) moments ``(N, C)``.

    Args:
        mean (Tensor): per-(n, c) means, ``(N, C)``.
        var (Tensor): per-(n, c) biased variances, ``(N, C)``.
        length (int): values per (n, c) row (the spatial size ``L``).
        process_group: ``None``: this process's batch; otherwise the batch of every process in
            the group. Each process contributes its own count, mean and variance per channel in
            its slot of one ``(world, 1 + 2C)`` tensor; one differentiable sum all-reduce makes
            every slot known everywhere and the global statistics are pooled exactly (processes
            with different batch or image sizes weigh by their number of values; an empty batch
            adds nothing but still joins the collective).

    Returns:
        tuple: ``(C,)`` mean and biased variance (differentiable w.r.t. the moments), and the
        number of values per channel (an ``int``, or a 0-dim tensor when synchronized). A batch
        with no values gives zeros.
    """
    local_mean, local_var = pool(mean, var, 0)
    if process_group is None:
        return local_mean[0], local_var[0], mean.shape[0] * length
    world = dist.get_world_size(process_group)
    rank = dist.get_rank(process_group)
    width = 1 + 2 * mean.shape[1]
    count = local_mean.new_full((1, 1), float(mean.shape[0] * length))
    own = torch.cat([count, local_mean, local_var], 1)
    slots = torch.cat([own.new_zeros(rank, width), own, own.new_zeros(world - rank - 1, width)])
    slots = _all_reduce_sum(slots, process_group)
    counts, means, variances = slots.split([1, mean.shape[1], mean.shape[1]], dim=1)
    total = counts.sum()
    weights = counts / total.clamp(min=1.0)
    global_mean = (weights * means).sum(0)
    global_var = (weights * (variances + (means - global_mean).square())).sum(0)
    return global_mean, global_var, total


def unbiased_factor(count: int) -> Optional[float]:
    """Bessel's correction ``n / (n - 1)``; ``None`` when ``n <= 1`` (undefined)."""
    return count / (count - 1) if count > 1 else None


@torch.no_grad()
def update_running_stats(running_mean: Tensor, running_var: Tensor, batch_mean: Tensor,
                         batch_var: Tensor, count: Count, momentum: Union[float, Tensor]) -> None:
    """``running = (1 - momentum) * running + momentum * batch`` in place.

    ``batch_var`` is the biased variance of ``count`` values per channel; the running variance
    tracks the unbiased one (PyTorch convention). With ``count == 1`` the unbiased variance is
    undefined and the running variance is left unchanged; with ``count == 0`` nothing changes.
    A tensor ``count`` (synchronized statistics) is handled without reading it on the host.
    """
    batch_mean = batch_mean.to(running_mean.dtype)
    batch_var = batch_var.to(running_var.dtype)
    if isinstance(momentum, Tensor):
        momentum = momentum.to(running_mean.dtype)
    if isinstance(count, Tensor):
        count = count.to(running_var.dtype)
        unbiased = batch_var * (count / (count - 1).clamp(min=1.0))
        running_mean.copy_(torch.where(count > 0, running_mean.lerp(batch_mean, momentum),
                                       running_mean))
        running_var.copy_(torch.where(count > 1, running_var.lerp(unbiased, momentum),
                                      running_var))
        return
    if count > 0:
        running_mean.lerp_(batch_mean, momentum)
    factor = unbiased_factor(count)
    if factor is not None:
        running_var.lerp_(batch_var * factor, momentum)


def update_from_batch(running_mean: Tensor, running_var: Tensor, batch: Tuple[Tensor, ...],
                      local_count: int, momentum: Union[float, Tensor]) -> None:
    """:func:`update_running_stats` from what a coefficient function returned as ``aux``:
    ``(batch_mean, batch_var)`` of this process's ``local_count`` values per channel, or
    ``(batch_mean, batch_var, count)`` when synchronized."""
    count = batch[2] if len(batch) == 3 else local_count
    update_running_stats(running_mean, running_var, batch[0], batch[1], count, momentum)
