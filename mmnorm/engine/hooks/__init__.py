# Copyright (c) mmnorm contributors. All rights reserved.
from .batch_average_stats_hook import BatchAverageStatsHook
from .compiled_form_hook import CompiledFormHook
from .estimate_rate_hook import EstimateRateHook
from .batched_ratios_hook import BatchedRatiosHook
from .frozen_ratios_hook import FrozenRatiosHook
from .hard_ratio_hooks import DeployHook, HardRatiosHook
from .ratio_logger_hook import SNRatioLoggerHook
from .ssn_radius_hook import SSNRadiusHook
from .statdiff_hook import StatDiffHook

__all__ = [
    'BatchAverageStatsHook', 'EstimateRateHook', 'SNRatioLoggerHook', 'HardRatiosHook',
    'DeployHook', 'StatDiffHook', 'SSNRadiusHook', 'CompiledFormHook', 'FrozenRatiosHook',
    'BatchedRatiosHook'
]
