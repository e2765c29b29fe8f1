# Copyright (c) mmnorm contributors. All rights reserved.
"""Plumbing shared by the studies in ``tools/analysis/``: config edits, one training or test run
with mmengine's Runner in this process, progress lines, and the CSV / Markdown / JSON outputs.

Each run gets its own work dir, experiment name (so mmengine's logger, visualizer and message
hub instances do not mix runs) and the config's seed. A study writes ``results.json`` after every
run, so what finished is kept when a later run fails.
"""
import argparse
import copy
import csv
import io
import json
import os
import os.path as osp
import shutil
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from mmengine.config import Config, DictAction
from mmengine.hooks import Hook
from mmengine.runner import IterBasedTrainLoop

from ..utils.files import atomic_write, check_writable
from ..utils.config import norm_configs
from ..utils.runner import build_runner, last_checkpoint

__all__ = [
    'DIGITS_CONFIG', 'add_study_arguments', 'save_figure', 'RATIO_COLORS', 'scale_batch_size',
    'set_length', 'replace_norms', 'norm_spec', 'run_training', 'run_test', 'primary_metric',
    'markdown_table', 'write_csv', 'write_text', 'StudyOutput', 'say'
]

#: The studies' default config, relative to the repository that holds ``tools/analysis/``.
DIGITS_CONFIG = osp.join('configs', 'analysis', 'resnet18-s3-w32_sn_1xb32_digits.py')

#: Normalizer colours of the SN study's figures (Fig. 4: BN orange, IN green, LN red).
RATIO_COLORS = {'IN': '#3fa34d', 'LN': '#d43b3b', 'BN': '#f28e2b'}


def say(message: str) -> None:
    print(message, flush=True)


def add_study_arguments(parser: argparse.ArgumentParser, default_out: str, tool: str) -> None:
    """CONFIG (default: the digits config of the repository holding ``tool``, the script's
    ``__file__``), ``--epochs`` | ``--iters``, ``--out``, ``--overwrite``, ``--verbose`` and
    ``--cfg-options``, as both studies take them."""
    root = osp.dirname(osp.dirname(osp.dirname(osp.abspath(tool))))
    parser.add_argument('config', nargs='?', default=osp.join(root, DIGITS_CONFIG),
                        help='the config (default: the digits config in configs/analysis/)')
    length = parser.add_mutually_exclusive_group()
    length.add_argument('--epochs', type=int, help="epochs per run (default: the config's)")
    length.add_argument('--iters', type=int,
                        help='iterations per run instead of epochs (smoke runs)')
    parser.add_argument('--out', default=default_out, help=f'output folder ({default_out})')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace the results of an earlier study in --out')
    parser.add_argument('--verbose', action='store_true', help="show mmengine's INFO logs")
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings in the config, key=value')


def save_figure(fig, path: str) -> None:
    """Write a matplotlib figure, atomically, in the format of ``path``'s extension (PNG
    without one), and close it."""
    import matplotlib.pyplot as plt
    fmt = osp.splitext(path)[1][1:].lower() or 'png'
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format=fmt))
    finally:
        plt.close(fig)


def scale_batch_size(cfg: Config, batch_size: int) -> float:
    """Set the training batch size and scale the learning rate linearly from the config's.

    Returns:
        the new learning rate.
    """
    if batch_size < 1:
        raise ValueError(f'batch sizes must be >= 1, got {batch_size}')
    base = cfg.train_dataloader.batch_size
    optimizer = cfg.optim_wrapper.optimizer
    optimizer.lr = optimizer.lr * batch_size / base
    cfg.train_dataloader.batch_size = batch_size
    return optimizer.lr


def set_length(cfg: Config, epochs: Optional[int] = None, iters: Optional[int] = None) -> str:
    """Train ``iters`` iterations (iteration loop) or ``epochs`` epochs; no validation in between
    (the studies test once at the end). Epoch-based schedulers that ended with the config's last
    epoch (``T_max`` / ``end``) end with the new one. Returns a description."""
    train_cfg = cfg.train_cfg
    if iters is not None:
        if iters < 1:
            raise ValueError(f'--iters must be >= 1, got {iters}')
        cfg.train_cfg = dict(by_epoch=False, max_iters=iters, val_interval=iters + 1)
        cfg.default_hooks.checkpoint = dict(type='CheckpointHook', by_epoch=False,
                                            interval=iters, max_keep_ckpts=1)
        return f'{iters} iteration(s)'
    if not train_cfg.get('by_epoch', train_cfg.get('type') == 'EpochBasedTrainLoop'):
        raise ValueError('the studies train for a number of epochs: the config trains by '
                         'iterations (train_cfg.max_iters); pass --iters N instead')
    old = train_cfg.max_epochs
    epochs = old if epochs is None else epochs
    if epochs < 1:
        raise ValueError(f'--epochs must be >= 1, got {epochs}')
    train_cfg.max_epochs = epochs
    train_cfg.val_interval = epochs + 1
    schedulers = cfg.get('param_scheduler') or []
    for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
        if scheduler.get('by_epoch', True):
            for key in ('T_max', 'end'):
                if scheduler.get(key) == old:
                    scheduler[key] = epochs
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=epochs, max_keep_ckpts=1)
    return f'{epochs} epoch(s)'


#: ``--norms`` names: (norm_cfg, weight-standardized convs). ``G`` is replaced by the groups.
_NORMS = {
    'BN': dict(type='BN'), 'GN': dict(type='GN', num_groups='G'),
    'LN': dict(type='GN', num_groups=1), 'SN': dict(type='SN'), 'SN_tied': dict(type='SN_tied'),
    'BCN': dict(type='BCN', num_groups='G'),
}


def norm_spec(name: str, groups: int) -> tuple:
    """``'GN+WS'`` → ``(dict(type='GN', num_groups=groups), True)``. LN is GN with one group (LN
    over C, H, W in a ConvNet, as the BCN paper uses it)."""
    base, _, suffix = name.partition('+')
    if base not in _NORMS or suffix not in ('', 'WS'):
        raise ValueError(f'unknown normalizer {name!r}: use one of {sorted(_NORMS)}, each '
                         f'optionally with +WS (e.g. GN+WS)')
    norm_cfg = {k: (groups if v == 'G' else v) for k, v in _NORMS[base].items()}
    return norm_cfg, suffix == 'WS'


def replace_norms(cfg: Config, norm_cfg: dict, ws: bool) -> int:
    """Give every norm config of ``cfg.model`` (:func:`~mmnorm.utils.config.norm_configs`) this
    one, and the module holding it ``conv_cfg=dict(type='WSConv')`` with ``ws``, else plain
    convs. Returns how many were replaced."""
    found = norm_configs(cfg.model)
    if not found:
        raise ValueError("the config's model has no norm_cfg to replace")
    for parent, key in found:
        parent[key] = dict(copy.deepcopy(norm_cfg), requires_grad=True)
        parent['conv_cfg'] = dict(type='WSConv') if ws else None
    return len(found)


class _Progress(Hook):
    """One line per epoch (or at the end of an iteration-based run): mean loss and time."""

    priority = 'LOWEST'

    def __init__(self, label: str):
        self.label = label
        self.start = time.time()
        self.first_iter = 0

    def before_train_epoch(self, runner) -> None:
        self.first_iter = runner.iter

    def after_train_epoch(self, runner) -> None:
        # the iteration loop calls this once, at its end
        loss = runner.message_hub.get_scalar('train/loss').mean(runner.iter - self.first_iter)
        done = (f'{runner.iter} iteration(s)' if isinstance(runner.train_loop, IterBasedTrainLoop)
                else f'epoch {runner.epoch + 1}/{runner.max_epochs}')
        say(f'  {self.label}: {done}, mean loss {loss:.4f}, {time.time() - self.start:.0f} s')


def _prepare(cfg: Config, work_dir: str, label: str, verbose: bool) -> Config:
    cfg = copy.deepcopy(cfg)
    if osp.isdir(work_dir):
        shutil.rmtree(work_dir)  # a previous run of this study (the caller checked --overwrite)
    cfg.work_dir = work_dir
    cfg.experiment_name = f'{label}_{time.strftime("%Y%m%d_%H%M%S")}_{os.getpid()}'
    cfg.launcher = 'none'
    if not verbose:
        cfg.log_level = 'WARNING'
    return cfg


def _build(cfg: Config, label: str):
    """The run's Runner; a model the edited config cannot build (e.g. GN groups that do not
    divide a layer's channels) ends the study with one line."""
    try:
        return build_runner(cfg)
    except (ValueError, TypeError, KeyError) as error:
        raise SystemExit(f'error: run {label!r} cannot build its model: '
                         f'{type(error).__name__}: {error}') from error


def run_training(cfg: Config, work_dir: str, label: str, verbose: bool = False) -> dict:
    """Train ``cfg`` in ``work_dir``, then test it. Returns ``{'metrics', 'checkpoint',
    'model', 'iters'}``."""
    cfg = _prepare(cfg, work_dir, label, verbose)
    runner = _build(cfg, label)
    runner.register_hook(_Progress(label))
    runner.train()
    metrics = runner.test()
    return {'metrics': dict(metrics), 'checkpoint': last_checkpoint(work_dir),
            'model': runner.model, 'iters': runner.iter}


def run_test(cfg: Config, work_dir: str, label: str, checkpoint: str,
             change_model: Callable, verbose: bool = False) -> dict:
    """Load ``checkpoint``, apply ``change_model(model)`` and test (with the config's test-time
    hooks, e.g. the batch average). Returns the metrics."""
    cfg = _prepare(cfg, work_dir, label, verbose)
    cfg.load_from = None
    runner = _build(cfg, label)
    runner.load_checkpoint(checkpoint, map_location='cpu')
    change_model(runner.model)
    return dict(runner.test())


#: Metrics the studies report, in order of preference (else the first one the evaluator gives).
PRIMARY_METRICS = ('accuracy/top1', 'mIoU', 'coco/segm_mAP', 'coco/bbox_mAP')


def primary_metric(metrics: dict) -> tuple:
    """``(name, value)`` of the metric a study reports: top-1 accuracy for classifiers."""
    for name in PRIMARY_METRICS:
        if name in metrics:
            return name, float(metrics[name])
    if not metrics:
        raise ValueError('the test run returned no metric')
    name = next(iter(metrics))
    return name, float(metrics[name])


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ['| ' + ' | '.join(headers) + ' |', '|' + '---|' * len(headers)]
    lines += ['| ' + ' | '.join(str(v) for v in row) + ' |' for row in rows]
    return '\n'.join(lines) + '\n'


def write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, 'w') as f:
            f.write(text)
    atomic_write(path, write)


def write_csv(path: str, headers: Sequence[str], rows: Iterable[Sequence]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator='\n')
    writer.writerow(headers)
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


class StudyOutput:
    """The output folder of a study: refuses one that holds results, of a finished study
    (``marker``, its report) or of an interrupted one (``results.json``, written after every
    run), unless ``overwrite``, which removes them (and ``runs/``) first so that the folder never
    mixes two studies; keeps ``results.json`` up to date after every run."""

    def __init__(self, root: str, marker: str, overwrite: bool):
        self.root = root
        held = [name for name in (marker, 'results.json') if osp.exists(osp.join(root, name))]
        if held and not overwrite:
            what = ('a study' if marker in held else
                    'an unfinished study (results.json, written after every run)')
            raise FileExistsError(f'{root} already holds the results of {what}; pass '
                                  '--overwrite to replace them, or choose another --out')
        check_writable(osp.join(root, 'results.json'))  # now, not after the first run
        for name in held:
            os.remove(osp.join(root, name))
        shutil.rmtree(osp.join(root, 'runs'), ignore_errors=True)
        os.makedirs(root, exist_ok=True)
        self.results: Dict[str, dict] = {}

    def path(self, *parts: str) -> str:
        return osp.join(self.root, *parts)

    def run_dir(self, name: str) -> str:
        return self.path('runs', name)

    def save(self, key: str, value: dict) -> None:
        self.results[key] = value
        write_text(self.path('results.json'), json.dumps(self.results, indent=1) + '\n')

    def written(self) -> List[str]:
        return sorted(osp.join(self.root, f) for f in os.listdir(self.root)
                      if osp.isfile(osp.join(self.root, f)))
