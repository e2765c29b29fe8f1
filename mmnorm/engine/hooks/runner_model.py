# Copyright (c) mmnorm contributors. All rights reserved.
"""The runner's models as the hooks need them: unwrapped from DDP / FSDP wrappers, and the
averaged copies of mmengine's ``EMAHook``."""
from typing import List

from mmengine.hooks import EMAHook
from mmengine.model import is_model_wrapper
from torch import nn

__all__ = ['runner_model', 'averaged_models', 'ema_hooks']


def runner_model(runner) -> nn.Module:
    """``runner.model`` without its distributed wrapper (``.module``), or itself."""
    model = runner.model
    return model.module if is_model_wrapper(model) else model


def averaged_models(runner) -> List[nn.Module]:
    """The averaged copies (``ema_model.module``) of the runner's ``EMAHook`` s.

    Such a hook swaps its copy's weights (and buffers, with ``update_buffers=True``) into the
    model at the start of every validation and test epoch (at its priority, NORMAL by default;
    49 in mmdet's RTMDet and YOLOX configs), swaps them back at the end, and writes its copy's
    weights and buffers as every checkpoint's ``state_dict``: what is evaluated and saved is the
    averaged model. (Before the hook's ``begin_iter`` / ``begin_epoch`` the copy follows the
    model step by step, and is swapped and saved all the same.)"""
    return [hook.ema_model.module for hook in ema_hooks(runner)]


def ema_hooks(runner) -> List[EMAHook]:
    """The runner's ``EMAHook`` s that hold an averaged copy."""
    return [hook for hook in getattr(runner, 'hooks', ())
            if isinstance(hook, EMAHook) and getattr(hook, 'ema_model', None) is not None]
