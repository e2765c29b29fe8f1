# Copyright (c) mmnorm contributors. All rights reserved.
"""Pure functions implementing the normalizers; the modules in :mod:`mmnorm.layers` wrap them.

:mod:`.moments` is the shared core (per-row moments, a coefficient function on ``(N, C)``
tensors, one centered affine map; :class:`~.moments.CoefficientFn` is its written contract);
:mod:`.compiled` chooses whether an eager call runs it compiled or in public eager ops;
:mod:`.running_stats` forms batch statistics (:class:`~.running_stats.BatchStats`) and updates
running buffers; :mod:`.switchable`, :mod:`.sparse_switchable` and :mod:`.batch_channel` are SN's,
SSN's and BCN's coefficient (or ratio) functions and functional forms.
"""
from .batch_channel import (batch_channel_norm, batch_norm_step, check_num_groups, check_rate,
                            update_estimates)
from .compiled import auto_switch, compile_mode, compiled_enabled, use_compiled
from .moments import (COMPILED_DEVICES, LOW_PRECISION, CoefficientFn, Coefficients, as_rows,
                      channel_moments, in_recomputation, is_tracing, normalize_rows, pool,
                      stat_dtype)
from .running_stats import BatchStats, batch_statistics, pool_weighted, update_running_stats
from .sparse_switchable import sparse_switchable_norm, sparsemax, sparsest_ratios, sparsestmax
from .switchable import (MIX_MODES, NORMALIZERS, check_norm_input, check_param_sizes,
                         mix_normalizers, softmax_ratios, switchable_norm)
from .weight_std import conv2d_ws, standardize_weight

__all__ = [
    'switchable_norm', 'mix_normalizers', 'softmax_ratios', 'sparse_switchable_norm',
    'sparsemax', 'sparsestmax', 'sparsest_ratios', 'batch_channel_norm',
    'batch_norm_step', 'standardize_weight', 'conv2d_ws', 'normalize_rows', 'CoefficientFn',
    'Coefficients', 'channel_moments', 'as_rows', 'pool', 'stat_dtype', 'LOW_PRECISION',
    'BatchStats', 'batch_statistics', 'pool_weighted', 'update_running_stats',
    'update_estimates', 'check_norm_input', 'check_param_sizes', 'check_num_groups',
    'check_rate', 'MIX_MODES', 'NORMALIZERS', 'is_tracing', 'in_recomputation', 'use_compiled',
    'compiled_enabled', 'compile_mode', 'auto_switch', 'COMPILED_DEVICES'
]
