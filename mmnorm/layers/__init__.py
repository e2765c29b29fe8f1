# Copyright (c) mmnorm contributors. All rights reserved.
"""Thin ``nn.Module`` wrappers of :mod:`mmnorm.functional`, registered in mmengine's root
``MODELS`` registry under the names users type in ``norm_cfg`` / ``conv_cfg``.

Each normalizer lives in its own file with its synchronized twin; :mod:`.base` holds the
contract every normalizer follows (what tools read from the layer), :mod:`.sync` the module-tree
conversions.
"""
from .base import (EVAL_STATS_MODES, BatchedRatios, BatchStatsNorm, SyncNorm, batched_ratios,
                   frozen_ratios, has_ratios)
from .batch_channel_norm import BatchChannelNorm, SyncBatchChannelNorm
from .conv_ws import WSConv2d
from .sparse_switchable_norm import SparseSwitchableNorm, SyncSparseSwitchableNorm
from .switchable_norm import (NORMALIZERS, SwitchableNorm, SwitchableNormTied,
                              SyncSwitchableNorm, SyncSwitchableNormTied)
from .sync import convert_sync_norm, revert_sync_norm

__all__ = [
    'BatchStatsNorm', 'SyncNorm', 'frozen_ratios', 'batched_ratios', 'BatchedRatios',
    'has_ratios', 'SwitchableNorm',
    'SwitchableNormTied',
    'BatchChannelNorm', 'WSConv2d', 'NORMALIZERS', 'EVAL_STATS_MODES', 'SyncSwitchableNorm',
    'SyncSwitchableNormTied', 'SyncBatchChannelNorm', 'SparseSwitchableNorm',
    'SyncSparseSwitchableNorm', 'convert_sync_norm', 'revert_sync_norm'
]
