# Copyright (c) mmnorm contributors. All rights reserved.
"""Train a model from an mmdet, mmseg or mmpretrain config (the config's ``default_scope`` picks the
codebase), with mmnorm's layers and hooks available.

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp] [--cfg-options k=v]
    bash tools/dist_train.sh CONFIG NUM_PROCS [args]       # torchrun, also on CPU (gloo)

Differences from the codebases' own ``tools/train.py``: ``--launcher pytorch``/``slurm`` work
without CUDA (gloo, CPU DDP), ``--sync-norm`` switches SN/SN_tied/BCN norm configs to their
synchronized versions (plain BN is left to mmengine's ``sync_bn``), and checkpoints written by
mmengine load under torch's safe unpickler.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.join(osp.dirname(osp.abspath(__file__)), '..'))

import mmnorm  # noqa: E402,F401  (registers layers and hooks; safe checkpoint loading)
import torch  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from mmnorm.utils import (add_common_arguments, apply_common_options, build_runner,  # noqa: E402
                          find_resume_checkpoint, parse_with_common_arguments,
                          prepare_distributed)
from mmnorm.utils.model import load_config  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a model (mmdet/mmseg/mmpretrain config)')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from the given checkpoint; without a path, from the newest checkpoint in '
        'the work dir that loads (the one last_checkpoint names, else iter_*/epoch_*.pth)')
    parser.add_argument('--amp', action='store_true',
                        help='automatic mixed precision (AmpOptimWrapper on CUDA; '
                        'CPUAmpOptimWrapper, bfloat16, without CUDA)')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the learning rate with the total batch size')
    parser.add_argument('--sync-norm', action='store_true',
                        help='switch SN/SN_tied/BCN in the model config to SyncSN/SyncSN_tied/'
                        'SyncBCN before training (multi-process runs; BatchNorm is left to the '
                        "config's own sync_bn key)")
    add_common_arguments(parser)
    return parse_with_common_arguments(parser, argv)


def enable_amp(cfg: Config) -> None:
    """AmpOptimWrapper on CUDA; on CPU its bfloat16 variant (mmengine's refuses to start)."""
    wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
    if wrapper in ('AmpOptimWrapper', 'CPUAmpOptimWrapper'):
        print('AMP is already enabled in the config')
        return
    if wrapper != 'OptimWrapper':
        raise ValueError(f'--amp needs OptimWrapper in the config, got {wrapper}')
    if torch.cuda.is_available():
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    else:
        if cfg.get('default_scope') == 'mmdet' and cfg.get('model', {}).get('rpn_head'):
            # (the first iteration's RPN would stop in mmcv's nms: 'expected scalar type Float
            # but found BFloat16')
            raise SystemExit(
                'error: --amp without CUDA trains in bfloat16, and mmcv\'s CPU NMS, which the '
                'RPN of this two-stage detector runs in every training iteration, takes float32 '
                'only: train it without --amp on the CPU, or with --amp on a GPU')
        cfg.optim_wrapper.type = 'CPUAmpOptimWrapper'
        cfg.optim_wrapper.setdefault('dtype', 'bfloat16')


def main(argv=None) -> Runner:
    args = parse_args(argv)
    cfg = load_config(args.config)
    apply_common_options(cfg, args)
    if args.amp:
        enable_amp(cfg)
    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg or 'base_batch_size' not in cfg.auto_scale_lr:
            raise RuntimeError('--auto-scale-lr needs auto_scale_lr.base_batch_size in the config')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        # The newest checkpoint in the work dir that loads, even when last_checkpoint is empty
        # or names a damaged file (mmengine would stop, or start afresh, then).
        found = find_resume_checkpoint(cfg.work_dir)
        if found is not None:
            cfg.resume, cfg.load_from = True, found
        else:  # nothing to resume: start as a fresh run of the config would
            cfg.resume = False
    elif args.resume is not None:
        local = osp.expanduser(args.resume)
        if '://' not in args.resume and not osp.isfile(local):  # (URLs: mmengine's)
            raise SystemExit(f'error: --resume {args.resume}: ' + (
                'a directory, not a checkpoint file (--resume without a path takes the newest '
                'in the work dir)' if osp.isdir(local) else 'no such checkpoint file'))
        cfg.resume = True
        cfg.load_from = args.resume if '://' in args.resume else local
    if args.sync_norm:
        cfg.sync_norm = True
    prepare_distributed(cfg, args.launcher)
    runner = build_runner(cfg)
    runner.train()
    return runner


if __name__ == '__main__':
    main()
