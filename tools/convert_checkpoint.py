# Copyright (c) mmnorm contributors. All rights reserved.
"""Convert the papers' released ImageNet ResNets into mmpretrain ImageClassifier checkpoints.

    python tools/convert_checkpoint.py SRC.pth DST.pth --format sn  [--verify]
    python tools/convert_checkpoint.py SRC.pth DST.pth --format ssn [--verify]
    python tools/convert_checkpoint.py SRC.pth DST.pth --format bcn [--verify]

``--format sn``: the SN authors' ResNets (SN / SN without BN); ``--format ssn``: the Sparse SN
authors' ResNets (the target backbone is ``ResNetV1SSN``, with their stem pooling);
``--format bcn``: the BCN authors' BCN+WS ResNets. See mmnorm/convert/resnet.py for the
layouts. The output's ``backbone.`` keys load into the mmdet / mmseg / mmpretrain ResNets of
mmnorm's configs (``init_cfg=dict(type='Pretrained', prefix='backbone.', checkpoint=DST)``), with
the same norm_cfg: ``dict(type='SN')`` / ``dict(type='SSN')`` (converted layers carry
``in_unbiased=True``, the authors' IN variance, in their saved state; SSN layers their radius and
fixed ratios) or ``dict(type='BCN', num_groups=G)`` with ``conv_cfg=dict(type='WSConv')``.

The source is loaded with ``weights_only=True`` and only read; an existing DST (the source
included) is replaced only with ``--overwrite``, atomically. Every key and shape is checked
against the target model; the tool names what does not match and writes nothing unless
``--allow-partial``. The output records the source, the format and the momentum in ``meta``.
``--verify`` runs the converted model and an independent eval-mode forward of the source network
on the same random batch and prints the largest difference.
"""
import argparse
import os.path as osp
import sys
import time

sys.path.insert(0, osp.join(osp.dirname(osp.abspath(__file__)), '..'))

import mmnorm  # noqa: E402,F401
import torch  # noqa: E402

from mmnorm.convert import (FORMATS, SOURCE_MOMENTUM, ConversionError,  # noqa: E402
                            check_against, classifier_config, convert_state_dict, source_forward)
from mmnorm.utils import (CheckpointFileError, OutputError,  # noqa: E402
                          UnsafeCheckpointError, check_output, load_checkpoint_file,
                          save_checkpoint, sha256_file)


def load_source(path: str) -> dict:
    """The source state dict, loaded with the safe unpickler (and unwrapped)."""
    try:
        checkpoint = load_checkpoint_file(path, map_location='cpu')
    except FileNotFoundError:
        raise SystemExit(f'error: {path} not found')
    except UnsafeCheckpointError as error:
        raise SystemExit(f'error: (weights_only=True) {error}')
    except CheckpointFileError as error:
        raise SystemExit(f'error: {error}')
    for key in ('state_dict', 'model'):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor)
                                                   for v in checkpoint.values()):
        raise SystemExit(f'error: {path} does not hold a state dict of tensors')
    return checkpoint


def build_target(spec):
    """The mmpretrain classifier the converted state dict belongs to."""
    from mmengine.config import Config

    from mmnorm.utils.model import build_model
    return build_model(Config(dict(model=classifier_config(spec), default_scope='mmpretrain')))


def verify(source: dict, spec, model, batch: int, size: int, seed: int = 0) -> float:
    """Largest relative difference of the logits (eval mode, random images)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=gen)
    model.eval()
    with torch.no_grad():
        converted = model(images, mode='tensor')
    reference = source_forward(source, spec, images)
    diff = (converted - reference).abs().max().item()
    scale = reference.abs().max().item()
    print(f'verify: {batch} random {size}x{size} images; largest |difference| of the logits '
          f'{diff:.3e} (largest |logit| {scale:.3e}, relative {diff / max(scale, 1e-12):.3e})')
    return diff / max(scale, 1e-12)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src', help='released checkpoint (.pth / .pth.tar)')
    parser.add_argument('dst', help='output mmpretrain checkpoint')
    parser.add_argument('--format', choices=FORMATS, required=True)
    parser.add_argument('--source-momentum', type=float, default=None,
                        help='--format sn / ssn: the momentum the source was trained with, in '
                        "the authors' convention (share of the old running value kept; "
                        f'defaults: {SOURCE_MOMENTUM}). The converted norm_cfg gets 1 - this')
    parser.add_argument('--style', choices=['pytorch', 'caffe'], default='pytorch',
                        help="where the stride sits in a bottleneck: the 3x3 conv ('pytorch', "
                        "torchvision, default) or the first 1x1 ('caffe')")
    parser.add_argument('--allow-partial', action='store_true',
                        help='write the matched part even when keys are missing or mismatched')
    parser.add_argument('--verify', action='store_true',
                        help='compare the converted model with the source network')
    parser.add_argument('--verify-size', type=int, default=224)
    parser.add_argument('--verify-batch', type=int, default=2)
    parser.add_argument('--overwrite', action='store_true', help='replace an existing dst')
    args = parser.parse_args(argv)
    if args.verify and min(args.verify_size, args.verify_batch) < 1:
        raise SystemExit('error: --verify-size and --verify-batch must be >= 1')
    try:
        check_output(args.dst, [args.src], args.overwrite)
    except OutputError as error:
        raise SystemExit(f'error: {error}')

    source = load_source(args.src)
    try:
        converted, spec, problems, unused = convert_state_dict(source, args.format, args.style,
                                                               args.source_momentum)
    except ConversionError as error:
        raise SystemExit(f'error: {error}')
    print(f'source: ResNet-{spec.depth} ({spec.block} blocks {list(spec.blocks)}), '
          f'{spec.num_classes} classes, format {args.format}; target norm_cfg {spec.norm_cfg}'
          + (f', conv_cfg {spec.conv_cfg}' if spec.conv_cfg else ''))
    if args.format == 'sn' and spec.num_ratios == 2:
        print('  (no BN in the source, as the authors\' using_bn=False layers: the running '
              'buffers, unused, get their initial values)')
    model = build_target(spec)
    missing, unexpected, mismatched = check_against(converted, model.state_dict())
    report = problems + [f'target key not provided: {k!r}' for k in missing] + [
        f'converted key the model does not have: {k!r}' for k in unexpected
    ] + [f'shape mismatch {m}' for m in mismatched] + [
        f'source key not converted: {k!r}' for k in unused
    ]
    for line in report:
        print(f'  - {line}')
    if report and not args.allow_partial:
        raise SystemExit(f'error: {len(report)} problem(s) above; nothing written '
                         f'(--allow-partial writes the matched part)')
    if mismatched:
        for entry in mismatched:
            converted.pop(entry.split(':')[0], None)

    meta = dict(converted_from=osp.abspath(args.src), source_sha256=sha256_file(args.src),
                format=args.format, style=args.style, source_momentum=spec.source_momentum,
                architecture=spec.as_dict(), partial=bool(report),
                time=time.strftime('%Y-%m-%d %H:%M:%S'), mmnorm_version=mmnorm.__version__)
    relative = None
    if args.verify:
        model.load_state_dict(converted, strict=not report)
        relative = verify(source, spec, model, args.verify_batch, args.verify_size)
        meta['verify_relative_difference'] = relative
    save_checkpoint({'meta': meta, 'state_dict': converted}, args.dst)
    print(f'wrote {args.dst}: {len(converted)} entries')
    return dict(meta=meta, report=report, relative_difference=relative)


if __name__ == '__main__':
    main()
