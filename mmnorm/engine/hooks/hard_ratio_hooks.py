# Copyright (c) mmnorm contributors. All rights reserved.
"""Hooks for hard-ratio finetuning and deploy-form evaluation."""
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import Runner

from ...convert.hard_ratios import hard_choices, harden_ratios, summarize, to_deploy
from .runner_model import runner_model

__all__ = ['HardRatiosHook', 'DeployHook']


@HOOKS.register_module()
class HardRatiosHook(Hook):
    """Finetune with hard (one-hot, argmax) SN ratios, frozen (SN study Table 2, right).

    Runs after the checkpoint is loaded, before the first iteration: the ratios become one-hot
    and stop receiving gradients, so the optimizer leaves them alone.
    """

    priority = 'VERY_HIGH'

    def before_train(self, runner: Runner) -> None:
        choices = harden_ratios(runner_model(runner))
        runner.logger.info(f'HardRatiosHook: {len(choices)} SN layer(s) with frozen one-hot '
                           f'ratios')


@HOOKS.register_module()
class DeployHook(Hook):
    """Evaluate the deploy form: before testing, turn hardened SN layers into their cheapest
    equivalent (:func:`mmnorm.convert.to_deploy`) and log the plan."""

    priority = 'VERY_HIGH'

    def before_test(self, runner: Runner) -> None:
        model = runner_model(runner)
        model.eval()
        choices = hard_choices(model)  # read before the layers are replaced
        plan = to_deploy(model)
        runner.logger.info('DeployHook:\n' + summarize(plan, choices))
