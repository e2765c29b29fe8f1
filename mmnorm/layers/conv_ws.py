# Copyright (c) mmnorm contributors. All rights reserved.
"""Weight-standardized convolution: ``WSConv`` (for ``conv_cfg``)."""
from torch import Tensor, nn

from ..functional import standardize_weight
from ..functional.arguments import check_eps
from ..registry import MODELS, register
from .fx import fx_leaf

__all__ = ['WSConv2d']


@register(MODELS, 'WSConv')
class WSConv2d(nn.Conv2d):
    r"""``nn.Conv2d`` whose filters are standardized on every forward (registered as ``WSConv``).

    .. math::
        \hat W_c = \frac{W_c - \mathrm{mean}(W_c)}{\sqrt{\mathrm{var}(W_c) + \epsilon}}

    over each output filter's ``in_channels / groups × kh × kw`` values, with the unbiased variance
    and ε inside the square root: the formula of the BCN authors' ImageNet layers (the
    constraints of BCN paper Eq. (9)), used with :class:`~mmnorm.layers.BatchChannelNorm` and GN.

    The WS authors' own layer (and the BCN authors' DeepLabV3 code) divides by the unbiased
    ``std + eps`` instead (ε outside the root), as mmcv's ``ConvWS`` (``ConvWS2d``) does; the
    two agree to about ``eps / std`` and differ for filters with tiny variance. Weights
    pretrained with one formula should be used with the same one (``ConvWS`` for the WS
    authors' models).

    Args:
        in_channels (int): as ``nn.Conv2d`` (``build_conv_layer`` / ``ConvModule`` pass it, and
            the arguments up to ``padding_mode``).
        out_channels (int): as ``nn.Conv2d``.
        kernel_size, stride, padding, dilation, groups, bias, padding_mode: as ``nn.Conv2d``.
        eps (float): added to the filter variance. Defaults to 1e-5.

    Examples:
        >>> from mmcv.cnn import ConvModule
        >>> m = ConvModule(3, 8, 3, padding=1, conv_cfg=dict(type='WSConv'),
        ...                norm_cfg=dict(type='GN', num_groups=4))
        >>> type(m.conv).__name__
        'WSConv2d'
    """

    #: mmengine's FLOP analysis counts the standardization's traced ops on top of the convolution
    #: (:mod:`mmnorm.integration.mmengine_flops`).
    flops_from_traced_ops = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = 'zeros',
                 eps: float = 1e-5, device=None, dtype=None):
        check_eps(eps, 'WSConv')
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device=device, dtype=dtype)
        self.eps = eps

    def standardized_weight(self) -> Tensor:
        """The weight the convolution actually uses."""
        return standardize_weight(self.weight, self.eps)

    @fx_leaf
    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, eps={self.eps}'
