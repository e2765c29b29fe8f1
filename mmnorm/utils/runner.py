# Copyright (c) mmnorm contributors. All rights reserved.
"""Glue shared by ``tools/train.py`` and ``tools/test.py``."""
import argparse
import glob
import os
import os.path as osp
import re
from typing import List, Optional

from mmengine.config import Config, DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from .checkpoint import (CheckpointFileError, UnsafeCheckpointError, load_checkpoint_file,
                         register_checkpoint_loader)
from .config import sync_norm_config

__all__ = [
    'add_common_arguments', 'parse_with_common_arguments', 'apply_common_options',
    'build_runner', 'find_resume_checkpoint', 'last_checkpoint'
]


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--cfg-options``, ``--launcher`` and ``--local-rank``, as the OpenMMLab tools take them."""
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override settings in the config, key=value (e.g. '
        'train_dataloader.batch_size=2 "model.backbone.norm_cfg.type=SN")')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    # torch.distributed.launch passes --local-rank (torch >= 2.0) or --local_rank
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def parse_with_common_arguments(parser: argparse.ArgumentParser, argv=None):
    """Parse, exporting ``LOCAL_RANK`` for launchers that only pass ``--local-rank``."""
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def apply_common_options(cfg: Config, args) -> None:
    """``--launcher``, ``--cfg-options`` and ``--work-dir`` as the OpenMMLab tools apply them."""
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])


def build_runner(cfg: Config) -> Runner:
    """Build the config's runner (``runner_type`` if set); applies ``cfg.sync_norm``. mmnorm's
    tools load checkpoints with :func:`~mmnorm.utils.checkpoint.load_from_local`'s errors (the
    opt-in ``checkpoint_loader`` of :mod:`mmnorm.side_effects`)."""
    register_checkpoint_loader()
    if cfg.get('sync_norm', False):
        sync_norm_config(cfg)
    if 'runner_type' in cfg:
        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)


def last_checkpoint(work_dir: str) -> str:
    """The checkpoint mmengine's ``CheckpointHook`` saved last in ``work_dir`` (the path in its
    ``last_checkpoint`` file; empty when the run stopped while writing it)."""
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        return f.read().strip()


def _numbered_checkpoints(work_dir: str) -> List[str]:
    """``iter_*.pth`` / ``epoch_*.pth`` in ``work_dir``, newest (highest number) first."""
    found = []
    for path in glob.glob(osp.join(work_dir, '*.pth')):
        match = re.fullmatch(r'(?:iter|epoch)_(\d+)\.pth', osp.basename(path))
        if match:
            found.append((int(match.group(1)), osp.getmtime(path), path))
    return [path for _, _, path in sorted(found, reverse=True)]


def find_resume_checkpoint(work_dir: str, log=print) -> Optional[str]:
    """The checkpoint to resume a run in ``work_dir`` from: the newest one that loads.

    mmengine resumes from the path written in ``work_dir/last_checkpoint``. A run killed while
    that file was being rewritten leaves it empty (mmengine then fails with ``checkpoint ''
    not found``), and one killed while saving leaves a damaged checkpoint. This tries the file
    named there first, then ``iter_*.pth`` / ``epoch_*.pth`` from the highest number down, and
    returns the first that loads, saying (through ``log``) which one and why others were passed
    over. ``None`` when there is none (training starts afresh, as mmengine does).
    """
    named = ''
    pointer = osp.join(work_dir, 'last_checkpoint')
    if osp.isfile(pointer):
        named = last_checkpoint(work_dir)
        if not named:
            log(f'{pointer} is empty (the run stopped while writing it)')
    candidates = [named] if named else []
    candidates += [p for p in _numbered_checkpoints(work_dir)
                   if not (named and osp.exists(named) and osp.samefile(p, named))]
    for path in candidates:
        try:
            load_checkpoint_file(path, map_location='cpu')
        except (FileNotFoundError, CheckpointFileError, UnsafeCheckpointError) as error:
            log(f'cannot resume from {path}: {str(error).splitlines()[0]}')
            continue
        if path != named:
            log(f'resuming from {path}, the newest checkpoint in {work_dir} that loads')
        return path
    log(f'no checkpoint to resume from in {work_dir}: training starts from the beginning')
    return None
