# Copyright (c) mmnorm contributors. All rights reserved.
"""SN importance ratios: read them from a model or a state dict, compare means and variances.

The stored parameters are *logits*; the ratios are their softmax (users often misread the raw
values). For every SN / SN_tied layer this gives ``{'normalizers': ['IN', 'LN', 'BN'],
'mean': [...], 'var': [...], 'tied': bool}`` in the order of the normalizers.
"""
from collections import OrderedDict
from typing import Dict, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..layers import NORMALIZERS, SwitchableNorm, SwitchableNormTied

__all__ = ['model_ratios', 'state_dict_ratios', 'symmetric_kl']


def _record(mean: Tensor, var: Tensor, tied: bool) -> dict:
    mean, var = mean.detach().float().cpu(), var.detach().float().cpu()
    return {'normalizers': list(NORMALIZERS[:mean.numel()]), 'mean': mean.tolist(),
            'var': var.tolist(), 'tied': tied}


def model_ratios(model: nn.Module) -> Dict[str, dict]:
    """Ratios of every SN / SN_tied layer of ``model``, in module order."""
    found = OrderedDict()
    for name, module in model.named_modules():
        if isinstance(module, SwitchableNorm):
            mean, var = module.ratios()
            found[name] = _record(mean, var, isinstance(module, SwitchableNormTied))
    return found


def state_dict_ratios(state_dict: Mapping[str, Tensor]) -> Dict[str, dict]:
    """Ratios of the SN / SN_tied layers in a state dict (mmnorm's parameter names)."""
    found = OrderedDict()
    for key, value in state_dict.items():
        if not isinstance(value, Tensor) or value.dim() != 1 or value.numel() not in (2, 3):
            continue
        if key.endswith('.mean_logits'):
            prefix = key[:-len('.mean_logits')]
            var_logits = state_dict.get(prefix + '.var_logits')
            if var_logits is not None:
                found[prefix] = _record(value.softmax(0), var_logits.float().softmax(0), False)
        elif key.endswith('.logits') and (key[:-len('logits')] + 'running_mean' in state_dict
                                          or key[:-len('logits')] + 'weight' in state_dict):
            ratios = value.float().softmax(0)
            found[key[:-len('.logits')]] = _record(ratios, ratios, True)
    return found


def symmetric_kl(p: Sequence[float], q: Sequence[float], eps: float = 1e-12) -> float:
    """D(p||q) = KL(p||q) + KL(q||p), the SN study's divergence between mean and var ratios."""
    p_t = torch.tensor(p, dtype=torch.float64).clamp(min=eps)
    q_t = torch.tensor(q, dtype=torch.float64).clamp(min=eps)
    return float(((p_t - q_t) * (p_t.log() - q_t.log())).sum())
