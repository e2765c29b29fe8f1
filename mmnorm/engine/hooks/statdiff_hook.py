# Copyright (c) mmnorm contributors. All rights reserved.
"""Record StatDiff (BCN paper Eq. (8)) of the channels each normalization groups together."""
import json
import os.path as osp
from typing import Dict, List, Optional, Sequence

from mmengine.dist import master_only
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import IterBasedTrainLoop, Runner
from torch import Tensor, nn

from ...analysis.statdiff import (RunningChannelStats, is_statdiff_norm, norm_groups,
                                  select_layers, statdiff, statdiff_moments, summarize)
from ...functional import in_recomputation
from .runner_model import runner_model

__all__ = ['StatDiffHook']


@HOOKS.register_module()
class StatDiffHook(Hook):
    r"""Track each channel's running mean and variance and record StatDiff (BCN Eq. (8)).

    .. math::
        \mathrm{StatDiff}(g) = \frac{\mathrm{std}_{c\in g}(\mu^r_c)}
                                    {\mathbb{E}_{c\in g}[\sqrt{(\sigma^r_c)^2 + \epsilon}]}

    per group ``g`` of channels normalized together (:func:`mmnorm.analysis.statdiff`). In every
    training step each measured layer's per-channel moments update running statistics kept by the
    hook (BN's convention: ``momentum``, unbiased variance; the first step sets them), whatever the
    norm; the layers themselves are not changed. Forward passes outside training steps (validation,
    batch-average recomputation, activation-checkpoint recomputation) are not counted.

    Measured (``layers``):

    - default: the input of every normalization layer (BN, SyncBN, GN, IN, SN, SN_tied, BCN), i.e.
      every conv output feeding a norm; groups from the layer (:func:`~mmnorm.analysis.norm_groups`:
      GN/BCN their groups, IN one channel each, BN/SN ``num_groups`` contiguous groups); for BCN,
      the output of its batch normalization, which is what its channel normalization groups;
    - or the modules named (exact names or ``fnmatch`` patterns such as
      ``'backbone.layer1.*.bn?'``): a normalization layer's input as above, any other module's
      output (e.g. a conv) in ``num_groups`` groups.

    Every ``interval`` iterations, after the last one, and at the end of every epoch (epoch-based
    loops) it

    - puts ``statdiff/mean`` and ``statdiff/std`` (over all groups of all layers, the paper's
      Fig. 3) and ``statdiff/max_layer`` into the message hub, which the logger prints and passes
      to the visualizer backends;
    - sends each layer's mean StatDiff to the visualizer (``statdiff/<layer>``);
    - appends a JSON line to ``<work_dir>/<out_file>``: ``{"iter", "epoch", "end_of_epoch", "mean",
      "std", "max_layer", "layers": {name: {"statdiff", "groups", "num_groups", "channels"}}}``
      (``epoch`` counts completed epochs in end-of-epoch records).

    Statistics are those of the process's own batches (rank 0 writes).

    Args:
        interval (int): iterations between records. Defaults to 50.
        layers (Sequence[str], optional): module names or patterns; default every norm's input.
        num_groups (int): groups for layers without their own (BN, SN, SN_tied, convs); the gcd
            with the channels when it does not divide them. Defaults to 32 (GN's default).
        momentum (float): running-statistics momentum. Defaults to 0.1.
        eps (float): added to each variance (the norms' epsilon). Defaults to 1e-5.
        out_file (str): JSON-lines file in the work dir. Defaults to ``'statdiff.jsonl'``.

    Example:
        >>> custom_hooks = [dict(type='StatDiffHook', interval=100)]
        >>> custom_hooks = [dict(type='StatDiffHook', layers=['backbone.layer4.*'], num_groups=16)]
    """

    priority = 'HIGH'  # after_train_iter before BatchAverageStatsHook's recomputation forwards

    def __init__(self, interval: int = 50, layers: Optional[Sequence[str]] = None,
                 num_groups: int = 32, momentum: float = 0.1, eps: float = 1e-5,
                 out_file: str = 'statdiff.jsonl'):
        if interval < 1:
            raise ValueError(f'interval must be >= 1, got {interval}')
        if num_groups < 1:
            raise ValueError(f'num_groups must be >= 1, got {num_groups}')
        if eps < 0:
            raise ValueError(f'eps must be >= 0, got {eps}')
        if isinstance(layers, str):
            layers = [layers]
        RunningChannelStats(momentum)  # checks the momentum now, not at the first step
        self.interval = interval
        self.layers = list(layers) if layers is not None else None
        self.num_groups = num_groups
        self.momentum = momentum
        self.eps = eps
        self.out_file = out_file
        self.path: Optional[str] = None
        self.stats: Dict[str, RunningChannelStats] = {}
        self.groups: Dict[str, int] = {}
        self._active = False
        self._handles: List = []

    def before_train(self, runner: Runner) -> None:
        self.path = osp.join(runner.work_dir, self.out_file)
        for name, module in select_layers(runner_model(runner), self.layers).items():
            if isinstance(module, nn.LayerNorm):
                norm_groups(module, 1)  # raises: LayerNorm does not group channels
            self.stats[name] = RunningChannelStats(self.momentum)
            self._handles.append(module.register_forward_hook(
                self._observer(name, use_output=not is_statdiff_norm(module))))
        runner.logger.info(f'StatDiffHook: measuring {len(self.stats)} layer(s), records in '
                           f'{self.path}')

    def _observer(self, name: str, use_output: bool):

        def observe(module: nn.Module, args, output) -> None:
            if not (self._active and module.training) or in_recomputation():
                return
            x = output if use_output else args[0]
            if not isinstance(x, Tensor) or x.dim() < 2:
                return
            if name not in self.groups:
                self.groups[name] = norm_groups(module, x.shape[1], self.num_groups)
            mean, var, count = statdiff_moments(module if not use_output else None, x)
            self.stats[name].update(mean, var, count)

        return observe

    def before_train_iter(self, runner: Runner, batch_idx: int, data_batch=None) -> None:
        self._active = True

    def after_train_iter(self, runner: Runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        self._active = False
        if self.every_n_train_iters(runner, self.interval) or self.is_last_train_iter(runner):
            self._record(runner, runner.iter + 1, runner.epoch, end_of_epoch=False)

    def after_train_epoch(self, runner: Runner) -> None:
        if isinstance(runner.train_loop, IterBasedTrainLoop):
            return  # an iteration loop calls this once at its end: not an epoch
        self._record(runner, runner.iter, runner.epoch + 1, end_of_epoch=True)

    def after_train(self, runner: Runner) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def values(self) -> Dict[str, Tensor]:
        """StatDiff per group of every layer measured so far (float64)."""
        return {name: statdiff(s.mean, s.var, self.groups[name], self.eps)
                for name, s in self.stats.items() if s.ready}

    def _record(self, runner: Runner, iteration: int, epoch: int, end_of_epoch: bool) -> None:
        values = self.values()
        if not values:
            return
        overall = summarize(values)
        for key, value in overall.items():
            runner.message_hub.update_scalar(f'train/statdiff/{key}', value)
        layers = {name: {'statdiff': float(v.mean()), 'groups': v.tolist(),
                         'num_groups': self.groups[name], 'channels': self.stats[name].mean.numel()}
                  for name, v in values.items()}
        runner.visualizer.add_scalars(
            {f'statdiff/{name}': r['statdiff'] for name, r in layers.items()}, step=iteration)
        self._append(dict(iter=iteration, epoch=epoch, end_of_epoch=end_of_epoch, **overall,
                          layers=layers))

    @master_only
    def _append(self, record: dict) -> None:
        with open(self.path, 'a') as f:
            f.write(json.dumps(record) + '\n')
