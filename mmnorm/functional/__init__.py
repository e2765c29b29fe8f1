# Copyright (c) mmnorm contributors. All rights reserved.
"""Pure functions implementing the normalizers; the modules in :mod:`mmnorm.layers` wrap them."""
from .batch_channel import BatchChannelRule, batch_channel_norm, check_num_groups
from .moments import (CoefficientRule, MomentAffineFunction, channel_moments,
                            moment_affine)
from .running_stats import (LocalBatchStats, pool, pool_backward, unbiased_factor,
                            update_running_stats)
from .switchable import MIX_MODES, SwitchableRule, check_norm_input, switchable_norm
from .weight_std import conv2d_ws, standardize_weight

__all__ = [
    'switchable_norm', 'batch_channel_norm', 'standardize_weight', 'conv2d_ws', 'moment_affine',
    'MomentAffineFunction', 'CoefficientRule', 'SwitchableRule', 'BatchChannelRule',
    'channel_moments', 'LocalBatchStats', 'pool', 'pool_backward', 'update_running_stats',
    'unbiased_factor', 'check_norm_input', 'check_num_groups', 'MIX_MODES'
]
