# Copyright (c) mmnorm contributors. All rights reserved.
r"""StatDiff: how different the channels that a normalization groups together are (BCN Eq. (8)).

Reference: Qiao et al., *Rethinking Normalization and Elimination Singularity in Neural
Networks* (arXiv:1911.09738), Sec. 2.3. For every group :math:`g` of channels normalized together,
from the running mean :math:`\mu^r_c` and running variance :math:`(\sigma^r_c)^2` of each channel
after the convolution,

.. math::
    \mathrm{StatDiff}(g) = \frac{\sqrt{\mathbb{E}_{c\in g}[(\mu^r_c)^2]
                                       - (\mathbb{E}_{c\in g}[\mu^r_c])^2}}
                                {\mathbb{E}_{c\in g}[\sigma_c]},

the standard deviation of the channels' means over the mean of their standard deviations. It is
0 when all channels of a group share their statistics (BN's output) and grows as channels drift
apart, towards the elimination singularities the paper describes (Fig. 3: GN and LN drift, WS
keeps StatDiff near 0).

Which channels are "normalized together" depends on the layer (:func:`norm_groups`): a GN's
groups, one group for a GN with one group (LN in a ConvNet), every channel alone for IN, an mmnorm
normalizer's ``channel_groups`` (BCN's channel-normalization groups); for layers that normalize
each channel on its own over the batch (BN, SN, SN_tied) the groups are the user's choice
(contiguous, ``num_groups`` of them).

An mmnorm normalizer says what its groups see (``grouped_moments``): for BCN the channels its
group normalization normalizes together are those of its *batch normalization's output*, not the
conv output, so :func:`statdiff_moments` maps the conv output's moments through that batch
normalization (with the statistics the layer used), and BCN's StatDiff measures what the paper
argues BCN keeps small.
"""
import difflib
import math
from fnmatch import fnmatchcase
from typing import Dict, Iterable, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ..functional import BatchStats, batch_statistics, update_running_stats
from ..functional.moments import eager_channel_moments
from ..layers import BatchStatsNorm

__all__ = [
    'statdiff', 'norm_groups', 'statdiff_moments', 'RunningChannelStats', 'is_statdiff_norm',
    'select_layers', 'summarize', 'NORM_TYPES'
]

#: Layers whose *input* StatDiff measures by default (a conv output feeding a norm): torch's
#: norms, and every mmnorm normalizer.
NORM_TYPES = (_BatchNorm, _InstanceNorm, nn.GroupNorm, BatchStatsNorm)


def is_statdiff_norm(module: nn.Module) -> bool:
    """True for the normalization layers whose input :class:`~mmnorm.engine.StatDiffHook`
    measures by default."""
    return isinstance(module, NORM_TYPES)


def statdiff(running_mean: Tensor, running_var: Tensor, num_groups: int,
             eps: float = 0.0) -> Tensor:
    r"""Eq. (8) for ``num_groups`` contiguous groups of channels, in float64.

    Args:
        running_mean (Tensor): ``(C,)`` per-channel means :math:`\mu^r_c`.
        running_var (Tensor): ``(C,)`` per-channel variances :math:`(\sigma^r_c)^2`.
        num_groups (int): groups; must divide ``C``.
        eps (float): added to each variance before the square root (the norm's epsilon), so a
            group of constant channels has a finite StatDiff. Defaults to 0 (Eq. (8) as printed).

    Returns:
        Tensor: ``(num_groups,)`` float64. A group of one channel has StatDiff 0.
    """
    if running_mean.dim() != 1 or running_mean.shape != running_var.shape:
        raise ValueError(f'statdiff: running_mean and running_var must both be (C,), got '
                         f'{tuple(running_mean.shape)} and {tuple(running_var.shape)}')
    channels = running_mean.numel()
    if num_groups < 1 or channels % num_groups:
        raise ValueError(f'statdiff: num_groups ({num_groups}) must divide the channels '
                         f'({channels})')
    if eps < 0:
        raise ValueError(f'statdiff: eps must be >= 0, got {eps}')
    mean = running_mean.detach().double().reshape(num_groups, -1)
    std = (running_var.detach().double().clamp(min=0) + eps).sqrt().reshape(num_groups, -1)
    spread = (mean.square().mean(1) - mean.mean(1).square()).clamp(min=0).sqrt()
    return spread / std.mean(1)


def norm_groups(module: nn.Module, channels: int, num_groups: int = 32) -> int:
    """How many groups of channels ``module`` normalizes together, for :func:`statdiff`.

    GN and mmnorm normalizers with ``channel_groups`` (BCN): the layer's own groups; IN: one
    group per channel; BN, SN, SN_tied and any other module (a conv named by the user):
    ``num_groups``, or the largest number of groups of equal size that divides ``channels``
    (``gcd``) when it does not.

    Raises:
        TypeError: ``nn.LayerNorm`` (it normalizes the trailing dims, not groups of channels;
            in a ConvNet LN is ``GN`` with one group).
    """
    if isinstance(module, nn.LayerNorm):
        raise TypeError('StatDiff: nn.LayerNorm normalizes the trailing dimensions, not groups '
                        "of channels; in a ConvNet use dict(type='GN', num_groups=1) for LN")
    if isinstance(module, nn.GroupNorm):
        return module.num_groups
    if isinstance(module, BatchStatsNorm) and module.channel_groups is not None:
        return module.channel_groups
    if isinstance(module, _InstanceNorm):
        return channels
    if num_groups < 1:
        raise ValueError(f'StatDiff: num_groups must be >= 1, got {num_groups}')
    return math.gcd(channels, num_groups)


@torch.no_grad()
def statdiff_moments(module: Optional[nn.Module], x: Tensor) -> Tuple[Tensor, Tensor, int]:
    """Per-channel batch mean and biased variance (float64) of what ``module`` normalizes in
    groups, and the values per channel ``N * prod(*)``.

    ``x`` is the layer's input ``(N, C, *)`` (or, with ``module=None``, any module's output). For
    torch's norms that is ``x`` itself; an mmnorm normalizer maps ``x``'s moments to those of
    what its groups see (``grouped_moments``: for BCN, its batch normalization's output, from the
    statistics the layer normalized with; called after the layer's forward, so Algorithm 1's
    estimates are the moved ones it used). A ``SyncBCN`` in a distributed run normalized with
    the synchronized batch statistics; this process's own stand in for them.

    The moments are the layers' own (:func:`mmnorm.functional.batch_statistics`: one fused pass,
    float32 for half-precision input, compiled where the layers are); an empty batch gives
    zeros and count 0.
    """
    stats = batch_statistics(*eager_channel_moments(x.detach()), math.prod(x.shape[2:]))
    mean, var = stats.mean.double(), stats.var.double()
    if isinstance(module, BatchStatsNorm):
        mean, var = module.grouped_moments(mean, var)
    return mean.double(), var.double(), int(stats.count)


class RunningChannelStats:
    """Running per-channel mean and variance, as BN keeps them (PyTorch convention, the layers'
    own update: :func:`mmnorm.functional.update_running_stats`).

    The first batch sets them; later batches move them by ``momentum`` with the batch's unbiased
    variance. A batch with one value per channel has no variance and leaves the variance alone.
    """

    def __init__(self, momentum: float = 0.1):
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f'momentum must be in (0, 1], got {momentum}')
        self.momentum = momentum
        self.mean: Optional[Tensor] = None
        self.var: Optional[Tensor] = None

    def update(self, mean: Tensor, var: Tensor, count: int) -> None:
        if count < 1:
            return  # an empty batch says nothing
        batch = BatchStats(mean, var, torch.tensor(float(count), dtype=mean.dtype))
        if self.mean is None:  # the first batch sets them: a running average from zeros,
            self.mean, self.var = torch.zeros_like(mean), torch.zeros_like(var)
            update_running_stats(self.mean, self.var, batch, 1.0)  # at momentum 1
            return
        update_running_stats(self.mean, self.var, batch, self.momentum)

    @property
    def ready(self) -> bool:
        return self.mean is not None


def summarize(values: Dict[str, Tensor]) -> Dict[str, float]:
    """Mean and (population) standard deviation of StatDiff over all groups of all layers
    (the paper's Fig. 3 plots these per epoch), and the largest layer mean."""
    flat = torch.cat([v.reshape(-1) for v in values.values()]) if values else torch.zeros(0)
    if flat.numel() == 0:
        return {}
    return {'mean': float(flat.mean()), 'std': float(flat.std(unbiased=False)),
            'max_layer': max(float(v.mean()) for v in values.values())}


def select_layers(model: nn.Module, names: Optional[Iterable[str]] = None) -> Dict[str, nn.Module]:
    """The modules to measure: ``names`` (exact module names or ``fnmatch`` patterns), or every
    normalization layer (``NORM_TYPES``: each is fed by a conv in the ConvNets mmnorm targets).

    Raises:
        ValueError: a name or pattern that matches no module; nothing to measure.
    """
    modules = dict(model.named_modules())
    if names is None:
        found = {name: m for name, m in modules.items() if is_statdiff_norm(m)}
        if not found:
            raise ValueError('StatDiff: the model has no normalization layer (BN, GN, IN, SN, '
                             'SN_tied, BCN); name the layers to measure with layers=[...]')
        return found
    found = {}
    for pattern in names:
        hits = [name for name in modules if name and fnmatchcase(name, pattern)]
        if not hits:
            close = difflib.get_close_matches(pattern, [n for n in modules if n], n=5)
            raise ValueError(f'StatDiff: no module named {pattern!r} in the model'
                             + (f'; similar names: {close}' if close else ''))
        for name in hits:
            found[name] = modules[name]
    return found
