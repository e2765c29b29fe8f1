# Copyright (c) mmnorm contributors. All rights reserved.
"""Log SN importance ratios during training and keep their history as JSON lines."""
import json
import os.path as osp
from typing import Optional

from mmengine.dist import master_only
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import Runner

from ...utils.ratios import (group_choices, group_mean, layer_divergence, mean_radius,
                             model_ratios, one_hot_share, record_groups)
from .runner_model import runner_model

__all__ = ['SNRatioLoggerHook']


@HOOKS.register_module()
class SNRatioLoggerHook(Hook):
    """Record the mean/var ratios of every SN-like layer (SN, SN_tied, SSN) every ``interval``
    iterations.

    - appends one JSON line ``{"iter", "epoch", "layers": {name: {"normalizers", "mean", "var",
      "tied"}}}`` to ``<work_dir>/<out_file>`` (``tools/plot_ratios.py`` draws it);
    - puts the ratios averaged over layers (``sn/mean_IN`` ... ``sn/var_BN``), the mean
      divergence ``sn/divergence`` (D(λμ‖λσ), SN study Fig. 3), the share of one-hot ratio
      vectors ``sn/one_hot`` and, for SSN, the mean SparsestMax radius ``sn/radius`` into the
      message hub, so the logger prints them and visualizer backends (TensorBoard, ...) plot
      them. Records carry each layer's ``ratio_details()`` too (SSN: ``radius``, ``fixed``).

    Layers with ratio groups (``ratio_groups=G > 1``) are recorded whole in the JSON lines
    (``"groups": G`` and one μ and one σ vector per group, :mod:`mmnorm.utils.ratios`;
    ``tools/plot_ratios.py`` draws them as heat maps), but not as scalars per group: each such
    layer counts once in the averages, with its ratios averaged over its groups (the mean weight
    of each normalizer over its channels) and its divergence averaged over its groups;
    ``sn/one_hot`` counts every group's vectors. One scalar more when a model has such layers:
    ``sn/split``, the share of grouped layers whose groups do not all choose the same normalizer
    (argmax) for μ or for σ, the IBN-Net-like layers.

    Args:
        interval (int): iterations between records. Defaults to 50.
        out_file (str): file name in the work dir. Defaults to ``'sn_ratios.jsonl'``.

    Example:
        >>> custom_hooks = [dict(type='SNRatioLoggerHook', interval=100)]
    """

    priority = 'BELOW_NORMAL'  # after the optimizer step, before the logger prints

    def __init__(self, interval: int = 50, out_file: str = 'sn_ratios.jsonl'):
        if interval < 1:
            raise ValueError(f'interval must be >= 1, got {interval}')
        self.interval = interval
        self.out_file = out_file
        self.path: Optional[str] = None

    def before_train(self, runner: Runner) -> None:
        self.path = osp.join(runner.work_dir, self.out_file)
        self._record(runner, runner.iter)  # the starting point (1/3 each for a new model)

    def after_train_iter(self, runner: Runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        if self.every_n_train_iters(runner, self.interval) or self.is_last_train_iter(runner):
            self._record(runner, runner.iter + 1)

    def _record(self, runner: Runner, iteration: int) -> None:
        model = runner_model(runner)
        layers = model_ratios(model)
        if not layers:
            return
        hub = runner.message_hub
        count = len(layers)
        first = next(iter(layers.values()))
        for kind in ('mean', 'var'):
            means = [group_mean(r, kind) for r in layers.values()]  # a layer counts once
            for index, normalizer in enumerate(first['normalizers']):
                total = sum(m[index] for m in means if len(m) > index)
                hub.update_scalar(f'train/sn/{kind}_{normalizer}', total / count)
        divergence = sum(layer_divergence(r) for r in layers.values()) / count
        hub.update_scalar('train/sn/divergence', divergence)
        hub.update_scalar('train/sn/one_hot', one_hot_share(layers))
        grouped = [r for r in layers.values() if record_groups(r) > 1]
        if grouped:
            split = sum(any(len(set(group_choices(r, kind))) > 1 for kind in ('mean', 'var'))
                        for r in grouped)
            hub.update_scalar('train/sn/split', split / len(grouped))
        radius = mean_radius(layers)
        if radius is not None:
            hub.update_scalar('train/sn/radius', radius)
        self._append(dict(iter=iteration, epoch=runner.epoch, layers=layers))

    @master_only
    def _append(self, record: dict) -> None:
        with open(self.path, 'a') as f:
            f.write(json.dumps(record) + '\n')
