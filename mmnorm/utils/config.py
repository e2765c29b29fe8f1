# Copyright (c) mmnorm contributors. All rights reserved.
"""Config-level helpers: find and swap normalizers in every component of a model config, and
finetune from a checkpoint."""
import copy
from typing import Any, Dict, List, Optional, Tuple

from mmengine.config import Config, ConfigDict

__all__ = ['sync_norm_types', 'sync_norm_config', 'replace_norm_types', 'norm_configs',
           'finetune_config', 'plain_layers_config']


def sync_norm_types() -> Dict[str, str]:
    """Registered name of every mmnorm normalizer -> the registered name of its synchronized
    twin (``{'SN': 'SyncSN', 'SN_tied': 'SyncSN_tied', 'BCN': 'SyncBCN', ...}``), read from
    mmengine's ``MODELS`` registry and the layers' ``sync_class()``. (Plain BN is left to
    mmengine's own ``sync_bn`` config key; torch's SyncBatchNorm has no CPU implementation.)"""
    from mmengine.registry import MODELS

    from ..layers import BatchStatsNorm
    registered = {cls: name for name, cls in MODELS.module_dict.items()}
    return {name: registered[cls.sync_class()] for name, cls in MODELS.module_dict.items()
            if isinstance(cls, type) and issubclass(cls, BatchStatsNorm)
            and cls.sync_class() in registered}


def _configs_at(node: Any, key_part: str) -> List[Tuple[dict, str]]:
    """``(parent, key)`` of every dict under ``node`` that is the value of a key containing
    ``key_part``, in config order."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key_part in str(key) and isinstance(value, dict):
                found.append((node, key))
            found += _configs_at(value, key_part)
    elif isinstance(node, (list, tuple)):
        for item in node:
            found += _configs_at(item, key_part)
    return found


def norm_configs(node: Any) -> List[Tuple[dict, str]]:
    """``(parent, key)`` of every norm config under ``node``: a dict that is the value of a key
    containing ``norm_cfg`` (``norm_cfg``, ``conv_norm_cfg``, ...), in config order. A list, so
    callers may replace ``parent[key]`` while going through it."""
    return _configs_at(node, 'norm_cfg')


def replace_norm_types(node: Any, mapping: Dict[str, str]) -> int:
    """Rewrite ``type`` of every norm config under ``node`` (:func:`norm_configs`) per
    ``mapping``. Returns the number of rewritten dicts."""
    count = 0
    for parent, key in norm_configs(node):
        norm = parent[key]
        if norm.get('type') in mapping:
            norm['type'] = mapping[norm['type']]
            count += 1
    return count


def plain_layers_config(node: Any, norm_cfg: dict) -> int:
    """Replace every mmnorm normalizer config under ``node`` by ``norm_cfg`` (e.g.
    ``dict(type='BN')``) and every ``WSConv`` ``conv_cfg`` by ``None`` (a plain convolution):
    the same model with native layers, as a baseline. Returns the number of replaced configs."""
    mmnorm_norms = {name for pair in sync_norm_types().items() for name in pair}
    count = 0
    for parent, key in norm_configs(node):
        if parent[key].get('type') in mmnorm_norms:
            parent[key] = copy.deepcopy(norm_cfg)
            count += 1
    for parent, key in _configs_at(node, 'conv_cfg'):
        if parent[key].get('type') == 'WSConv':
            parent[key] = None
            count += 1
    return count


def finetune_config(cfg: Config, checkpoint: str, hard_ratios: bool = False) -> Config:
    """A copy of ``cfg`` that starts from ``checkpoint`` (``load_from``, not a resume), with
    ``HardRatiosHook`` added when ``hard_ratios``: the SN ratios become one-hot and frozen
    before the first step (SN study Table 2, right)."""
    cfg = copy.deepcopy(cfg)
    cfg.load_from = checkpoint
    cfg.resume = False
    if hard_ratios:
        cfg.custom_hooks = list(cfg.get('custom_hooks') or []) + [dict(type='HardRatiosHook')]
    return cfg


def sync_norm_config(cfg: Config, model_key: Optional[str] = 'model') -> int:
    """Switch SN/SN_tied/BCN in ``cfg.model`` to their synchronized versions.

    The synchronized layers fall back to local statistics when not distributed, so the switched
    config still runs in one process. Returns the number of norm configs changed.
    """
    target = cfg if model_key is None else cfg.get(model_key, ConfigDict())
    return replace_norm_types(target, sync_norm_types())
