# Copyright (c) mmnorm contributors. All rights reserved.
"""Build a config's model, and load a checkpoint into it: what the tools that do not go through a
Runner need."""
import copy
import os.path as osp
import re
from typing import Optional, Tuple

from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope
from torch import nn

from .checkpoint import CheckpointFileError, UnsafeCheckpointError, load_checkpoint_file

__all__ = ['config_scope', 'load_config', 'build_model', 'build_model_for_tool', 'load_weights',
           'CheckpointMismatchError', 'MODEL_LOAD_ERRORS']


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's weights do not fit the config's model (keys or shapes)."""


#: What :func:`build_model` raises for a checkpoint it cannot use (the tools report these as
#: one-line errors).
MODEL_LOAD_ERRORS = (FileNotFoundError, CheckpointFileError, UnsafeCheckpointError,
                     CheckpointMismatchError)


def _summary(kind: str, keys) -> str:
    keys = list(keys)
    shown = ', '.join(keys[:4]) + (f', ... ({len(keys) - 4} more)' if len(keys) > 4 else '')
    return f'{len(keys)} {kind} ({shown})'


def load_weights(model: nn.Module, checkpoint: str, strict: bool = True) -> dict:
    """Load ``checkpoint`` (an mmengine checkpoint or a bare state dict, ``module.`` prefixes
    removed as mmengine removes them) into ``model``; returns the whole checkpoint.

    Raises:
        CheckpointMismatchError: with ``strict``, when keys are missing or unexpected, or shapes
            differ; the message counts them and names the first few.
    """
    loaded = load_checkpoint_file(checkpoint, map_location='cpu')
    state = loaded.get('state_dict', loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise CheckpointMismatchError(f'{checkpoint} holds no state dict')
    state = {re.sub(r'^module\.', '', k): v for k, v in state.items()}
    own = model.state_dict()
    shapes = [f'{k} {tuple(v.shape)} vs {tuple(own[k].shape)}' for k, v in state.items()
              if k in own and hasattr(v, 'shape') and v.shape != own[k].shape]
    if shapes:
        raise CheckpointMismatchError(
            f'{checkpoint} does not fit the model of the config: {_summary("shape(s)", shapes)}')
    result = model.load_state_dict(state, strict=False)
    problems = [_summary(kind, keys) for kind, keys in
                (('missing key(s)', result.missing_keys),
                 ('unexpected key(s)', result.unexpected_keys)) if keys]
    if strict and problems:
        raise CheckpointMismatchError(f'{checkpoint} does not fit the model of the config: '
                                      + '; '.join(problems))
    return loaded


def config_scope(cfg: Config) -> str:
    """The codebase a config belongs to (``default_scope``; ``mmengine`` when it has none)."""
    return cfg.get('default_scope', None) or 'mmengine'


def build_model(cfg: Config, checkpoint: Optional[str] = None, strict: bool = True,
                device: str = 'cpu') -> nn.Module:
    """``cfg.model`` built as a Runner builds it: in the config's scope (made the default scope,
    so that its datasets and transforms resolve too) and with a top-level ``data_preprocessor``
    merged in; then ``checkpoint`` loaded (:func:`load_weights`), on ``device``. Raises one of
    :data:`MODEL_LOAD_ERRORS` for a checkpoint it cannot use."""
    init_default_scope(config_scope(cfg))
    model_cfg = copy.deepcopy(cfg.model)
    # As mmengine's Runner does: mmpretrain configs give the data preprocessor at top level.
    if cfg.get('data_preprocessor', None) is not None:
        model_cfg.setdefault('data_preprocessor', copy.deepcopy(cfg.data_preprocessor))
    model = MODELS.build(model_cfg)
    if checkpoint is not None:
        load_weights(model, checkpoint, strict)
    return model.to(device)


#: The config files mmengine reads.
CONFIG_SUFFIXES = ('.py', '.yml', '.yaml', '.json')


def load_config(path: str, cfg_options: Optional[dict] = None) -> Config:
    """``Config.fromfile(path)`` with the tool's ``--cfg-options`` merged in; a missing file ends
    the tool with one line (``SystemExit``) instead of a traceback."""
    if not osp.isfile(path):
        raise SystemExit(f'error: config {path} does not exist')
    if not path.endswith(CONFIG_SUFFIXES):
        hint = ('; the config comes first, then the checkpoint' if path.endswith(
            ('.pth', '.pt', '.ckpt')) else '')
        raise SystemExit(f'error: {path} is not a config (a {", ".join(CONFIG_SUFFIXES)} '
                         f'file){hint}')
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def build_model_for_tool(cfg: Config, checkpoint: str) -> Tuple[nn.Module, dict]:
    """:func:`build_model` and :func:`load_weights` for command-line tools: returns the model
    and the whole checkpoint; a checkpoint it cannot use ends the tool with one ``error:``
    line (``SystemExit``) instead of a traceback."""
    model = build_model(cfg)
    try:
        return model, load_weights(model, checkpoint)
    except MODEL_LOAD_ERRORS as error:
        raise SystemExit(f'error: {error}')
