# Copyright (c) mmnorm contributors. All rights reserved.
"""Importance ratios of SN and its variants: read them from a model or a state dict, compare
means and variances.

The stored parameters are not the ratios (SN stores logits; users often misread the raw values):
each layer's own ratio function (``ratio_fn``, :mod:`mmnorm.layers.base`) gives them. For every
such layer this gives ``{'normalizers': ['IN', 'LN', 'BN'], 'mean': [...], 'var': [...],
'tied': bool, ...}`` in the order of the normalizers, plus what the layer's ``ratio_details()``
adds (e.g. SSN's radius and frozen ratios).
"""
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Type

import torch
from torch import Tensor, nn

from ..layers import NORMALIZERS, BatchStatsNorm, has_ratios

__all__ = ['model_ratios', 'state_dict_ratios', 'symmetric_kl', 'ratio_classes', 'one_hot_share',
           'mean_radius']


def _record(mean: Tensor, var: Tensor, tied: bool) -> dict:
    mean, var = mean.detach().float().cpu(), var.detach().float().cpu()
    return {'normalizers': list(NORMALIZERS[:mean.numel()]), 'mean': mean.tolist(),
            'var': var.tolist(), 'tied': tied}


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
        if inputs[0].dim() != 1 or inputs[0].numel() not in (2, 3):
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
    """The share of ratio vectors (μ and σ of every layer of a :func:`model_ratios` record) that
    are one-hot: 1 when every layer is one plain normalizer (a trained SSN), 0 for soft ratios."""
    vectors = [r[kind] for r in layers.values() for kind in ('mean', 'var')]
    if not vectors:
        return float('nan')
    return sum(sum(v > 0 for v in vector) == 1 for vector in vectors) / len(vectors)


def mean_radius(layers: Mapping[str, dict]) -> Optional[float]:
    """The mean SparsestMax radius of the layers that have one (SSN), or None."""
    radii = [r['radius'] for r in layers.values() if 'radius' in r]
    return sum(radii) / len(radii) if radii else None
