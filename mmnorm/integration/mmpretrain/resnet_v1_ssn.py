# Copyright (c) mmnorm contributors. All rights reserved.
"""mmpretrain's ResNet with the stem of the SSN authors' released ResNet-v1.

Their ``ResNetV1SSN`` (switchablenorms/Sparse_SwitchNorm, ``models/resnet_v1_ssn.py``) pools the
stem with a 3x3 max pooling of stride 2 **without padding, rounding up** (``ceil_mode``), where
torchvision's and mmpretrain's ResNets pad by 1: at 224 px both give 56x56, from windows shifted
by one pixel. Everything else (bottlenecks with the stride on the 3x3 conv, global pooling at
224 px, the classifier) is mmpretrain's ``ResNet`` with ``style='pytorch'``, with the same
parameter names, so a checkpoint loads into either. Use it to compute exactly what the authors'
released SSN models compute (``tools/convert_checkpoint.py --format ssn`` targets it); detectors
and segmentors finetuned from those weights may keep their own ResNet.
"""
from mmpretrain.models.backbones import ResNet
from mmpretrain.registry import MODELS
from torch import nn

from ...registry import register

__all__ = ['ResNetV1SSN']


@register(MODELS, 'ResNetV1SSN')
class ResNetV1SSN(ResNet):
    """:class:`mmpretrain.models.ResNet` whose stem max pooling is the SSN authors':
    ``MaxPool2d(3, stride=2, padding=0, ceil_mode=True)``. Takes ResNet's arguments."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=0, ceil_mode=True)
