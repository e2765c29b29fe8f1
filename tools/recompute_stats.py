# Copyright (c) mmnorm contributors. All rights reserved.
"""Recompute the batch statistics of a trained checkpoint (SN study Sec. 3: batch average).

    python tools/recompute_stats.py CONFIG CHECKPOINT --num-iters 200 --out NEW.pth
    bash tools/dist_run.sh 2 recompute_stats.py CONFIG CHECKPOINT --num-iters 200 --out NEW.pth

Runs ``--num-iters`` training batches of the config's ``train_dataloader`` through the model
(frozen weights, no gradients) and replaces the running statistics of every SN / SN_tied / BCN
(non-estimated) and BatchNorm layer by their batch average (``--estimator population`` for the
pooled alternative), all-reduced over processes. The new checkpoint keeps everything else of the
old one and records in ``meta['batch_stats']`` how the statistics were made. The output is
written to a temporary file and renamed, so a failure never leaves a partial checkpoint.
"""
import argparse
import os.path as osp
import sys
import time

sys.path.insert(0, osp.join(osp.dirname(osp.abspath(__file__)), '..'))

import mmnorm  # noqa: E402,F401  (registers layers; safe checkpoint loading)
import torch  # noqa: E402
from mmengine.dist import get_dist_info, init_dist  # noqa: E402
from mmengine.runner import Runner  # noqa: E402
from mmengine.runner.checkpoint import get_state_dict, weights_to_cpu  # noqa: E402
from mmengine.utils import ProgressBar  # noqa: E402

from mmnorm.engine import ESTIMATORS, recompute_batch_stats  # noqa: E402
from mmnorm.utils import (OutputError, add_common_arguments, check_output,  # noqa: E402
                          parse_with_common_arguments, prepare_distributed, save_checkpoint)
from mmnorm.utils.model import build_model_for_tool, load_config  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Recompute batch-average statistics of a checkpoint')
    parser.add_argument('config', help='config whose train_dataloader provides the batches')
    parser.add_argument('checkpoint', help='checkpoint to read')
    parser.add_argument('--out', required=True, help='checkpoint to write')
    parser.add_argument('--num-iters', type=int, default=200, help='batches K (default 200)')
    parser.add_argument('--estimator', choices=ESTIMATORS, default='batch_average',
                        help='batch_average (default): mean of per-batch mean and unbiased '
                        'variance; population: pooled mean and variance of all values')
    parser.add_argument('--overwrite', action='store_true',
                        help='allow --out to be the input checkpoint or an existing file')
    add_common_arguments(parser)
    return parse_with_common_arguments(parser, argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.num_iters < 1:
        raise SystemExit('--num-iters must be >= 1')
    try:
        check_output(args.out, [args.checkpoint, args.config], args.overwrite)
    except OutputError as error:
        raise SystemExit(f'error: {error}')
    cfg = load_config(args.config, args.cfg_options)
    if 'train_dataloader' not in cfg or cfg.train_dataloader is None:
        raise SystemExit('the config has no train_dataloader to compute statistics from')
    if args.launcher != 'none' and not prepare_distributed(cfg, args.launcher):
        init_dist(args.launcher, **cfg.get('env_cfg', {}).get('dist_cfg', {}))
    rank, world_size = get_dist_info()
    model, checkpoint = build_model_for_tool(cfg, args.checkpoint)
    model.to('cuda' if torch.cuda.is_available() else 'cpu')
    seed = cfg.get('randomness', {}).get('seed', 0)
    loader = Runner.build_dataloader(cfg.train_dataloader, seed=seed)

    bar = ProgressBar(args.num_iters) if rank == 0 else None
    start = time.time()
    layers = recompute_batch_stats(model, loader, args.num_iters, estimator=args.estimator,
                                   progress=(lambda _: bar.update()) if bar else None)
    if rank == 0:
        print()
        if not isinstance(checkpoint, dict) or 'state_dict' not in checkpoint:
            checkpoint = {'state_dict': checkpoint}
        checkpoint['state_dict'] = weights_to_cpu(get_state_dict(model))
        meta = checkpoint.setdefault('meta', {})
        meta['batch_stats'] = dict(
            method='recompute_batch_stats', estimator=args.estimator,
            num_iters=args.num_iters, world_size=world_size,
            samples_per_process=max((v['samples'] for v in layers.values()), default=0),
            layers=len(layers), source_checkpoint=osp.abspath(args.checkpoint),
            config=osp.abspath(args.config), time=time.strftime('%Y-%m-%d %H:%M:%S'),
            mmnorm_version=mmnorm.__version__)
        save_checkpoint(checkpoint, args.out)
        print(f'recomputed {len(layers)} layer(s) from {args.num_iters} batch(es) x '
              f'{world_size} process(es) in {time.time() - start:.1f} s; wrote {args.out}')
        return meta['batch_stats']
    return {}


if __name__ == '__main__':
    main()
