# Copyright (c) mmnorm contributors. All rights reserved.
"""Thin ``nn.Module`` wrappers of :mod:`mmnorm.functional`, registered in mmengine's root
``MODELS`` registry under the names users type in ``norm_cfg`` / ``conv_cfg``."""
from .base import EVAL_STATS_MODES, BatchStatsNorm
from .batch_channel_norm import BatchChannelNorm
from .conv_ws import WSConv2d
from .switchable_norm import NORMALIZERS, SwitchableNorm, SwitchableNormTied
from .sync import (SyncBatchChannelNorm, SyncSwitchableNorm, SyncSwitchableNormTied,
                   convert_sync_norm, revert_sync_norm)

__all__ = [
    'BatchStatsNorm', 'SwitchableNorm', 'SwitchableNormTied', 'BatchChannelNorm', 'WSConv2d',
    'NORMALIZERS', 'EVAL_STATS_MODES', 'SyncSwitchableNorm', 'SyncSwitchableNormTied',
    'SyncBatchChannelNorm', 'convert_sync_norm', 'revert_sync_norm'
]
