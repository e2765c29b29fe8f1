# Copyright (c) mmnorm contributors. All rights reserved.
"""Utilities: safe checkpoint loading, CPU distributed launch, config and runner helpers."""
from .checkpoint import (UnsafeCheckpointError, allow_mmengine_checkpoint_globals,
                         register_checkpoint_loader, safe_globals)
from .config import SYNC_NORM_TYPES, replace_norm_types, sync_norm_config
from .launch import cpu_distributed_env, prepare_distributed
from .ratios import model_ratios, state_dict_ratios, symmetric_kl
from .runner import (add_common_arguments, apply_common_options, build_runner,
                     parse_with_common_arguments)

__all__ = [
    'UnsafeCheckpointError', 'allow_mmengine_checkpoint_globals', 'register_checkpoint_loader',
    'safe_globals', 'SYNC_NORM_TYPES', 'replace_norm_types', 'sync_norm_config',
    'cpu_distributed_env', 'prepare_distributed', 'add_common_arguments',
    'parse_with_common_arguments', 'apply_common_options', 'build_runner', 'model_ratios',
    'state_dict_ratios', 'symmetric_kl'
]
