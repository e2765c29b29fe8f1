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
  weight), else a native ``BatchNorm`` in eval mode (:class:`BatchNormNd`); both IN ->
  ``nn.InstanceNorm`` (:class:`InstanceNormNd`, affine); both LN -> ``nn.GroupNorm(1, C)`` (each
  takes inputs of any number of spatial dims, as the layer did); different choices for μ and
  σ stay one fused SN layer (a plain SN layer with the one-hot ratios, whose ratio function is
  a softmax, whatever computed them).
  Layers with ``in_unbiased=True`` (converted from the SN authors) keep the fused layer for IN /
  LN, whose native kernels use the biased variance.

Layers with ``ratio_groups`` > 1 choose per group of channels: :func:`hard_choices` gives such a
layer a tuple of names per group, for μ and for σ (``(('IN', 'IN', 'BN', 'BN'), ('IN', 'BN',
'BN', 'BN'))``), and :func:`summarize` writes it as runs (``IN×2,BN×2``). A hardened grouped
layer whose every group chose the same normalizer for μ and σ deploys as an ungrouped one (the
whole layer BN: folded or affine; IN: :class:`InstanceNormNd`; LN: ``nn.GroupNorm(1, C)``); any
other becomes a :class:`~mmnorm.convert.groupwise.GroupwiseHardNorm` (``groupwise``): the IN
moments once, LN pooled from them if some group uses it, BN from its buffers, one pass ``a x +
b`` (also for ``in_unbiased=True``, whose IN variance it corrects as the layer does). Only a
whole-BN layer folds into the convolution: see :func:`to_deploy` for what cannot.
"""
import re
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..layers import BatchStatsNorm, SwitchableNorm, has_ratios
from .folding import bn_affine, fold_affine_into_conv
from .groupwise import Choice, GroupwiseHardNorm, choice_label

__all__ = ['hard_choices', 'harden_ratios', 'to_deploy', 'summarize', 'DEPLOY_ACTIONS',
           'BatchNormNd', 'InstanceNormNd']

#: What :func:`to_deploy` can do with a layer (``groupwise``: grouped layers only).
DEPLOY_ACTIONS = ('folded', 'affine', 'instance_norm', 'group_norm', 'fused', 'groupwise')


def _choices(module: BatchStatsNorm) -> Tuple[Choice, Choice]:
    mean, var = module.ratios()
    names = module.normalizers
    if mean.dim() == 1:
        return names[int(mean.argmax())], names[int(var.argmax())]
    # ratio groups: one name per group (row), in channel order
    return tuple(tuple(names[i] for i in ratios.argmax(-1).tolist()) for ratios in (mean, var))


def hard_choices(model: nn.Module) -> Dict[str, Tuple[Choice, Choice]]:
    """``{layer: (normalizer chosen for μ, for σ)}`` by argmax of the current ratios.

    A layer with ``ratio_groups`` G > 1 chooses per group: its μ and σ entries are tuples of G
    names, group 0 (the first ``C / G`` channels) first;
    :func:`~mmnorm.convert.groupwise.choice_label` writes one as a short word
    (``'IN×2,BN×2'``)."""
    return OrderedDict((name, _choices(module)) for name, module in model.named_modules()
                       if has_ratios(module))


def harden_ratios(model: nn.Module) -> Dict[str, Tuple[Choice, Choice]]:
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


class BatchNormNd(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` for inputs ``(N, C, *)`` of any number of spatial dims, as the layer
    it replaces takes (``F.batch_norm`` computes any, and refuses fewer than 2 dims;
    ``BatchNorm2d`` checks for 4-D only). An ``nn.BatchNorm2d`` (and a ``_BatchNorm``) to
    folding tools, exporters and ``isinstance``; scriptable, and traced by ``torch.fx`` into
    its ``F.batch_norm`` call (not a leaf: only ``torch.nn``'s own classes are)."""

    def _check_input_dim(self, input):
        pass


class InstanceNormNd(nn.InstanceNorm2d):
    """``nn.InstanceNorm2d`` for inputs ``(N, C, *)`` with any number (>= 1) of spatial dims,
    always batched, where ``InstanceNorm2d`` reads a 3-D input as one unbatched ``(C, H, W)``
    image (a ``(N, C, L)`` input with ``N == C`` was normalized over the wrong dims). As
    ``InstanceNorm2d``, ATen's instance norm refuses rows of one value (``H x W = 1``), where
    the layer it replaces outputs its bias. Scriptable; traced by ``torch.fx`` into its
    ``F.instance_norm`` call."""

    def forward(self, input):
        return self._apply_instance_norm(input)


def _native(module: BatchStatsNorm, action: str) -> nn.Module:
    channels, factory = module.num_features, _factory(module)  # built in the layer's dtype
    if action == 'affine':
        replacement = BatchNormNd(channels, eps=module.eps, affine=module.affine, **factory)
        replacement.running_mean.copy_(module.running_mean)
        replacement.running_var.copy_(module.running_var)
    elif action == 'instance_norm':
        replacement = InstanceNormNd(channels, eps=module.eps, affine=module.affine, **factory)
    else:
        replacement = nn.GroupNorm(1, channels, eps=module.eps, affine=module.affine, **factory)
    if module.affine:
        with torch.no_grad():
            replacement.weight.copy_(module.weight)
            replacement.bias.copy_(module.bias)
    return replacement.eval()


def _factory(module: nn.Module) -> dict:
    """The device and floating dtype of ``module``'s state (an SN layer always has its ratio
    parameters, with or without affine and running buffers)."""
    tensor = next(t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point())
    return dict(device=tensor.device, dtype=tensor.dtype)


def _uniform(mean_choice: Choice, var_choice: Choice) -> Optional[str]:
    """The one normalizer a layer chose for μ and σ (of every group), or None."""
    names = {mean_choice, var_choice} if isinstance(mean_choice, str) else \
        set(mean_choice) | set(var_choice)
    return names.pop() if len(names) == 1 else None


def _action(module: BatchStatsNorm, can_fold: bool) -> str:
    if not _is_hard(module):
        return 'fused'
    mean_choice, var_choice = _choices(module)
    grouped = not isinstance(mean_choice, str)
    uses_bn = 'BN' in (mean_choice, var_choice) if not grouped else \
        'BN' in mean_choice + var_choice
    if uses_bn and module.running_mean is None:
        return 'fused'  # BN in eval uses the batch's statistics: the layer computes them
    choice = _uniform(mean_choice, var_choice)
    if choice is None:
        return 'groupwise' if grouped else 'fused'
    if choice == 'BN':
        return 'folded' if can_fold else 'affine'
    if getattr(module, 'in_unbiased', False):
        # native IN / LN kernels use the biased variance; GroupwiseHardNorm corrects it
        return 'groupwise' if grouped else 'fused'
    return 'instance_norm' if choice == 'IN' else 'group_norm'


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

    What folds into the preceding convolution: a layer whose μ and σ chose BN, in every group
    of a grouped layer; it disappears. What does not: the BN-only groups of a layer whose other
    groups chose IN or LN (``groupwise``). With an LN group folding them would be wrong: LN's
    statistics pool every channel, those of the BN groups included, and folding changes them.
    Without LN it would be exact (IN statistics are per channel, BN's map too) but saves
    nothing: :class:`~mmnorm.convert.groupwise.GroupwiseHardNorm` still reads every channel
    once to reduce and once to apply ``a x + b``, and a BN channel's constant ``a, b`` ride in
    that same pass; skipping those channels would cost a slice and a concatenation. A channel
    whose μ and σ chose differently (say BN and IN) is no constant map and never folds.

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
        elif action == 'groupwise':
            setattr(model, name, GroupwiseHardNorm.from_layer(child).eval())
        elif action != 'fused':
            setattr(model, name, _native(child, action))
        elif _is_hard(child):
            setattr(model, name, _fused_switchable(child))
    return plan


def _fused_switchable(module: BatchStatsNorm) -> nn.Module:
    """A hardened layer whose μ and σ chose differently, as a plain SN layer with the same
    one-hot ratios (hardened logits, exactly one-hot; per group with ratio groups) and state:
    the same output, with SN's cheap ratio function (a softmax) instead of, e.g., Sparse SN's
    SparsestMax."""
    replacement = SwitchableNorm(**module.config(), **_factory(module))
    state = {k: v for k, v in module.state_dict().items() if k in replacement.state_dict()}
    replacement.load_state_dict(state, strict=False)
    with torch.no_grad():
        for logits, ratios in zip((replacement.mean_logits, replacement.var_logits),
                                  module.ratios()):
            logits.copy_(ratios * 2 - 1)  # 1 at the choice, -1 elsewhere
    replacement.harden_ratios_()
    return replacement.eval()


def summarize(plan: Dict[str, str], choices: Dict[str, Tuple[Choice, Choice]]) -> str:
    """Per-layer choices and actions, and the share of layers folded away. A grouped layer's
    choices are written as runs over its groups (``IN×2,BN×2``: the first two groups IN, the
    next two BN); the count of ``groupwise`` layers is written when there is one."""
    lines = [f'{"layer":<48} {"mu":>3} {"sigma":>5}  deploy']
    for name, action in plan.items():
        mean_choice, var_choice = (choice_label(c) for c in choices.get(name, ('?', '?')))
        lines.append(f'{name:<48} {mean_choice:>3} {var_choice:>5}  {action}')
    total = max(len(plan), 1)
    counts = {a: sum(1 for v in plan.values() if v == a) for a in DEPLOY_ACTIONS
              if a != 'groupwise' or 'groupwise' in plan.values()}
    lines.append(', '.join(f'{a}: {n}' for a, n in counts.items()) +
                 f' -- {counts["folded"] / total:.0%} of {len(plan)} SN layers folded away')
    return '\n'.join(lines)
