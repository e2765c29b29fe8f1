# Copyright (c) mmnorm contributors. All rights reserved.
"""How SN's learned ratios depend on the batch size and the depth, and whether hard ratios
perform like soft ones (SN study Sec. 4.1.1, Fig. 4; Table 2 right).

    python tools/analysis/ratio_study.py                       # the digits config, batches 2 8 32
    python tools/analysis/ratio_study.py CONFIG --batch-sizes 2 8 32 [--epochs E | --iters N]
        [--finetune-epochs F] [--ratio-groups G] [--out DIR] [--overwrite] [--cfg-options k=v ...]

For every batch size B the config (a model with SN, SN_tied or Sparse SN layers) trains for the
same number of epochs with the learning rate scaled linearly (``lr * B / config batch size``) and
is tested (with the config's test-time hooks, e.g. the SN batch average). Its soft ratios (each
layer's own ratio function: softmax of SN's logits, SparsestMax of SSN's parameters; per layer,
for μ and σ) and hard choices (argmax) are read, with the share of one-hot ratio vectors and, for
SSN, the SparsestMax radius; when the config logs ratios (``SNRatioLoggerHook``) also how they
became sparse over training (``ratio_study_training.csv`` / ``.png``). Then, from that
checkpoint, for F epochs at ``--finetune-lr-mult`` times the learning rate:

- ``hard``: the ratios made one-hot and frozen (``HardRatiosHook``) and finetuned;
- ``soft``: finetuned as they are, so soft and hard have trained equally long;

and ``hard, no finetune`` (one-hot ratios, statistics recomputed, tested) shows what the
finetuning recovers.

Writes to ``--out`` (default ``work_dirs/ratio_study``): ``ratio_study.png`` (a row per batch size:
the μ and σ ratios of IN / LN / BN stacked per layer against depth, Fig. 4 style),
``ratio_study.csv`` (per batch size and layer), ``ratio_study.md`` (the tables printed at the
end), ``results.json`` (updated after every run) and ``runs/`` (the runs' work dirs).
Depth is the layer's position in the model's module order; "shallow / middle / deep" are its
thirds.

Group-wise ratios (``ratio_groups=G``: one ratio vector per group of C / G channels): the grouped
digits configs (``configs/analysis/*_sn-g4_*``, ``*_sn-g16_*``, ``*_ssn-g4_*``, ``*_ssn-g16_*``),
or ``--ratio-groups G`` on any config, which sets G in every ratio norm_cfg of its model. A grouped
layer counts once in the per-layer figures and tables (its ratios averaged over its groups); what
the groups chose is added: per layer, the share of its channels whose μ / σ choose IN, LN, BN
(argmax) in ``ratio_study.md`` and ``ratio_study.csv`` (columns ``groups`` and
``{mean,var}_share_*``; ``hard_mean`` / ``hard_var`` list every group's choice), every group's
ratios in ``ratio_study_groups.csv``, and a heat map per batch size
(``ratio_study_groups_bs{B}.png``: layers × groups, per normalizer, for μ and σ).
"""
import argparse
import copy
import os.path as osp
import sys

import numpy as np

sys.path.insert(0, osp.join(osp.dirname(osp.abspath(__file__)), '..', '..'))

from mmnorm.analysis.ratio_maps import group_heatmap  # noqa: E402
from mmnorm.analysis.study import (RATIO_COLORS, StudyOutput,  # noqa: E402
                                   add_study_arguments, markdown_table, primary_metric, run_test,
                                   run_training, save_figure, say, scale_batch_size, set_length,
                                   write_csv, write_text)
from mmnorm.layers import has_ratios  # noqa: E402
from mmnorm.utils import (choice_shares, finetune_config, group_choices,  # noqa: E402
                          group_mean, mean_radius, model_ratios, norm_configs, one_hot_share,
                          ratio_vectors, record_groups)
from mmnorm.utils.model import load_config  # noqa: E402
from mmnorm.utils.ratios import ratio_classes  # noqa: E402

DEPTHS = ('shallow', 'middle', 'deep')


def ratio_types() -> tuple:
    """The registered names of the normalizers that mix others by ratios (SN, SN_tied, SSN and
    their Sync twins), from the registry."""
    from mmengine.registry import MODELS
    classes = set(ratio_classes())
    return tuple(name for name, cls in MODELS.module_dict.items() if cls in classes)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_arguments(parser, 'work_dirs/ratio_study', __file__)
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[2, 8, 32],
                        help='training batch sizes per process (default: 2 8 32)')
    parser.add_argument('--finetune-epochs', type=int, default=2,
                        help='epochs of the soft and hard finetuning (default: 2)')
    parser.add_argument('--finetune-lr-mult', type=float, default=0.1,
                        help='finetuning learning rate / training learning rate (default: 0.1)')
    parser.add_argument('--ratio-groups', type=int, default=None, metavar='G',
                        help="ratio groups of every ratio norm_cfg (SN, SN_tied, SSN): one ratio "
                        "vector per group of C / G channels (default: the config's)")
    args = parser.parse_args(argv)
    if args.ratio_groups is not None and args.ratio_groups < 1:
        parser.error(f'--ratio-groups must be >= 1, got {args.ratio_groups}')
    if any(b < 1 for b in args.batch_sizes):
        parser.error(f'batch sizes must be >= 1, got {args.batch_sizes}')
    if len(set(args.batch_sizes)) != len(args.batch_sizes):
        parser.error(f'--batch-sizes lists a batch size twice: {args.batch_sizes}')
    if args.finetune_epochs < 1 or args.finetune_lr_mult <= 0:
        parser.error('--finetune-epochs must be >= 1 and --finetune-lr-mult > 0')
    return args


def set_ratio_groups(cfg, groups: int) -> int:
    """Set ``ratio_groups=groups`` in every norm config of ``cfg.model`` whose type mixes
    normalizers by ratios. Returns how many."""
    types = ratio_types()
    found = [parent[key] for parent, key in norm_configs(cfg.model)
             if parent[key].get('type') in types]
    for norm_cfg in found:
        norm_cfg['ratio_groups'] = groups
    return len(found)


def harden(model) -> None:
    """Every layer's ratios one-hot at their argmax (every group's, with ratio groups) and
    frozen, by the layer's own ``harden_ratios_()``."""
    for module in model.modules():
        if has_ratios(module):
            module.harden_ratios_()


def choices_of(layers: dict) -> dict:
    """``{layer: (μ choice, σ choice)}`` (argmax), or for a layer with ratio groups
    ``{layer: ([μ choice per group], [σ choice per group])}``."""
    return {name: tuple(group_choices(r, kind) if record_groups(r) > 1
                        else group_choices(r, kind)[0] for kind in ('mean', 'var'))
            for name, r in layers.items()}


def finetune(cfg, checkpoint: str, args, hard: bool):
    """From ``checkpoint``, the finetuning run: ``--finetune-epochs`` at ``--finetune-lr-mult``
    times the learning rate, with hard (one-hot, frozen) ratios or the soft ones."""
    cfg = finetune_config(cfg, checkpoint, hard_ratios=hard)
    set_length(cfg, epochs=None if args.iters else args.finetune_epochs, iters=args.iters)
    cfg.optim_wrapper.optimizer.lr *= args.finetune_lr_mult
    return cfg


def study_batch_size(cfg, batch_size: int, args, out: StudyOutput) -> dict:
    cfg = copy.deepcopy(cfg)
    lr = scale_batch_size(cfg, batch_size)
    length = set_length(cfg, args.epochs, args.iters)
    name = f'bs{batch_size}'
    say(f'[ratio_study] batch size {batch_size}: training {length} at lr {lr:g}')
    trained = run_training(cfg, out.run_dir(name), name, args.verbose)
    layers = model_ratios(trained['model'])
    history = training_history(osp.join(out.run_dir(name), 'sn_ratios.jsonl'))
    choices = choices_of(layers)
    metric, soft = primary_metric(trained['metrics'])
    say(f'[ratio_study] batch size {batch_size}: {metric} {soft:.2f}; hard ratios without '
        f'finetuning')
    hard_now = run_test(cfg, out.run_dir(name + '_hard_no_ft'), name + '_hard_no_ft',
                        trained['checkpoint'], harden, args.verbose)
    accuracy = {'soft': soft, 'hard, no finetune': primary_metric(hard_now)[1]}
    for kind in ('soft', 'hard'):
        say(f'[ratio_study] batch size {batch_size}: finetuning with {kind} ratios')
        tuned = run_training(finetune(cfg, trained['checkpoint'], args, kind == 'hard'),
                             out.run_dir(f'{name}_{kind}_ft'), f'{name}_{kind}_ft', args.verbose)
        accuracy[f'{kind}, finetuned'] = primary_metric(tuned['metrics'])[1]
    return {'batch_size': batch_size, 'lr': lr, 'iters': trained['iters'], 'metric': metric,
            'accuracy': accuracy, 'layers': layers, 'choices': choices,
            'one_hot': one_hot_share(layers), 'radius': mean_radius(layers), 'history': history}


def training_history(path: str) -> list:
    """``[(iteration, radius or None, one-hot share)]`` from a run's ratio log, if it kept one."""
    if not osp.exists(path):
        return []
    import json
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [(r['iter'], mean_radius(r['layers']), one_hot_share(r['layers'])) for r in records]


def bn_ratio_by_depth(layers: dict, kind: str) -> list:
    """Mean BN ratio over all layers, then over the shallow / middle / deep thirds (a layer with
    ratio groups: its mean over groups)."""
    values = [group_mean(r, kind)[r['normalizers'].index('BN')] for r in layers.values()
              if 'BN' in r['normalizers']]
    if not values:
        return [float('nan')] * 4
    parts = np.array_split(np.array(values), min(3, len(values)))
    return [float(np.mean(values))] + [float(p.mean()) for p in parts] + \
        [float('nan')] * (3 - len(parts))


def is_grouped(results: list) -> bool:
    """Whether a layer of the study has ratio groups."""
    return any(record_groups(layer) > 1 for r in results for layer in r['layers'].values())


def _bn_choices(layers: dict, kind: str, grouped: bool) -> str:
    """How many layers (with ratio groups: groups of channels) choose BN for ``kind``."""
    chosen = [z for r in layers.values() for z in group_choices(r, kind)]
    return f"{chosen.count('BN')}/{len(chosen)}" + (' groups' if grouped else '')


def _slash(values) -> str:
    return '/'.join(f'{v:.2f}' for v in values)


def _hard_cell(record: dict) -> str:
    """The hard choices of a layer: ``μ/σ``, or with ratio groups how many groups choose each
    normalizer for μ, then for σ (``IN 4 BN 12 / BN 16``)."""
    if record_groups(record) == 1:
        return '/'.join(group_choices(record, kind)[0] for kind in ('mean', 'var'))
    counts = []
    for kind in ('mean', 'var'):
        chosen = group_choices(record, kind)
        counts.append(' '.join(f'{z} {chosen.count(z)}' for z in record['normalizers']
                               if z in chosen))
    return ' / '.join(counts)


def groups_table(results: list) -> str:
    """Per layer with ratio groups and batch size: the share of its channels whose μ / σ choose
    each normalizer (argmax)."""
    names = [name for name, r in results[0]['layers'].items() if record_groups(r) > 1]
    normalizers = max((results[0]['layers'][n]['normalizers'] for n in names), key=len)
    order = list(results[0]['layers'])
    rows = []
    for name in names:
        row = [order.index(name), name, record_groups(results[0]['layers'][name])]
        for r in results:
            record = r['layers'][name]
            row += ['/'.join(f"{choice_shares(record, kind).get(z, 0):.0%}" for z in normalizers)
                    for kind in ('mean', 'var')]
        rows.append(row)
    z_names = '/'.join(normalizers)
    headers = ['depth', 'layer', 'G'] + [h for r in results for h in (
        f"batch {r['batch_size']} μ {z_names}", f'σ {z_names}')]
    return markdown_table(headers, rows)


def tables(results: list) -> str:
    metric = results[0]['metric']
    grouped = is_grouped(results)
    summary = []
    depth = []
    for r in results:
        mu = bn_ratio_by_depth(r['layers'], 'mean')
        sigma = bn_ratio_by_depth(r['layers'], 'var')
        summary.append([r['batch_size'], f"{r['lr']:g}", r['iters'], f'{mu[0]:.3f}',
                        f'{sigma[0]:.3f}', _bn_choices(r['layers'], 'mean', grouped),
                        _bn_choices(r['layers'], 'var', grouped),
                        f"{r['one_hot']:.0%}", '-' if r['radius'] is None else
                        f"{r['radius']:.3f}"] + [f'{v:.2f}' for v in r['accuracy'].values()])
        depth.append([r['batch_size']] + [f'{m:.3f} / {s:.3f}' for m, s in zip(mu[1:], sigma[1:])])
    acc_names = list(results[0]['accuracy'])
    text = '### BN ratio and accuracy per batch size\n\n'
    text += markdown_table(['batch', 'lr', 'iters', 'BN ratio μ (mean over layers)',
                            'BN ratio σ', 'hard: BN for μ', 'hard: BN for σ', 'one-hot ratios',
                            'radius'] + [f'{metric}: {a}' for a in acc_names], summary)
    text += '\n### BN ratio (μ / σ) by depth\n\n'
    text += markdown_table(['batch'] + list(DEPTHS), depth)
    if grouped:
        text += ('\n### What the groups chose: share of the channels whose μ / σ choose each '
                 'normalizer (argmax), per layer with ratio groups\n\n')
        text += groups_table(results)
    text += '\n### Soft ratios and hard choices per layer (μ: IN/LN/BN, σ: IN/LN/BN)\n\n'
    if grouped:
        text += ('Layers with ratio groups: the ratios averaged over their groups, and how many '
                 'groups choose each normalizer for μ / σ.\n\n')
    rows = []
    names = list(results[0]['layers'])
    for index, name in enumerate(names):
        row = [index, name]
        for r in results:
            record = r['layers'][name]
            row.append(f"{_slash(group_mean(record, 'mean'))} | "
                       f"{_slash(group_mean(record, 'var'))} | {_hard_cell(record)}")
        rows.append(row)
    # three columns per batch size: μ ratios, σ ratios, hard choices
    headers = ['depth', 'layer'] + [h for r in results for h in (
        f"batch {r['batch_size']} μ", 'σ', 'hard (μ/σ)')]
    text += markdown_table(headers, rows)
    return text


def csv_rows(results: list, normalizers: list) -> list:
    """A row per batch size and layer: its ratios (a layer with ratio groups: averaged over its
    groups) and hard choices (every group's, space-separated); with ratio groups in the study
    also G and the share of the layer's channels choosing each normalizer."""
    grouped = is_grouped(results)
    rows = []
    for r in results:
        for index, (name, record) in enumerate(r['layers'].items()):
            row = [r['batch_size'], f"{r['lr']:g}", index, name] + \
                [f'{v:.6f}' for kind in ('mean', 'var') for v in group_mean(record, kind)] + \
                [' '.join(group_choices(record, kind)) for kind in ('mean', 'var')]
            if grouped:
                row += [record_groups(record)] + [
                    f'{choice_shares(record, kind).get(z, 0.0):.6f}'
                    for kind in ('mean', 'var') for z in normalizers]
            rows.append(row)
    return rows


def group_rows(results: list) -> list:
    """A row per batch size, layer with ratio groups and group: its ratios and choices."""
    rows = []
    for r in results:
        for index, (name, record) in enumerate(r['layers'].items()):
            if record_groups(record) == 1:
                continue
            for group, (mean, var) in enumerate(zip(ratio_vectors(record, 'mean'),
                                                    ratio_vectors(record, 'var'))):
                rows.append([r['batch_size'], index, name, group] +
                            [f'{v:.6f}' for v in mean + var] +
                            [group_choices(record, kind)[group] for kind in ('mean', 'var')])
    return rows


def plot(results: list, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    rows = len(results)
    fig, axes = plt.subplots(rows, 2, figsize=(12, 2.4 * rows + 0.6), squeeze=False,
                             sharex=True, sharey=True)
    for row, r in enumerate(results):
        layers = list(r['layers'].values())
        depth = np.arange(len(layers))
        for col, (kind, symbol) in enumerate((('mean', 'μ'), ('var', 'σ'))):
            ax = axes[row][col]
            bottom = np.zeros(len(layers))
            for index, normalizer in enumerate(layers[0]['normalizers']):
                values = np.array([group_mean(layer, kind)[index] for layer in layers])
                ax.bar(depth, values, bottom=bottom, color=RATIO_COLORS[normalizer],
                       width=0.85, label=normalizer)
                bottom += values
            ax.set_ylim(0, 1)
            ax.set_title(f"λ{symbol}, batch {r['batch_size']}", fontsize=10)
            if row == rows - 1:
                ax.set_xlabel('depth (SN layers in module order)')
    axes[0][1].legend(loc='upper right', fontsize=8, ncol=3)
    fig.suptitle('SN ratios against depth per batch size (SN study Fig. 4 style)'
                 + ('; layers with ratio groups: mean over their groups'
                    if is_grouped(results) else ''))
    fig.tight_layout()
    save_figure(fig, path)


def plot_training(results: list, path: str) -> None:
    """One-hot share (and SSN's radius) against the iteration, per batch size."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for r in results:
        iters = [h[0] for h in r['history']]
        line, = ax.plot(iters, [h[2] for h in r['history']], 'o-', markersize=3,
                        label=f"batch {r['batch_size']}: one-hot share")
        if any(h[1] is not None for h in r['history']):
            ax.plot(iters, [h[1] for h in r['history']], '--', color=line.get_color(),
                    label=f"batch {r['batch_size']}: radius")
    ax.set_xlabel('iteration')
    ax.set_ylim(-0.02, 1.05)
    ax.legend(fontsize=7)
    ax.set_title('Sparsity of the ratios over training')
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options)
    if args.ratio_groups is not None:
        set_ratio_groups(cfg, args.ratio_groups)
    types = ratio_types()
    if not any(parent[key].get('type') in types for parent, key in norm_configs(cfg.model)):
        raise SystemExit(f'{args.config} has no layer with ratios (norm_cfg type in '
                         f'{types}): the ratio study needs one')
    try:  # the config edits of every run, checked before any training
        set_length(copy.deepcopy(cfg), args.epochs, args.iters)
        scale_batch_size(copy.deepcopy(cfg), args.batch_sizes[0])
    except (ValueError, KeyError, AttributeError) as error:
        raise SystemExit(f'error: {args.config}: {error}')
    try:
        out = StudyOutput(args.out, 'ratio_study.md', args.overwrite)
    except OSError as error:  # (a finished or unfinished study there; not writable)
        raise SystemExit(f'error: {error}')
    results = []
    for batch_size in args.batch_sizes:
        result = study_batch_size(cfg, batch_size, args, out)
        results.append(result)
        out.save(f'bs{batch_size}', result)
    normalizers = next(iter(results[0]['layers'].values()))['normalizers']
    layer_headers = [f'{kind}_{n}' for kind in ('mean', 'var') for n in normalizers]
    grouped = is_grouped(results)
    write_csv(out.path('ratio_study.csv'), ['batch_size', 'lr', 'depth', 'layer'] +
              layer_headers + ['hard_mean', 'hard_var'] +
              (['groups'] + [f'{kind}_share_{n}' for kind in ('mean', 'var')
                             for n in normalizers] if grouped else []),
              csv_rows(results, normalizers))
    text = tables(results)
    write_text(out.path('ratio_study.md'), f'# Ratio study: {osp.basename(args.config)}\n\n' + text)
    plot(results, out.path('ratio_study.png'))
    if grouped:
        write_csv(out.path('ratio_study_groups.csv'),
                  ['batch_size', 'depth', 'layer', 'group'] + layer_headers +
                  ['hard_mean', 'hard_var'], group_rows(results))
        for r in results:
            save_figure(group_heatmap(r['layers'], osp.basename(args.config), RATIO_COLORS,
                                      subtitle=f"batch {r['batch_size']}"),
                        out.path(f"ratio_study_groups_bs{r['batch_size']}.png"))
    if any(r['history'] for r in results):
        write_csv(out.path('ratio_study_training.csv'),
                  ['batch_size', 'iter', 'radius', 'one_hot_share'],
                  [[r['batch_size'], it, '' if radius is None else f'{radius:.6f}',
                    f'{share:.6f}'] for r in results for it, radius, share in r['history']])
        plot_training(results, out.path('ratio_study_training.png'))
    say('\n' + text.split('\n### Soft ratios')[0])  # with the groups' choices, if any
    say('written: ' + ', '.join(out.written()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
