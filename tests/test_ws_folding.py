# Copyright (c) mmnorm contributors. All rights reserved.
"""Folding an eval-mode BN into a weight-standardized conv: mmnorm's own folding, mmcv's
``fuse_conv_bn`` and ``ConvModule(efficient_conv_bn_eval=True)`` all give what the unfolded
WSConv -> BN computes (mmcv alone folds into the raw weight, which WS then standardizes away)."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from mmcv.cnn import ConvModule, fuse_conv_bn
from torch import nn

from mmnorm import WSConv2d
from mmnorm.convert import fold_bn_into_conv
from mmnorm.integration import mmcv_fusion
from mmnorm.testing import oracles


def _trained_bn_(bn, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.normal_(0, 1, generator=gen)
        bn.running_var.uniform_(0.1, 2.0, generator=gen)
        bn.weight.normal_(0, 1, generator=gen)
        bn.bias.normal_(0, 1, generator=gen)
    return bn


def _conv_module(efficient, bias=False, dtype=torch.float64):
    torch.manual_seed(0)
    module = ConvModule(3, 8, 3, padding=1, bias=bias, conv_cfg=dict(type='WSConv'),
                        norm_cfg=dict(type='BN'), efficient_conv_bn_eval=efficient)
    _trained_bn_(module.norm)
    return module.to(dtype).eval()


def _oracle(module, x):
    """WS conv then eval BN, from mmnorm/testing/oracles.py and F.batch_norm, float64."""
    conv, bn = module.conv, module.norm
    y = F.conv2d(x, oracles.standardize(conv.weight), conv.bias, conv.stride, conv.padding)
    y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return F.relu(y)


@pytest.mark.parametrize('bias', [False, True])
def test_efficient_conv_bn_eval_with_wsconv(bias):
    module = _conv_module(efficient=True, bias=bias)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, requires_grad=True)
    expected = _oracle(module, x)
    actual = module(x)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
    # Also as mmcv uses it in training with a frozen BN: the gradients reach the raw weight
    # through the standardization.
    weight_grad, input_grad = torch.autograd.grad(actual.square().sum(), (module.conv.weight, x))
    ref_weight_grad, ref_input_grad = torch.autograd.grad(
        _oracle(module, x).square().sum(), (module.conv.weight, x))
    torch.testing.assert_close(weight_grad, ref_weight_grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(input_grad, ref_input_grad, rtol=1e-9, atol=1e-10)


def test_mmcv_fuse_conv_bn_with_wsconv_in_a_resnet():
    import mmpretrain.models  # noqa: F401
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = MODELS.build(dict(type='ResNet', depth=18, conv_cfg=dict(type='WSConv'),
                                  norm_cfg=dict(type='BN'))).double()
    for index, module in enumerate(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        _trained_bn_(module, seed=index)
    model.eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)[-1]
        fused = fuse_conv_bn(model)
        actual = fused(x)[-1]
    assert not any(isinstance(m, (WSConv2d, nn.BatchNorm2d)) for m in fused.modules())
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)


def test_mmnorm_fold_bn_into_wsconv_against_oracle():
    module = _conv_module(efficient=False, bias=True)
    folded = fold_bn_into_conv(module.conv, module.norm)
    assert type(folded) is nn.Conv2d
    x = torch.randn(3, 3, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(F.relu(folded(x)), _oracle(module, x), rtol=1e-10, atol=1e-10)


def test_plain_convs_still_fold_with_mmcv_originals():
    torch.manual_seed(0)
    module = ConvModule(3, 8, 3, norm_cfg=dict(type='BN'), efficient_conv_bn_eval=True).double()
    _trained_bn_(module.norm)
    module.eval()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        expected = F.relu(module.norm(module.conv(x)))
        torch.testing.assert_close(module(x), expected)
        conv = module.conv
        fused = fuse_conv_bn(module)
        assert fused.conv is conv  # mmcv's own _fuse_conv_bn: the conv is modified in place
        torch.testing.assert_close(fused(x), expected)


def _two_conv_modules(seed=0):
    """A backbone of two WSConv -> BN ConvModules with trained BN statistics, float64."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(*[
        ConvModule(c, 8, 3, padding=1, conv_cfg=dict(type='WSConv'), norm_cfg=dict(type='BN'))
        for c in (3, 8)])
    for i, module in enumerate(backbone):
        _trained_bn_(module.norm, seed=i)
    return backbone.double()


def _efficient_and_reference():
    """mmengine's ``efficient_conv_bn_eval = ['backbone']`` (what the Runner does for the config
    key) on one model; the same model untouched beside it."""
    from mmengine.model.efficient_conv_bn_eval import turn_on_efficient_conv_bn_eval
    model, reference = nn.Module(), nn.Module()
    model.backbone, reference.backbone = _two_conv_modules(), _two_conv_modules()
    turn_on_efficient_conv_bn_eval(model, ['backbone'])
    # (the transform found the pairs: its graph module's code calls the control)
    assert 'efficient_conv_bn_eval_control' in model.backbone.forward.__self__.code
    return model.backbone, reference.backbone


@pytest.mark.parametrize('train', [False, True])
def test_mmengine_efficient_conv_bn_eval_with_wsconv(train):
    # The fold in eval, the two layers in training (mmengine convolves with the raw weight):
    # outputs and the raw weights' gradients as the untouched WSConv -> BN, whose first pair
    # is also checked against the oracle.
    model, reference = _efficient_and_reference()
    model.train(train), reference.train(train)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    if not train:
        torch.testing.assert_close(reference[0](x), _oracle(reference[0], x))
    actual, expected = model(x), reference(x)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(actual.square().sum(), [m.conv.weight for m in model])
    ref_grads = torch.autograd.grad(expected.square().sum(), [m.conv.weight for m in reference])
    torch.testing.assert_close(grads, ref_grads, rtol=1e-9, atol=1e-10)


def test_unpatched_mmcv_is_wrong_for_wsconv():
    """What the wrappers are for (and a check that the tests above can fail)."""
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    expected = _oracle(_conv_module(efficient=False), x)
    mmcv_fusion.uninstall()
    try:
        efficient = _conv_module(efficient=True)
        assert (efficient(x) - expected).abs().max() > 1.0
        with torch.no_grad():
            assert (fuse_conv_bn(_conv_module(efficient=False))(x) - expected).abs().max() > 1.0
        model, reference = _efficient_and_reference()
        for train in (False, True):
            model.train(train), reference.train(train)
            assert (model(x) - reference(x)).abs().max() > 0.1, train
    finally:
        mmcv_fusion.install()


@pytest.mark.parametrize('order', ['mmcv first', 'mmnorm first'])
def test_wrappers_installed_once_whatever_the_import_order(order):
    imports = ('import mmcv.cnn; import mmnorm' if order == 'mmcv first'
               else 'import mmnorm; import mmcv.cnn')
    code = (f'{imports}; import mmnorm.integration.mmcv_fusion as f; f.install(); f.install(); '
            'import sys; a = sys.modules["mmcv.cnn.utils.fuse_conv_bn"]; '
            'b = sys.modules["mmcv.cnn.bricks.conv_module"]; '
            'import mmengine.model.efficient_conv_bn_eval as c; '
            'fns = [a._fuse_conv_bn, b.efficient_conv_bn_eval_forward, '
            'c.efficient_conv_bn_eval_control]; '
            'assert all(hasattr(g, "__mmnorm_wraps__") for g in fns), fns; '
            'assert not any(hasattr(g.__mmnorm_wraps__, "__mmnorm_wraps__") for g in fns); '
            'print("ok")')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == 'ok', out.stderr[-2000:]
