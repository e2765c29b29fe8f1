# Copyright (c) mmnorm contributors. All rights reserved.
"""Compute all ratio layers' ratios together, once per forward of the runner's model."""
from typing import Optional

from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import Runner

from ...layers import BatchedRatios, batched_ratios
from .runner_model import runner_model

__all__ = ['BatchedRatiosHook']


@HOOKS.register_module()
class BatchedRatiosHook(Hook):
    """Put the runner's model under :func:`mmnorm.batched_ratios` for the run: each forward
    (training, validation and test steps) computes the ratios of every SN, SN_tied and SSN layer
    in one computation per kind of layer, instead of a few small ops per layer and call (SSN:
    about 45 per layer and training step, a kernel launch each on a GPU). Values, gradients
    and SSN's choices are those of the layers' own computation; :func:`mmnorm.batched_ratios`
    says when a layer still computes its own.

    The hooks go on the model without its DDP wrapper at ``before_run`` and come off at
    ``after_run`` (mmengine calls none after a run that raised: they stay on the model, which
    computes the same with them). With ``FrozenRatiosHook`` as well, validation and test
    epochs use the frozen ratios (computed once per epoch).

    Example:
        ``custom_hooks = [dict(type='BatchedRatiosHook')]``
    """

    priority = 'NORMAL'

    def __init__(self) -> None:
        self._handle: Optional[BatchedRatios] = None

    def before_run(self, runner: Runner) -> None:
        self.after_run(runner)
        self._handle = batched_ratios(runner_model(runner))

    def after_run(self, runner: Runner) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
