# Copyright (c) mmnorm contributors. All rights reserved.
"""Export a trained model with mmnorm layers to ONNX, and check it with ONNX Runtime.

    python tools/deploy/export_onnx.py CONFIG CHECKPOINT OUT.onnx [--hard-ratios] [--fold]
        [--dynamic-batch | --dynamic-shape] [--verify] [--shape H W] [--overwrite]
        [--cfg-options k=v]

Exports the tensor part of the config's model (mmnorm.deploy.onnx): an mmpretrain classifier's
logits, an mmseg segmentor's segmentation logits at the input size, or an mmdet detector's
backbone + neck features (where mmdeploy's detector rewriters start). The input is the image
batch after the model's data preprocessor (normalized, padded).

- ``--hard-ratios``: SN layers use one-hot (argmax) ratios (SN study Table 2 right). Use a
  checkpoint finetuned with them (tools/export_hard_ratios.py --finetune) for the accuracy of
  the soft model.
- ``--fold``: hard ratios, and every layer whose μ and σ both pick BN folded into the preceding
  convolution (a WSConv becomes a plain conv with its standardized, scaled weight); IN / LN
  choices become native InstanceNorm / GroupNorm (mmnorm.convert.to_deploy).
- ``--dynamic-batch``: a symbolic batch dimension (else batch 1).
- ``--dynamic-shape``: symbolic batch, height and width (``batch``, ``height``, ``width`` in
  the file), for detectors and segmentors that see images of many sizes.
- ``--verify``: runs ONNX Runtime and the PyTorch model (after the same --hard-ratios / --fold)
  on real images from the config's test pipeline, at batch 1 and, with a dynamic batch, 2; with
  --dynamic-shape also at a second image size; prints the largest differences and exits with
  status 1 above ``--tolerance`` (relative).

The example size is ``--shape`` or the first test image's preprocessed size; without
--dynamic-shape it is the only size the file accepts. OUT is written atomically and never
replaces an existing file (or the checkpoint) without ``--overwrite``.
"""
import argparse
import itertools
import os
import os.path as osp
import sys
import tempfile
import time

sys.path.insert(0, osp.join(osp.dirname(osp.abspath(__file__)), '..', '..'))

import mmnorm  # noqa: E402,F401  (registers the layers; safe checkpoint loading)
import torch  # noqa: E402
from mmengine.config import DictAction  # noqa: E402

from mmnorm.convert import hard_choices, harden_ratios, summarize, to_deploy  # noqa: E402
from mmnorm.deploy import (TensorForward, compare, export_onnx, ort_session,  # noqa: E402
                           real_inputs, run_session)
from mmnorm.deploy.data import input_channels  # noqa: E402
from mmnorm.utils import OutputError, check_output  # noqa: E402
from mmnorm.utils.model import build_model_for_tool, load_config  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('out', help='the .onnx file to write')
    parser.add_argument('--hard-ratios', action='store_true',
                        help='one-hot (argmax) SN ratios')
    parser.add_argument('--fold', action='store_true',
                        help='hard ratios, BN choices folded into the convolutions')
    dynamic = parser.add_mutually_exclusive_group()
    dynamic.add_argument('--dynamic-batch', action='store_true',
                         help='symbolic batch dimension (default: batch 1)')
    dynamic.add_argument('--dynamic-shape', action='store_true',
                         help='symbolic batch, height and width (default: static)')
    parser.add_argument('--verify', action='store_true',
                        help='compare ONNX Runtime with PyTorch on real test images')
    parser.add_argument('--tolerance', type=float, default=1e-4,
                        help='largest relative difference --verify accepts (default 1e-4)')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                        help='input height and width of the example (default: the first test '
                        'image)')
    parser.add_argument('--opset', type=int, default=18,
                        help='ONNX opset of the file (default 18; 17 for TensorRT 8.5 / 8.6: '
                             'the exporter writes 18, converted down; an opset it cannot be '
                             'converted to is refused)')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing OUT')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings in the config, key=value')
    return parser.parse_args(argv)


def prepare(model, hard: bool, fold: bool, checkpoint_meta: dict) -> dict:
    """Apply --hard-ratios / --fold in place; returns what was done, for the report."""
    info = {}
    if not (hard or fold):
        return info
    if not hard_choices(model):
        raise SystemExit('error: --hard-ratios / --fold concern SN layers; the model has none')
    if 'hard_ratios' not in checkpoint_meta:
        print('note: the checkpoint has soft ratios, made one-hot now; without finetuning with '
              'them (tools/export_hard_ratios.py --finetune) its accuracy can drop')
    info['choices'] = harden_ratios(model)
    if fold:
        model.eval()
        info['plan'] = to_deploy(model)
        print(summarize(info['plan'], info['choices']))
    return info


def second_size(shape):
    """Another image size for --verify of a --dynamic-shape export: another aspect ratio, odd
    sides (no stride divides them)."""
    return (shape[0] + shape[0] // 2 + 1, shape[1] + shape[1] // 4 + 3)


def verify(cfg, module, session, shapes, dynamic_batch: bool, tolerance: float) -> float:
    """Largest relative difference ONNX Runtime vs PyTorch on real test images (padded or
    cropped to each of ``shapes``)."""
    worst = 0.0
    for count, shape in itertools.product((1, 2) if dynamic_batch else (1, ), shapes):
        images = real_inputs(cfg, module.model, count, shape)
        with torch.no_grad():
            expected = module(images)
        expected = list(expected) if isinstance(expected, (tuple, list)) else [expected]
        diff, relative, per_output = compare(run_session(session, images), expected)
        worst = max(worst, relative)
        outputs = ', '.join(f'{name}: {value:.1e}'
                            for name, value in zip(module.output_names, per_output.values()))
        print(f'verify: batch {count} of real test images {tuple(images.shape)}: largest '
              f'|difference| {diff:.3e}, relative {relative:.3e} ({outputs})')
    status = 'ok' if worst <= tolerance else f'ABOVE the tolerance {tolerance:g}'
    print(f'verify: largest relative difference {worst:.3e} ({status})')
    return worst


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        check_output(args.out, [args.checkpoint, args.config], args.overwrite)
    except OutputError as error:
        raise SystemExit(f'error: {error}')
    cfg = load_config(args.config, args.cfg_options)
    model, checkpoint = build_model_for_tool(cfg, args.checkpoint)
    meta = checkpoint.get('meta', {})
    info = prepare(model.eval(), args.hard_ratios or args.fold, args.fold, meta)
    try:
        module = TensorForward(model)
        shape = tuple(args.shape) if args.shape else tuple(
            real_inputs(cfg, model, 1).shape[-2:])
    except (ValueError, RuntimeError) as error:
        raise SystemExit(f'error: {error} (or give the input size with --shape H W)')
    dynamic_batch = args.dynamic_batch or args.dynamic_shape
    example = torch.randn(2 if dynamic_batch else 1, input_channels(model), *shape,
                          generator=torch.Generator().manual_seed(0))
    start = time.time()
    # With --verify the file is exported beside OUT and renamed to OUT only once it passed: a
    # file that failed the check never replaces OUT (nor is left under its name).
    target = _unverified_path(args.out) if args.verify else args.out
    print(f'exporting the {module.kind} with torch.onnx.export(dynamo=True) ...', flush=True)
    try:
        try:
            export_onnx(module, example, target, dynamic_batch, module.output_names, args.opset,
                        dynamic_size=args.dynamic_shape)
        except ValueError as error:
            raise SystemExit(f'error: {error}')
        size_mb = osp.getsize(target) / 2**20
        if args.dynamic_shape:
            described = (f'(batch, {example.shape[1]}, height, width), example '
                         f'{tuple(example.shape)}')
        else:
            described = (f'(N, {example.shape[1]}, {shape[0]}, {shape[1]}) with '
                         f'{"dynamic" if dynamic_batch else "static"} N')
        print(f'exported {module.kind}, input {described}, outputs {module.output_names}, '
              f'opset {args.opset}, {size_mb:.1f} MiB, {time.time() - start:.1f} s')
        result = dict(kind=module.kind, shape=shape, size_mb=size_mb, **info)
        if args.verify:
            session = ort_session(target)
            shapes = [shape, second_size(shape)] if args.dynamic_shape else [shape]
            result['relative_difference'] = verify(cfg, module, session, shapes, dynamic_batch,
                                                   args.tolerance)
            if result['relative_difference'] > args.tolerance:
                print(f'error: the export failed --verify; {args.out} was not written (export '
                      'without --verify to inspect the file)', file=sys.stderr)
                raise SystemExit(1)
            os.replace(target, args.out)
    finally:
        if target != args.out and osp.exists(target):
            os.remove(target)
    print(f'wrote {args.out}')
    return result


def _unverified_path(out: str) -> str:
    """A new path beside ``out`` for the export that --verify checks before it becomes
    ``out``."""
    folder = osp.dirname(osp.abspath(out))
    os.makedirs(folder, exist_ok=True)
    handle, path = tempfile.mkstemp(prefix=f'.{osp.basename(out)}.', suffix='.unverified.onnx',
                                    dir=folder)
    os.close(handle)
    os.remove(path)  # (export_onnx writes it atomically; it must not exist)
    return path

if __name__ == '__main__':
    main()
