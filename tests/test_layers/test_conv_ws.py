# Copyright (c) mmnorm contributors. All rights reserved.
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmnorm import WSConv2d
from mmnorm.functional import conv2d_ws, standardize_weight
from mmnorm.testing import oracles
from tests.conftest import assert_close, make_input


def test_repr_and_subclass():
    conv = WSConv2d(3, 8, 3, padding=1, eps=1e-4)
    assert isinstance(conv, nn.Conv2d)
    assert repr(conv) == 'WSConv2d(3, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), ' \
                         'eps=0.0001)'


def test_bad_arguments():
    with pytest.raises(ValueError, match='eps'):
        WSConv2d(3, 8, 3, eps=-1)
    with pytest.raises(ValueError, match='>= 2 dims'):
        standardize_weight(torch.randn(4))


@pytest.mark.parametrize('groups, kernel', [(1, 3), (2, 1), (4, (3, 1))])
def test_forward_and_gradients_match_oracle(groups, kernel):
    conv = WSConv2d(4, 8, kernel, padding=0, groups=groups, bias=True).double()
    x = make_input((2, 4, 6, 5)).requires_grad_()
    y = conv(x)
    w = conv.weight.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = F.conv2d(x_ref, oracles.standardize(w), conv.bias, groups=groups)
    assert_close(y, y_ref)
    grad = make_input(y.shape, seed=2)
    y.backward(grad)
    y_ref.backward(grad)
    assert_close(x.grad, x_ref.grad)
    assert_close(conv.weight.grad, w.grad)


def test_standardized_filters_have_zero_mean_unit_unbiased_variance():
    w = standardize_weight(make_input((6, 3, 3, 3)) * 5, eps=0.0).flatten(1)
    assert_close(w.mean(1), torch.zeros(6, dtype=w.dtype), atol=1e-12)
    assert_close(w.var(1, unbiased=True), torch.ones(6, dtype=w.dtype))


def test_differs_from_mmcv_conv_ws_by_eps_placement():
    from mmcv.cnn.bricks.conv_ws import conv_ws_2d
    weight = make_input((4, 2, 1, 1), scale=1e-3)  # tiny filter variance: eps matters
    x = make_input((1, 2, 3, 3))
    ours = conv2d_ws(x, weight, eps=1e-5)
    mmcv = conv_ws_2d(x, weight, eps=1e-5)
    expected = F.conv2d(x, oracles.standardize(weight, eps=1e-5))
    assert_close(ours, expected)
    assert not torch.allclose(ours, mmcv, rtol=1e-3)


def test_single_value_filters_are_finite():
    conv = WSConv2d(1, 4, 1)
    y = conv(torch.randn(2, 1, 3, 3))
    assert torch.isfinite(y).all()


def test_gradcheck():
    x = make_input((1, 2, 4, 4)).requires_grad_()
    w = make_input((3, 2, 3, 3), seed=1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: conv2d_ws(x, w, padding=1), (x, w))


def test_half_precision_weight_stats_in_float32():
    conv = WSConv2d(4, 8, 3).bfloat16()
    w = conv.standardized_weight()
    assert w.dtype == torch.bfloat16
    expected = oracles.standardize(conv.weight.double())
    torch.testing.assert_close(w.double(), expected, rtol=2e-2, atol=2e-2)


def test_autocast():
    conv = WSConv2d(4, 8, 3)
    x = torch.randn(2, 4, 6, 6)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = conv(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
