# Copyright (c) mmnorm contributors. All rights reserved.
"""Hard (argmax) SN ratios and the cheapest equivalent of each hardened layer for inference.

SN study Sec. 4.1.1 ("Performance of hard ratios", Table 2 right): replacing the soft ratios by
one-hot ones (argmax) and finetuning keeps the accuracy; Appendix B, Table 4 items 7-8: layers
whose μ and σ both select BN "can be turned into linear transformation".

- :func:`harden_ratios` makes every SN-like layer's ratios one-hot at their argmax and frozen, each
  in its own way (``harden_ratios_()`` of the layer, :mod:`mmnorm.layers.base`);
- :func:`to_deploy` (eval mode) replaces each hardened layer by its cheapest equivalent:
  μ and σ both BN -> a per-channel affine map ``a x + b``, folded into the preceding convolution
  where there is one (a WS convolution becomes a plain one with the standardized, scaled
  weight), else a native ``BatchNorm`` in eval mode; both IN -> ``nn.InstanceNorm`` (affine); both
  LN -> ``nn.GroupNorm(1, C)``; different choices for μ and σ stay one fused SN layer (a plain
  SN layer with the one-hot ratios, whose ratio function is a softmax, whatever computed them).
  Layers with ``in_unbiased=True`` (converted from the SN authors) keep the fused layer for IN /
  LN, whose native kernels use the biased variance.
"""
import re
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..layers import BatchStatsNorm, SwitchableNorm, has_ratios
from .folding import bn_affine, fold_affine_into_conv

__all__ = ['hard_choices', 'harden_ratios', 'to_deploy', 'summarize', 'DEPLOY_ACTIONS']

#: What :func:`to_deploy` can do with a layer.
DEPLOY_ACTIONS = ('folded', 'affine', 'instance_norm', 'group_norm', 'fused')


def _choices(module: BatchStatsNorm) -> Tuple[str, str]:
    mean, var = module.ratios()
    names = module.normalizers
    return names[int(mean.argmax())], names[int(var.argmax())]


def hard_choices(model: nn.Module) -> Dict[str, Tuple[str, str]]:
    """``{layer: (normalizer chosen for μ, for σ)}`` by argmax of the current ratios."""
    return OrderedDict((name, _choices(module)) for name, module in model.named_modules()
                       if has_ratios(module))


def harden_ratios(model: nn.Module) -> Dict[str, Tuple[str, str]]:
    """Make every SN-like layer's ratios one-hot (argmax) and freeze them.

    Returns:
        the choices, as :func:`hard_choices`.
    """
    choices = hard_choices(model)
    for module in model.modules():
        if has_ratios(module):
            module.harden_ratios_()
    return choices


def _is_hard(module: BatchStatsNorm) -> bool:
    mean, var = module.ratios()
    return bool(((mean == 0) | (mean == 1)).all() and ((var == 0) | (var == 1)).all())


def _native(module: BatchStatsNorm, action: str) -> nn.Module:
    channels = module.num_features
    if action == 'affine':
        replacement = nn.BatchNorm2d(channels, eps=module.eps, affine=module.affine)
        replacement.running_mean.copy_(module.running_mean)
        replacement.running_var.copy_(module.running_var)
    elif action == 'instance_norm':
        replacement = nn.InstanceNorm2d(channels, eps=module.eps, affine=module.affine)
    else:
        replacement = nn.GroupNorm(1, channels, eps=module.eps, affine=module.affine)
    if module.affine:
        with torch.no_grad():
            replacement.weight.copy_(module.weight)
            replacement.bias.copy_(module.bias)
    return replacement.to(module.running_mean.device).eval()


def _action(module: BatchStatsNorm, can_fold: bool) -> str:
    if not _is_hard(module):
        return 'fused'
    mean_choice, var_choice = _choices(module)
    if mean_choice != var_choice:
        return 'fused'
    if mean_choice == 'BN':
        return 'folded' if can_fold else 'affine'
    if getattr(module, 'in_unbiased', False):
        return 'fused'  # native IN / LN kernels use the biased variance
    return 'instance_norm' if mean_choice == 'IN' else 'group_norm'


def _preceding_conv(parent: nn.Module, names: List[str], index: int) -> Optional[str]:
    """The conv whose output this child normalizes, for the layouts where that is certain:
    consecutive children of a ``Sequential`` / ``ConvModule``, or ``conv{k}`` -> ``<abbr>{k}``
    (ResNet blocks and stems)."""
    if index == 0:
        return None
    previous = names[index - 1]
    if not isinstance(getattr(parent, previous), nn.Conv2d):
        return None
    if isinstance(parent, nn.Sequential):
        return previous
    if type(parent).__name__ == 'ConvModule':  # children are registered conv-first always
        order = getattr(parent, 'order', ('conv', 'norm', 'act'))
        return previous if order.index('conv') < order.index('norm') else None
    conv_index = re.fullmatch(r'conv(\d+)', previous)
    norm_index = re.search(r'(\d+)$', names[index])
    if conv_index and norm_index and conv_index.group(1) == norm_index.group(1):
        return previous
    return None


def to_deploy(model: nn.Module, prefix: str = '') -> Dict[str, str]:
    """Replace hardened SN-like layers by their cheapest equivalent, in place (call in eval
    mode).

    Returns:
        ``{layer: action}`` with actions from :data:`DEPLOY_ACTIONS` for every SN layer.
    """
    if model.training:
        raise RuntimeError('to_deploy() folds eval-mode statistics: call model.eval() first')
    plan: Dict[str, str] = OrderedDict()
    names = [name for name, _ in model.named_children()]
    for index, name in enumerate(names):
        child = getattr(model, name)
        full = f'{prefix}.{name}' if prefix else name
        if not has_ratios(child):
            plan.update(to_deploy(child, full))
            continue
        conv_name = _preceding_conv(model, names, index)
        action = _action(child, conv_name is not None)
        plan[full] = action
        if action == 'folded':
            # With both ratios on BN, the eval-mode layer is BN's affine map of its buffers.
            scale, shift = bn_affine(child)
            folded = fold_affine_into_conv(getattr(model, conv_name), scale, shift)
            setattr(model, conv_name, folded)
            setattr(model, name, nn.Identity())
        elif action != 'fused':
            setattr(model, name, _native(child, action))
        elif _is_hard(child):
            setattr(model, name, _fused_switchable(child))
    return plan


def _fused_switchable(module: BatchStatsNorm) -> nn.Module:
    """A hardened layer whose μ and σ chose differently, as a plain SN layer with the same
    one-hot ratios (hardened logits, exactly one-hot) and state: the same output, with SN's
    cheap ratio function (a softmax) instead of, e.g., Sparse SN's SparsestMax."""
    mean_choice, var_choice = _choices(module)
    names = module.normalizers
    replacement = SwitchableNorm(**module.config())
    state = {k: v for k, v in module.state_dict().items() if k in replacement.state_dict()}
    replacement.load_state_dict(state, strict=False)
    with torch.no_grad():
        for logits, choice in ((replacement.mean_logits, mean_choice),
                               (replacement.var_logits, var_choice)):
            logits.fill_(-1.0)
            logits[names.index(choice)] = 1.0
    replacement.harden_ratios_()
    return replacement.to(module.running_mean.device).eval()


def summarize(plan: Dict[str, str], choices: Dict[str, Tuple[str, str]]) -> str:
    """Per-layer choices and actions, and the share of layers folded away."""
    lines = [f'{"layer":<48} {"mu":>3} {"sigma":>5}  deploy']
    for name, action in plan.items():
        mean_choice, var_choice = choices.get(name, ('?', '?'))
        lines.append(f'{name:<48} {mean_choice:>3} {var_choice:>5}  {action}')
    total = max(len(plan), 1)
    counts = {a: sum(1 for v in plan.values() if v == a) for a in DEPLOY_ACTIONS}
    lines.append(', '.join(f'{a}: {n}' for a, n in counts.items()) +
                 f' -- {counts["folded"] / total:.0%} of {len(plan)} SN layers folded away')
    return '\n'.join(lines)
