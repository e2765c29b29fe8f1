# Copyright (c) mmnorm contributors. All rights reserved.
r"""Switchable Normalization (SN), functional form.

Luo, Peng, Ren, Zhang. *Do Normalization Layers in a Deep ConvNet Really Need to Be Distinct?*
(2019), Eq. (1); Luo et al. *Differentiable Learning-to-Normalize via Switchable Normalization*
(ICLR 2019). Written from the papers; no code of the authors' (CC-BY-NC) repository is used.

For an input :math:`x` shaped ``(N, C, *)`` and :math:`\Omega = \{IN, LN, BN\}`:

.. math::
    y = \gamma \frac{x - \sum_{z\in\Omega} \lambda^\mu_z \mu_z}
                   {\sqrt{\sum_{z\in\Omega} \lambda^\sigma_z \sigma^2_z + \epsilon}} + \beta
    \quad (\text{mix='var'}), \qquad
    y = \gamma \frac{x - \sum_{z} \lambda^\mu_z \mu_z}
                   {\sum_{z} \lambda^\sigma_z \sqrt{\sigma^2_z + \epsilon}} + \beta
    \quad (\text{mix='std'}, \text{Eq. (1) literally}),

with :math:`\lambda^\mu = \mathrm{softmax}(\text{mean\_logits})`,
:math:`\lambda^\sigma = \mathrm{softmax}(\text{var\_logits})`. IN statistics are per (sample,
channel) over space, LN per sample over channels and space, BN per channel over the batch and
space; all variances are biased. LN and BN statistics are pooled from the IN moments (law of total
variance), so the input is read once for all three.
"""
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .moments import CoefficientRule, input_moments, moment_affine, softmax_backward
from .running_stats import LocalBatchStats, pool, pool_backward, update_running_stats

__all__ = ['switchable_norm', 'SwitchableRule', 'check_norm_input', 'MIX_MODES']

MIX_MODES = ('var', 'std')


def check_norm_input(input: Tensor, num_features: Optional[int] = None) -> None:
    """Raise a clear error for an input that is not ``(N, C, *)`` with ``C == num_features``."""
    if not isinstance(input, Tensor):
        raise TypeError(f'expected a Tensor, got {type(input).__name__}')
    if input.dim() < 2:
        raise ValueError(f'expected an input shaped (N, C, *) with at least 2 dims, got shape '
                         f'{tuple(input.shape)}')
    if num_features is not None and input.shape[1] != num_features:
        raise ValueError(f'expected {num_features} channels (dim 1), got input shaped '
                         f'{tuple(input.shape)}')
    if not input.is_floating_point():
        raise TypeError(f'expected a floating-point input, got {input.dtype}')


def _mix(ratios: Tensor, per_nc: Tensor, per_n: Tensor, per_c: Optional[Tensor],
         constant: float = 0.0) -> Tensor:
    """``ratios[0] * per_nc + ratios[1] * per_n + ratios[2] * per_c + constant``, as ``(N, C)``.

    The per-sample and per-channel terms are combined on their small shapes first, so only two
    operations touch ``(N, C)`` tensors.
    """
    rest = ratios[1] * per_n + constant
    if per_c is not None:
        rest = rest + ratios[2] * per_c
    return torch.addcmul(rest, ratios[0], per_nc)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum()`` without a temporary (both contiguous and alike in shape)."""
    return torch.dot(a.reshape(-1), b.reshape(-1))


class SwitchableRule(CoefficientRule):
    """Coefficients of SN: ``tensors = (mean_logits, var_logits, weight, bias, bn_mean, bn_var)``.

    ``bn_mean``/``bn_var`` are BN statistics used as constants (eval). When they are ``None``
    (training) the rule uses ``batch = (batch_mean, batch_var, state)`` from
    ``batch_stats.forward`` on the same moments, and ``batch_stats.backward`` to route their
    gradients. Passing the same tensor as both logits gives tied ratios.
    """

    def __init__(self, eps: float, mix: str, in_correction: float, batch_stats: Any = None,
                 batch: Optional[tuple] = None):
        self.eps, self.mix, self.in_correction = eps, mix, in_correction
        self.batch_stats, self.batch = batch_stats, batch

    def forward(self, mean: Tensor, var: Tensor, tensors: Sequence[Optional[Tensor]]
                ) -> Tuple[Tensor, Tensor, Any]:
        mean_logits, var_logits, weight, bias, bn_mean, bn_var = tensors
        dtype = mean.dtype
        var = var * self.in_correction if self.in_correction != 1.0 else var
        ln_mean, ln_var, ln_dev = pool(mean, var, 1)                # (N, 1)
        bn_state = None
        if mean_logits.numel() == 3:
            if bn_mean is None:
                bn_mean, bn_var, bn_state = self.batch
            bn_mean, bn_var = bn_mean.to(dtype), bn_var.to(dtype)
        mean_ratios = F.softmax(mean_logits.to(dtype), 0)
        var_ratios = (mean_ratios if var_logits is mean_logits else
                      F.softmax(var_logits.to(dtype), 0))
        mixed_mean = _mix(mean_ratios, mean, ln_mean, bn_mean)
        stds = None
        if self.mix == 'var':
            inv_std = _mix(var_ratios, var, ln_var, bn_var, self.eps).rsqrt_()
        else:
            stds = [torch.sqrt(v + self.eps) if v is not None else None
                    for v in (var, ln_var, bn_var)]
            inv_std = _mix(var_ratios, *stds).reciprocal_()
        scale = inv_std * weight.to(dtype) if weight is not None else inv_std
        if bias is not None:
            shift = torch.addcmul(bias.to(dtype), scale, mixed_mean, value=-1.0)
        else:
            shift = torch.mul(scale, mixed_mean).neg_()
        state = (mean, var, ln_mean, ln_var, ln_dev, bn_mean, bn_var, bn_state, mean_ratios,
                 var_ratios, mixed_mean, inv_std, stds, weight, scale)
        return scale, shift, state

    def backward(self, state: Any, grad_scale: Tensor, grad_shift: Tensor,
                 needs: Sequence[bool]) -> Tuple[Tensor, Tensor, List[Optional[Tensor]]]:
        (mean, var, ln_mean, ln_var, ln_dev, bn_mean, bn_var, bn_state, mean_ratios, var_ratios,
         mixed_mean, inv_std, stds, weight, scale) = state
        using_bn = bn_mean is not None
        # shift = bias - scale * mixed_mean, scale = weight * inv_std
        grad_bias = grad_shift.sum(0) if needs[3] else None
        grad_a = torch.addcmul(grad_scale, mixed_mean, grad_shift, value=-1.0)
        neg_grad_mixed_mean = scale * grad_shift                   # -d/d mixed_mean
        grad_weight = (grad_a * inv_std).sum(0) if needs[2] else None
        grad_inv_std = grad_a.mul_(weight.to(grad_a.dtype)) if weight is not None else grad_a

        # The mixed variance (mix='var', inv_std = (mix + eps)^-1/2) or the mixed std (mix='std',
        # inv_std = 1 / mix): grad_mix = grad_inv_std * inv_std^p * factor.
        if self.mix == 'var':
            grad_mix = grad_inv_std.mul_(inv_std.pow(3)).mul_(-0.5)
            terms = (var, ln_var, bn_var)
        else:
            grad_mix = grad_inv_std.mul_(inv_std.square()).neg_()
            terms = stds
        grad_mix_n = grad_mix.sum(1, keepdim=True)
        grad_mix_c = grad_mix.sum(0) if using_bn else None
        parts = [_dot(grad_mix, terms[0]), _dot(grad_mix_n, terms[1])]
        if using_bn:
            parts.append(torch.dot(grad_mix_c, terms[2]))
        grad_var_ratios = torch.stack(parts)
        grad_ln_var = var_ratios[1] * grad_mix_n
        grad_bn_var = var_ratios[2] * grad_mix_c if using_bn else None
        if self.mix == 'var':
            grad_var = var_ratios[0] * grad_mix
        else:  # d sqrt(v + eps) / dv = 1 / (2 sqrt(v + eps))
            grad_var = torch.div(grad_mix, stds[0]).mul_(0.5 * var_ratios[0])
            grad_ln_var = grad_ln_var / (2 * stds[1])
            grad_bn_var = grad_bn_var / (2 * stds[2]) if using_bn else None

        # Means.
        neg_grad_mean_n = neg_grad_mixed_mean.sum(1, keepdim=True)
        neg_grad_mean_c = neg_grad_mixed_mean.sum(0) if using_bn else None
        parts = [_dot(neg_grad_mixed_mean, mean), _dot(neg_grad_mean_n, ln_mean)]
        if using_bn:
            parts.append(torch.dot(neg_grad_mean_c, bn_mean))
        grad_mean_ratios = -torch.stack(parts)

        # LN statistics are pooled over channels, BN statistics over the batch.
        grad_mean, g_var = pool_backward(-mean_ratios[1] * neg_grad_mean_n, grad_ln_var, ln_dev,
                                         1)
        grad_mean.addcmul_(neg_grad_mixed_mean, mean_ratios[0], value=-1.0)
        grad_var = grad_var + g_var
        if bn_state is not None:
            g_mean, g_var = self.batch_stats.backward(
                bn_state, -mean_ratios[2] * neg_grad_mean_c, grad_bn_var)
            grad_mean += g_mean
            grad_var += g_var
        if self.in_correction != 1.0:
            grad_var *= self.in_correction

        grad_mean_logits = softmax_backward(mean_ratios, grad_mean_ratios) if needs[0] else None
        grad_var_logits = softmax_backward(var_ratios, grad_var_ratios) if needs[1] else None
        return grad_mean, grad_var, [grad_mean_logits, grad_var_logits, grad_weight, grad_bias,
                                     None, None]


def switchable_norm(input: Tensor, mean_logits: Tensor, var_logits: Tensor,
                    weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                    running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
                    training: bool = True, momentum: float = 0.1, eps: float = 1e-5,
                    mix: str = 'var', in_unbiased: bool = False,
                    batch_stats: Optional[Callable[[int], Any]] = None) -> Tensor:
    r"""Switchable Normalization over IN, LN (and BN), see the module docstring for the equation.

    Args:
        input (Tensor): ``(N, C, *)``, any number of spatial dims.
        mean_logits (Tensor): ratio logits for the means, ``(3,)`` for (IN, LN, BN) or ``(2,)``
            for (IN, LN) (SN without BN, e.g. one sample per GPU).
        var_logits (Tensor): ratio logits for the variances, same size. Pass the *same* tensor as
            ``mean_logits`` for tied ratios (SN_tied).
        weight (Tensor, optional): per-channel scale :math:`\gamma`, ``(C,)``.
        bias (Tensor, optional): per-channel shift :math:`\beta`, ``(C,)``.
        running_mean (Tensor, optional): ``(C,)`` running BN mean.
        running_var (Tensor, optional): ``(C,)`` running BN (unbiased) variance.
        training (bool): use the batch's BN statistics and, when running buffers are given, update
            them; otherwise the BN branch uses the running buffers. IN and LN are always computed
            per sample. Defaults to True.
        momentum (float): PyTorch convention, ``running = (1 - m) * running + m * batch``.
            Defaults to 0.1.
        eps (float): added to the variance(s). Defaults to 1e-5.
        mix (str): ``'var'`` mixes variances then takes one square root (the SN authors'
            formulation); ``'std'`` mixes standard deviations (Eq. (1) literally).
            Defaults to ``'var'``.
        in_unbiased (bool): compute the IN variance with Bessel's correction ÷(H·W−1) before LN
            and BN are pooled from it, as the SN authors' released code does. Only for converted
            checkpoints. Defaults to False.
        batch_stats (callable, optional): ``batch_stats(L)`` makes the object that forms the BN
            statistics from per-(n, c) moments (``forward(mean, var) -> (mean_c, var_c,
            state)``, ``backward(state, grad_mean_c, grad_var_c)``, ``count``); defaults to
            :class:`LocalBatchStats` (this batch). The synchronized layers pass one that
            all-reduces (:class:`mmnorm.layers.sync.SyncBatchStats`).

    Returns:
        Tensor: normalized input, same shape and dtype. Statistics are computed in float32 for
        float16/bfloat16 inputs.
    """
    check_norm_input(input, weight.numel() if weight is not None else None)
    if mix not in MIX_MODES:
        raise ValueError(f"mix must be one of {MIX_MODES}, got {mix!r}")
    if mean_logits.numel() not in (2, 3) or var_logits.numel() != mean_logits.numel():
        raise ValueError('mean_logits and var_logits must both have 3 entries (IN, LN, BN) or '
                         f'both 2 (IN, LN); got {mean_logits.numel()} and {var_logits.numel()}')
    if input.numel() == 0 and not getattr(batch_stats, 'collective', False):
        return input.clone()  # (a synchronized layer still joins its collectives)
    input, mean, var, length = input_moments(input)
    in_correction = length / (length - 1) if in_unbiased and length > 1 else 1.0

    use_batch_stats = training or running_mean is None
    bn_mean = bn_var = batch = None
    if mean_logits.numel() == 3:
        if use_batch_stats:
            batch_stats = (batch_stats or LocalBatchStats)(length)
            batch = batch_stats.forward(mean, var * in_correction)
            if running_mean is not None:
                update_running_stats(running_mean, running_var, batch[0], batch[1],
                                     batch_stats.count, momentum)
        else:
            # Copies: backward must not see a later in-place update of the buffers.
            bn_mean, bn_var = running_mean.clone(), running_var.clone()

    rule = SwitchableRule(eps, mix, in_correction, batch_stats, batch)
    # Tied ratios (SN_tied) pass the same tensor twice; autograd sums its two gradients.
    return moment_affine(input, mean, var, rule,
                         (mean_logits, var_logits, weight, bias, bn_mean, bn_var))
