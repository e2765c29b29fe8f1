# Copyright (c) mmnorm contributors. All rights reserved.
"""mmnorm: Switchable Normalization and Batch-Channel Normalization for OpenMMLab.

``import mmnorm`` (or ``custom_imports=dict(imports=['mmnorm'], allow_failed_imports=False)`` in
a config):

- registers the layers (``SN``, ``SN_tied``, ``BCN``, ``WSConv`` and the synchronized versions)
  in mmengine's root ``MODELS`` registry, where mmcv's ``build_norm_layer`` / ``build_conv_layer``
  and every OpenMMLab codebase find them;
- registers the training hooks and the optimizer-wrapper constructor;
- when mmdet / mmseg / mmpretrain models are imported: makes their backbones' ``norm_eval`` freeze
  mmnorm layers too, and registers mmseg's ``DeepLabV2Head``;
- when mmcv's conv + BN folding modules are imported: makes ``fuse_conv_bn`` and
  ``efficient_conv_bn_eval`` fold ``WSConv`` from its standardized weight (other convolutions
  unchanged; :mod:`mmnorm.integration.mmcv_fusion`);
- lets checkpoints written by mmengine load under torch's ``weights_only`` unpickler, with errors
  that tell damaged files, non-checkpoints and unsafe ones apart (:mod:`mmnorm.utils.checkpoint`).
"""
from . import engine, functional, integration, layers, utils
from .layers import (BatchChannelNorm, SwitchableNorm, SwitchableNormTied, SyncBatchChannelNorm,
                     SyncSwitchableNorm, SyncSwitchableNormTied, WSConv2d, convert_sync_norm,
                     revert_sync_norm)
from .version import __version__, version_info

utils.allow_mmengine_checkpoint_globals()
utils.register_checkpoint_loader()
integration.install_integrations()

__all__ = [
    '__version__', 'version_info', 'functional', 'layers', 'engine', 'integration', 'utils',
    'SwitchableNorm', 'SwitchableNormTied', 'BatchChannelNorm', 'WSConv2d',
    'SyncSwitchableNorm', 'SyncSwitchableNormTied', 'SyncBatchChannelNorm', 'convert_sync_norm',
    'revert_sync_norm'
]
