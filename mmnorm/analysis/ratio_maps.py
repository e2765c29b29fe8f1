# Copyright (c) mmnorm contributors. All rights reserved.
"""Heat maps of group-wise ratios (``ratio_groups=G``): what each group of channels of each
layer chose, for ``tools/plot_ratios.py`` and ``tools/analysis/ratio_study.py``.

Rows are the layers in network order, columns the groups of channels in channel order; one panel
per normalizer for μ and one for σ (the soft ratio, 0 to 1, one colour scale), then one panel of
the argmax choice per group for μ and for σ. A model whose layers have different numbers of
groups (or some none) is drawn on the channel axis: every row spans the layer's channels, split
into its own G equal cells (a layer without groups is one cell), and its label names G.
"""
from typing import List, Mapping, Optional, Sequence

from ..utils.ratios import mean_radius, ratio_vectors, record_groups

__all__ = ['group_heatmap', 'module_groups']


def module_groups(names: Sequence[str]) -> List[list]:
    """``[[top-level module, first index, last index]]`` of consecutive layers sharing their
    top-level module (backbone, neck, heads)."""
    groups: List[list] = []
    for index, name in enumerate(names):
        top = name.split('.')[0]
        if groups and groups[-1][0] == top:
            groups[-1][2] = index
        else:
            groups.append([top, index, index])
    return groups


def _ticks(groups: int) -> List[int]:
    step = max(1, -(-groups // 8))
    return list(range(0, groups, step))


def group_heatmap(layers: Mapping[str, dict], title: str, colors: Mapping[str, str],
                  subtitle: Optional[str] = None):
    """The heat map figure (matplotlib, Agg) of ``layers`` (:func:`mmnorm.utils.model_ratios`
    records, grouped or not). ``colors``: a colour per normalizer, for the argmax panels.

    Returns the figure: ``2 * (K + 1)`` panels (K: the most normalizers of any layer; a layer
    with fewer leaves the missing normalizer's cells grey) and a colour bar."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    names = list(layers)
    records = list(layers.values())
    count = len(names)
    normalizers = max((r['normalizers'] for r in records), key=len)
    sizes = [record_groups(r) for r in records]
    common: Optional[int] = sizes[0] if len(set(sizes)) == 1 else None
    panels = [(kind, z) for kind in ('mean', 'var') for z in normalizers + ['argmax']]
    fig, axes = plt.subplots(
        1, len(panels), sharey=True, layout='constrained',
        figsize=(1.55 * len(panels) + 3.4, min(0.15 * count + 2.0, 60.0)))
    soft_map = matplotlib.colormaps['viridis'].with_extremes(bad='#d9d9d9')
    hard_map = ListedColormap([colors[z] for z in normalizers]).with_extremes(bad='#d9d9d9')
    soft_mesh = None
    for ax, (kind, z) in zip(axes, panels):
        for row, record in enumerate(records):
            vectors = ratio_vectors(record, kind)
            if z == 'argmax':
                values = [normalizers.index(record['normalizers'][int(np.argmax(v))])
                          for v in vectors]
            else:
                index = record['normalizers'].index(z) if z in record['normalizers'] else None
                values = [float('nan') if index is None else v[index] for v in vectors]
            edges = (np.arange(len(values) + 1) if common is not None
                     else np.linspace(0.0, 1.0, len(values) + 1))
            data = np.ma.masked_invalid(np.array([values], dtype=float))
            mesh = ax.pcolormesh(edges, [row, row + 1], data,
                                 cmap=hard_map if z == 'argmax' else soft_map,
                                 vmin=-0.5 if z == 'argmax' else 0.0,
                                 vmax=len(normalizers) - 0.5 if z == 'argmax' else 1.0,
                                 edgecolors='white', linewidth=0.2 if count <= 80 else 0.0)
            if z != 'argmax':
                soft_mesh = mesh
        symbol = 'μ' if kind == 'mean' else 'σ'
        ax.set_title(f'{symbol}: argmax' if z == 'argmax' else f'λ{symbol} {z}', fontsize=9)
        if common is not None:
            ticks = _ticks(common)
            ax.set_xticks([t + 0.5 for t in ticks])
            ax.set_xticklabels([str(t) for t in ticks], fontsize=6)
            ax.set_xlim(0, common)
        else:
            ax.set_xticks([0.0, 0.5, 1.0])
            ax.set_xticklabels(['0', '½', '1'], fontsize=6)
            ax.set_xlim(0.0, 1.0)
        for _, _, last in module_groups(names)[:-1]:
            ax.axhline(last + 1, color='black', linewidth=0.8)
    axes[0].set_ylim(count, 0)  # the first layer on top
    axes[0].set_yticks([row + 0.5 for row in range(count)])
    labels = [name.replace('backbone.', '') for name in names]
    if common is None:
        labels = [f'{label} [G={size}]' for label, size in zip(labels, sizes)]
    axes[0].set_yticklabels(labels, fontsize=5 if count > 40 else 7)
    fig.supxlabel(f'group of channels (G = {common}, in channel order)' if common is not None
                  else "channels (share; each row split into its layer's G groups)",
                  fontsize=9)
    fig.colorbar(soft_mesh, ax=list(axes), shrink=0.6, pad=0.01, label='ratio')
    fig.legend(handles=[Patch(color=colors[z], label=f'{z} (argmax)') for z in normalizers],
               loc='outside lower right', ncol=len(normalizers), fontsize=8)
    radius = mean_radius(layers)
    grouped = sum(size > 1 for size in sizes)
    fig.suptitle(f'{title}: ratios per group of channels, {grouped} of {count} layers grouped'
                 + (f' (SparsestMax radius {radius:.3f})' if radius is not None else '')
                 + (f'\n{subtitle}' if subtitle else ''), fontsize=10)
    return fig

