# Copyright (c) mmnorm contributors. All rights reserved.
"""mmcv's and mmengine's conv + BN folding paths, made correct for weight-standardized convs.

``mmcv.cnn.fuse_conv_bn``, ``ConvModule(..., efficient_conv_bn_eval=True)`` and mmengine's
``efficient_conv_bn_eval`` (the Runner's config key of that name) fold an eval-mode BN into the
raw weight of any ``nn.Conv2d``. A :class:`~mmnorm.layers.WSConv2d` standardizes that weight
again on every forward, which removes the BN's scale: the result is silently wrong (by up to 14
on a 3x3 ConvModule, 3.3 on a WS ResNet). mmcv's own ``ConvWS2d`` has the same flaw; it is not
mmnorm's to change.

:func:`install` wraps the module-level functions mmcv and mmengine call for this; the wrappers
hand every other convolution to the original unchanged, and for a ``WSConv2d`` fold from the
standardized weight (:mod:`mmnorm.convert.folding`):

- ``mmcv.cnn.utils.fuse_conv_bn._fuse_conv_bn`` (what ``fuse_conv_bn`` calls per conv + BN
  pair): returns a plain ``nn.Conv2d`` with the standardized, scaled weight;
- ``mmcv.cnn.bricks.conv_module.efficient_conv_bn_eval_forward`` (what ``ConvModule`` binds when
  ``efficient_conv_bn_eval`` is on): convolves with the standardized weight times the BN scale,
  so it keeps its purpose (one convolution, no stored conv output) and stays differentiable;
- ``mmengine.model.efficient_conv_bn_eval.efficient_conv_bn_eval_control`` (what mmengine's
  graph transform puts in place of each conv + BN pair): the same one convolution in eval, and
  ``bn(conv(x))`` in training, where mmengine convolves with the raw weight (it would train a
  network without weight standardization).

Applied when those mmcv modules are imported (idempotent: a wrapper is never wrapped again).
"""
import functools
import importlib

import torch

from ..convert.folding import bn_affine, fold_bn_into_conv
from ..layers import WSConv2d

__all__ = ['install', 'ws_efficient_conv_bn_eval_forward']

#: (module, function name) pairs that :func:`install` wraps.
TARGETS = (('mmcv.cnn.utils.fuse_conv_bn', '_fuse_conv_bn'),
           ('mmcv.cnn.bricks.conv_module', 'efficient_conv_bn_eval_forward'),
           ('mmengine.model.efficient_conv_bn_eval', 'efficient_conv_bn_eval_control'))


def ws_efficient_conv_bn_eval_forward(bn, conv: WSConv2d, x: torch.Tensor) -> torch.Tensor:
    """``bn(conv(x))`` with an eval-mode ``bn`` as one convolution of the standardized weight."""
    scale, shift = bn_affine(bn)
    weight = conv.standardized_weight() * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
    bias = shift if conv.bias is None else shift + scale * conv.bias
    return conv._conv_forward(x, weight, bias)


def _ws_aware(name: str, original):
    if name == '_fuse_conv_bn':

        @functools.wraps(original)
        def wrapper(conv, bn):
            if isinstance(conv, WSConv2d):
                with torch.no_grad():
                    return fold_bn_into_conv(conv, bn)
            return original(conv, bn)
    elif name == 'efficient_conv_bn_eval_forward':

        @functools.wraps(original)
        def wrapper(bn, conv, x):
            if isinstance(conv, WSConv2d):
                return ws_efficient_conv_bn_eval_forward(bn, conv, x)
            return original(bn, conv, x)
    else:  # mmengine's control: eval-mode BN folded, else the two layers as they are

        @functools.wraps(original)
        def wrapper(bn, conv, x):
            if isinstance(conv, WSConv2d):
                return bn(conv(x)) if bn.training else ws_efficient_conv_bn_eval_forward(
                    bn, conv, x)
            return original(bn, conv, x)

    wrapper.__mmnorm_wraps__ = original
    return wrapper


def install(module=None) -> None:
    """Wrap the ``TARGETS`` of every mmcv module already imported (idempotent). ``module``
    is the one just imported when called as a post-import callback (unused: all are checked)."""
    import sys
    for module_name, name in TARGETS:
        target = sys.modules.get(module_name)
        if target is None:
            continue
        current = getattr(target, name)
        if not hasattr(current, '__mmnorm_wraps__'):
            setattr(target, name, _ws_aware(name, current))


def uninstall() -> None:
    """Restore mmcv's originals (for tests)."""
    for module_name, name in TARGETS:
        target = importlib.import_module(module_name)
        current = getattr(target, name)
        if hasattr(current, '__mmnorm_wraps__'):
            setattr(target, name, current.__mmnorm_wraps__)
