# Copyright (c) mmnorm contributors. All rights reserved.
"""What SN and BCN learn: StatDiff (BCN Eq. (8)) and the studies of ``tools/analysis/``."""
from .statdiff import (NORM_TYPES, RunningChannelStats, is_statdiff_norm, norm_groups,
                       select_layers, statdiff, statdiff_moments, summarize)

__all__ = [
    'statdiff', 'norm_groups', 'statdiff_moments', 'RunningChannelStats', 'is_statdiff_norm',
    'select_layers', 'summarize', 'NORM_TYPES'
]
