# Copyright (c) mmnorm contributors. All rights reserved.
"""Draw the learned SN importance ratios per layer, in the style of the SN study's Fig. 2 and 3.

    python tools/plot_ratios.py work_dirs/exp/iter_1000.pth --out ratios.png
    python tools/plot_ratios.py work_dirs/exp/sn_ratios.jsonl --out ratios.png [--iter 500]
    python tools/plot_ratios.py CHECKPOINT --out ratios.png --history work_dirs/exp/sn_ratios.jsonl

Input: a checkpoint (ratios from the ``mean_logits`` / ``var_logits`` / ``logits`` parameters) or
the JSON lines written by ``SNRatioLoggerHook`` (the last record, or ``--iter``). Output: one PNG
with five rows over the SN layers in network order: soft ratios of μ and σ as stacked bars of IN
(blue), LN (red) and BN (green); hard ratios (argmax, Fig. 2); and the divergence
D(λμ‖λσ) = KL(λμ‖λσ) + KL(λσ‖λμ) (Fig. 3c). Layers are grouped by their top-level module
(backbone, neck, heads). A summary is printed as well. Works for every layer that mixes
normalizers by ratios (SN, SN_tied, SSN: each layer's own ratio function gives them).

A model with group-wise ratios (layers with ``ratio_groups=G > 1``: one ratio vector per group of
channels) is drawn as a heat map instead (:func:`mmnorm.analysis.ratio_maps.group_heatmap`): rows
are the layers, columns the groups, one panel per normalizer for μ and for σ (the soft ratio) and
one of the argmax choice per group for each; a model whose layers have different G (or some no
groups) is drawn on the channel axis, each row split into its layer's own G cells. The summary
then counts choices per group.

``--history`` (the JSON lines of ``SNRatioLoggerHook``) also draws how the ratios became sparse over
training, in ``<out>_training.png``: the share of one-hot ratio vectors and, for SSN, the
SparsestMax radius, per logged iteration.
"""
import argparse
import json
import os.path as osp
import sys
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, osp.join(osp.dirname(osp.abspath(__file__)), '..'))

import mmnorm  # noqa: E402,F401  (safe checkpoint loading)
from mmnorm.analysis.ratio_maps import group_heatmap, module_groups  # noqa: E402
from mmnorm.analysis.study import save_figure  # noqa: E402
from mmnorm.utils import (check_writable, group_choices, layer_divergence,  # noqa: E402
                          mean_radius, one_hot_share, record_groups, state_dict_ratios,
                          symmetric_kl)

COLORS = {'IN': '#3b6fd4', 'LN': '#d43b3b', 'BN': '#3fa34d'}


def read_log(path: str) -> List[dict]:
    """The records of a ratio log (JSON lines), in order; a file that is not one ends the tool
    with one ``error:`` line."""
    records, number = [], 0
    try:
        with open(path) as f:
            for number, line in enumerate(f, 1):
                line = line.strip()
                if line:
                    records.append(json.loads(line))
    except OSError as error:
        raise SystemExit(f'error: cannot read {path}: {error.strerror or error}')
    except UnicodeDecodeError:
        raise SystemExit(f'error: {path} line {number + 1} is not text; a ratio log is the '
                         'JSON lines SNRatioLoggerHook writes')
    except json.JSONDecodeError as error:
        raise SystemExit(f'error: {path} line {number} is not JSON ({error}); a ratio log is '
                         'what SNRatioLoggerHook writes')
    if not records:
        raise SystemExit(f'error: {path} holds no ratio record')
    bad = [i for i, r in enumerate(records, 1)
           if not isinstance(r, dict) or not isinstance(r.get('layers'), dict) or 'iter' not in r]
    if bad:
        raise SystemExit(f'error: {path}: record {bad[0]} has no "iter" and "layers"; a ratio '
                         'log is what SNRatioLoggerHook writes')
    return records


def load_ratios(path: str, iteration: Optional[int] = None) -> Tuple[Dict[str, dict], str]:
    """``({layer: record}, description)`` from a checkpoint or a ratio log."""
    if path.endswith(('.jsonl', '.json')):
        records = read_log(path)
        if iteration is None:
            record = records[-1]
        else:
            matches = [r for r in records if r['iter'] == iteration]
            if not matches:
                raise SystemExit(f'no record at iteration {iteration} in {path}; available: '
                                 f'{[r["iter"] for r in records]}')
            record = matches[-1]
        return OrderedDict(record['layers']), f'iteration {record["iter"]}'
    if iteration is not None:
        raise SystemExit(f'error: --iter picks a record of a ratio log (.jsonl); {path} is a '
                         'checkpoint')
    from mmnorm.utils.checkpoint import load_checkpoint_for_tool
    checkpoint = load_checkpoint_for_tool(path)
    state_dict = checkpoint.get('state_dict', checkpoint)
    meta = checkpoint.get('meta', {})
    where = f'iteration {meta["iter"]}' if 'iter' in meta else osp.basename(path)
    return state_dict_ratios(state_dict), where


def plot(layers: Dict[str, dict], out: str, title: str):
    """Draw ``layers`` into ``out``: the heat map when a layer has ratio groups, else the bars.
    Returns the figure (closed)."""
    if any(record_groups(r) > 1 for r in layers.values()):
        fig = group_heatmap(layers, title, COLORS)
        save_figure(fig, out)
        return fig
    return plot_bars(layers, out, title)


def plot_bars(layers: Dict[str, dict], out: str, title: str):
    """The layer-wise figure: stacked soft ratios, hard ratios and divergence per layer."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Patch

    names = list(layers)
    count = len(names)
    normalizers = max((r['normalizers'] for r in layers.values()), key=len)
    fig, axes = plt.subplots(5, 1, figsize=(max(8.0, 0.16 * count + 2.5), 11), sharex=True,
                             gridspec_kw=dict(height_ratios=[3, 3, 1.2, 1.2, 2]))
    x = np.arange(count)
    for row, kind in enumerate(('mean', 'var')):
        ax = axes[row]
        bottom = np.zeros(count)
        for index, z in enumerate(normalizers):
            values = np.array([r[kind][index] if index < len(r[kind]) else 0.0
                               for r in layers.values()])
            ax.bar(x, values, bottom=bottom, width=0.85, color=COLORS[z], label=z)
            bottom += values
        ax.set_ylim(0, 1)
        ax.set_ylabel('λμ (soft)' if kind == 'mean' else 'λσ (soft)')
    for row, kind in enumerate(('mean', 'var')):
        ax = axes[2 + row]
        hard = [layers[n]['normalizers'][int(np.argmax(layers[n][kind]))] for n in names]
        ax.bar(x, np.ones(count), width=0.85, color=[COLORS[z] for z in hard])
        ax.set_yticks([])
        ax.set_ylabel('μ hard' if kind == 'mean' else 'σ hard', rotation=0, ha='right',
                      va='center')
    divergence = [symmetric_kl(r['mean'], r['var']) for r in layers.values()]
    axes[4].bar(x, divergence, width=0.85, color='#555555')
    axes[4].set_ylabel('D(λμ‖λσ)')
    tied = [i for i, r in enumerate(layers.values()) if r.get('tied')]
    if tied:
        axes[4].plot(tied, [0] * len(tied), 'k|', markersize=6, label='tied (D = 0)')
        axes[4].legend(loc='upper right', fontsize=7)
    for group, first, last in module_groups(names):
        for ax in axes:
            ax.axvline(last + 0.5, color='black', linewidth=0.6, alpha=0.5)
        axes[0].text((first + last) / 2, 1.02, group, ha='center', va='bottom', fontsize=8,
                     transform=axes[0].get_xaxis_transform())
    axes[4].set_xticks(x)
    axes[4].set_xticklabels([n.replace('backbone.', '') for n in names], rotation=90,
                            fontsize=5 if count > 40 else 7)
    axes[4].set_xlim(-0.6, count - 0.4)
    fig.legend(handles=[Patch(color=COLORS[z], label=z) for z in normalizers],
               loc='upper right', ncol=len(normalizers), fontsize=9)
    radius = mean_radius(layers)
    fig.suptitle(f'{title}: SN importance ratios of {count} layers'
                 + (f' (SparsestMax radius {radius:.3f})' if radius is not None else ''),
                 fontsize=11, x=0.02, ha='left')
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    save_figure(fig, out)
    return fig


def plot_training(records: List[dict], out: str, title: str) -> None:
    """The share of one-hot ratio vectors, and the mean SparsestMax radius where layers have
    one, per logged iteration."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    iters = [r['iter'] for r in records]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(iters, [one_hot_share(r['layers']) for r in records], 'o-', color='#3b6fd4',
            label='one-hot ratio vectors (share)')
    radii = [mean_radius(r['layers']) for r in records]
    if any(r is not None for r in radii):
        ax.plot(iters, [float('nan') if r is None else r for r in radii], 's--',
                color='#d43b3b', label='SparsestMax radius')
        ax.axhline((2 / 3) ** 0.5, color='#999999', linewidth=0.8, linestyle=':',
                   label='radius beyond which 3 ratios are one-hot')
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel('iteration')
    ax.legend(fontsize=8, loc='lower right')
    ax.set_title(f'{title}: sparsity over training', fontsize=10)
    fig.tight_layout()
    save_figure(fig, out)


def summarize(layers: Dict[str, dict]) -> str:
    """The printed summary. Choices are counted per layer, or per group of channels when a layer
    has ratio groups (each group one vote), and the divergence of a grouped layer is the mean of
    its groups'."""
    lines = []
    grouped = [r for r in layers.values() if record_groups(r) > 1]
    unit = ' (per group of channels)' if grouped else ''
    for kind, label in (('mean', 'mu'), ('var', 'sigma')):
        winners = {}
        for record in layers.values():
            for z in group_choices(record, kind):
                winners[z] = winners.get(z, 0) + 1
        share = ', '.join(f'{z} {n}' for z, n in sorted(winners.items()))
        lines.append(f'hard ratios of {label}{unit}: {share}')
    pairs = [(m, v) for r in layers.values()
             for m, v in zip(group_choices(r, 'mean'), group_choices(r, 'var'))]
    differ = sum(m != v for m, v in pairs)
    if grouped:
        lines.append(f'groups whose mu and sigma select different normalizers: {differ}/'
                     f'{len(pairs)}')
        split = {kind: sum(len(set(group_choices(r, kind))) > 1 for r in grouped)
                 for kind in ('mean', 'var')}
        lines.append(f'layers whose groups select more than one normalizer: mu {split["mean"]}/'
                     f'{len(grouped)}, sigma {split["var"]}/{len(grouped)} (of the layers with '
                     'ratio groups)')
    else:
        lines.append(f'layers whose mu and sigma select different normalizers: {differ}/'
                     f'{len(layers)}')
    divergence = [layer_divergence(r) for r in layers.values()]
    lines.append(f'mean divergence D: {sum(divergence) / len(divergence):.4f}, max '
                 f'{max(divergence):.4f}')
    radius = mean_radius(layers)
    lines.append(f'one-hot ratio vectors: {one_hot_share(layers):.0%}'
                 + (f'; SparsestMax radius {radius:.3f}' if radius is not None else ''))
    return '\n'.join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description='Plot SN importance ratios')
    parser.add_argument('input', help='checkpoint (.pth) or ratio log (.jsonl)')
    parser.add_argument('--out', default=None,
                        help='image path, .png, .pdf or .svg: the format follows the extension '
                        '(default: a PNG next to the input)')
    parser.add_argument('--iter', type=int, default=None, help='record of a ratio log to draw')
    parser.add_argument('--title', default=None, help='figure title')
    parser.add_argument('--history', default=None,
                        help='ratio log (.jsonl) to draw the sparsity over training from, in '
                        '<out>_training.png')
    args = parser.parse_args(argv)
    if args.out:  # an unknown format fails now, not after the drawing
        from matplotlib.figure import Figure
        formats = Figure().canvas.get_supported_filetypes()
        fmt = osp.splitext(args.out)[1][1:].lower()
        if fmt and fmt not in formats:
            raise SystemExit(f'error: --out {args.out}: matplotlib writes no .{fmt} files; use '
                             f'one of {", ".join("." + f for f in sorted(formats))}')
    out = args.out or osp.splitext(args.input)[0] + '_ratios.png'
    try:  # a folder that cannot take the image fails now, not after the drawing
        check_writable(out)
    except OSError as error:
        raise SystemExit(f'error: {error}')
    layers, where = load_ratios(args.input, args.iter)
    history = read_log(args.history) if args.history else None  # (read before any writing)
    if not layers:
        raise SystemExit(f'no layer with ratios (SN, SN_tied, SSN) found in {args.input}')
    title = args.title or f'{osp.basename(args.input)} ({where})'
    plot(layers, out, title)
    print(summarize(layers))
    print(f'wrote {out}')
    if history is not None:
        training = osp.splitext(out)[0] + '_training.png'
        plot_training(history, training, title)
        print(f'wrote {training}')
    return out


if __name__ == '__main__':
    main()
