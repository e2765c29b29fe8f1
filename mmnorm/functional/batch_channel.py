# Copyright (c) mmnorm contributors. All rights reserved.
r"""Batch-Channel Normalization (BCN), functional form.

Qiao, Wang, Liu, Shen, Yuille. *Rethinking Normalization and Elimination Singularity in Neural
Networks* (2020), Eq. (13)-(16) and Algorithm 1. Written from the paper.

.. math::
    \dot x_{\cdot c} = \gamma^b_c \frac{x_{\cdot c} - \hat\mu_c}{\hat\sigma_c} + \beta^b_c
    \quad (13), \qquad
    y_{bg} = \gamma^c_g \frac{\dot x_{bg} - \mu_{bg}}{\sigma_{bg}} + \beta^c_g \quad (15),

i.e. ``BCN(x) = GN(BN(x))`` (Eq. 16): a batch normalization with a per-channel affine followed by
a group normalization into ``G`` groups with a **per-group** affine (Eq. 15, as in the paper; GN's
usual affine is per channel). :math:`\hat\sigma_c = \sqrt{\hat\sigma^2_c + \epsilon}`.

Large batch: :math:`\hat\mu, \hat\sigma^2` are the batch statistics (training) or running averages
(eval). Micro batch (``estimate=True``, Algorithm 1): they are *estimates*, initialised to 0 and 1,
updated in training at rate :math:`r` before normalizing, and used as constants (no gradient):

1. :math:`\dot\mu_c = \frac{1}{BHW}\sum x_{bchw}`
2. :math:`\dot\sigma^2_c = \frac{1}{BHW}\sum (x_{bchw} - \hat\mu_c)^2` (about the previous estimate)
3. :math:`\hat\mu_c \leftarrow \hat\mu_c + r(\dot\mu_c - \hat\mu_c)`
4. :math:`\hat\sigma^2_c \leftarrow \hat\sigma^2_c + r(\dot\sigma^2_c - \hat\sigma^2_c)`

The paper sets :math:`r` to the learning rate (:class:`mmnorm.engine.EstimateRateHook` does so).

Because the BN step is a per-channel affine map, the group statistics of :math:`\dot x` follow from
the per-(n, c) moments of :math:`x`; the whole layer is one per-(n, c) affine map of the input and
costs what GroupNorm costs.
"""
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .moments import CoefficientRule, input_moments, moment_affine
from .running_stats import LocalBatchStats, pool, pool_backward, update_running_stats
from .switchable import check_norm_input

__all__ = ['batch_channel_norm', 'BatchChannelRule', 'check_num_groups']


def check_num_groups(num_channels: int, num_groups: int) -> None:
    """Raise a clear error unless ``num_groups`` is a positive divisor of ``num_channels``."""
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f'num_groups must be a positive int, got {num_groups!r}')
    if num_channels % num_groups:
        raise ValueError(f'num_groups={num_groups} does not divide the number of channels '
                         f'{num_channels}; choose a divisor of {num_channels}')


class BatchChannelRule(CoefficientRule):
    """Coefficients of BCN: ``tensors = (weight, bias, bn_weight, bn_bias, bn_mean, bn_var)``.

    ``bn_mean``/``bn_var``: the BN statistics used as constants (eval, or the estimates of
    Algorithm 1), or ``None`` to use ``batch = (batch_mean, batch_var, state)`` from
    ``batch_stats.forward`` on the same moments (large-batch training).
    """

    def __init__(self, num_groups: int, eps: float, batch_stats: Any = None,
                 batch: Optional[tuple] = None):
        self.num_groups, self.eps = num_groups, eps
        self.batch_stats, self.batch = batch_stats, batch

    def forward(self, mean: Tensor, var: Tensor, tensors: Sequence[Optional[Tensor]]
                ) -> Tuple[Tensor, Tensor, Any]:
        weight, bias, bn_weight, bn_bias, bn_mean, bn_var = tensors
        n, c = mean.shape
        g = self.num_groups
        bn_state = None
        if bn_mean is None:
            bn_mean, bn_var, bn_state = self.batch
        bn_mean, bn_var = bn_mean.to(mean.dtype), bn_var.to(mean.dtype)
        # Eq. (13) as a per-channel affine map: x_dot = alpha * x + delta.
        bn_inv_std = torch.rsqrt(bn_var + self.eps)
        alpha = bn_inv_std * bn_weight.to(mean.dtype) if bn_weight is not None else bn_inv_std
        delta = -alpha * bn_mean
        if bn_bias is not None:
            delta = delta + bn_bias.to(mean.dtype)
        d = c // g  # explicit sizes: N may be 0 (an empty shard of a synchronized layer)
        alpha3, delta3 = alpha.view(1, g, d), delta.view(1, g, d)
        mean3, var3 = mean.view(n, g, d), var.view(n, g, d)
        # Eq. (15): group statistics of x_dot from its per-(n, c) moments.
        group_mean, group_var, group_dev = pool(torch.addcmul(delta3, alpha3, mean3),
                                                alpha3.square() * var3, 2)
        group_inv_std = torch.rsqrt(group_var + self.eps)             # (N, G, 1)
        k = (group_inv_std * weight.to(mean.dtype).view(1, g, 1) if weight is not None
             else group_inv_std)
        centered_delta = delta3 - group_mean
        scale = k * alpha3
        shift = k * centered_delta
        if bias is not None:
            shift = shift + bias.to(mean.dtype).view(1, g, 1)
        state = (mean3, var3, alpha3, bn_mean, bn_inv_std, bn_state, group_dev, group_inv_std,
                 k, centered_delta, weight, bn_weight)
        return scale.reshape(n, c), shift.reshape(n, c), state

    def backward(self, state: Any, grad_scale: Tensor, grad_shift: Tensor,
                 needs: Sequence[bool]) -> Tuple[Tensor, Tensor, List[Optional[Tensor]]]:
        (mean3, var3, alpha3, bn_mean, bn_inv_std, bn_state, group_dev, group_inv_std, k,
         centered_delta, weight, bn_weight) = state
        n, g, d = mean3.shape
        grad_scale3, grad_shift3 = grad_scale.view(n, g, d), grad_shift.view(n, g, d)
        grad_bias = grad_shift3.sum((0, 2)) if needs[1] else None
        # scale = k * alpha, shift = k * (delta - group_mean) + bias
        grad_k = (grad_scale3 * alpha3 + grad_shift3 * centered_delta).sum(2, keepdim=True)
        grad_alpha = (grad_scale3 * k).sum(0)                          # (G, D)
        grad_shift_k = grad_shift3 * k
        grad_delta = grad_shift_k.sum(0)
        grad_group_mean = -grad_shift_k.sum(2, keepdim=True)
        grad_weight = (grad_k * group_inv_std).sum(0).view(g) if needs[0] else None
        grad_inv = grad_k * weight.to(grad_k.dtype).view(1, g, 1) if weight is not None else grad_k
        grad_group_var = -0.5 * grad_inv * group_inv_std.pow(3)
        grad_dot_mean, grad_dot_var = pool_backward(grad_group_mean, grad_group_var, group_dev,
                                                    2)
        # dot_mean = alpha * mean + delta, dot_var = alpha^2 * var
        grad_alpha = (grad_alpha + (grad_dot_mean * mean3).sum(0)
                      + 2.0 * alpha3[0] * (grad_dot_var * var3).sum(0))
        grad_delta = grad_delta + grad_dot_mean.sum(0)
        grad_mean = grad_dot_mean * alpha3
        grad_var = grad_dot_var * alpha3.square()
        grad_alpha, grad_delta = grad_alpha.reshape(-1), grad_delta.reshape(-1)
        # delta = bn_bias - alpha * bn_mean, alpha = bn_weight * bn_inv_std
        grad_bn_bias = grad_delta if needs[3] else None
        grad_alpha = grad_alpha - grad_delta * bn_mean
        grad_bn_weight = grad_alpha * bn_inv_std if needs[2] else None
        if bn_state is not None:
            grad_bn_inv = grad_alpha * bn_weight.to(grad_alpha.dtype) if bn_weight is not None \
                else grad_alpha
            grad_bn_mean = -grad_delta * alpha3.reshape(-1)
            grad_bn_var = -0.5 * grad_bn_inv * bn_inv_std.pow(3)
            g_mean, g_var = self.batch_stats.backward(bn_state, grad_bn_mean, grad_bn_var)
            grad_mean = grad_mean.reshape(n, g * d) + g_mean
            grad_var = grad_var.reshape(n, g * d) + g_var
        return (grad_mean.reshape(n, g * d), grad_var.reshape(n, g * d),
                [grad_weight, grad_bias, grad_bn_weight, grad_bn_bias, None, None])


@torch.no_grad()
def _update_estimates(estimate_mean: Tensor, estimate_var: Tensor, mean: Tensor, var: Tensor,
                      rate: Union[float, Tensor]) -> None:
    """Algorithm 1, steps 1-4, from per-(n, c) moments."""
    if isinstance(rate, Tensor):
        rate = rate.to(estimate_mean.dtype)
    batch_mean = mean.mean(0)                                                     # step 1
    batch_var = (var + (mean - estimate_mean.to(mean.dtype)).square()).mean(0)    # step 2
    estimate_mean.lerp_(batch_mean.to(estimate_mean.dtype), rate)                 # step 3
    estimate_var.lerp_(batch_var.to(estimate_var.dtype), rate)                    # step 4


def batch_channel_norm(input: Tensor, num_groups: int, weight: Optional[Tensor] = None,
                       bias: Optional[Tensor] = None, bn_weight: Optional[Tensor] = None,
                       bn_bias: Optional[Tensor] = None, running_mean: Optional[Tensor] = None,
                       running_var: Optional[Tensor] = None, training: bool = True,
                       momentum: float = 0.1, eps: float = 1e-5, estimate: bool = False,
                       rate: Union[float, Tensor] = 0.0, batch_stats: Optional[Callable[[int], Any]] = None) -> Tensor:
    r"""Batch-Channel Normalization, see the module docstring for the equations.

    Args:
        input (Tensor): ``(N, C, *)``, any number of spatial dims.
        num_groups (int): number of channel groups ``G`` of the channel normalization.
        weight (Tensor, optional): per-group scale :math:`\gamma^c`, ``(G,)``.
        bias (Tensor, optional): per-group shift :math:`\beta^c`, ``(G,)``.
        bn_weight (Tensor, optional): per-channel scale :math:`\gamma^b`, ``(C,)``.
        bn_bias (Tensor, optional): per-channel shift :math:`\beta^b`, ``(C,)``.
        running_mean (Tensor, optional): ``(C,)`` running mean, or the estimate
            :math:`\hat\mu` when ``estimate=True``.
        running_var (Tensor, optional): ``(C,)`` running (unbiased) variance, or the estimate
            :math:`\hat\sigma^2` when ``estimate=True``.
        training (bool): training mode. Large batch: use and (if given) update batch
            statistics. Estimated: update the estimates (Algorithm 1). Defaults to True.
        momentum (float): PyTorch-convention momentum of the running buffers (large batch only).
            Defaults to 0.1.
        eps (float): added to both variances. Defaults to 1e-5.
        estimate (bool): micro-batch form (Algorithm 1); requires the running buffers.
            Defaults to False.
        rate (float | Tensor): update rate :math:`r` of the estimates (a 0-dim tensor avoids a
            host-device sync). Defaults to 0.
        batch_stats (callable, optional): how BN statistics are formed from per-(n, c) moments
            (large batch only), see :func:`~mmnorm.functional.switchable_norm`; defaults to this
            batch's.

    Returns:
        Tensor: normalized input, same shape and dtype.
    """
    check_norm_input(input, bn_weight.numel() if bn_weight is not None else None)
    check_num_groups(input.shape[1], num_groups)
    if estimate and (running_mean is None or running_var is None):
        raise ValueError('estimate=True needs the running_mean/running_var estimate buffers')
    if input.numel() == 0 and not getattr(batch_stats, 'collective', False):
        return input.clone()  # (a synchronized layer still joins its collectives)
    input, mean, var, length = input_moments(input)

    bn_mean = bn_var = batch = None
    if estimate:
        if training:
            _update_estimates(running_mean, running_var, mean, var, rate)
        # Constants (no gradient, Algorithm 1); copies, so a later in-place update of the buffers
        # (a layer called again before backward) cannot invalidate what backward saved.
        bn_mean, bn_var = running_mean.clone(), running_var.clone()
    elif training or running_mean is None:
        batch_stats = (batch_stats or LocalBatchStats)(length)
        batch = batch_stats.forward(mean, var)
        if running_mean is not None:
            update_running_stats(running_mean, running_var, batch[0], batch[1],
                                 batch_stats.count, momentum)
    else:
        bn_mean, bn_var = running_mean.clone(), running_var.clone()

    rule = BatchChannelRule(num_groups, eps, batch_stats, batch)
    return moment_affine(input, mean, var, rule,
                         (weight, bias, bn_weight, bn_bias, bn_mean, bn_var))
