# Copyright (c) mmnorm contributors. All rights reserved.
from .cpu_amp_optim_wrapper import CPUAmpOptimWrapper
from .norm_aware_constructor import NormAwareOptimWrapperConstructor

__all__ = ['NormAwareOptimWrapperConstructor', 'CPUAmpOptimWrapper']
