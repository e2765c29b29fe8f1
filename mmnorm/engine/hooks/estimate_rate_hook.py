# Copyright (c) mmnorm contributors. All rights reserved.
"""Tie the update rate of estimated BCN statistics to the learning rate (BCN Algorithm 1)."""
from typing import Dict, List, Optional

import torch
from mmengine.hooks import Hook
from mmengine.optim import OptimWrapper, OptimWrapperDict
from mmengine.registry import HOOKS
from mmengine.runner import Runner

from ...layers import BatchStatsNorm
from .runner_model import runner_model

__all__ = ['EstimateRateHook']


def _optimizers(optim_wrapper) -> List[torch.optim.Optimizer]:
    if isinstance(optim_wrapper, OptimWrapperDict):
        return [w.optimizer for w in optim_wrapper.values()]
    if isinstance(optim_wrapper, OptimWrapper):
        return [optim_wrapper.optimizer]
    return [optim_wrapper]


@HOOKS.register_module()
class EstimateRateHook(Hook):
    """Set every estimated BCN's update rate ``r`` to the current learning rate, every iteration.

    BCN Algorithm 1: "we set the update rate r to be the learning rate of trainable parameters".
    The rate of a layer is the learning rate of the optimizer parameter group that holds the
    layer's own parameters (so ``lr_mult`` / ``custom_keys`` apply), or of the first group for a
    layer without parameters. It is read before each iteration, after the parameter schedulers
    have set it (warm-up included), and after a resume it follows the restored optimizer, whatever
    rate the checkpoint stored.

    Args:
        scale (float): multiply the learning rate by this factor. Defaults to 1 (the paper).

    Example:
        >>> custom_hooks = [dict(type='EstimateRateHook')]
    """

    priority = 'NORMAL'

    def __init__(self, scale: float = 1.0):
        if not scale > 0:
            raise ValueError(f'scale must be > 0, got {scale!r}')
        self.scale = scale
        self._groups: Optional[Dict[BatchStatsNorm, dict]] = None
        self._group_names: Dict[BatchStatsNorm, str] = {}

    def before_train(self, runner: Runner) -> None:
        self._groups = None  # the optimizer may be rebuilt (resume)

    def _layer_groups(self, runner: Runner) -> Dict[BatchStatsNorm, dict]:
        model = runner_model(runner)
        layers = [m for m in model.modules() if isinstance(m, BatchStatsNorm) and m.estimated]
        groups_of = {}
        optimizers = _optimizers(runner.optim_wrapper)
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                for p in group['params']:
                    groups_of[id(p)] = group
        names = {id(group): f'param group {index} of optimizer {k}'
                 for k, optimizer in enumerate(optimizers)
                 for index, group in enumerate(optimizer.param_groups)}
        default = optimizers[0].param_groups[0]
        found = {}
        self._group_names = {}
        for layer in layers:
            group = next((groups_of[id(p)] for p in layer.parameters() if id(p) in groups_of),
                         default)
            found[layer] = group
            layer_name = next((n for n, m in model.named_modules() if m is layer), '?')
            self._group_names[layer] = f'layer {layer_name} (its {names[id(group)]})'
        if not layers:
            runner.logger.warning('EstimateRateHook: the model has no BCN layer with '
                                  'estimate=True; the hook does nothing')
        return found

    def before_train_iter(self, runner: Runner, batch_idx: int, data_batch=None) -> None:
        if self._groups is None:
            self._groups = self._layer_groups(runner)
        for layer, group in self._groups.items():
            rate = group['lr'] * self.scale
            if not 0.0 <= rate <= 1.0:
                index = self._group_names[layer]
                raise ValueError(
                    f'EstimateRateHook: {index} has lr {group["lr"]!r} x scale {self.scale} = '
                    f'{rate!r}, outside [0, 1]. The estimate rate is the learning rate (BCN '
                    f'Algorithm 1); lower the scale, or that group\'s lr / lr_mult')
            layer.set_estimate_rate(rate)
