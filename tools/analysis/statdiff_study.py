# Copyright (c) mmnorm contributors. All rights reserved.
"""Do channel normalizations drift towards elimination singularities, and do WS and BCN keep
them away? StatDiff (BCN paper Eq. (8)) per epoch for several normalizers (Sec. 2.3, Fig. 3).

    python tools/analysis/statdiff_study.py                    # the digits config
    python tools/analysis/statdiff_study.py CONFIG --norms GN GN+WS LN LN+WS BCN+WS
        [--groups G] [--epochs E | --iters N] [--out DIR] [--overwrite] [--cfg-options k=v ...]

The config's model trains once per normalizer, every ``norm_cfg`` in it replaced (``GN``: G groups;
``LN``: GN with one group, as in a ConvNet; ``BCN``: BN then GN with G groups; also ``BN``,
``SN``, ``SN_tied``), with ``+WS`` weight-standardized convolutions (``WSConv``) and plain ones
otherwise. ``StatDiffHook`` records, after every epoch, StatDiff of every group of channels
normalized together (for BN / SN: ``--groups`` contiguous groups), and the model is tested at
the end.

``--groups`` defaults to the config's ``statdiff_groups`` when it sets one (the digits config
sets 8: its stages have 32, 64 and 128 channels), else 32 (GN's default, and the paper's).

Writes to ``--out`` (default ``work_dirs/statdiff_study``): ``statdiff_study.png`` (mean and
standard deviation over all groups of all layers per epoch, one line per normalizer with its
final accuracy in the legend, Fig. 3 style), ``statdiff_study.csv`` (per normalizer and epoch),
``statdiff_study.md`` (the table printed at the end), ``results.json`` and ``runs/``.
"""
import argparse
import copy
import json
import os.path as osp
import sys

sys.path.insert(0, osp.join(osp.dirname(osp.abspath(__file__)), '..', '..'))

from mmnorm.analysis.study import (StudyOutput, add_study_arguments,  # noqa: E402
                                   markdown_table, norm_spec, primary_metric, replace_norms,
                                   run_training, save_figure, say, set_length, write_csv,
                                   write_text)
from mmnorm.utils.model import load_config  # noqa: E402

STATDIFF_FILE = 'statdiff.jsonl'


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_arguments(parser, 'work_dirs/statdiff_study', __file__)
    parser.add_argument('--norms', nargs='+', default=['GN', 'GN+WS', 'LN', 'LN+WS', 'BCN+WS'],
                        help='normalizers to compare (default: GN GN+WS LN LN+WS BCN+WS)')
    parser.add_argument('--groups', type=int,
                        help="groups of GN / BCN, and StatDiff's groups for BN / SN (default: "
                        "the config's statdiff_groups, else 32)")
    args = parser.parse_args(argv)
    for name in args.norms:
        try:
            norm_spec(name, 1)
        except ValueError as error:
            parser.error(str(error))
    if len(set(args.norms)) != len(args.norms):
        parser.error(f'--norms lists a normalizer twice: {args.norms}')
    if args.groups is not None and args.groups < 1:
        parser.error(f'--groups must be >= 1, got {args.groups}')
    return args


def read_records(path: str) -> list:
    """StatDiffHook's end-of-epoch records; the last record when there is none (``--iters``)."""
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records:
        raise RuntimeError(f'{path} holds no StatDiff record')
    by_epoch = [r for r in records if r['end_of_epoch']]
    return by_epoch or records[-1:]


def study_norm(cfg, name: str, groups: int, args, out: StudyOutput) -> dict:
    cfg = copy.deepcopy(cfg)
    norm_cfg, ws = norm_spec(name, groups)
    replaced = replace_norms(cfg, norm_cfg, ws)
    length = set_length(cfg, args.epochs, args.iters)
    cfg.custom_hooks = [h for h in (cfg.get('custom_hooks') or [])
                        if h.get('type') != 'StatDiffHook']
    cfg.custom_hooks.append(dict(type='StatDiffHook', interval=10**9, num_groups=groups,
                                 out_file=STATDIFF_FILE))
    run = name.replace('+', '-')
    say(f'[statdiff_study] {name} ({replaced} norm_cfg replaced): training {length}')
    trained = run_training(cfg, out.run_dir(run), run, args.verbose)
    records = read_records(osp.join(out.run_dir(run), STATDIFF_FILE))
    metric, value = primary_metric(trained['metrics'])
    say(f'[statdiff_study] {name}: StatDiff {records[-1]["mean"]:.3f} ± '
        f'{records[-1]["std"]:.3f}, {metric} {value:.2f}')
    return {'norm': name, 'norm_cfg': norm_cfg, 'ws': ws, 'metric': metric, 'accuracy': value,
            'iters': trained['iters'],
            'epochs': [{k: r[k] for k in ('epoch', 'iter', 'mean', 'std', 'max_layer')}
                       for r in records]}


def plot(results: list, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, (ax_mean, ax_std) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        x = [e['epoch'] if e['epoch'] else e['iter'] for e in r['epochs']]
        style = '--' if r['ws'] else '-'
        line, = ax_mean.plot(x, [e['mean'] for e in r['epochs']], style, marker='o', ms=3,
                             label=f"{r['norm']} ({r['metric']} {r['accuracy']:.2f})")
        ax_std.plot(x, [e['std'] for e in r['epochs']], style, marker='o', ms=3,
                    color=line.get_color(), label=r['norm'])
    for ax, title in ((ax_mean, 'mean of StatDiff'), (ax_std, 'std of StatDiff')):
        ax.set_xlabel('epoch')
        ax.set_title(title + ' over all groups of all layers', fontsize=10)
        ax.grid(alpha=0.3)
    ax_mean.legend(fontsize=8)
    fig.suptitle('StatDiff (BCN paper Eq. 8) per epoch, Fig. 3 style')
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options)
    groups = args.groups or cfg.get('statdiff_groups', 32)
    try:  # the config edits of every run, checked before any training
        set_length(copy.deepcopy(cfg), args.epochs, args.iters)
        replace_norms(copy.deepcopy(cfg), *norm_spec(args.norms[0], groups))
    except (ValueError, KeyError, AttributeError) as error:
        raise SystemExit(f'error: {args.config}: {error}')
    try:
        out = StudyOutput(args.out, 'statdiff_study.md', args.overwrite)
    except OSError as error:  # (a finished or unfinished study there; not writable)
        raise SystemExit(f'error: {error}')
    results = []
    for name in args.norms:
        result = study_norm(cfg, name, groups, args, out)
        results.append(result)
        out.save(name, result)
    write_csv(out.path('statdiff_study.csv'),
              ['norm', 'epoch', 'iter', 'statdiff_mean', 'statdiff_std', 'statdiff_max_layer'],
              [[r['norm'], e['epoch'], e['iter'], f"{e['mean']:.6f}", f"{e['std']:.6f}",
                f"{e['max_layer']:.6f}"] for r in results for e in r['epochs']])
    metric = results[0]['metric']
    text = markdown_table(
        ['normalizer', 'StatDiff mean (end)', 'StatDiff std (end)', 'largest layer mean',
         metric],
        [[r['norm'], f"{r['epochs'][-1]['mean']:.3f}", f"{r['epochs'][-1]['std']:.3f}",
          f"{r['epochs'][-1]['max_layer']:.3f}", f"{r['accuracy']:.2f}"] for r in results])
    write_text(out.path('statdiff_study.md'),
               f'# StatDiff study: {osp.basename(args.config)} (groups: {groups})\n\n' + text)
    plot(results, out.path('statdiff_study.png'))
    say(f'\n### StatDiff at the end of training (groups: {groups})\n\n' + text)
    say('written: ' + ', '.join(out.written()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
