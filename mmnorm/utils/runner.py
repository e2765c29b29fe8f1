# Copyright (c) mmnorm contributors. All rights reserved.
"""Glue shared by ``tools/train.py`` and ``tools/test.py``."""
import argparse
import os
import os.path as osp

from mmengine.config import Config, DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from .config import sync_norm_config

__all__ = [
    'add_common_arguments', 'parse_with_common_arguments', 'apply_common_options',
    'build_runner'
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
    """Build the config's runner (``runner_type`` if set); applies ``cfg.sync_norm``."""
    if cfg.get('sync_norm', False):
        sync_norm_config(cfg)
    if 'runner_type' in cfg:
        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)
