# Copyright (c) mmnorm contributors. All rights reserved.
from .cpu_amp_optim_wrapper import CPUAmpOptimWrapper
from .norm_aware_constructor import RATIO_PARAMS, NormAwareOptimWrapperConstructor

__all__ = ['NormAwareOptimWrapperConstructor', 'RATIO_PARAMS', 'CPUAmpOptimWrapper']
