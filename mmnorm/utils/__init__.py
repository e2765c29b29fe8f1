# Copyright (c) mmnorm contributors. All rights reserved.
"""Utilities: safe checkpoint loading and output writing, CPU distributed launch, config, model
and runner helpers."""
from . import timing

try:
    import mmengine  # noqa: F401
except ImportError:  # mmnorm's core alone (tools/gpu_check.py): timing only
    __all__ = ['timing']
else:
    from .checkpoint import (CheckpointFileError, UnsafeCheckpointError,
                             allow_mmengine_checkpoint_globals, load_checkpoint_file,
                             register_checkpoint_loader, safe_globals)
    from .files import (OutputError, OutputExistsError, OutputNotWritableError, atomic_write,
                        check_output, check_writable, prepare_output_file, save_checkpoint,
                        sha256_file, torch_save, write_json)
    from .config import (finetune_config, norm_configs, replace_norm_types, sync_norm_config,
                         sync_norm_types)
    from .launch import cpu_distributed_env, prepare_distributed
    from .ratios import (choice_shares, group_choices, group_mean, layer_divergence, mean_radius,
                         model_ratios, one_hot_share, ratio_vectors, record_groups,
                         state_dict_ratios, symmetric_kl)
    from .runner import (add_common_arguments, apply_common_options, build_runner,
                         find_resume_checkpoint, last_checkpoint, parse_with_common_arguments)
    __all__ = [
        'CheckpointFileError', 'load_checkpoint_file', 'OutputError', 'OutputExistsError',
        'OutputNotWritableError', 'atomic_write', 'check_output', 'check_writable',
        'prepare_output_file', 'save_checkpoint', 'torch_save', 'write_json',
        'sha256_file', 'UnsafeCheckpointError',
        'allow_mmengine_checkpoint_globals', 'register_checkpoint_loader', 'safe_globals',
        'sync_norm_types', 'replace_norm_types', 'sync_norm_config', 'norm_configs',
        'finetune_config', 'last_checkpoint', 'cpu_distributed_env',
        'prepare_distributed', 'add_common_arguments', 'parse_with_common_arguments',
        'apply_common_options', 'build_runner', 'find_resume_checkpoint', 'model_ratios',
        'state_dict_ratios', 'symmetric_kl', 'one_hot_share', 'mean_radius', 'record_groups',
        'ratio_vectors', 'group_mean', 'layer_divergence', 'group_choices', 'choice_shares'
    ]
