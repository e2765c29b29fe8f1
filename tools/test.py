# Copyright (c) mmnorm contributors. All rights reserved.
"""Evaluate a checkpoint with an mmdet, mmseg or mmpretrain config (``default_scope`` picks the
codebase), with mmnorm's layers and hooks available.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out FILE] [--show-dir DIR]
        [--metrics-out metrics.json] [--cfg-options k=v]
    bash tools/dist_test.sh CONFIG CHECKPOINT NUM_PROCS [args]     # torchrun, also on CPU (gloo)
"""
import argparse
import json
import numbers
import os.path as osp
import sys

sys.path.insert(0, osp.join(osp.dirname(osp.abspath(__file__)), '..'))

import mmnorm  # noqa: E402,F401  (registers layers and hooks; safe checkpoint loading)
from mmengine.config import Config  # noqa: E402
from mmengine.dist import get_rank  # noqa: E402

from mmnorm.utils import (add_common_arguments, apply_common_options, build_runner,  # noqa: E402
                          parse_with_common_arguments, prepare_distributed)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test (and eval) a checkpoint')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='the dir to save logs and metrics')
    parser.add_argument('--out', help='dump raw predictions to this file (.pkl)')
    parser.add_argument('--show-dir', help='draw predictions into this dir (under work dir)')
    parser.add_argument('--metrics-out', help='write the metrics as JSON to this file')
    parser.add_argument('--tta', action='store_true', help='test-time augmentation (tta_model '
                        'and tta_pipeline from the config)')
    parser.add_argument('--deploy', action='store_true',
                        help='evaluate the deploy form of a hard-ratio SN checkpoint '
                        '(tools/export_hard_ratios.py): hardened layers folded / native')
    add_common_arguments(parser)
    return parse_with_common_arguments(parser, argv)


def _scope(cfg: Config) -> str:
    return cfg.get('default_scope', None) or 'mmengine'


def setup_show_dir(cfg: Config, show_dir: str) -> None:
    """Turn on the codebase's visualization hook, drawing into ``show_dir``."""
    hooks = cfg.get('default_hooks', {})
    scope = _scope(cfg)
    if scope == 'mmpretrain':
        cfg.default_hooks.visualization = dict(type='VisualizationHook', enable=True,
                                               out_dir=show_dir)
        return
    if 'visualization' not in hooks:
        raise RuntimeError('--show-dir needs a "visualization" hook in default_hooks')
    cfg.default_hooks.visualization.draw = True
    if scope == 'mmdet':
        cfg.default_hooks.visualization.test_out_dir = show_dir
    else:  # mmseg draws into the visualizer's save_dir
        cfg.visualizer.save_dir = show_dir
        cfg.default_hooks.visualization.interval = 1


def setup_dump(cfg: Config, out: str) -> None:
    """Add the codebase's result dumper to the test evaluator."""
    if not out.endswith(('.pkl', '.pickle')):
        raise ValueError(f'--out must be a .pkl file, got {out!r}')
    scope = _scope(cfg)
    dumper = {'mmdet': 'DumpDetResults', 'mmpretrain': 'DumpResults'}.get(scope)
    if dumper is None:
        if scope == 'mmseg':
            cfg.test_evaluator['output_dir'] = osp.splitext(out)[0]
            cfg.test_evaluator['keep_results'] = True
            return
        raise ValueError(f'--out is not supported for default_scope={scope!r}')
    evaluator = cfg.test_evaluator
    evaluators = list(evaluator) if isinstance(evaluator, (list, tuple)) else [evaluator]
    cfg.test_evaluator = evaluators + [dict(type=dumper, out_file_path=out)]


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    apply_common_options(cfg, args)
    cfg.load_from = args.checkpoint
    if args.show_dir:
        setup_show_dir(cfg, args.show_dir)
    if args.out:
        setup_dump(cfg, args.out)
    if args.tta:
        if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
            raise RuntimeError('--tta needs tta_model and tta_pipeline in the config')
        cfg.model = dict(**cfg.tta_model, module=cfg.model)
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
    if args.deploy:
        cfg.custom_hooks = list(cfg.get('custom_hooks', [])) + [dict(type='DeployHook')]
    prepare_distributed(cfg, args.launcher)
    runner = build_runner(cfg)
    metrics = runner.test()
    if args.metrics_out and get_rank() == 0:
        with open(args.metrics_out, 'w') as f:
            json.dump({k: float(v) if isinstance(v, numbers.Real) else v
                       for k, v in metrics.items()}, f, indent=2)
        print(f'metrics written to {args.metrics_out}')
    return metrics


if __name__ == '__main__':
    main()
