# Copyright (c) mmnorm contributors. All rights reserved.
"""An eval-mode forward pass of the *source* networks straight from their state dicts, with
plain torch ops and the source's own conventions (Python control flow where theirs has it), used
by ``tools/convert_checkpoint.py --verify`` to compare against the converted mmpretrain model
(which runs mmnorm's layers)."""
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from .resnet import ResNetSpec, strip_prefix

__all__ = ['source_forward']

EPS = 1e-5


def _sn(state: Mapping[str, Tensor], name: str, x: Tensor, ratios=None) -> Tensor:
    """SN authors' eval forward: unbiased IN variance; LN/BN from E[var + mean^2]; ratios the
    softmax of the stored logits unless given."""
    n, c, h, w = x.shape
    flat = x.reshape(n, c, -1)
    mean_in = flat.mean(-1, keepdim=True)
    var_in = flat.var(-1, keepdim=True) if h * w > 1 else torch.zeros_like(mean_in)
    second = var_in + mean_in ** 2
    mean_ln = mean_in.mean(1, keepdim=True)
    var_ln = second.mean(1, keepdim=True) - mean_ln ** 2
    if ratios is None:
        ratios = [torch.softmax(state[f'{name}.{kind}_weight'].reshape(-1), 0)
                  for kind in ('mean', 'var')]
    mean_ratios, var_ratios = ratios
    mean = mean_ratios[0] * mean_in + mean_ratios[1] * mean_ln
    var = var_ratios[0] * var_in + var_ratios[1] * var_ln
    if mean_ratios.numel() == 3:
        mean = mean + mean_ratios[2] * state[f'{name}.running_mean'].reshape(1, c, 1)
        var = var + var_ratios[2] * state[f'{name}.running_var'].reshape(1, c, 1)
    out = (flat - mean) / torch.sqrt(var + EPS)
    out = out * state[f'{name}.weight'].reshape(1, c, 1) + state[f'{name}.bias'].reshape(1, c, 1)
    return out.reshape(n, c, h, w)


def _sparsestmax(v: Tensor, radius: float, previous_centre=None) -> Tensor:
    """SparsestMax step by step (Python control flow, the paper's description): project onto the
    simplex; stop when one-hot, or outside the sphere of ``radius`` around the centre of the
    current face; else push out to that sphere, and when that leaves the simplex, project again,
    on a face where the sphere has radius ``sqrt(r^2 - |u' - u|^2)``."""
    ordered = torch.sort(v, descending=True).values
    cumulative = ordered.cumsum(0) - 1
    ranks = torch.arange(1, v.numel() + 1, dtype=v.dtype)
    support = int((ordered - cumulative / ranks > 0).sum())
    if support == 1:
        return (v == v.max()).to(v.dtype)
    w = torch.clamp(v - cumulative[support - 1] / support, min=0)
    inside = w > 0
    centre = inside.to(v.dtype) / inside.sum()
    if previous_centre is not None:
        radius = max(radius ** 2 - float(((centre - previous_centre) ** 2).sum()), 0.0) ** 0.5
    distance = float((w - centre).norm())
    if distance >= radius or distance <= 1e-12:
        return w
    pushed = centre + radius * (w - centre) / distance
    if float(pushed.min()) < 0:
        return _sparsestmax(pushed, radius, centre)
    return pushed.clamp(0, 1)


def _ssn(state: Mapping[str, Tensor], name: str, x: Tensor) -> Tensor:
    """Sparse SN authors' eval forward: SN's (unbiased IN variance, running BN statistics) with
    the ratios SparsestMax gives at the saved radius, or the stored one-hot vector once fixed."""
    ratios = []
    for kind in ('mean', 'var'):
        scores = state[f'{name}.{kind}_weight'].reshape(-1)
        fixed = bool(state[f'{name}.{kind}_fixed'].reshape(-1)[0])
        ratios.append(scores if fixed else _sparsestmax(
            scores, float(state[f'{name}.radius'].reshape(-1)[0])))
    return _sn(state, name, x, ratios)


def _bcn(state: Mapping[str, Tensor], name: str, x: Tensor, bn_prefix: str) -> Tensor:
    """BCN authors' eval forward: BN with running statistics, then per-group GN."""
    n, c, h, w = x.shape
    bn = f'{name}.{bn_prefix}'
    x = F.batch_norm(x, state[f'{bn}.running_mean'], state[f'{bn}.running_var'],
                     state[f'{bn}.weight'], state[f'{bn}.bias'], False, 0.0, EPS)
    gamma, beta = state[f'{name}.weight'], state[f'{name}.bias']
    groups = gamma.numel()
    grouped = x.reshape(n, groups, -1)
    grouped = (grouped - grouped.mean(-1, keepdim=True)) / torch.sqrt(
        grouped.var(-1, unbiased=False, keepdim=True) + EPS)
    grouped = grouped * gamma.reshape(1, groups, 1) + beta.reshape(1, groups, 1)
    return grouped.reshape(n, c, h, w)


def _ws(weight: Tensor) -> Tensor:
    flat = weight.reshape(weight.shape[0], -1)
    mean = flat.mean(1, keepdim=True)
    std = torch.sqrt(flat.var(1, unbiased=True, keepdim=True) + EPS)
    return ((flat - mean) / std).reshape_as(weight)


@torch.no_grad()
def source_forward(source: Mapping[str, Tensor], spec: ResNetSpec, x: Tensor) -> Tensor:
    """Logits of the source ResNet (eval mode) for images ``x``."""
    state = strip_prefix(source)

    def conv(name: str, h: Tensor, stride: int = 1, padding: int = 0) -> Tensor:
        weight = state[f'{name}.weight']
        if spec.fmt == 'bcn':
            weight = _ws(weight)
        return F.conv2d(h, weight, None, stride, padding)

    def norm(name: str, h: Tensor) -> Tensor:
        if spec.fmt == 'ssn':
            return _ssn(state, name, h)
        return _sn(state, name, h) if spec.fmt == 'sn' else _bcn(state, name, h,
                                                                   spec.bn_prefix)

    tag = 'bn' if spec.fmt == 'bcn' else 'sn'
    h = F.relu(norm(f'{tag}1', conv('conv1', x, 2, 3)))
    if spec.fmt == 'ssn':  # the Sparse SN authors' stem pooling: no padding, rounded up
        h = F.max_pool2d(h, 3, 2, 0, ceil_mode=True)
    else:
        h = F.max_pool2d(h, 3, 2, 1)
    for stage, count in enumerate(spec.blocks, start=1):
        for index in range(count):
            block = f'layer{stage}.{index}'
            stride = 2 if stage > 1 and index == 0 else 1
            if spec.block == 'bottleneck':
                first, second = (1, stride) if spec.style == 'pytorch' else (stride, 1)
                out = F.relu(norm(f'{block}.{tag}1', conv(f'{block}.conv1', h, first)))
                out = F.relu(norm(f'{block}.{tag}2', conv(f'{block}.conv2', out, second, 1)))
                out = norm(f'{block}.{tag}3', conv(f'{block}.conv3', out))
            else:
                out = F.relu(norm(f'{block}.{tag}1', conv(f'{block}.conv1', h, stride, 1)))
                out = norm(f'{block}.{tag}2', conv(f'{block}.conv2', out, 1, 1))
            if f'{block}.downsample.0.weight' in state:
                h = norm(f'{block}.downsample.1', conv(f'{block}.downsample.0', h, stride))
            h = F.relu(out + h)
    h = h.mean((2, 3))
    return F.linear(h, state['fc.weight'], state['fc.bias'])
