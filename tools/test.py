# Copyright (c) mmnorm contributors. All rights reserved.
"""Evaluate a checkpoint with an mmdet, mmseg or mmpretrain config (``default_scope`` picks the
codebase), with mmnorm's layers and hooks available.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out OUT] [--show-dir DIR]
        [--metrics-out metrics.json] [--tta] [--deploy] [--cfg-options k=v]
    bash tools/dist_test.sh CONFIG CHECKPOINT NUM_PROCS [args]     # torchrun, also on CPU (gloo)

``--out`` and ``--tta`` behave as in each codebase's own ``tools/test.py``: ``--out`` is a
``.pkl`` of the predictions for mmdet, a directory of prediction images for mmseg, and a file of
the predictions (or, with ``--out-item metrics``, of the metrics) for mmpretrain; ``--tta`` uses
the config's ``tta_model`` / ``tta_pipeline``, and without them falls back, as mmdet and
mmpretrain do, to flip test-time augmentation (``DetTTAModel`` merging boxes with NMS,
``AverageClsScoreTTA``); mmseg's tool has no such fallback, and neither has this one.
"""
import argparse
import copy
import numbers
import os.path as osp
import sys
import warnings

sys.path.insert(0, osp.join(osp.dirname(osp.abspath(__file__)), '..'))

import mmnorm  # noqa: E402,F401  (registers layers and hooks; safe checkpoint loading)
from mmengine.config import Config  # noqa: E402
from mmengine.dist import get_rank  # noqa: E402

from mmnorm.utils import (CheckpointFileError, add_common_arguments,  # noqa: E402
                          apply_common_options, build_runner, parse_with_common_arguments,
                          UnsafeCheckpointError, prepare_distributed, prepare_output_file,
                          write_json)
from mmnorm.utils.model import load_config  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test (and eval) a checkpoint')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='the dir to save logs and metrics')
    parser.add_argument('--out', help='dump the predictions: mmdet a .pkl file, mmseg a '
                        'directory of prediction images, mmpretrain a file (see --out-item)')
    parser.add_argument('--out-item', choices=['pred', 'metrics'], default=None,
                        help='mmpretrain: what --out holds (default: the predictions)')
    parser.add_argument('--show-dir', help='draw predictions into this dir (under work dir)')
    parser.add_argument('--metrics-out', help='write the metrics as JSON to this file')
    parser.add_argument('--tta', action='store_true', help='test-time augmentation: tta_model '
                        'and tta_pipeline from the config, else flip TTA (mmdet, mmpretrain)')
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


def setup_dump(cfg: Config, out: str, out_item: str = None) -> None:
    """Make the test run save its results to ``out`` as the codebase's own test tool does."""
    scope = _scope(cfg)
    if out_item is not None and scope != 'mmpretrain':
        raise SystemExit(f'--out-item is mmpretrain\'s option; this config is {scope}\'s')
    if scope == 'mmseg':  # a directory of prediction images, mmseg's --out
        cfg.test_evaluator['output_dir'] = out
        cfg.test_evaluator['keep_results'] = True
        return
    if scope == 'mmdet' and not out.endswith(('.pkl', '.pickle')):
        raise SystemExit(f'--out must be a .pkl / .pickle file for mmdet, got {out!r}')
    dumper = {'mmdet': 'DumpDetResults', 'mmpretrain': 'DumpResults'}.get(scope)
    if dumper is None:
        raise SystemExit(f'--out is not supported for default_scope={scope!r}')
    if out_item == 'metrics':
        return  # written after the test run (main)
    evaluator = cfg.test_evaluator
    evaluators = list(evaluator) if isinstance(evaluator, (list, tuple)) else [evaluator]
    cfg.test_evaluator = evaluators + [dict(type=dumper, out_file_path=out)]


def _innermost_dataset(cfg: Config) -> dict:
    dataset = cfg.test_dataloader.dataset
    while 'dataset' in dataset:  # wrappers (e.g. ConcatDataset, RepeatDataset)
        dataset = dataset['dataset']
    return dataset


def _flip_pipeline(cfg: Config, extra_meta_keys=()) -> list:
    """The test pipeline with its last (packing) step run on the image and on its horizontal
    flip (``TestTimeAug``), its ``meta_keys`` extended with what the merger needs."""
    pipeline = copy.deepcopy(_innermost_dataset(cfg).pipeline)
    pack = copy.deepcopy(pipeline[-1])
    if extra_meta_keys and 'meta_keys' in pack:
        pack['meta_keys'] = tuple(pack['meta_keys']) + tuple(
            k for k in extra_meta_keys if k not in pack['meta_keys'])
    pipeline[-1] = dict(type='TestTimeAug',
                        transforms=[[dict(type='RandomFlip', prob=1.0),
                                     dict(type='RandomFlip', prob=0.0)], [pack]])
    return pipeline


#: The fallback of each codebase's own test tool when the config has no tta_model.
_DEFAULT_TTA = {
    'mmdet': (dict(type='DetTTAModel', tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5),
                                                    max_per_img=100)), ('flip', 'flip_direction')),
    'mmpretrain': (dict(type='mmpretrain.AverageClsScoreTTA'), ()),
}


def setup_tta(cfg: Config) -> None:
    """Test-time augmentation from the config's ``tta_model`` / ``tta_pipeline``, or, where the
    codebase's own tool falls back (mmdet, mmpretrain), flip TTA."""
    scope = _scope(cfg)
    missing = [key for key in ('tta_model', 'tta_pipeline') if key not in cfg]
    if missing and scope not in _DEFAULT_TTA:
        raise SystemExit(f'--tta needs {" and ".join(missing)} in the config ({scope}\'s own '
                         f'test tool has no fallback either)')
    if missing:
        model, meta_keys = _DEFAULT_TTA[scope]
        warnings.warn(f'--tta: the config has no {" / ".join(missing)}; flip test-time '
                      f'augmentation, as {scope}\'s own test tool does')
        if 'tta_model' not in cfg:
            cfg.tta_model = copy.deepcopy(model)
        if 'tta_pipeline' not in cfg:
            cfg.tta_pipeline = _flip_pipeline(cfg, meta_keys)
    if cfg.tta_model.get('type') == 'DetTTAModel' and _predicts_masks(cfg.model):
        raise SystemExit(  # (mmdet's own assertion comes after the model is built and loaded)
            "error: --tta: mmdet's DetTTAModel merges boxes only, and this model predicts "
            'instance masks; test it without --tta, or test its boxes with --cfg-options '
            'model.roi_head.mask_roi_extractor=None model.roi_head.mask_head=None '
            'test_evaluator.metric=bbox')
    cfg.model = dict(**cfg.tta_model, module=cfg.model)
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline


#: mmdet model and head types that predict instance masks without a ``mask_head`` key.
_MASK_TYPES = ('SOLO', 'SOLOv2', 'YOLACT', 'CondInst', 'BoxInst', 'MaskFormer', 'Mask2Former',
               'RTMDetInsHead', 'RTMDetInsSepBNHead')


def _predicts_masks(node) -> bool:
    """Whether an mmdet model config predicts instance masks: a ``mask_head`` that is set
    anywhere in it, or a mask model or head type."""
    if isinstance(node, dict):
        if node.get('mask_head') is not None or node.get('type') in _MASK_TYPES:
            return True
        return any(_predicts_masks(value) for value in node.values())
    if isinstance(node, (list, tuple)):
        return any(_predicts_masks(value) for value in node)
    return False


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = load_config(args.config)
    local = osp.expanduser(args.checkpoint)
    if '://' not in args.checkpoint and not osp.isfile(local):  # (URLs: mmengine's)
        raise SystemExit(f'error: checkpoint {args.checkpoint} ' + (
            'is a directory, not a checkpoint file' if osp.isdir(local) else 'does not exist'))
    if args.metrics_out:  # a wrong path fails now, not after the evaluation
        try:
            prepare_output_file(args.metrics_out)
        except OSError as error:
            raise SystemExit(f'error: {error}')
    apply_common_options(cfg, args)
    cfg.load_from = args.checkpoint
    if args.show_dir:
        setup_show_dir(cfg, args.show_dir)
    if args.out:
        setup_dump(cfg, args.out, args.out_item)
    elif args.out_item:
        raise SystemExit('--out-item needs --out')
    if args.tta:
        setup_tta(cfg)
    if args.deploy:
        cfg.custom_hooks = list(cfg.get('custom_hooks', [])) + [dict(type='DeployHook')]
    prepare_distributed(cfg, args.launcher)
    runner = build_runner(cfg)
    try:
        metrics = runner.test()
    except (CheckpointFileError, UnsafeCheckpointError) as error:  # one line, not a traceback
        raise SystemExit(f'error: {error}')
    plain = {k: float(v) if isinstance(v, numbers.Real) else v for k, v in metrics.items()}
    if args.metrics_out and get_rank() == 0:
        write_json(args.metrics_out, plain, indent=2)
        print(f'metrics written to {args.metrics_out}')
    if args.out and args.out_item == 'metrics' and get_rank() == 0:
        import mmengine
        mmengine.dump(plain, args.out)
        print(f'metrics written to {args.out}')
    return metrics


if __name__ == '__main__':
    main()
