# Copyright (c) mmnorm contributors. All rights reserved.
"""BCN (large-batch and estimated) against the independent oracle in mmnorm/testing/oracles.py."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmnorm import BatchChannelNorm
from mmnorm.functional import batch_channel_norm, sparse_switchable_norm, switchable_norm
from mmnorm.testing import oracles
from tests.conftest import logged, assert_close, make_input

SHAPES = [(4, 8, 9), (3, 8, 5, 6), (2, 8, 3, 4, 3)]


def _bcn(channels=8, groups=4, seed=1, **kwargs):
    layer = BatchChannelNorm(channels, num_groups=groups, **kwargs).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return layer


def _oracle(layer, x, bn_stats=None):
    return oracles.bcn(x, layer.num_groups, layer.weight, layer.bias, layer.bn_weight,
                       layer.bn_bias, bn_stats=bn_stats, eps=layer.eps)


class TestSmoke:

    def test_repr(self):
        assert repr(BatchChannelNorm(64, num_groups=8, estimate=True)) == (
            "BatchChannelNorm(64, eps=1e-05, momentum=0.1, track_running_stats=True, "
            "eval_stats='moving', num_groups=8, affine=True, estimate=True)")

    def test_parameters_are_per_channel_then_per_group(self):
        bcn = BatchChannelNorm(64)
        shapes = {n: tuple(p.shape) for n, p in bcn.named_parameters()}
        assert shapes == {'bn_weight': (64, ), 'bn_bias': (64, ), 'weight': (32, ),
                          'bias': (32, )}
        assert 'estimate_rate' not in dict(bcn.named_buffers())
        est = BatchChannelNorm(64, estimate=True)
        assert float(est.estimate_rate) == 0.0
        assert torch.equal(est.running_mean, torch.zeros(64))
        assert torch.equal(est.running_var, torch.ones(64))


class TestExceptions:

    def test_groups_must_divide_channels(self):
        with pytest.raises(ValueError, match='does not divide the number of channels 48'):
            BatchChannelNorm(48, num_groups=32)
        with pytest.raises(ValueError, match='positive int'):
            BatchChannelNorm(48, num_groups=0)
        with pytest.raises(ValueError, match='does not divide'):
            batch_channel_norm(torch.randn(2, 6, 3), 4)

    def test_estimate_needs_buffers(self):
        with pytest.raises(ValueError, match='track_running_stats'):
            BatchChannelNorm(8, num_groups=4, estimate=True, track_running_stats=False)
        with pytest.raises(ValueError, match="eval_stats must be 'moving'"):
            BatchChannelNorm(8, num_groups=4, estimate=True, eval_stats='batch_average')
        with pytest.raises(ValueError, match='estimate buffers'):
            batch_channel_norm(torch.randn(2, 8, 3), 4, estimate=True)

    def test_rate_setter(self):
        with pytest.raises(RuntimeError, match='estimate=True'):
            BatchChannelNorm(8, num_groups=4).set_estimate_rate(0.1)
        layer = BatchChannelNorm(8, num_groups=4, estimate=True)
        for rate in (-1, 1.5, float('nan')):
            with pytest.raises(ValueError, match=r'must be in \[0, 1\]'):
                layer.set_estimate_rate(rate)
        layer.set_estimate_rate(1.0)  # the bounds are allowed
        layer.set_estimate_rate(0.0)

    @pytest.mark.parametrize('rate', [-0.5, 1.5, torch.tensor(-0.5), torch.tensor(1.5)])
    def test_functional_refuses_rates_outside_unit_interval(self, rate):
        # Above 1 the estimates overshoot: after a wide then a narrow batch the estimated
        # variance goes negative and the output is NaN.
        with pytest.raises(ValueError, match=r'rate must be in \[0, 1\]'):
            batch_channel_norm(torch.randn(2, 8, 3), 4, running_mean=torch.zeros(8),
                               running_var=torch.ones(8), estimate=True, rate=rate)

    @pytest.mark.parametrize('name, size, expected, meaning', [
        ('bias', 1, 4, 'group'), ('weight', 8, 4, 'group'), ('bn_bias', 1, 8, 'channel'),
        ('bn_weight', 4, 8, 'channel'), ('running_mean', 1, 8, 'channel'),
        ('running_var', 7, 8, 'channel')])
    @pytest.mark.parametrize('estimate', [False, True])
    def test_functional_checks_parameter_sizes(self, name, size, expected, meaning, estimate):
        args = dict(weight=torch.ones(4), bias=torch.zeros(4), bn_weight=torch.ones(8),
                    bn_bias=torch.zeros(8), running_mean=torch.zeros(8),
                    running_var=torch.ones(8))
        args[name] = torch.ones(size)
        with pytest.raises(ValueError, match=rf'batch_channel_norm: {name} should have shape '
                           rf'\({expected},\) \(one per {meaning}'):
            batch_channel_norm(torch.randn(2, 8, 3), 4, estimate=estimate, rate=0.1, **args)

    @pytest.mark.parametrize('rate', [5.0, -0.1, float('nan')])
    def test_load_refuses_a_rate_outside_the_unit_interval(self, rate):
        bcn = BatchChannelNorm(8, num_groups=4, estimate=True)
        bcn.set_estimate_rate(0.25)
        state = bcn.state_dict()
        state['estimate_rate'] = torch.tensor(rate)
        with pytest.raises(RuntimeError, match=r"estimate_rate: the estimates' update rate must "
                                               r'be in \[0, 1\]'):
            bcn.load_state_dict(state)
        assert float(bcn.estimate_rate) == 0.25 and bcn._estimate_rate == 0.25  # not copied
        assert 'estimate_rate' in state  # the caller's dict as it was

    @pytest.mark.parametrize('eps', [-1.0, float('nan')])
    def test_functional_forms_refuse_a_negative_eps(self, eps):
        # (as the layers' constructors do; they returned NaN)
        x = torch.randn(2, 8, 3, 3)
        with pytest.raises(ValueError, match='batch_channel_norm: eps must be >= 0'):
            batch_channel_norm(x, 4, eps=eps)
        with pytest.raises(ValueError, match='switchable_norm.*eps must be >= 0'):
            switchable_norm(x, torch.zeros(3), torch.zeros(3), eps=eps)
        with pytest.raises(ValueError, match='switchable_norm.*eps must be >= 0'):
            sparse_switchable_norm(x, torch.ones(3), torch.ones(3), 0.5, eps=eps)

    def test_bad_input(self):
        bcn = BatchChannelNorm(8, num_groups=4)
        with pytest.raises(ValueError, match='expected 8 channels'):
            bcn(torch.randn(2, 4, 3))
        with pytest.raises(ValueError, match='at least 2 dims'):
            bcn(torch.randn(8))


class TestNumerics:

    @pytest.mark.parametrize('shape', SHAPES)
    def test_forward_and_gradients_match_oracle(self, shape, job):
        bcn = _bcn()
        x = make_input(shape).requires_grad_()
        y = bcn(x)
        x_ref = x.detach().clone().requires_grad_()
        ref = {n: p.detach().clone().requires_grad_() for n, p in bcn.named_parameters()}
        y_ref = oracles.bcn(x_ref, 4, ref['weight'], ref['bias'], ref['bn_weight'],
                            ref['bn_bias'])
        assert_close(y, y_ref)
        grad = make_input(shape, seed=5)
        y.backward(grad)
        y_ref.backward(grad)
        assert_close(x.grad, x_ref.grad)
        for name, p in bcn.named_parameters():
            assert_close(p.grad, ref[name].grad, msg=lambda m, n=name: f'{n}: {m}')

    def test_equals_explicit_composition_of_torch_layers(self):
        # BN with per-channel affine, then GN without affine and a per-group affine (Eq. 16).
        bcn = _bcn()
        bn = nn.BatchNorm2d(8).double()
        with torch.no_grad():
            bn.weight.copy_(bcn.bn_weight)
            bn.bias.copy_(bcn.bn_bias)
        for step in range(2):
            x = make_input((3, 8, 5, 5), seed=step, offset=step)
            g = F.group_norm(bn(x), 4).view(3, 4, 2, 5, 5)
            expected = (g * bcn.weight.view(1, 4, 1, 1, 1)
                        + bcn.bias.view(1, 4, 1, 1, 1)).view_as(x)
            assert_close(bcn(x), expected)
        assert_close(bcn.running_mean, bn.running_mean)
        assert_close(bcn.running_var, bn.running_var)

    def test_eval_uses_running_stats(self):
        bcn = _bcn(momentum=0.5)
        for step in range(3):
            bcn(make_input((4, 8, 6), seed=step))
        bcn.eval()
        x = make_input((2, 8, 6), seed=9)
        assert_close(bcn(x), _oracle(bcn, x, bn_stats=(bcn.running_mean, bcn.running_var)))

    def test_gradcheck(self):
        x = make_input((3, 4, 3, 2)).requires_grad_()
        w = make_input((2, ), seed=1).requires_grad_()
        b = make_input((2, ), seed=2).requires_grad_()
        bw = make_input((4, ), seed=3).requires_grad_()
        bb = make_input((4, ), seed=4).requires_grad_()
        assert torch.autograd.gradcheck(
            lambda *a: batch_channel_norm(a[0], 2, *a[1:]), (x, w, b, bw, bb))
        rm, rv = make_input((4, ), seed=5), make_input((4, ), seed=6).abs() + 0.5
        assert torch.autograd.gradcheck(
            lambda *a: batch_channel_norm(a[0], 2, *a[1:], running_mean=rm, running_var=rv,
                                          training=False), (x, w, b, bw, bb))


class TestEstimated:
    """Algorithm 1: estimates updated at rate r before normalizing; no gradient through them."""

    @pytest.mark.parametrize('shape', SHAPES)
    def test_algorithm1_steps_and_outputs(self, shape, job):
        rate = 0.25
        bcn = _bcn(estimate=True)
        bcn.set_estimate_rate(rate)
        est_mean = torch.zeros(8, dtype=torch.float64)
        est_var = torch.ones(8, dtype=torch.float64)
        for step in range(4):
            x = make_input(shape, seed=step, offset=step).requires_grad_()
            y = bcn(x)
            est_mean, est_var = oracles.algorithm1_step(x.detach(), est_mean, est_var, rate)
            assert_close(bcn.running_mean, est_mean)
            assert_close(bcn.running_var, est_var)
            # Step 5-8 with the *updated* estimates, treated as constants.
            x_ref = x.detach().clone().requires_grad_()
            ref = {n: p.detach().clone().requires_grad_() for n, p in bcn.named_parameters()}
            y_ref = oracles.bcn(x_ref, 4, ref['weight'], ref['bias'], ref['bn_weight'],
                                ref['bn_bias'], bn_stats=(est_mean, est_var))
            assert_close(y, y_ref)
            grad = make_input(shape, seed=40 + step)
            y.backward(grad)
            y_ref.backward(grad)
            assert_close(x.grad, x_ref.grad)
            for name, p in bcn.named_parameters():
                assert_close(p.grad, ref[name].grad)
                p.grad = None
        bcn.eval()
        x = make_input(shape, seed=77)
        assert_close(bcn(x), _oracle(bcn, x, bn_stats=(est_mean, est_var)))
        assert_close(bcn.running_mean, est_mean)  # eval does not update

    def test_float64_layer_keeps_the_rate_exact(self):
        # Built in float64 (dtype=), the rate buffer is float64 too: 0.1 in float32 moved the
        # estimates by 1e-9. A half-precision layer keeps it in float32.
        assert BatchChannelNorm(8, num_groups=4, estimate=True,
                                dtype=torch.bfloat16).estimate_rate.dtype == torch.float32
        bcn = BatchChannelNorm(8, num_groups=4, estimate=True, dtype=torch.float64)
        assert bcn.estimate_rate.dtype == torch.float64
        bcn.set_estimate_rate(0.1)
        x = make_input((4, 8, 3, 3), offset=3.0)
        bcn(x)
        mean, var = oracles.algorithm1_step(x, torch.zeros(8, dtype=torch.float64),
                                            torch.ones(8, dtype=torch.float64), 0.1)
        torch.testing.assert_close(bcn.running_mean, mean, rtol=0, atol=1e-13)
        torch.testing.assert_close(bcn.running_var, var, rtol=0, atol=1e-13)

    def test_micro_batch_of_one(self):
        bcn = _bcn(estimate=True)
        bcn.set_estimate_rate(0.1)
        x = make_input((1, 8, 4, 4)).requires_grad_()
        bcn(x).sum().backward()
        assert torch.isfinite(x.grad).all()

    def test_zero_rate_warns_once(self, mmnorm_log):
        bcn = BatchChannelNorm(8, num_groups=4, estimate=True)
        bcn(torch.randn(2, 8, 3))
        assert len(logged(mmnorm_log, 'estimate_rate == 0')) == 1
        bcn(torch.randn(2, 8, 3))
        BatchChannelNorm(8, num_groups=4, estimate=True)(torch.randn(2, 8, 3))  # once per run
        bcn.eval()
        bcn(torch.randn(2, 8, 3))
        assert len(mmnorm_log) == 1

    def test_rate_set_no_warning(self, mmnorm_log):
        bcn = BatchChannelNorm(8, num_groups=4, estimate=True)
        bcn.set_estimate_rate(0.01)
        bcn(torch.randn(2, 8, 3))
        assert not mmnorm_log


class TestEdgeCases:

    @pytest.mark.parametrize('estimate', [False, True])
    @pytest.mark.parametrize('shape', [(1, 8, 4, 4), (4, 8, 1, 1), (1, 8, 1, 1), (3, 8)])
    def test_finite(self, estimate, shape, job):
        bcn = BatchChannelNorm(8, num_groups=4, estimate=estimate)
        if estimate:
            bcn.set_estimate_rate(0.1)
        x = torch.randn(shape, requires_grad=True)
        y = bcn(x)
        y.square().sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()

    @pytest.mark.parametrize('estimate', [False, True])
    @pytest.mark.parametrize('shape', [(1, 4, 1, 1), (1, 4, 1), (3, 4, 1, 1)])
    @pytest.mark.parametrize('grad', [False, True])
    def test_eval_with_groups_of_one_value(self, estimate, shape, grad):
        # One channel per group and one value per channel and sample: GN maps every group to
        # its shift, whatever the input (F.group_norm refuses such groups: the layer must not
        # hand them to it).
        bcn = BatchChannelNorm(4, num_groups=4, estimate=estimate)
        if estimate:
            bcn.set_estimate_rate(0.1)
        with torch.no_grad():
            bcn.bias.copy_(torch.tensor([0.5, -1.0, 2.0, 3.0]))
        bcn(torch.randn(shape))
        bcn.eval()
        x = torch.randn(shape, requires_grad=grad)
        with torch.set_grad_enabled(grad):
            y = bcn(x)
            functional = batch_channel_norm(
                x, 4, bcn.weight, bcn.bias, bcn.bn_weight, bcn.bn_bias, bcn.running_mean,
                bcn.running_var, training=False, eps=bcn.eps)
        expected = bcn.bias.detach().view(1, 4, *[1] * (len(shape) - 2)).expand(shape)
        torch.testing.assert_close(y, expected, rtol=0, atol=0)
        torch.testing.assert_close(functional, expected, rtol=0, atol=0)
        if grad:  # 0; estimated BCN's per-row map gets it up to the rounding of terms of
            # size 1/sqrt(eps) (its backward sums A dy + P x + Q)
            y.backward(torch.randn(shape))
            torch.testing.assert_close(x.grad, torch.zeros(shape), rtol=0,
                                       atol=1e-4 if estimate else 0)

    def test_constant_input(self):
        # BN maps a constant channel to its shift bn_bias; GN then normalizes those shifts.
        bcn = _bcn()
        x = torch.full((2, 8, 3, 3), -2.0, dtype=torch.float64)
        y = bcn(x)
        assert torch.isfinite(y).all()
        assert_close(y, _oracle(bcn, x))

    def test_autocast_bfloat16(self):
        bcn = _bcn().float()
        x = make_input((4, 8, 5, 5), dtype=torch.float32)
        expected = bcn(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            y = bcn(x.bfloat16())
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), expected, rtol=5e-2, atol=5e-2)

    def test_layer_called_twice_before_backward(self):
        """A shared head applies one estimated layer to several levels before one backward.
        Each use normalizes with the estimates *its* update produced (constants for autograd),
        though the buffers move again before the backward: an independent float64 oracle per
        use, with the estimates of Algorithm 1 after the first and after the second update."""
        rate = 0.3
        bcn = _bcn(estimate=True)
        bcn.set_estimate_rate(rate)
        a = make_input((2, 8, 4, 4), seed=1, offset=1.0).requires_grad_()
        b = make_input((2, 8, 2, 2), seed=2, scale=5.0, offset=-3.0).requires_grad_()
        (bcn(a).sum() + bcn(b).square().sum()).backward()
        first = oracles.algorithm1_step(a.detach(), torch.zeros(8, dtype=torch.float64),
                                        torch.ones(8, dtype=torch.float64), rate)
        second = oracles.algorithm1_step(b.detach(), *first, rate)
        assert_close(bcn.running_mean, second[0])
        assert_close(bcn.running_var, second[1])
        for x, stats, loss in ((a, first, lambda y: y.sum()),
                               (b, second, lambda y: y.square().sum())):
            x_ref = x.detach().clone().requires_grad_()
            params = {n: p.detach() for n, p in bcn.named_parameters()}
            loss(oracles.bcn(x_ref, 4, params['weight'], params['bias'], params['bn_weight'],
                             params['bn_bias'], bn_stats=stats)).backward()
            assert_close(x.grad, x_ref.grad)
