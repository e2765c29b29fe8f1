# Copyright (c) mmnorm contributors. All rights reserved.
"""DeepLabv2's ASPP classifier for mmsegmentation (which ships DeepLabv3 and v3+ only).

Chen et al. *DeepLab: Semantic Image Segmentation with Deep Convolutional Nets, Atrous
Convolution, and Fully Connected CRFs* (TPAMI 2018): atrous spatial pyramid pooling as four
parallel 3x3 convolutions with dilation rates 6, 12, 18 and 24 applied to the backbone's last
feature map, each producing class scores; the four score maps are summed. Unlike DeepLabv3's ASPP
there is no image-pooling branch, no 1x1 branch, no normalization and no fusion conv. The SN study
uses it (ResNet-50, output stride 8) for Cityscapes and ADE20K.
"""
from typing import List, Sequence

from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from mmseg.registry import MODELS
from torch import Tensor, nn

from ...registry import register

__all__ = ['DeepLabV2Head']


@register(MODELS, 'DeepLabV2Head')
class DeepLabV2Head(BaseDecodeHead):
    """DeepLabv2 ASPP head: summed class scores of parallel dilated 3x3 convolutions.

    Args:
        in_channels (int): channels of the input feature map (2048 for ResNet-50/101).
        num_classes (int): number of classes.
        dilations (Sequence[int]): dilation (and padding) of each branch.
            Defaults to (6, 12, 18, 24).
        channels (int, optional): unused by the ASPP classifier (kept for the decode-head
            interface); defaults to ``in_channels``.
        **kwargs: the other :class:`~mmseg.models.decode_heads.decode_head.BaseDecodeHead`
            arguments (``in_index``, ``dropout_ratio`` applied to the input features,
            ``loss_decode``, ``align_corners``, ...). ``conv_cfg`` selects the branch conv type;
            ``norm_cfg``/``act_cfg`` are accepted for config compatibility and unused: the head
            has no normalization or activation.

    Examples:
        >>> head = DeepLabV2Head(in_channels=64, num_classes=5)
        >>> head([torch.randn(2, 64, 17, 17)]).shape
        torch.Size([2, 5, 17, 17])
    """

    def __init__(self, in_channels: int, num_classes: int,
                 dilations: Sequence[int] = (6, 12, 18, 24), channels: int = None, **kwargs):
        if not dilations:
            raise ValueError('DeepLabV2Head needs at least one dilation')
        kwargs.setdefault('init_cfg', dict(type='Normal', std=0.01, override=dict(name='aspp')))
        super().__init__(in_channels, channels or in_channels, num_classes=num_classes,
                         **kwargs)
        if self.input_transform == 'multiple_select':
            raise ValueError('DeepLabV2Head classifies one feature map; use in_index=<int>')
        del self.conv_seg  # the summed ASPP branches are the classifier
        from mmcv.cnn import build_conv_layer

        def conv(*args, **kw):  # build_conv_layer(None) is nn.Conv2d
            return build_conv_layer(self.conv_cfg, *args, **kw)
        self.dilations = tuple(dilations)
        self.aspp = nn.ModuleList([
            conv(self.in_channels, self.out_channels, 3, padding=d, dilation=d, bias=True)
            for d in self.dilations
        ])

    def forward(self, inputs: List[Tensor]) -> Tensor:
        x = self._transform_inputs(inputs)
        if self.dropout is not None:
            x = self.dropout(x)
        scores = self.aspp[0](x)
        for branch in self.aspp[1:]:
            scores = scores + branch(x)
        return scores

    def cls_seg(self, feat: Tensor) -> Tensor:
        raise NotImplementedError('DeepLabV2Head classifies in forward(); it has no conv_seg')
