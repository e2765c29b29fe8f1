# Copyright (c) mmnorm contributors. All rights reserved.
"""Synchronized SN, SN_tied and BCN: the BN statistics are those of the global batch.

Note:
    Only the batch-normalization statistics are synchronized: SN's IN and LN statistics and BCN's
    group statistics are per sample and stay local; BCN with ``estimate=True`` is not
    synchronized (its statistics are estimates). Each process contributes its own count, mean and
    variance per channel; the global mean and variance are pooled exactly (law of total
    variance), so processes with different batch or image sizes are weighted by their number of
    values, and a process with an empty batch contributes nothing (but still takes part in the
    collectives). Forward uses one all-reduce of one concatenated tensor; backward is autograd
    through it (the gradient of a sum-all-reduce is the sum-all-reduce of the gradient). Outside
    a distributed run, with one process, or in eval mode, the layers compute exactly what their
    local versions compute. As with SyncBN, every process must call the layer the same number of
    times per iteration.
"""
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from mmengine.registry import MODELS
from torch import Tensor, nn

from ..functional import pool
from ..registry import register
from .batch_channel_norm import BatchChannelNorm
from .switchable_norm import SwitchableNorm, SwitchableNormTied

__all__ = ['SyncSwitchableNorm', 'SyncSwitchableNormTied', 'SyncBatchChannelNorm',
           'SyncBatchStats', 'convert_sync_norm', 'revert_sync_norm']


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum all-reduce: backward all-reduces the incoming gradient."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class SyncBatchStats:
    """BN statistics of the global batch, from each process's per-(n, c) moments.

    Same interface as :class:`mmnorm.functional.LocalBatchStats`. Every process writes
    ``(count, mean_c, var_c)`` of its own batch into its slot of a ``(world, 1 + 2C)`` tensor; one
    differentiable sum all-reduce makes all slots known everywhere, and the global statistics are
    pooled from them. :meth:`backward` runs autograd through that small graph.

    Args:
        length (int): values per (n, c) row in this process.
        group: process group. Defaults to the whole world.
    """

    #: Tells the functional forms that skipping the layer (e.g. for an empty batch) would leave
    #: the other processes waiting in the collective.
    collective = True

    def __init__(self, length: int, group=None):
        self.length = length
        self.group = group
        self.count = 0

    def forward(self, mean: Tensor, var: Tensor) -> Tuple[Tensor, Tensor, object]:
        world = dist.get_world_size(self.group)
        rank = dist.get_rank(self.group)
        n, c = mean.shape
        leaves = (mean.detach().requires_grad_(), var.detach().requires_grad_())
        with torch.enable_grad():
            count = float(n * self.length)
            if n > 0:
                local_mean, local_var, _ = pool(leaves[0], leaves[1], 0)
            else:  # nothing here; the other processes still need this process in the reduce
                local_mean = local_var = leaves[0].new_zeros(1, c) + 0 * leaves[0].sum()
            slots = mean.new_zeros(world, 1 + 2 * c)
            own = torch.cat([local_mean.new_full((1, 1), count), local_mean, local_var], 1)
            slots = torch.cat([slots[:rank], own, slots[rank + 1:]], 0)
            slots = _AllReduceSum.apply(slots, self.group)
            counts, means, variances = slots[:, :1], slots[:, 1:1 + c], slots[:, 1 + c:]
            total = counts.sum()
            weights = counts / total.clamp(min=1.0)
            global_mean = (weights * means).sum(0)
            global_var = (weights * (variances + (means - global_mean).square())).sum(0)
        self.count = int(total.item())
        return global_mean.detach(), global_var.detach(), (leaves, global_mean, global_var)

    def backward(self, state: object, grad_mean: Tensor, grad_var: Tensor
                 ) -> Tuple[Tensor, Tensor]:
        leaves, global_mean, global_var = state
        grads = torch.autograd.grad((global_mean, global_var), leaves, (grad_mean, grad_var),
                                    retain_graph=True, allow_unused=True)
        return tuple(torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads))


def _sync_active(group) -> bool:
    return (dist.is_available() and dist.is_initialized()
            and dist.get_world_size(group) > 1)


def _sync_batch_stats(group):
    """A ``batch_stats`` factory for the functional forms (see ``switchable_norm``)."""

    def make(length: int) -> SyncBatchStats:
        return SyncBatchStats(length, group)

    make.collective = SyncBatchStats.collective
    return make


class _SyncMixin:
    """Uses :class:`SyncBatchStats` for batch statistics when running distributed."""

    process_group = None

    def _batch_stats_fn(self):
        if self.training and _sync_active(self.process_group):
            return _sync_batch_stats(self.process_group)
        return None


@register(MODELS, 'SyncSN')
class SyncSwitchableNorm(_SyncMixin, SwitchableNorm):
    """:class:`~mmnorm.layers.SwitchableNorm` whose BN branch uses the global batch's statistics
    (registered as ``SyncSN``); see the module note. Takes the same arguments plus
    ``process_group`` (default: the whole world)."""

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group


@register(MODELS, 'SyncSN_tied')
class SyncSwitchableNormTied(_SyncMixin, SwitchableNormTied):
    """:class:`~mmnorm.layers.SwitchableNormTied` with synchronized BN statistics
    (registered as ``SyncSN_tied``)."""

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group


@register(MODELS, 'SyncBCN')
class SyncBatchChannelNorm(_SyncMixin, BatchChannelNorm):
    """:class:`~mmnorm.layers.BatchChannelNorm` whose batch normalization uses the global batch's
    statistics (registered as ``SyncBCN``); estimated layers (``estimate=True``) stay local."""

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group


_TO_SYNC = {
    SwitchableNorm: SyncSwitchableNorm,
    SwitchableNormTied: SyncSwitchableNormTied,
    BatchChannelNorm: SyncBatchChannelNorm,
}
_TO_LOCAL = {sync: local for local, sync in _TO_SYNC.items()}


def _swap_classes(module: nn.Module, mapping: dict, **attrs: Optional[object]) -> nn.Module:
    """Rebuild ``module``'s tree with the layer classes in ``mapping`` swapped; the new layers
    share the old ones' parameters and buffers. ``attrs`` are set on the new layers (``None``:
    removed)."""
    new_cls = mapping.get(type(module))
    if new_cls is not None:
        swapped = new_cls.__new__(new_cls)
        swapped.__dict__.update(module.__dict__)
        for key, value in attrs.items():
            if value is None:
                swapped.__dict__.pop(key, None)
            else:
                setattr(swapped, key, value)
        module = swapped
    for name, child in list(module.named_children()):
        new_child = _swap_classes(child, mapping, **attrs)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def convert_sync_norm(module: nn.Module, process_group=None) -> nn.Module:
    """Return ``module`` with SN / SN_tied / BCN layers replaced by their Sync versions.

    Parameters and buffers are shared, not copied; build the optimizer afterwards, as with
    ``nn.SyncBatchNorm.convert_sync_batchnorm``. Other layers (including plain BN) are untouched.
    """
    converted = _swap_classes(module, _TO_SYNC)
    for m in converted.modules():
        if isinstance(m, _SyncMixin):
            m.process_group = process_group
    return converted


def revert_sync_norm(module: nn.Module) -> nn.Module:
    """Inverse of :func:`convert_sync_norm` (e.g. to run a Sync model on one CPU process)."""
    return _swap_classes(module, _TO_LOCAL, process_group=None)
