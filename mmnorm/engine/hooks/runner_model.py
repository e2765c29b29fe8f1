# Copyright (c) mmnorm contributors. All rights reserved.
"""The runner's model as the hooks need it: unwrapped from DDP / FSDP wrappers."""
from mmengine.model import is_model_wrapper
from torch import nn

__all__ = ['runner_model']


def runner_model(runner) -> nn.Module:
    """``runner.model`` without its distributed wrapper (``.module``), or itself."""
    model = runner.model
    return model.module if is_model_wrapper(model) else model
