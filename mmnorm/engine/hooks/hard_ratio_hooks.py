# Copyright (c) mmnorm contributors. All rights reserved.
"""Hooks for hard-ratio finetuning and deploy-form evaluation."""
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import Runner

from ...convert.hard_ratios import hard_choices, harden_ratios, summarize, to_deploy
from .runner_model import averaged_models, runner_model

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
    """Evaluate the deploy form: at the start of the test epoch, turn hardened SN layers into
    their cheapest equivalent (:func:`mmnorm.convert.to_deploy`) and log the plan.

    Its priority, LOW, puts it after the weights and statistics the test evaluates are in place:
    after mmengine's ``EMAHook`` swaps the averaged weights in (NORMAL) and after
    :class:`BatchAverageStatsHook` recomputes the statistics (BELOW_NORMAL), which a folded BN
    layer would otherwise miss. An EMA hook's averaged copy is deployed too: the hook swaps the
    two models' tensors back, in order, at the end of the epoch.
    """

    priority = 'LOW'

    def before_test_epoch(self, runner: Runner) -> None:
        model = runner_model(runner)
        model.eval()
        choices = hard_choices(model)  # read before the layers are replaced
        plan = to_deploy(model)
        runner.logger.info('DeployHook:\n' + summarize(plan, choices))
        for averaged in averaged_models(runner):
            to_deploy(averaged.eval())
            if _shapes(averaged) != _shapes(model):
                raise RuntimeError(
                    'DeployHook: the EMA hook\'s averaged copy of the model chose other '
                    'normalizers than the model (their deploy forms differ), so EMAHook could '
                    'not swap their weights back after the test; evaluate the deploy form '
                    'without the EMA hook, or with tools/export_hard_ratios.py first')


def _shapes(model) -> list:
    """The shapes of the parameters and buffers, in the order ``EMAHook`` pairs them."""
    return [tuple(t.shape) for t in list(model.parameters()) + list(model.buffers())]
