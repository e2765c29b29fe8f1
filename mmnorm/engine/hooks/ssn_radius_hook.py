# Copyright (c) mmnorm contributors. All rights reserved.
"""Grow Sparse SN's SparsestMax radius with the training progress (SSN paper, Sec. 3)."""
from typing import List, Optional

from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import Runner

from ...layers import BatchStatsNorm
from .runner_model import runner_model

__all__ = ['SSNRadiusHook']


@HOOKS.register_module()
class SSNRadiusHook(Hook):
    """Before every training iteration, set each layer that follows the training progress
    (``follows_progress``: SSN, SyncSSN) to ``progress = iter / max_iters``: SSN's SparsestMax
    radius grows from 0 at the first iteration to ``(max_iters - 1) / max_iters`` at the last, as
    the authors' training script sets it, so that every ratio vector ends one-hot.

    Epoch-based loops count iterations too (``max_iters = max_epochs * len(dataloader)``). After
    a resume the radius continues from the restored iteration. The radius is set in
    ``before_train`` already, for any forward another hook runs then.

    A Runner that trains SSN layers without this hook stops at their first training step with an
    error that says to add it (:class:`~mmnorm.layers.SparseSwitchableNorm`).

    Example:
        >>> custom_hooks = [dict(type='SSNRadiusHook')]
    """

    priority = 'NORMAL'

    def __init__(self):
        self._layers: Optional[List[BatchStatsNorm]] = None

    def before_train(self, runner: Runner) -> None:
        self._layers = [m for m in runner_model(runner).modules()
                        if isinstance(m, BatchStatsNorm) and m.follows_progress]
        if not self._layers:
            runner.logger.warning('SSNRadiusHook: the model has no layer that follows the '
                                  'training progress (SSN); the hook does nothing')
        else:
            runner.logger.info(f'SSNRadiusHook: {len(self._layers)} SSN layer(s); radius '
                               f'{runner.iter / runner.max_iters:.4f} at iteration {runner.iter}'
                               f' of {runner.max_iters}')
        # Already now: a forward of another hook's before_train sees the run's radius too.
        self._set(runner)

    def before_train_iter(self, runner: Runner, batch_idx: int, data_batch=None) -> None:
        self._set(runner)

    def _set(self, runner: Runner) -> None:
        progress = min(runner.iter / runner.max_iters, 1.0)
        for layer in self._layers or ():
            layer.set_progress(progress)
