# Copyright (c) mmnorm contributors. All rights reserved.
r"""Weight Standardization (WS), functional form.

Qiao, Wang, Liu, Shen, Yuille. *Rethinking Normalization and Elimination Singularity in Neural
Networks* (2020), Eq. (9); Qiao et al. *Micro-Batch Training with Batch-Channel Normalization and
Weight Standardization* (2019). Each output filter :math:`W_c` (over input channels and kernel
positions, :math:`I` values) is standardized before the convolution:

.. math::
    \hat W_c = \frac{W_c - \mathrm{mean}(W_c)}{\sqrt{\mathrm{var}(W_c) + \epsilon}},

with the *unbiased* variance (÷(I−1)) and :math:`\epsilon = 10^{-5}` inside the square root, as in
the BCN authors' ImageNet layers. The WS authors' own layer and the BCN authors' DeepLabV3 code
divide by the unbiased ``std + eps`` (eps outside the root), which is mmcv's ``ConvWS``
(``ConvWS2d``); for pretrained WS weights the formula matters.
With a single value per filter (:math:`I = 1`) the biased variance (0) is used.
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .arguments import check_eps
from .moments import LOW_PRECISION, static_shape_checks

__all__ = ['standardize_weight', 'conv2d_ws']

_IntOrPair = Union[int, Tuple[int, int]]


@static_shape_checks  # (a weight's shape is fixed for a model)
def _correction(flat: Tensor) -> int:
    """Bessel's correction of a filter's ``I`` values: 1, or 0 for one value."""
    return 1 if flat.shape[1] > 1 else 0


def standardize_weight(weight: Tensor, eps: float = 1e-5) -> Tensor:
    """Standardize each output filter of a conv weight ``(O, I/groups, *kernel)``.

    Statistics are computed in float32 for float16/bfloat16 weights; the result has the weight's
    dtype.
    """
    if weight.dim() < 2:
        raise ValueError(f'expected a conv weight with >= 2 dims, got shape {tuple(weight.shape)}')
    check_eps(eps, 'standardize_weight')
    flat = weight.flatten(1)
    if flat.dtype in LOW_PRECISION:
        flat = flat.float()
    var, mean = torch.var_mean(flat, dim=1, correction=_correction(flat), keepdim=True)
    return ((flat - mean) * torch.rsqrt(var + eps)).view_as(weight).to(weight.dtype)


def conv2d_ws(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
              stride: _IntOrPair = 1, padding: Union[_IntOrPair, str] = 0,
              dilation: _IntOrPair = 1, groups: int = 1, eps: float = 1e-5) -> Tensor:
    """``F.conv2d`` with a standardized weight (:func:`standardize_weight`)."""
    return F.conv2d(input, standardize_weight(weight, eps), bias, stride, padding, dilation, groups)
