# Copyright (c) mmnorm contributors. All rights reserved.
"""Batch statistics from per-(sample, channel) moments, and running-buffer updates.

Every layer keeps its batch-normalization statistics the PyTorch way: ``running_mean`` and
``running_var`` shaped ``(C,)``, updated as ``running = (1 - momentum) * running +
momentum * batch`` with the *unbiased* batch variance, while normalization itself uses the biased
one. Tools that work on ``nn.BatchNorm`` buffers (precise BN, ``momentum=1.0`` refreshes) therefore
work on mmnorm layers too. The exception: layers with the SN authors' variances (``in_unbiased``,
converted checkpoints) move theirs as the authors' layer does, to the batch's variance as it
computes it, uncorrected (``mmnorm.engine.recompute_batch_stats`` knows).

Pooled statistics use the law of total variance (:func:`~mmnorm.functional.moments.pool`,
:func:`pool_weighted`), not ``E[x^2] - E[x]^2``: no catastrophic cancellation when means are
large against the spread.
"""
from typing import Dict, Mapping, NamedTuple, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .moments import pool

__all__ = ['BatchStats', 'batch_statistics', 'pool_weighted', 'update_running_stats',
           'update_running_stats_of']


class BatchStats(NamedTuple):
    """The BN statistics of one batch, per channel.

    Attributes:
        mean (Tensor): ``(C,)`` mean.
        var (Tensor): ``(C,)`` *biased* variance (what normalization divides by).
        count (Tensor): 0-dim, the number of values per channel behind them (``N * L``, summed
            over the processes when synchronized); 0 for an empty batch, whose mean and variance
            are 0. A tensor, so that nothing is read on the host.
    """
    mean: Tensor
    var: Tensor
    count: Tensor

    def as_aux(self) -> Dict[str, Tensor]:
        """The entries a coefficient function puts in its ``aux`` dict for them."""
        return {'batch_mean': self.mean, 'batch_var': self.var, 'batch_count': self.count}

    @classmethod
    def from_aux(cls, aux: Mapping[str, Tensor]) -> 'BatchStats':
        """Read them back from a coefficient function's ``aux``."""
        return cls(aux['batch_mean'], aux['batch_var'], aux['batch_count'])

    def unbiased_var(self) -> Tensor:
        """``var * n / (n - 1)``; the biased variance itself where ``n <= 1`` (undefined)."""
        count = self.count.to(self.var.dtype)
        return self.var * (count / (count - 1)).where(count > 1, torch.ones_like(count))


class _AllReduceSum(torch.autograd.Function):
    """The sum of ``tensor`` over the ranks of ``group``, differentiable: every rank's sum
    depends on every rank's tensor, so a rank's gradient is the sum of all ranks' incoming
    gradients (one all-reduce in the backward too). Written here, not taken from
    ``torch.distributed.nn.functional.all_reduce``: deprecated since torch 2.x, it warned at
    every synchronized step, and its suggested replacement is a private module."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _AllReduceSum.apply(grad, ctx.group), None


def _all_reduce_sum(tensor: Tensor, group) -> Tensor:
    return _AllReduceSum.apply(tensor, group)


def pool_weighted(counts: Tensor, means: Tensor, variances: Tensor
                  ) -> Tuple[Tensor, Tensor, Tensor]:
    """Mean and biased variance of the union of groups of ``counts`` values each.

    ``counts`` ``(G, 1)``, ``means`` / ``variances`` (biased) ``(G, C)``. Law of total variance:
    ``mean = sum(w m)``, ``var = sum(w (v + (m - mean)^2))`` with ``w = counts / sum(counts)``.
    Returns ``(mean (C,), var (C,), total count (0-dim))``; groups without values weigh nothing,
    and no values at all give zeros.
    """
    total = counts.sum()
    weights = counts / total.clamp(min=1.0)
    mean = (weights * means).sum(0)
    var = (weights * (variances + (means - mean).square())).sum(0)
    return mean, var, total


def batch_statistics(mean: Tensor, var: Tensor, length: int, process_group=None) -> BatchStats:
    """BN statistics of a batch from its per-(n, c) moments ``(N, C)``.

    Args:
        mean (Tensor): per-(n, c) means, ``(N, C)``.
        var (Tensor): per-(n, c) biased variances, ``(N, C)``.
        length (int): values per (n, c) row (the spatial size ``L``).
        process_group: ``None``: this process's batch; otherwise the batch of every process in
            the group. Each process contributes its own count, mean and variance per channel in
            its slot of one ``(world, 1 + 2C)`` tensor; one differentiable sum all-reduce makes
            every slot known everywhere and the global statistics are pooled exactly
            (:func:`pool_weighted`: processes with different batch or image sizes weigh by their
            number of values; an empty batch adds nothing but still joins the collective).

    Returns:
        BatchStats: ``(C,)`` mean and biased variance (differentiable w.r.t. the moments) and the
        count. A batch with no values gives zeros.
    """
    local_mean, local_var = pool(mean, var, 0)
    count = local_mean.new_full((1, 1), mean.shape[0] * length)
    if process_group is None:
        return BatchStats(local_mean[0], local_var[0], count[0, 0])
    world = dist.get_world_size(process_group)
    rank = dist.get_rank(process_group)
    width = 1 + 2 * mean.shape[1]
    own = torch.cat([count, local_mean, local_var], 1)
    slots = torch.cat([own.new_zeros(rank, width), own, own.new_zeros(world - rank - 1, width)])
    slots = _all_reduce_sum(slots, process_group)
    counts, means, variances = slots.split([1, mean.shape[1], mean.shape[1]], dim=1)
    return BatchStats(*pool_weighted(counts, means, variances))


@torch.no_grad()
def update_running_stats(running_mean: Tensor, running_var: Tensor, batch: BatchStats,
                         momentum: Union[float, Tensor], bessel: bool = True) -> None:
    """``running = (1 - momentum) * running + momentum * batch`` in place.

    ``batch.var`` is the biased variance of ``batch.count`` values per channel; the running
    variance tracks the unbiased one (PyTorch convention). With one value per channel the
    unbiased variance is undefined and the running variance is left unchanged (also with
    ``bessel=False``: one value's variance is 0 by construction); with none nothing changes.
    ``bessel=False``: the running variance tracks ``batch.var`` as it is (the SN authors'
    update, for layers that compute their variances as the authors do). Nothing is read on the
    host (``count`` is a tensor).
    """
    if isinstance(momentum, Tensor):
        momentum = momentum.to(running_mean.dtype)
    count = batch.count.to(running_mean.dtype)
    var = (batch.unbiased_var() if bessel else batch.var).to(running_var.dtype)
    running_mean.copy_(torch.where(count > 0, running_mean.lerp(batch.mean.to(running_mean.dtype),
                                                                momentum), running_mean))
    running_var.copy_(torch.where(count > 1, running_var.lerp(var, momentum), running_var))


@torch.no_grad()
def update_running_stats_of(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                            count: int, momentum: Union[float, Tensor]) -> None:
    """:func:`update_running_stats` for this process's batch, whose number of values per
    channel ``count`` is known on the host: the same update in two or three ops (no masks).

    ``mean`` / ``var`` (biased) are the batch's ``(C,)`` statistics of ``count`` values.
    """
    if count == 0:
        return
    if isinstance(momentum, Tensor):
        momentum = momentum.to(running_mean.dtype)
    running_mean.lerp_(mean.to(running_mean.dtype), momentum)
    if count > 1:
        running_var.lerp_((var * (count / (count - 1))).to(running_var.dtype), momentum)
