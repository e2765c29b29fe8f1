# Copyright (c) mmnorm contributors. All rights reserved.
"""The runner's models as the hooks need them: unwrapped from DDP / FSDP wrappers, and the
averaged copies of mmengine's ``EMAHook``."""
from typing import List

from mmengine.hooks import EMAHook
from mmengine.model import is_model_wrapper
from torch import nn

__all__ = ['runner_model', 'averaged_models']


def runner_model(runner) -> nn.Module:
    """``runner.model`` without its distributed wrapper (``.module``), or itself."""
    model = runner.model
    return model.module if is_model_wrapper(model) else model


def averaged_models(runner) -> List[nn.Module]:
    """The averaged copies (``ema_model.module``) of the runner's ``EMAHook`` s that have
    started averaging.

    Such a hook swaps its copy's weights into the model at the start of every validation and
    test epoch (at its priority, NORMAL by default; 49 in mmdet's RTMDet and YOLOX configs),
    swaps them back at the end, and writes its copy's weights and buffers as the checkpoint's
    ``state_dict``: what is evaluated and saved is the averaged model."""
    models = []
    for hook in getattr(runner, 'hooks', ()):
        if not isinstance(hook, EMAHook) or getattr(hook, 'ema_model', None) is None:
            continue
        started = getattr(hook, '_ema_started', None)  # (mmengine's own test, when it has one)
        if started is None or started(runner):
            models.append(hook.ema_model.module)
    return models
