# Copyright (c) mmnorm contributors. All rights reserved.
"""Build a config's model, and load a checkpoint into it: what the tools that do not go through a
Runner need."""
import copy
from typing import Optional

from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope
from mmengine.runner import load_checkpoint
from torch import nn

__all__ = ['config_scope', 'build_model']


def config_scope(cfg: Config) -> str:
    """The codebase a config belongs to (``default_scope``; ``mmengine`` when it has none)."""
    return cfg.get('default_scope', None) or 'mmengine'


def build_model(cfg: Config, checkpoint: Optional[str] = None, strict: bool = True,
                device: str = 'cpu') -> nn.Module:
    """``cfg.model`` built as a Runner builds it: in the config's scope (made the default scope,
    so that its datasets and transforms resolve too) and with a top-level ``data_preprocessor``
    merged in; then ``checkpoint`` loaded through mmengine's ``load_checkpoint`` (and so mmnorm's
    safe loader), on ``device``."""
    init_default_scope(config_scope(cfg))
    model_cfg = copy.deepcopy(cfg.model)
    # As mmengine's Runner does: mmpretrain configs give the data preprocessor at top level.
    if cfg.get('data_preprocessor', None) is not None:
        model_cfg.setdefault('data_preprocessor', copy.deepcopy(cfg.data_preprocessor))
    model = MODELS.build(model_cfg)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, map_location='cpu', strict=strict)
    return model.to(device)
