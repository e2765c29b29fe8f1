# Copyright (c) mmnorm contributors. All rights reserved.
"""What SN and BCN learn: StatDiff (BCN Eq. (8)) and the studies of ``tools/analysis/``."""
from .statdiff import (NORM_TYPES, RunningChannelStats, channel_moments, is_statdiff_norm,
                       norm_groups, select_layers, statdiff, summarize)

__all__ = [
    'statdiff', 'norm_groups', 'channel_moments', 'RunningChannelStats', 'is_statdiff_norm',
    'select_layers', 'summarize', 'NORM_TYPES'
]
