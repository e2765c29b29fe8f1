# Copyright (c) mmnorm contributors. All rights reserved.
"""Config-level helpers: swap normalizers in every component of a model config."""
from typing import Any, Dict, Optional

from mmengine.config import Config, ConfigDict

__all__ = ['SYNC_NORM_TYPES', 'sync_norm_config', 'replace_norm_types']

#: mmnorm layer type -> its synchronized version, as used by ``--sync-norm``. (Plain BN is left
#: to mmengine's own ``sync_bn`` config key; torch's SyncBatchNorm has no CPU implementation.)
SYNC_NORM_TYPES = {'SN': 'SyncSN', 'SN_tied': 'SyncSN_tied', 'BCN': 'SyncBCN'}


def replace_norm_types(node: Any, mapping: Dict[str, str]) -> int:
    """Rewrite ``type`` of every ``norm_cfg``-like dict under ``node`` per ``mapping``.

    A dict counts as a norm config when it is the value of a key containing ``norm_cfg`` (e.g.
    ``norm_cfg``, ``conv_norm_cfg``). Returns the number of rewritten dicts.
    """
    count = 0
    if isinstance(node, dict):
        for key, value in node.items():
            if 'norm_cfg' in str(key) and isinstance(value, dict) and \
                    value.get('type') in mapping:
                value['type'] = mapping[value['type']]
                count += 1
            count += replace_norm_types(value, mapping)
    elif isinstance(node, (list, tuple)):
        for item in node:
            count += replace_norm_types(item, mapping)
    return count


def sync_norm_config(cfg: Config, model_key: Optional[str] = 'model') -> int:
    """Switch SN/SN_tied/BCN in ``cfg.model`` to their synchronized versions.

    The synchronized layers fall back to local statistics when not distributed, so the switched
    config still runs in one process. Returns the number of norm configs changed.
    """
    target = cfg if model_key is None else cfg.get(model_key, ConfigDict())
    return replace_norm_types(target, SYNC_NORM_TYPES)
