# Copyright (c) mmnorm contributors. All rights reserved.
"""Independent reference implementations, written directly from the papers' equations with plain
torch ops on the full tensor (no per-(n, c) moment tricks, no code shared with mmnorm: this module
imports nothing from it, and the tests check that). Use them in float64."""
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ['sn', 'mixture', 'grouped_mixture', 'batch_stats', 'bcn', 'algorithm1_step',
           'running_update', 'standardize', 'one_hot_logits', 'simplex_projection', 'sparsestmax']


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], x.shape[1], -1)


def _affine(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    if weight is not None:
        y = y * weight.view(1, -1, 1)
    if bias is not None:
        y = y + bias.view(1, -1, 1)
    return y


def sn(x: Tensor, mean_logits: Tensor, var_logits: Tensor, weight=None, bias=None,
       bn_stats: Optional[Tuple[Tensor, Tensor]] = None, eps: float = 1e-5, mix: str = 'var',
       in_unbiased: bool = False) -> Tensor:
    """SN Eq. (1). ``bn_stats=(mean, var)``: BN branch uses them (eval); else batch stats.

    ``in_unbiased``: the SN authors' released code: unbiased IN variance, LN/BN variances as
    ``E[var_in + mean_in^2] - E[mean_in]^2``.
    """
    return mixture(x, torch.softmax(mean_logits, 0), torch.softmax(var_logits, 0), weight, bias,
                   bn_stats, eps, mix, in_unbiased)


def mixture(x: Tensor, lam_mu: Tensor, lam_var: Tensor, weight=None, bias=None,
            bn_stats: Optional[Tuple[Tensor, Tensor]] = None, eps: float = 1e-5,
            mix: str = 'var', in_unbiased: bool = False) -> Tensor:
    """SN Eq. (1) with the given ratios (IN, LN[, BN])."""
    h = _flat(x)
    n, c, length = h.shape
    mu_in = h.mean(2, keepdim=True)
    if in_unbiased:
        var_in = h.var(2, unbiased=True, keepdim=True)
        second = var_in + mu_in ** 2
        mu_ln = mu_in.mean(1, keepdim=True)
        var_ln = second.mean(1, keepdim=True) - mu_ln ** 2
        mu_bn = mu_in.mean(0, keepdim=True)
        var_bn = second.mean(0, keepdim=True) - mu_bn ** 2
    else:
        var_in = ((h - mu_in) ** 2).mean(2, keepdim=True)
        mu_ln = h.mean((1, 2), keepdim=True)
        var_ln = ((h - mu_ln) ** 2).mean((1, 2), keepdim=True)
        mu_bn = h.mean((0, 2), keepdim=True)
        var_bn = ((h - mu_bn) ** 2).mean((0, 2), keepdim=True)
    if bn_stats is not None:
        mu_bn, var_bn = bn_stats[0].view(1, c, 1), bn_stats[1].view(1, c, 1)
    means, variances = [mu_in, mu_ln, mu_bn], [var_in, var_ln, var_bn]
    k = len(lam_mu)
    mu = sum(lam_mu[i] * means[i] for i in range(k))
    if mix == 'var':
        denom = torch.sqrt(sum(lam_var[i] * variances[i] for i in range(k)) + eps)
    else:
        denom = sum(lam_var[i] * torch.sqrt(variances[i] + eps) for i in range(k))
    return _affine((h - mu) / denom, weight, bias).view_as(x)


def grouped_mixture(x: Tensor, lam_mu: Tensor, lam_var: Tensor, weight=None, bias=None,
                    bn_stats: Optional[Tuple[Tensor, Tensor]] = None, eps: float = 1e-5,
                    mix: str = 'var') -> Tensor:
    """SN Eq. (1) with one ratio row per group of channels: ``lam_mu`` / ``lam_var`` ``(G, K)``,
    channel ``c`` of ``C`` mixed by row ``c // (C / G)``. Statistics from the full tensor (IN per
    sample and channel, LN per sample over every channel, BN per channel over the batch), one
    channel at a time."""
    h = _flat(x)
    n, c, length = h.shape
    per_group = c // lam_mu.shape[0]
    out = torch.empty_like(h)
    mu_ln = h.mean((1, 2))
    var_ln = ((h - mu_ln.view(n, 1, 1)) ** 2).mean((1, 2))
    for ch in range(c):
        xc = h[:, ch, :]                                                 # (N, L)
        mu_in, var_in = xc.mean(1), ((xc - xc.mean(1, keepdim=True)) ** 2).mean(1)
        if bn_stats is None:
            mu_bn, var_bn = xc.mean(), ((xc - xc.mean()) ** 2).mean()
        else:
            mu_bn, var_bn = bn_stats[0][ch], bn_stats[1][ch]
        means, variances = [mu_in, mu_ln, mu_bn], [var_in, var_ln, var_bn]
        row_mu, row_var = lam_mu[ch // per_group], lam_var[ch // per_group]
        mu = sum(row_mu[i] * means[i] for i in range(len(row_mu)))
        if mix == 'var':
            denom = torch.sqrt(sum(row_var[i] * variances[i] for i in range(len(row_var))) + eps)
        else:
            denom = sum(row_var[i] * torch.sqrt(variances[i] + eps) for i in range(len(row_var)))
        out[:, ch, :] = (xc - mu.view(-1, 1)) / denom.view(-1, 1)
    return _affine(out, weight, bias).view_as(x)


def batch_stats(x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-channel batch mean, biased and unbiased variance of ``(N, C, *)``."""
    h = _flat(x).transpose(0, 1).reshape(x.shape[1], -1)
    return h.mean(1), h.var(1, unbiased=False), h.var(1, unbiased=True)


def bcn(x: Tensor, num_groups: int, weight=None, bias=None, bn_weight=None, bn_bias=None,
        bn_stats: Optional[Tuple[Tensor, Tensor]] = None, eps: float = 1e-5) -> Tensor:
    """BCN Eq. (13)-(16): batch norm with per-channel affine, then group norm with per-group
    affine. ``bn_stats``: (mean, var) used by the BN step instead of the batch's."""
    h = _flat(x)
    n, c, length = h.shape
    if bn_stats is None:
        mean, var, _ = batch_stats(x)
    else:
        mean, var = bn_stats
    h_dot = (h - mean.view(1, c, 1)) / torch.sqrt(var.view(1, c, 1) + eps)
    h_dot = _affine(h_dot, bn_weight, bn_bias)
    g = h_dot.reshape(n, num_groups, -1)
    g = (g - g.mean(2, keepdim=True)) / torch.sqrt(g.var(2, unbiased=False, keepdim=True) + eps)
    g = g.view(n, num_groups, -1)
    if weight is not None:
        g = g * weight.view(1, -1, 1)
    if bias is not None:
        g = g + bias.view(1, -1, 1)
    return g.view_as(x)


def algorithm1_step(x: Tensor, estimate_mean: Tensor, estimate_var: Tensor, rate: float
                    ) -> Tuple[Tensor, Tensor]:
    """BCN Algorithm 1, steps 1-4, literally."""
    h = _flat(x)
    c = h.shape[1]
    batch_mean = h.mean((0, 2))                                                   # step 1
    batch_var = ((h - estimate_mean.view(1, c, 1)) ** 2).mean((0, 2))             # step 2
    new_mean = estimate_mean + rate * (batch_mean - estimate_mean)                # step 3
    new_var = estimate_var + rate * (batch_var - estimate_var)                    # step 4
    return new_mean, new_var


def running_update(running: Tensor, batch: Tensor, momentum: float) -> Tensor:
    """PyTorch convention."""
    return (1 - momentum) * running + momentum * batch


def standardize(weight: Tensor, eps: float = 1e-5) -> Tensor:
    """WS with unbiased variance, eps inside the square root (BCN/WS reference layers)."""
    flat = weight.reshape(weight.shape[0], -1)
    mean = flat.mean(1, keepdim=True)
    var = ((flat - mean) ** 2).sum(1, keepdim=True) / (flat.shape[1] - 1)
    return ((flat - mean) / torch.sqrt(var + eps)).view_as(weight)


def one_hot_logits(index: int, size: int = 3, dtype=torch.float64) -> Tensor:
    """Logits whose softmax is exactly one-hot (the others underflow to 0)."""
    logits = torch.full((size, ), -1e4, dtype=dtype)
    logits[index] = 0.0
    return logits


def simplex_projection(v: Tensor, iterations: int = 200) -> Tensor:
    """Euclidean projection onto the probability simplex by bisection on the threshold ``tau``
    of ``max(v - tau, 0)`` (sums to 1), then tiny entries set to exactly 0 (float64)."""
    values = v.detach()  # the threshold is found on values; the result stays differentiable
    low, high = float(values.min()) - 1.0, float(values.max())
    for _ in range(iterations):
        tau = (low + high) / 2
        if float(torch.clamp(values - tau, min=0).sum()) > 1:
            low = tau
        else:
            high = tau
    p = torch.clamp(v - (low + high) / 2, min=0)
    return torch.where(p > 1e-12, p, torch.zeros_like(p))


def sparsestmax(v: Tensor, radius: float, previous_centre: Optional[Tensor] = None) -> Tensor:
    """SSN's SparsestMax as the paper describes it, with Python control flow (float64): project
    onto the simplex; stop when one-hot or outside the sphere of ``radius`` around the centre of
    the current face; else push out to the sphere, and when that leaves the simplex, project
    again onto the smaller face, where the sphere has radius ``sqrt(r^2 - |u' - u|^2)``."""
    import math
    p = simplex_projection(v)
    support = p > 0
    if int(support.sum()) == 1:
        return support.to(v.dtype)
    centre = support.to(v.dtype) / support.sum()
    if previous_centre is not None:
        radius = math.sqrt(max(radius ** 2 - float(((centre - previous_centre) ** 2).sum()), 0))
    distance = float((p - centre).norm())
    if distance >= radius or distance < 1e-12:
        return p
    pushed = centre + radius * (p - centre) / distance
    if float(pushed.min()) < 0:
        return sparsestmax(pushed, radius, centre)
    return pushed.clamp(0, 1)
