# Copyright (c) mmnorm contributors. All rights reserved.
"""Inference speed of a config's model over its test pipeline: images/s and latency, as ratios
to native-layer baselines measured in the same run (mmdet's analysis_tools/benchmark.py, made
comparative).

    python tools/analysis/benchmark.py CONFIG [CHECKPOINT] [--forms soft hard deploy]
        [--baselines BN GN:16] [--device cpu|cuda] [--num-images 8] [--batch-size 1]
        [--rounds 5] [--warmup 2] [--json FILE] [--cfg-options k=v]

The first ``--num-images`` test images are loaded once (the data pipeline is not timed, as in
mmdet's tool); each timed call is the model's ``test_step`` on one batch: the data
preprocessor, the forward and the codebase's postprocessing (boxes and masks, segmentation maps,
class scores), under ``torch.no_grad``. The models:

- ``soft``: the model as the checkpoint has it (SN / SSN ratios as trained, BCN, WS);
- ``hard``: SN / SSN ratios made one-hot (argmax), every layer still computing all three
  normalizers' statistics (``tools/export_hard_ratios.py``);
- ``deploy``: the hard model in its deploy form (``tools/test.py --deploy``; BN choices folded
  into the convolutions, IN / LN choices native; :func:`mmnorm.convert.to_deploy`);
- each ``--baselines`` entry: the same config with every mmnorm normalizer replaced by ``BN`` or
  ``GN:G`` (GroupNorm with G groups, 32 by default) and every WSConv by a plain convolution,
  randomly initialised (speed does not depend on the weights).

``hard`` and ``deploy`` apply to models with ratio layers. After ``--warmup`` passes over the
images (caches; with ``MMNORM_COMPILE=1`` the compilation of mmnorm's layers, which then run
compiled from the first call), ``--rounds`` rounds run every model over all
images back to back in a shuffled order; the ratios are medians of per-round ratios to the first
baseline (or ``soft`` without baselines), so the drift of a shared machine cancels. On a GPU the
clock is read after ``torch.cuda.synchronize``. Without CHECKPOINT the ratios are the initial
ones (speed only; the hard choices are then the argmax of equal logits).
"""
import argparse
import copy
import os.path as osp
import sys
import warnings

sys.path.insert(0, osp.join(osp.dirname(osp.abspath(__file__)), '..', '..'))

import mmnorm  # noqa: E402,F401  (registers the layers; safe checkpoint loading)
import torch  # noqa: E402
from mmengine.config import DictAction  # noqa: E402

from mmnorm.convert import hard_choices, harden_ratios, to_deploy  # noqa: E402
from mmnorm.deploy import test_dataloader  # noqa: E402
from mmnorm.functional import compile_mode, use_compiled  # noqa: E402
from mmnorm.utils.config import plain_layers_config  # noqa: E402
from mmnorm.utils.files import prepare_output_file, write_json  # noqa: E402
from mmnorm.utils.model import build_model, build_model_for_tool, load_config  # noqa: E402
from mmnorm.utils.timing import device_synchronizer, time_rounds  # noqa: E402

FORMS = ('soft', 'hard', 'deploy')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config')
    parser.add_argument('checkpoint', nargs='?', help='weights (default: random initialisation)')
    parser.add_argument('--forms', nargs='+', choices=FORMS, default=list(FORMS),
                        help='forms of the model to time (default: all that apply)')
    parser.add_argument('--baselines', nargs='*', default=['BN'], metavar='NORM',
                        help="native-layer baselines: BN, GN or GN:<groups> (default: BN)")
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--num-images', type=int, default=8, help='test images per pass')
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--rounds', type=int, default=5, help='timed passes (median taken)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed passes first')
    parser.add_argument('--json', help='also write the results to this JSON file')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings in the config, key=value')
    return parser.parse_args(argv)


def baseline_norm(text: str) -> dict:
    """``BN`` / ``GN`` / ``GN:<groups>`` as a norm config."""
    name, _, groups = text.partition(':')
    if name == 'BN' and not groups:
        return dict(type='BN', requires_grad=True)
    if name == 'GN' and (not groups or groups.isdigit() and int(groups) > 0):
        return dict(type='GN', num_groups=int(groups or 32), requires_grad=True)
    raise SystemExit(f'error: unknown baseline {text!r}; use BN, GN or GN:<groups> (groups > 0 '
                     'dividing every normalized layer\'s channels)')


def build_models(cfg, args) -> dict:
    """The timed models by name, in eval mode on the device."""
    if args.checkpoint:
        model, _ = build_model_for_tool(cfg, args.checkpoint)
    else:
        model = build_model(cfg)
    models = {'soft': model} if 'soft' in args.forms else {}
    if hard_choices(model):
        hard = copy.deepcopy(model)
        harden_ratios(hard)
        if 'hard' in args.forms:
            models['hard'] = hard
        if 'deploy' in args.forms:
            deployed = copy.deepcopy(hard).eval()
            to_deploy(deployed)
            models['deploy'] = deployed
    elif set(args.forms) - {'soft'}:
        print(f'note: the model has no ratio layers; --forms {" ".join(args.forms)} times '
              f'{"the soft model" if "soft" in args.forms else "nothing of it"}')
    for text in args.baselines:
        baseline = copy.deepcopy(cfg)
        if not plain_layers_config(baseline.model, baseline_norm(text)):
            raise SystemExit('error: the config has no mmnorm layers to replace for a baseline')
        models[text] = build_model(baseline)
    if not models:
        raise SystemExit('error: nothing to time (see --forms and --baselines)')
    return {name: m.eval().to(args.device) for name, m in models.items()}


def load_batches(cfg, args) -> list:
    try:
        loader = test_dataloader(cfg, batch_size=args.batch_size)
    except RuntimeError as error:
        raise SystemExit(f'error: {error}')
    batches, images = [], 0
    for data in loader:
        batches.append(data)
        images += len(data['inputs'])
        if images >= args.num_images:
            break
    if not batches:
        raise SystemExit('error: the test set has no images')
    return batches


def pass_over(model, batches):

    def run():
        with torch.no_grad():
            for data in batches:
                model.test_step(data)

    return run


def main(argv=None) -> dict:
    args = parse_args(argv)
    if min(args.num_images, args.batch_size, args.rounds) < 1 or args.warmup < 0:
        raise SystemExit('error: --num-images, --batch-size and --rounds must be >= 1')
    if args.json:  # a wrong path fails now, not after the timing
        try:
            prepare_output_file(args.json)
        except OSError as error:
            raise SystemExit(f'error: {error}')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise SystemExit('error: --device cuda, but torch sees no CUDA device')
    if compile_mode() == 'auto':
        use_compiled(True)  # the steady state: compiled from the (untimed) warm-up passes on
    cfg = load_config(args.config, args.cfg_options)
    models = build_models(cfg, args)  # (sets the config's default scope for its datasets)
    batches = load_batches(cfg, args)
    images = sum(len(data['inputs']) for data in batches)
    reference = args.baselines[0] if args.baselines else next(iter(models))
    if not args.checkpoint:
        print('note: no checkpoint: random weights and initial ratios (speed only)')
    print(f'{args.config}: {images} test images in batches of {args.batch_size}, on '
          f'{args.device}, {torch.get_num_threads()} threads; {args.warmup} warm-up and '
          f'{args.rounds} timed passes per model, interleaved')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # e.g. statistics not batch-averaged: speed only
        timings = time_rounds({name: pass_over(m, batches) for name, m in models.items()},
                              args.rounds, 1, reference, device_synchronizer(args.device),
                              warmup=args.warmup)
    results = {name: {'images_per_s': images / (ms / 1e3), 'ms_per_image': ms / images,
                      'ratio': ratio} for name, (ms, ratio) in timings.items()}
    print(f'\n{"model":<10} {"images/s":>9} {"ms/image":>9} {"x " + reference:>9}')
    for name, r in results.items():
        print(f'{name:<10} {r["images_per_s"]:>9.2f} {r["ms_per_image"]:>9.1f} '
              f'{r["ratio"]:>9.2f}')
    if args.json:
        write_json(args.json, dict(config=args.config, device=args.device, images=images,
                                   reference=reference, results=results), indent=2)
        print(f'wrote {args.json}')
    return results


if __name__ == '__main__':
    main()
