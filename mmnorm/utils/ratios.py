# Copyright (c) mmnorm contributors. All rights reserved.
"""Importance ratios of SN and its variants: read them from a model or a state dict, compare
means and variances.

The stored parameters are not the ratios (SN stores logits; users often misread the raw values):
each layer's own ratio function (``ratio_fn``, :mod:`mmnorm.layers.base`) gives them. For every
such layer this gives ``{'normalizers': ['IN', 'LN', 'BN'], 'mean': [...], 'var': [...],
'tied': bool, ...}`` in the order of the normalizers, plus what the layer's ``ratio_details()``
adds (e.g. SSN's radius and frozen ratios).

A layer with ratio groups (``ratio_groups=G > 1``: one ratio vector per group of ``C / G``
contiguous channels) gives ``{'normalizers': [...], 'groups': G, 'mean': [[...], ...],
'var': [[...], ...], 'tied': bool, ...}``: ``mean`` and ``var`` hold one vector per group, in
channel order (SSN's ``fixed`` holds one list of G bools for μ and one for σ). A layer without
groups has no ``groups`` key and flat vectors. :func:`ratio_vectors`, :func:`group_mean`,
:func:`layer_divergence` and :func:`group_choices` read either form.
"""
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Type

import torch
from torch import Tensor, nn

from ..layers import NORMALIZERS, BatchStatsNorm, has_ratios

__all__ = ['model_ratios', 'state_dict_ratios', 'symmetric_kl', 'ratio_classes', 'one_hot_share',
           'mean_radius', 'record_groups', 'ratio_vectors', 'group_mean', 'layer_divergence',
           'group_choices', 'choice_shares']


def _record(mean: Tensor, var: Tensor, tied: bool) -> dict:
    """A layer's record from its ratios: ``(K,)`` each, or ``(G, K)`` with ratio groups."""
    mean, var = mean.detach().float().cpu(), var.detach().float().cpu()
    normalizers = list(NORMALIZERS[:mean.shape[-1]])
    if mean.dim() == 1:
        return {'normalizers': normalizers, 'mean': mean.tolist(), 'var': var.tolist(),
                'tied': tied}
    return {'normalizers': normalizers, 'groups': mean.shape[0], 'mean': mean.tolist(),
            'var': var.tolist(), 'tied': tied}


def record_groups(record: Mapping) -> int:
    """The number of ratio groups of a layer's record (1: one vector per layer)."""
    return record.get('groups', 1)


def ratio_vectors(record: Mapping, kind: str) -> List[List[float]]:
    """The ratio vectors of ``kind`` (``'mean'`` or ``'var'``) of a layer's record, one per
    group in channel order (one for a layer without groups)."""
    return record[kind] if 'groups' in record else [record[kind]]


def group_mean(record: Mapping, kind: str) -> List[float]:
    """The ratios of ``kind`` averaged over the layer's groups, per normalizer: the mean weight
    of each normalizer over the layer's channels (groups are equally wide). The ratio vector
    itself for a layer without groups."""
    if 'groups' not in record:
        return list(record[kind])
    vectors = record[kind]
    return [sum(column) / len(vectors) for column in zip(*vectors)]


def layer_divergence(record: Mapping) -> float:
    """D(λμ‖λσ) (:func:`symmetric_kl`) of a layer, averaged over its groups."""
    pairs = list(zip(ratio_vectors(record, 'mean'), ratio_vectors(record, 'var')))
    return sum(symmetric_kl(p, q) for p, q in pairs) / len(pairs)


def _argmax(vector: Sequence[float]) -> int:
    return max(range(len(vector)), key=vector.__getitem__)  # the first of equal maxima


def group_choices(record: Mapping, kind: str) -> List[str]:
    """The normalizer each group's ``kind`` ratios choose (argmax), in channel order (one name
    for a layer without groups)."""
    return [record['normalizers'][_argmax(v)] for v in ratio_vectors(record, kind)]


def choice_shares(record: Mapping, kind: str) -> Dict[str, float]:
    """``{normalizer: share of the layer's channels whose kind ratios choose it (argmax)}``, over
    all of the layer's normalizers (groups are equally wide)."""
    chosen = group_choices(record, kind)
    return {z: chosen.count(z) / len(chosen) for z in record['normalizers']}


def model_ratios(model: nn.Module) -> Dict[str, dict]:
    """Ratios of every layer of ``model`` that mixes normalizers, in module order."""
    found = OrderedDict()
    for name, module in model.named_modules():
        if has_ratios(module):
            found[name] = dict(_record(*module.ratios(), module.tied_ratios),
                               **module.ratio_details())
    return found


def ratio_classes() -> List[Type[BatchStatsNorm]]:
    """The registered normalizer classes that mix normalizers (from mmengine's ``MODELS``)."""
    from mmengine.registry import MODELS
    return [cls for cls in dict.fromkeys(MODELS.module_dict.values())
            if isinstance(cls, type) and issubclass(cls, BatchStatsNorm)
            and cls.ratio_fn is not None]


def _matching_class(state: Mapping[str, Tensor], prefix: str
                    ) -> Optional[Type[BatchStatsNorm]]:
    """The ratio class whose ``ratio_state`` is all in ``state`` under ``prefix`` (the one naming
    the most entries, so that a layer is not mistaken for one reading fewer of its keys)."""
    fitting = [cls for cls in ratio_classes()
               if all(f'{prefix}{key}' in state for key in cls.ratio_state)]
    return max(fitting, key=lambda cls: len(cls.ratio_state), default=None)


def state_dict_ratios(state_dict: Mapping[str, Tensor]) -> Dict[str, dict]:
    """Ratios of the layers in a state dict that mix normalizers, found by the names of their
    ratio inputs (each registered class's ``ratio_state``) and computed by its ``ratio_fn``."""
    prefixes: Dict[str, None] = OrderedDict()
    names = {key for cls in ratio_classes() for key in cls.ratio_state}
    for key, value in state_dict.items():
        head, _, last = key.rpartition('.')
        if last in names and isinstance(value, Tensor):
            prefixes[f'{head}.' if head else ''] = None
    found = OrderedDict()
    for prefix in prefixes:
        cls = _matching_class(state_dict, prefix)
        if cls is None or not any(f'{prefix}{key}' in state_dict
                                  for key in ('weight', 'running_mean')):
            continue  # not a normalizer's state (e.g. some other module's 'logits')
        inputs: Tuple[Tensor, ...] = tuple(state_dict[prefix + key] for key in cls.ratio_state)
        # (|Ω|,) per layer, or (G, |Ω|) with ratio groups
        if inputs[0].dim() not in (1, 2) or inputs[0].shape[-1] not in (2, 3) \
                or inputs[0].numel() == 0:
            continue
        with torch.no_grad():
            mean, var = cls.ratio_fn(*(t.float() if t.is_floating_point() else t
                                       for t in inputs))
        found[prefix[:-1]] = _record(mean, var, cls.tied_ratios)
    return found


def symmetric_kl(p: Sequence[float], q: Sequence[float], eps: float = 1e-12) -> float:
    """D(p||q) = KL(p||q) + KL(q||p), the SN study's divergence between mean and var ratios."""
    p_t = torch.tensor(p, dtype=torch.float64).clamp(min=eps)
    q_t = torch.tensor(q, dtype=torch.float64).clamp(min=eps)
    return float(((p_t - q_t) * (p_t.log() - q_t.log())).sum())


def one_hot_share(layers: Mapping[str, dict]) -> float:
    """The share of ratio vectors (μ and σ of every layer of a :func:`model_ratios` record, every
    group's with ratio groups) that are one-hot: 1 when every layer (group) is one plain
    normalizer (a trained SSN), 0 for soft ratios."""
    vectors = [vector for r in layers.values() for kind in ('mean', 'var')
               for vector in ratio_vectors(r, kind)]
    if not vectors:
        return float('nan')
    return sum(sum(v > 0 for v in vector) == 1 for vector in vectors) / len(vectors)


def mean_radius(layers: Mapping[str, dict]) -> Optional[float]:
    """The mean SparsestMax radius of the layers that have one (SSN), or None."""
    radii = [r['radius'] for r in layers.values() if 'radius' in r]
    return sum(radii) / len(radii) if radii else None
