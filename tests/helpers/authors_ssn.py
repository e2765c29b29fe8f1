# Copyright (c) mmnorm contributors. All rights reserved.
"""A ResNet laid out as the Sparse SN authors' released code lays it out, to make checkpoints in
their format for the conversion tests (switchablenorms/Sparse_SwitchNorm: ``SSN2d`` in
``utils/sparse_switchable_norm.py``, ``sparsestmax`` in ``utils/ssn_utils.py``, ``ResNetV1SSN`` in
``models/resnet_v1_ssn.py``, the radius and the fixed ratios in ``train_imagenet.py``).

Written for these tests from reading their code (none of it is copied):

- each layer holds ``weight`` / ``bias`` shaped ``(1, C, 1, 1)``, ratio parameters
  ``mean_weight`` / ``var_weight`` (3 entries, initialised to ones; SparsestMax is applied to
  them, they are not logits), ``running_mean`` / ``running_var`` shaped ``(1, C, 1)`` initialised
  to zeros and updated as ``m * running + (1 - m) * batch`` with ``m = 0.997`` (their BN variance
  is ``E[var_IN + mean_IN^2] - mean^2`` with the unbiased IN variance), ``radius`` shaped ``(1,)``
  and ``mean_fixed`` / ``var_fixed`` (long, ``(1,)``);
- in every forward a ratio vector that is not fixed is SparsestMax of its parameters at the
  radius; once its result is one-hot the layer marks it fixed and *stores the one-hot vector in
  the parameter*, which from then on is used as it is, without gradient (their training script
  also drops the fixed parameters' gradients);
- the network is their ResNet-v1 (``AuthorsResNet('ssn')``): ``sn{k}`` norms,
  ``downsample.{0,1}``, the stride on the bottleneck's 3x3 conv, and a stem max pooling *without
  padding, rounded up*; it pools globally (their ``AvgPool2d(7)`` is the same at 224 px) so that
  the tests run at 64 px; their dropout before the classifier does nothing in eval.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .authors import AuthorsResNet, authors_mixture


def _sparsemax(v):
    ordered, _ = torch.sort(v, descending=True)
    cumulative = torch.cumsum(ordered, 0) - 1
    ranks = torch.arange(1, v.numel() + 1, dtype=v.dtype)
    support = ordered - cumulative / ranks > 0
    rho = ranks[support][-1]
    tau = cumulative[support][-1] / rho
    return torch.clamp(v - tau, min=0)


def authors_sparsestmax(v, radius, previous_centre=None):
    """Their algorithm's steps, with their one-hot test on the result's range."""
    w = _sparsemax(v)
    if float(w.max() - w.min()) == 1.0:
        return w
    support = (w > 0).to(v.dtype)
    centre = support / support.sum()
    if previous_centre is not None:
        radius = math.sqrt(radius ** 2 - float(((centre - previous_centre) ** 2).sum()))
    distance = torch.norm(w - centre)
    if float(distance) >= radius:
        return w
    p = radius * (w - centre) / distance + centre
    if float(p.min()) < 0:
        return authors_sparsestmax(p, radius, centre)
    return p.clamp(0, 1)


class AuthorsSSN(nn.Module):
    """The SSN authors' layer, as their checkpoints hold it."""

    def __init__(self, channels: int, momentum: float = 0.997):
        super().__init__()
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.mean_weight = nn.Parameter(torch.ones(3))
        self.var_weight = nn.Parameter(torch.ones(3))
        self.register_buffer('running_mean', torch.zeros(1, channels, 1))
        self.register_buffer('running_var', torch.zeros(1, channels, 1))
        self.register_buffer('mean_fixed', torch.zeros(1, dtype=torch.long))
        self.register_buffer('var_fixed', torch.zeros(1, dtype=torch.long))
        self.register_buffer('radius', torch.zeros(1))

    def _ratios(self, scores, fixed):
        if int(fixed):
            return scores.detach()
        ratios = authors_sparsestmax(scores, float(self.radius))
        if float(ratios.max() - ratios.min()) >= 1:
            fixed.fill_(1)
            scores.data = ratios.data.clone()
            return scores.detach()
        return ratios

    def forward(self, x):
        mean_ratios = self._ratios(self.mean_weight, self.mean_fixed)
        var_ratios = self._ratios(self.var_weight, self.var_fixed)
        return authors_mixture(self, x, mean_ratios, var_ratios)


def trained_authors_ssn(radii=(0.0, 0.3, 0.78), saved_radius: float = 0.45, spread: float = 0.6,
                        seed: int = 0):
    """Their ResNet-18, ratio parameters spread from their initial ones by ``spread``, after one
    SGD step per radius in ``radii`` (ratio parameters at lr / 10 without weight decay, their
    gradients clipped to norm 1 and dropped once fixed, as their script trains), saved at
    ``saved_radius``: some ratio vectors fixed (one-hot), others free."""
    torch.manual_seed(seed)
    model = AuthorsResNet('ssn')
    with torch.no_grad():  # ratio parameters that have learned different things already
        for name, param in model.named_parameters():
            if name.endswith('_weight'):
                param.add_(torch.randn(3) * spread)
    ratio_params = [p for n, p in model.named_parameters() if n.endswith('_weight')]
    others = [p for n, p in model.named_parameters() if not n.endswith('_weight')]
    optimizer = torch.optim.SGD([{'params': others},
                                 {'params': ratio_params, 'lr': 0.05, 'weight_decay': 0}],
                                lr=0.5, momentum=0.9, weight_decay=1e-4)
    model.train()
    for radius in radii:
        set_radius(model, radius)
        x = torch.randn(4, 3, 64, 64) * 1.5 + 0.3
        loss = F.cross_entropy(model(x), torch.randint(0, 10, (4, )))
        optimizer.zero_grad()
        loss.backward()
        for m in model.modules():
            if isinstance(m, AuthorsSSN):
                if int(m.mean_fixed):
                    m.mean_weight.grad = None
                if int(m.var_fixed):
                    m.var_weight.grad = None
        torch.nn.utils.clip_grad_norm_(ratio_params, 1.0)
        optimizer.step()
    set_radius(model, saved_radius)
    return model, optimizer


def set_radius(model: nn.Module, radius: float) -> None:
    for m in model.modules():
        if isinstance(m, AuthorsSSN):
            m.radius.fill_(radius)
