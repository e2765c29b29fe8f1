# Copyright (c) mmnorm contributors. All rights reserved.
"""Synchronized normalizers: convert a model's layers to their synchronized twins and back.

Note:
    Only the batch-normalization statistics are synchronized: SN's IN and LN statistics and BCN's
    group statistics are per sample and stay local; BCN with ``estimate=True`` is not
    synchronized (its statistics are estimates). Each process contributes its own count, mean and
    variance per channel; the global mean and variance are pooled exactly (law of total
    variance), so processes with different batch or image sizes are weighted by their number of
    values, and a process with an empty batch contributes nothing (but still takes part in the
    collectives). Forward uses one all-reduce of one concatenated tensor (a differentiable
    sum-all-reduce in ``mmnorm/functional/running_stats.py``); backward is autograd through it
    (the gradient of a sum-all-reduce is the sum-all-reduce of the gradient). Outside a
    distributed run, with one process, or in eval mode, the layers compute exactly what their
    local versions compute. As with SyncBN, every process must call the layer the same number of
    times per iteration.

Each twin is defined beside its normalizer (``class SyncX(SyncNorm, X)``,
:class:`~mmnorm.layers.SyncNorm`), which records it as ``X.sync_class()``; this module only walks
module trees.
"""
from typing import Optional, Type

from torch import nn

from .base import BatchStatsNorm, SyncNorm
from .batch_channel_norm import SyncBatchChannelNorm
from .switchable_norm import SyncSwitchableNorm, SyncSwitchableNormTied

__all__ = ['SyncSwitchableNorm', 'SyncSwitchableNormTied', 'SyncBatchChannelNorm',
           'convert_sync_norm', 'revert_sync_norm']


def _rebuild(layer: BatchStatsNorm, cls: Type[BatchStatsNorm], **extra) -> BatchStatsNorm:
    """A new ``cls`` layer built from ``layer``'s constructor arguments that takes over its
    parameters and buffers (the same tensors, as ``nn.SyncBatchNorm.convert_sync_batchnorm``
    moves them) and its train / eval mode."""
    new = cls(**layer.config(), **extra)
    for name, param in layer.named_parameters(recurse=False):
        new._parameters[name] = param
    for name, buffer in layer.named_buffers(recurse=False):
        new._buffers[name] = buffer
    # Host copies of buffers (read by forwards without a host-device sync).
    for name in ('_stats_ready', '_estimate_rate'):
        if hasattr(layer, name):
            setattr(new, name, getattr(layer, name))
    return new.train(layer.training)


def _convert(module: nn.Module, target) -> nn.Module:
    """``module`` with every layer for which ``target(layer)`` gives a new one replaced."""
    replacement = target(module)
    if replacement is not None:
        return replacement
    for name, child in list(module.named_children()):
        new_child = _convert(child, target)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def convert_sync_norm(module: nn.Module, process_group=None) -> nn.Module:
    """Return ``module`` with every mmnorm normalizer that has a synchronized twin replaced by
    it (SN -> SyncSN, SN_tied -> SyncSN_tied, BCN -> SyncBCN, ...).

    New layers are built and take over the old ones' parameters and buffers (the same tensors);
    build the optimizer afterwards, as with ``nn.SyncBatchNorm.convert_sync_batchnorm``. Layers
    that already synchronize get ``process_group``; other layers (plain BN included) are
    untouched.
    """

    def target(layer: nn.Module) -> Optional[nn.Module]:
        if isinstance(layer, SyncNorm):
            layer.process_group = process_group
            return None
        twin = type(layer).sync_class() if isinstance(layer, BatchStatsNorm) else None
        return None if twin is None else _rebuild(layer, twin, process_group=process_group)

    return _convert(module, target)


def revert_sync_norm(module: nn.Module) -> nn.Module:
    """Inverse of :func:`convert_sync_norm` (e.g. to run a Sync model on one CPU process)."""

    def target(layer: nn.Module) -> Optional[nn.Module]:
        if isinstance(layer, SyncNorm):
            return _rebuild(layer, layer.local_class)
        return None

    return _convert(module, target)
