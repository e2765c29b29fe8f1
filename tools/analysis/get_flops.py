# Copyright (c) mmnorm contributors. All rights reserved.
"""FLOPs and parameters of a config's model, mmnorm's layers counted (mmdet's get_flops table).

    python tools/analysis/get_flops.py CONFIG [--shape H W] [--num-images N] [--max-depth D]
        [--cfg-options k=v]

The model runs its ``mode='tensor'`` forward (a classifier's logits, a segmentor's decode-head
logits, a detector's RPN + RoI head outputs), traced by mmengine's ``FlopAnalyzer`` as the
codebases' own ``get_flops`` tools trace it; ``import mmnorm`` gives the analyzer FLOP counts
for mmnorm's layers (:mod:`mmnorm.integration.mmengine_flops`: their moments, mixture,
normalization and affine map; a WSConv's standardization on top of its convolution). The input
is ``--shape H W`` (random images with matching data samples) or, by default, the first
``--num-images`` test images after the model's data preprocessor (FLOPs averaged over them, as
mmdet's tool does). One FLOP is one multiply-add for convolutions and linear layers (fvcore's
convention, which mmengine follows). Prints the input shape, FLOPs, parameters, the share of
mmnorm's layers and mmengine's per-module table to ``--max-depth``.
"""
import argparse
import os.path as osp
import sys
from functools import partial

sys.path.insert(0, osp.join(osp.dirname(osp.abspath(__file__)), '..', '..'))

import mmnorm  # noqa: E402,F401  (registers the layers; FLOP handlers for them)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmengine.analysis import FlopAnalyzer, parameter_count  # noqa: E402
from mmengine.analysis.print_helper import _format_size, complexity_stats_table  # noqa: E402
from mmengine.config import DictAction  # noqa: E402

from mmnorm.deploy import preprocessed_batches, synthetic_batch, test_dataloader  # noqa: E402
from mmnorm.utils.model import build_model, load_config  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                        help='random input images of this size (default: the test images)')
    parser.add_argument('--num-images', type=int, default=1,
                        help='test images to average over (default 1)')
    parser.add_argument('--max-depth', type=int, default=2,
                        help='module depth of the printed table (default 2)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings in the config, key=value')
    return parser.parse_args(argv)


def mmnorm_module_names(model: torch.nn.Module):
    """Names of the modules whose FLOPs mmnorm's handlers count."""
    return [name for name, module in model.named_modules()
            if getattr(type(module), 'flops_from_traced_ops', False)]


def batches(cfg, model, args):
    """The analysed input batches: ``--shape`` random images, or the first test images."""
    if args.shape:
        yield synthetic_batch(model, tuple(args.shape)), 'random images of --shape'
        return
    try:
        loader = test_dataloader(cfg, batch_size=1)
    except RuntimeError as error:
        raise SystemExit(f'error: {error} (or give an input size with --shape H W)')
    for index, data in enumerate(preprocessed_batches(model, loader)):
        if index == args.num_images:
            break
        yield data, 'test images after the data preprocessor'


def analyse(model, data):
    """A ``FlopAnalyzer`` of ``model``'s ``mode='tensor'`` forward on one batch, its totals by
    module computed (mmengine traces the model lazily, at the first query)."""
    model.forward = partial(type(model).forward, model, data_samples=data['data_samples'],
                            mode='tensor')
    try:
        analyzer = FlopAnalyzer(model, (data['inputs'], ))
        analyzer.by_module()
        return analyzer
    finally:
        del model.forward  # the class's forward again


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.num_images < 1:
        raise SystemExit('error: --num-images must be >= 1')
    cfg = load_config(args.config, args.cfg_options)
    model = build_model(cfg).eval()
    names = mmnorm_module_names(model)
    totals, shares, shape, analyzer, source = [], [], None, None, None
    with torch.no_grad():
        for data, source in batches(cfg, model, args):
            analyzer = analyse(model, data)
            totals.append(analyzer.total())
            by_module = analyzer.by_module()
            shares.append(sum(by_module.get(name, 0) for name in names))
            shape = tuple(data['inputs'].shape[-2:])
    if analyzer is None:
        raise SystemExit('error: the test set has no images')
    flops, norm_flops = float(np.mean(totals)), float(np.mean(shares))
    params = parameter_count(model)['']
    line = '=' * 30
    print(f'{line}\nCompute type: {source} ({len(totals)})\nInput shape: {shape}\n'
          f'Flops: {_format_size(int(flops))}\nParams: {_format_size(params)}\n'
          f'mmnorm layers ({len(names)}): {_format_size(int(norm_flops))} '
          f'({100 * norm_flops / max(flops, 1):.2f}% of the FLOPs)\n{line}')
    print(complexity_stats_table(analyzer, max_depth=args.max_depth))
    print('!!!Please be cautious if you use the results in papers. You may need to check if all '
          'ops are supported and verify that the flops computation is correct.')
    return dict(flops=flops, params=params, mmnorm_flops=norm_flops, shape=shape,
                mmnorm_layers=len(names))


if __name__ == '__main__':
    main()
