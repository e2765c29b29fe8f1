# Copyright (c) mmnorm contributors. All rights reserved.
"""Synchronized SN, SN_tied and BCN: the BN statistics are those of the global batch.

Note:
    Only the batch-normalization statistics are synchronized: SN's IN and LN statistics and BCN's
    group statistics are per sample and stay local; BCN with ``estimate=True`` is not
    synchronized (its statistics are estimates). Each process contributes its own count, mean and
    variance per channel; the global mean and variance are pooled exactly (law of total
    variance), so processes with different batch or image sizes are weighted by their number of
    values, and a process with an empty batch contributes nothing (but still takes part in the
    collectives). Forward uses one all-reduce of one concatenated tensor
    (``torch.distributed.nn.functional.all_reduce``); backward is autograd through it (the
    gradient of a sum-all-reduce is the sum-all-reduce of the gradient). Outside
    a distributed run, with one process, or in eval mode, the layers compute exactly what their
    local versions compute. As with SyncBN, every process must call the layer the same number of
    times per iteration.
"""
from typing import Optional

import torch.distributed as dist
from mmengine.registry import MODELS
from torch import nn

from ..registry import register
from .batch_channel_norm import BatchChannelNorm
from .switchable_norm import SwitchableNorm, SwitchableNormTied

__all__ = ['SyncSwitchableNorm', 'SyncSwitchableNormTied', 'SyncBatchChannelNorm',
           'convert_sync_norm', 'revert_sync_norm']


def _sync_active(group) -> bool:
    return (dist.is_available() and dist.is_initialized()
            and dist.get_world_size(group) > 1)


class _SyncMixin:
    """Forms the BN statistics of a training step from the whole group's batch when running
    distributed (:func:`mmnorm.functional.batch_statistics` with a ``process_group``)."""

    process_group = None

    def _sync_group(self):
        if self.training and _sync_active(self.process_group):
            return self.process_group if self.process_group is not None else dist.group.WORLD
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
