# Copyright (c) mmnorm contributors. All rights reserved.
"""Compute the ratio layers' ratios once per validation and test epoch."""
import contextlib
from typing import Optional

from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import Runner

from ...layers import frozen_ratios
from .runner_model import runner_model

__all__ = ['FrozenRatiosHook']


@HOOKS.register_module()
class FrozenRatiosHook(Hook):
    """Run each validation and test epoch inside :func:`mmnorm.frozen_ratios`: every SN, SN_tied
    and SSN layer computes its ratios at the epoch's first forward and reuses them for the rest
    of it, instead of once per forward (SSN: about 25 small ops per layer and image batch, a
    kernel launch each on a GPU).

    Nothing changes a model's parameters during mmengine's validation and test loops; the
    scope opens at ``before_val_epoch`` / ``before_test_epoch`` and closes at the matching
    ``after_*_epoch`` hook, so an EMA hook that swaps its averaged weights in before the epoch
    (at any priority) is seen by the first forward. A scope an error left open (mmengine
    calls no ``after_*`` hook then) is closed before the next training iteration; meanwhile a
    ``load_state_dict`` or an optimizer step that bumps the version counters is seen anyway.

    Example:
        ``custom_hooks = [dict(type='FrozenRatiosHook')]``
    """

    priority = 'NORMAL'

    def __init__(self) -> None:
        self._scope: Optional[contextlib.ExitStack] = None

    def _open(self, runner: Runner) -> None:
        self._close()
        self._scope = contextlib.ExitStack()
        self._scope.enter_context(frozen_ratios(runner_model(runner)))

    def _close(self, *args, **kwargs) -> None:
        if self._scope is not None:
            self._scope.close()
            self._scope = None

    def before_val_epoch(self, runner: Runner) -> None:
        self._open(runner)

    def before_test_epoch(self, runner: Runner) -> None:
        self._open(runner)

    after_val_epoch = after_test_epoch = _close
    before_train_iter = after_run = _close
