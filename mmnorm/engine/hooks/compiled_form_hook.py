# Copyright (c) mmnorm contributors. All rights reserved.
"""The form of mmnorm's layers (compiled or public eager ops) chosen in a config."""
import os

from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import Runner

from ...functional.compiled import COMPILE_AFTER, compile_mode, resolve_mode, use_compiled

__all__ = ['CompiledFormHook']


@HOOKS.register_module()
class CompiledFormHook(Hook):
    """Set the form mmnorm's layers run in (:mod:`mmnorm.functional.compiled`) when the run
    starts: ``'auto'`` (the default: compiled after ``COMPILE_AFTER`` calls of a kind),
    ``'always'`` or ``'never'``. The environment variable ``MMNORM_COMPILE``, when set,
    overrides the config (as timm's fast-norm switch does), so that one run can be changed
    without editing its config.

    Example:
        >>> custom_hooks = [dict(type='CompiledFormHook', mode='never')]
    """

    priority = 'VERY_HIGH'

    def __init__(self, mode: str = 'auto'):
        self.mode = resolve_mode(mode)  # a bad mode fails when the config is built

    def before_run(self, runner: Runner) -> None:
        override = os.environ.get('MMNORM_COMPILE', '').strip()
        if override:
            use_compiled(resolve_mode(override))
            source = f'MMNORM_COMPILE={override} (overrides the config\'s {self.mode!r})'
        else:
            use_compiled(self.mode)
            source = 'the config'
        what = {'auto': f'compiled after {COMPILE_AFTER} calls of a kind',
                'always': 'compiled from the first call', 'never': 'public eager ops'}
        runner.logger.info(f'CompiledFormHook: mmnorm layers {what[compile_mode()]} '
                           f'(mode {compile_mode()!r}, from {source})')
