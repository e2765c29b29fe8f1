# Copyright (c) mmnorm contributors. All rights reserved.
"""Training integration: batch-average statistics, LR-tied estimates, ratio logging, StatDiff
recording, SSN's radius schedule, optimizer rules. Registered in mmengine's root ``HOOKS`` /
``OPTIM_WRAPPER_CONSTRUCTORS`` registries."""
from .batch_stats import ESTIMATORS, find_batch_stats_layers, recompute_batch_stats
from .hooks import (BatchAverageStatsHook, BatchedRatiosHook, CompiledFormHook, DeployHook,
                    EstimateRateHook, FrozenRatiosHook, HardRatiosHook, SNRatioLoggerHook,
                    SSNRadiusHook, StatDiffHook)
from .optimizers import CPUAmpOptimWrapper, NormAwareOptimWrapperConstructor

__all__ = [
    'recompute_batch_stats', 'find_batch_stats_layers', 'ESTIMATORS', 'BatchAverageStatsHook',
    'EstimateRateHook', 'SNRatioLoggerHook', 'NormAwareOptimWrapperConstructor',
    'CPUAmpOptimWrapper', 'HardRatiosHook', 'DeployHook', 'StatDiffHook', 'SSNRadiusHook',
    'CompiledFormHook', 'FrozenRatiosHook', 'BatchedRatiosHook'
]
