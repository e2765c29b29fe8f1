# Copyright (c) mmnorm contributors. All rights reserved.
r"""Folding a per-channel affine map (an eval-mode BN, or an SN layer whose ratios all pick BN)
into the convolution before it, for weight-standardized convolutions too.

A :class:`~mmnorm.layers.WSConv2d` standardizes its weight on every forward, so scaling its raw
weight (what ``mmcv.cnn.fuse_conv_bn`` and mmcv's ``efficient_conv_bn_eval`` do with any
``nn.Conv2d``) changes nothing: the scale is standardized away and the BN is lost. Folding must
start from the standardized weight :math:`\hat W`:

.. math::
    a \cdot \mathrm{conv}(x; \hat W, b) + c = \mathrm{conv}(x; a\hat W, a b + c),

and the result is a plain ``nn.Conv2d``.
"""
from typing import Tuple

import torch
from torch import Tensor, nn

from ..layers import WSConv2d

__all__ = ['bn_affine', 'conv_weight', 'fold_affine_into_conv', 'fold_bn_into_conv']


def conv_weight(conv: nn.Conv2d) -> Tensor:
    """The weight ``conv`` convolves with: standardized for a ``WSConv2d``, else its own."""
    return conv.standardized_weight() if isinstance(conv, WSConv2d) else conv.weight


def bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> Tuple[Tensor, Tensor]:
    """``(a, c)`` with ``bn(x) = a * x + c`` per channel, from its running statistics."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -scale * bn.running_mean
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


@torch.no_grad()
def fold_affine_into_conv(conv: nn.Conv2d, scale: Tensor, shift: Tensor) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` computing ``scale * conv(x) + shift`` per output channel."""
    weight = conv_weight(conv)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, conv.dilation, conv.groups, bias=True,
                      padding_mode=conv.padding_mode, device=weight.device, dtype=weight.dtype)
    fused.weight.copy_(weight * scale.view(-1, *([1] * (weight.dim() - 1))))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
    fused.bias.copy_(scale * bias + shift)
    return fused


def fold_bn_into_conv(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> nn.Conv2d:
    """``bn(conv(x))`` (BN in eval mode) as one plain ``nn.Conv2d``."""
    return fold_affine_into_conv(conv, *bn_affine(bn))
