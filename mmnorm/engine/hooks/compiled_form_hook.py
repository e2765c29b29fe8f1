# Copyright (c) mmnorm contributors. All rights reserved.
"""The form of mmnorm's layers (compiled or the eager forms) chosen in a config."""
import os
from typing import Optional

from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import Runner

from ...functional.compiled import (COMPILE_AFTER_ITERS, COMPILED, auto_switch, compile_mode,
                                    resolve_mode, use_compiled)

__all__ = ['CompiledFormHook']


@HOOKS.register_module()
class CompiledFormHook(Hook):
    """Choose the form mmnorm's layers run in (:mod:`mmnorm.functional.compiled`) for a run.

    The compiled form is opt-in: without this hook (and without ``MMNORM_COMPILE``) the layers
    run their eager forms. The mode is set when the run starts:

    - ``'auto'`` (the hook's default): the eager forms for the first ``compile_after_iters``
      training iterations, compiled from training iteration ``compile_after_iters`` on
      (counted from 0; ``runner.iter``, so a resumed run past it is compiled from its first
      iteration). The switch is thrown in :meth:`before_train_iter` only, from the iteration
      number only: every rank switches at the same iteration whatever its data, and a
      validation or test loop runs in the form it starts with (a run that only evaluates runs
      the eager forms);
    - ``'always'``: compiled from the first call;
    - ``'never'``: the eager forms.

    The environment variable ``MMNORM_COMPILE``, when set, overrides the config (as timm's
    fast-norm switch does), so that one run can be changed without editing its config; the hook
    logs which of the two decided.

    Args:
        mode (str | bool): ``'auto'``, ``'always'`` (``True``) or ``'never'`` (``False``).
            Defaults to ``'auto'``.
        compile_after_iters (int): training iterations in the eager forms under ``'auto'``.
            Defaults to :data:`~mmnorm.functional.compiled.COMPILE_AFTER_ITERS`.

    Example:
        >>> custom_hooks = [dict(type='CompiledFormHook', mode='auto', compile_after_iters=100)]
    """

    priority = 'VERY_HIGH'

    def __init__(self, mode: str = 'auto', compile_after_iters: int = COMPILE_AFTER_ITERS):
        self.mode = resolve_mode(mode)  # a bad mode fails when the config is built
        if int(compile_after_iters) != compile_after_iters or compile_after_iters < 0:
            raise ValueError('CompiledFormHook: compile_after_iters must be an int >= 0, got '
                             f'{compile_after_iters!r}')
        self.compile_after_iters = int(compile_after_iters)
        self._switched_at: Optional[int] = None

    def before_run(self, runner: Runner) -> None:
        """Set the mode (the config's, or ``MMNORM_COMPILE``'s) and log it; ``'auto'`` starts
        in the eager forms."""
        override = os.environ.get('MMNORM_COMPILE', '').strip()
        if override:
            use_compiled(resolve_mode(override))
            source = f'MMNORM_COMPILE={override} (overrides the config\'s {self.mode!r})'
        else:
            use_compiled(self.mode)
            source = 'the config'
        self._switched_at = None
        what = {'auto': 'the eager forms, compiled from training iteration '
                        f'{self.compile_after_iters} on (all ranks)',
                'always': 'compiled from the first call', 'never': 'the eager forms'}
        runner.logger.info(f'CompiledFormHook: mmnorm layers run {what[compile_mode()]} '
                           f'(mode {compile_mode()!r}, from {source})')

    def before_train_iter(self, runner: Runner, batch_idx: int,
                          data_batch: Optional[dict] = None) -> None:
        """Under ``'auto'``, throw the switch at training iteration ``compile_after_iters``
        (the same iteration on every rank)."""
        if compile_mode() != 'auto':
            return
        compiled = runner.iter >= self.compile_after_iters
        auto_switch(compiled)
        if compiled and self._switched_at is None:
            self._switched_at = runner.iter
            state = ('compiled' if COMPILED.failed is None else
                     f'the eager forms (the compiled form failed: {COMPILED.failed})')
            runner.logger.info(f'CompiledFormHook: mmnorm layers run {state} from training '
                               f'iteration {runner.iter} on')
