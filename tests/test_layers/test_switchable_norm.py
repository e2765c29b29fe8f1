# Copyright (c) mmnorm contributors. All rights reserved.
"""SN and SN_tied against the independent oracle in mmnorm/testing/oracles.py."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmnorm import SwitchableNorm, SwitchableNormTied
from mmnorm.functional import switchable_norm
from mmnorm.testing import oracles
from tests.conftest import assert_close, make_input

SHAPES = [(4, 6, 9), (3, 6, 5, 7), (2, 6, 3, 4, 5)]  # 1d, 2d, 3d spatial


def _sn_with_params(layer_cls=SwitchableNorm, channels=6, seed=1, **kwargs):
    layer = layer_cls(channels, **kwargs).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
        layer.weight.abs_().add_(0.5)
    return layer


def _logits(layer):
    if isinstance(layer, SwitchableNormTied):
        return layer.logits, layer.logits
    return layer.mean_logits, layer.var_logits


class TestSmoke:

    def test_repr_lists_every_argument(self):
        text = repr(SwitchableNorm(8, eps=1e-3, momentum=None, using_bn=False, mix='std'))
        assert text == ("SwitchableNorm(8, eps=0.001, momentum=None, track_running_stats=True, "
                        "eval_stats='moving', affine=True, using_bn=False, mix='std', "
                        "in_unbiased=False, ratio_groups=1)")
        assert repr(SwitchableNormTied(4)).startswith('SwitchableNormTied(4, eps=1e-05')

    def test_parameters_and_buffers(self):
        sn = SwitchableNorm(5)
        assert [n for n, _ in sn.named_parameters()] == [
            'weight', 'bias', 'mean_logits', 'var_logits']
        assert sn.weight.shape == sn.bias.shape == (5, )
        assert sn.mean_logits.shape == sn.var_logits.shape == (3, )
        assert torch.equal(sn.running_mean, torch.zeros(5))
        assert torch.equal(sn.running_var, torch.ones(5))
        assert int(sn.num_batches_tracked) == 0
        tied = SwitchableNormTied(5, using_bn=False)
        assert [n for n, _ in tied.named_parameters()] == ['weight', 'bias', 'logits']
        assert tied.logits.shape == (2, )
        assert tied.normalizers == ('IN', 'LN')

    def test_initial_ratios_are_equal(self):
        mean_ratios, var_ratios = SwitchableNorm(4).ratios()
        torch.testing.assert_close(mean_ratios, torch.full((3, ), 1 / 3))
        torch.testing.assert_close(var_ratios, torch.full((3, ), 1 / 3))

    def test_affine_false(self):
        sn = SwitchableNorm(4, affine=False)
        assert sn.weight is None and sn.bias is None
        x = make_input((2, 4, 3, 3))
        expected = oracles.sn(x, torch.zeros(3, dtype=x.dtype), torch.zeros(3, dtype=x.dtype))
        assert_close(sn.double()(x), expected)


class TestExceptions:

    @pytest.mark.parametrize('kwargs, match', [
        (dict(num_features=0), 'num_features'),
        (dict(num_features=4, mix='avg'), 'mix'),
        (dict(num_features=4, momentum=1.5), 'momentum'),
        (dict(num_features=4, eps=-1.0), 'eps'),
        (dict(num_features=4, eval_stats='precise'), 'eval_stats'),
        (dict(num_features=4, eval_stats='batch_average', track_running_stats=False),
         'track_running_stats'),
        (dict(num_features=4, eval_stats='batch_average', using_bn=False), 'using_bn'),
    ])
    def test_bad_constructor_arguments(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            SwitchableNorm(**kwargs)

    def test_inverted_momentum_warns(self):
        with pytest.warns(UserWarning, match='PyTorch convention'):
            SwitchableNorm(4, momentum=0.997)

    def test_wrong_ndim(self):
        with pytest.raises(ValueError, match='at least 2 dims'):
            SwitchableNorm(4)(torch.randn(4))

    def test_channel_mismatch(self):
        with pytest.raises(ValueError, match='expected 4 channels'):
            SwitchableNorm(4)(torch.randn(2, 5, 3, 3))

    def test_integer_input(self):
        with pytest.raises(TypeError, match='floating-point'):
            SwitchableNorm(4)(torch.ones(2, 4, 3, 3, dtype=torch.long))

    def test_functional_checks_logits(self):
        x = torch.randn(2, 3, 4)
        with pytest.raises(ValueError, match='3 entries'):
            switchable_norm(x, torch.zeros(3), torch.zeros(2))
        with pytest.raises(ValueError, match='mix'):
            switchable_norm(x, torch.zeros(3), torch.zeros(3), mix='l1')

    @pytest.mark.parametrize('name, size', [('bias', 1), ('weight', 1), ('running_mean', 1),
                                            ('running_var', 1), ('weight', 4), ('bias', 2)])
    @pytest.mark.parametrize('training', [True, False])
    def test_functional_checks_parameter_sizes(self, name, size, training):
        # Size 1 would broadcast silently; other sizes used to fail inside with a reshape error.
        x = torch.randn(2, 3, 4)
        args = dict(weight=torch.ones(3), bias=torch.zeros(3), running_mean=torch.zeros(3),
                    running_var=torch.ones(3))
        args[name] = torch.ones(size)
        with pytest.raises(ValueError, match=rf'switchable_norm: {name} should have shape '
                           rf'\(3,\) \(one per channel C\), got \({size},\)'):
            switchable_norm(x, torch.zeros(3), torch.zeros(3), training=training, **args)


class TestShapes:

    @pytest.mark.parametrize('shape', SHAPES + [(3, 6)])
    @pytest.mark.parametrize('cls', [SwitchableNorm, SwitchableNormTied])
    def test_output_shape_and_dtype(self, shape, cls):
        x = torch.randn(shape)
        y = cls(6)(x)
        assert y.shape == x.shape and y.dtype == x.dtype

    def test_empty_batch(self):
        sn = SwitchableNorm(4)
        x = torch.randn(0, 4, 5, 5, requires_grad=True)
        y = sn(x)
        assert y.shape == x.shape
        y.sum().backward()
        assert int(sn.num_batches_tracked) == 0
        assert torch.equal(sn.running_mean, torch.zeros(4))

    def test_channels_last_input(self):
        sn = _sn_with_params()
        x = make_input((2, 6, 4, 5)).contiguous(memory_format=torch.channels_last)
        ml, vl = _logits(sn)
        assert_close(sn(x), oracles.sn(x, ml, vl, sn.weight, sn.bias))


class TestNumerics:

    @pytest.mark.parametrize('shape', SHAPES)
    @pytest.mark.parametrize('mix', ['var', 'std'])
    @pytest.mark.parametrize('cls', [SwitchableNorm, SwitchableNormTied])
    @pytest.mark.parametrize('using_bn', [True, False])
    def test_forward_and_gradients_match_oracle(self, shape, mix, cls, using_bn, job):
        sn = _sn_with_params(cls, mix=mix, using_bn=using_bn)
        x = make_input(shape).requires_grad_()
        ml, vl = _logits(sn)
        y = sn(x)
        x_ref = x.detach().clone().requires_grad_()
        params_ref = {n: p.detach().clone().requires_grad_() for n, p in sn.named_parameters()}
        ml_ref = params_ref.get('logits', params_ref.get('mean_logits'))
        vl_ref = params_ref.get('logits', params_ref.get('var_logits'))
        y_ref = oracles.sn(x_ref, ml_ref, vl_ref, params_ref['weight'], params_ref['bias'],
                           mix=mix)
        assert_close(y, y_ref)
        grad = make_input(shape, seed=3)
        y.backward(grad)
        y_ref.backward(grad)
        assert_close(x.grad, x_ref.grad)
        for name, p in sn.named_parameters():
            assert_close(p.grad, params_ref[name].grad, msg=lambda m, n=name: f'{n}: {m}')

    @pytest.mark.parametrize('shape', SHAPES)
    def test_running_buffers_and_eval_match_oracle(self, shape, job):
        momentum = 0.3
        sn = _sn_with_params(momentum=momentum)
        running_mean = torch.zeros(6, dtype=torch.float64)
        running_var = torch.ones(6, dtype=torch.float64)
        for step in range(4):
            x = make_input(shape, seed=10 + step, offset=step)
            sn(x)
            mean, _, var_unbiased = oracles.batch_stats(x)
            running_mean = oracles.running_update(running_mean, mean, momentum)
            running_var = oracles.running_update(running_var, var_unbiased, momentum)
        assert_close(sn.running_mean, running_mean)
        assert_close(sn.running_var, running_var)
        assert int(sn.num_batches_tracked) == 4
        sn.eval()
        x = make_input(shape, seed=99)
        expected = oracles.sn(x, sn.mean_logits, sn.var_logits, sn.weight, sn.bias,
                              bn_stats=(running_mean, running_var))
        assert_close(sn(x), expected)
        assert int(sn.num_batches_tracked) == 4  # eval does not count

    def test_cumulative_average_momentum_none(self):
        sn = SwitchableNorm(3, momentum=None).double()
        batches = [make_input((4, 3, 5), seed=s, offset=s) for s in range(3)]
        for x in batches:
            sn(x)
        means = torch.stack([oracles.batch_stats(x)[0] for x in batches])
        variances = torch.stack([oracles.batch_stats(x)[2] for x in batches])
        assert_close(sn.running_mean, means.mean(0))
        assert_close(sn.running_var, variances.mean(0))

    def test_momentum_one_keeps_last_batch(self):
        sn = SwitchableNorm(3, momentum=1.0).double()
        sn(make_input((4, 3, 5), seed=1))
        x = make_input((4, 3, 5), seed=2, offset=3)
        sn(x)
        mean, _, var = oracles.batch_stats(x)
        assert_close(sn.running_mean, mean)
        assert_close(sn.running_var, var)

    def test_in_unbiased_matches_authors_formulation(self):
        sn = _sn_with_params(in_unbiased=True)
        x = make_input((3, 6, 4, 5))
        expected = oracles.sn(x, sn.mean_logits, sn.var_logits, sn.weight, sn.bias,
                              in_unbiased=True)
        assert_close(sn(x), expected)

    def test_in_unbiased_steps_and_eval_as_the_authors_layer(self):
        # A converted layer fine-tuned: its running statistics move as the authors' layer moves
        # them (m = 0.9 keeps 0.9 of the old value: momentum 0.1 here), the variance the batch's
        # as they compute it (no second Bessel correction), and eval uses them as theirs does.
        from tests.helpers.authors import AuthorsSwitchNorm
        sn = _sn_with_params(in_unbiased=True, momentum=0.1)
        theirs = AuthorsSwitchNorm(6, momentum=0.9).double()
        with torch.no_grad():
            theirs.weight.copy_(sn.weight.view(1, 6, 1, 1))
            theirs.bias.copy_(sn.bias.view(1, 6, 1, 1))
            theirs.mean_weight.copy_(sn.mean_logits)
            theirs.var_weight.copy_(sn.var_logits)
            theirs.running_mean.copy_(sn.running_mean.view(1, 6, 1))
            theirs.running_var.copy_(sn.running_var.view(1, 6, 1))
        for step in range(3):
            x = make_input((2, 6, 3, 4), seed=step, offset=step)
            assert_close(sn(x), theirs(x))
            assert_close(sn.running_mean, theirs.running_mean.view(6))
            assert_close(sn.running_var, theirs.running_var.view(6))
        sn.eval(), theirs.eval()
        x = make_input((2, 6, 3, 4), seed=9)
        assert_close(sn(x), theirs(x))

    def test_in_unbiased_keeps_the_running_variance_on_one_value_per_channel(self):
        # (one value's variance is 0 by construction: moving towards it would drive the eval
        # variance to eps over such batches; the authors' layer gives NaN there)
        sn = SwitchableNorm(4, in_unbiased=True)
        sn(torch.randn(1, 4, 1, 1))
        assert torch.equal(sn.running_var, torch.ones(4))
        assert not torch.equal(sn.running_mean, torch.zeros(4))

    def test_track_running_stats_false_uses_batch_stats_in_eval(self):
        sn = _sn_with_params(track_running_stats=False).eval()
        assert sn.running_mean is None
        x = make_input((3, 6, 4))
        assert_close(sn(x), oracles.sn(x, sn.mean_logits, sn.var_logits, sn.weight, sn.bias))

    @pytest.mark.parametrize('mix', ['var', 'std'])
    def test_gradcheck(self, mix):
        x = make_input((3, 4, 3, 2)).requires_grad_()
        params = [make_input((3, ), seed=s).requires_grad_() for s in (1, 2)]
        weight = make_input((4, ), seed=3).requires_grad_()
        bias = make_input((4, ), seed=4).requires_grad_()

        def fn(x, ml, vl, w, b):
            return switchable_norm(x, ml, vl, w, b, mix=mix)

        assert torch.autograd.gradcheck(fn, (x, *params, weight, bias))

    def test_gradcheck_tied_and_eval(self):
        x = make_input((3, 4, 5)).requires_grad_()
        logits = make_input((3, ), seed=1).requires_grad_()
        running = (make_input((4, ), seed=2), make_input((4, ), seed=3).abs() + 0.5)
        assert torch.autograd.gradcheck(lambda x, lg: switchable_norm(x, lg, lg), (x, logits))
        assert torch.autograd.gradcheck(
            lambda x, lg: switchable_norm(x, lg, lg, None, None, *running, training=False),
            (x, logits))


class TestDegenerateRatios:
    """One-hot ratios reproduce the single normalizers (exact references from torch)."""

    def test_bn_one_hot_equals_batchnorm2d(self):
        sn = SwitchableNorm(6, momentum=0.2).double()
        bn = nn.BatchNorm2d(6, momentum=0.2).double()
        with torch.no_grad():
            sn.mean_logits.copy_(oracles.one_hot_logits(2))
            sn.var_logits.copy_(oracles.one_hot_logits(2))
            for p in (sn.weight, bn.weight):
                p.copy_(torch.linspace(0.5, 2, 6))
            for p in (sn.bias, bn.bias):
                p.copy_(torch.linspace(-1, 1, 6))
        for step in range(3):
            x = make_input((4, 6, 5, 5), seed=step, offset=step)
            assert_close(sn(x), bn(x))
        assert_close(sn.running_mean, bn.running_mean)
        assert_close(sn.running_var, bn.running_var)
        sn.eval(), bn.eval()
        x = make_input((2, 6, 5, 5), seed=7)
        assert_close(sn(x), bn(x))

    def test_in_one_hot_equals_instance_norm(self):
        sn = SwitchableNorm(6, affine=False).double()
        with torch.no_grad():
            sn.mean_logits.copy_(oracles.one_hot_logits(0))
            sn.var_logits.copy_(oracles.one_hot_logits(0))
        x = make_input((3, 6, 5, 4))
        assert_close(sn(x), F.instance_norm(x, eps=1e-5))

    def test_ln_one_hot_equals_group_norm_one_group(self):
        sn = _sn_with_params()
        with torch.no_grad():
            sn.mean_logits.copy_(oracles.one_hot_logits(1))
            sn.var_logits.copy_(oracles.one_hot_logits(1))
        x = make_input((3, 6, 5, 4))
        assert_close(sn(x), F.group_norm(x, 1, sn.weight, sn.bias, eps=1e-5))


class TestEdgeCases:

    @pytest.mark.parametrize('shape', [(1, 6, 4, 4), (5, 6, 1, 1), (1, 6, 1, 1), (4, 6)])
    @pytest.mark.parametrize('cls', [SwitchableNorm, SwitchableNormTied])
    def test_single_sample_or_pixel_is_finite(self, shape, cls, job):
        sn = cls(6)
        x = torch.randn(shape, requires_grad=True)
        y = sn(x)
        y.square().sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
        assert all(torch.isfinite(p.grad).all() for p in sn.parameters())
        assert torch.isfinite(sn.running_var).all()

    def test_single_value_per_channel_keeps_running_var(self):
        sn = SwitchableNorm(3)
        sn(torch.randn(1, 3, 1, 1))
        assert torch.equal(sn.running_var, torch.ones(3))  # unbiased variance undefined
        assert not torch.equal(sn.running_mean, torch.zeros(3))

    def test_constant_input(self):
        sn = _sn_with_params().float()
        x = torch.full((2, 6, 4, 4), 3.7, requires_grad=True)
        y = sn(x)
        y.sum().backward()
        assert_close(y, sn.bias.detach().view(1, 6, 1, 1).expand_as(y), atol=1e-4)
        assert torch.isfinite(x.grad).all()

    def test_large_mean_small_spread_float32(self):
        x64 = make_input((4, 6, 8, 8), scale=0.05, offset=40.0)
        sn = _sn_with_params()
        expected = sn(x64)
        y32 = sn.float()(x64.float())
        torch.testing.assert_close(y32.double(), expected, rtol=1e-3, atol=2e-3)

    @pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
    def test_autocast_and_half_inputs(self, dtype, job):
        sn = _sn_with_params().float()
        x = make_input((4, 6, 5, 5), dtype=torch.float32)
        expected = sn(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            y = sn(x.to(dtype))
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), expected, rtol=3e-2, atol=3e-2)
        x_half = x.to(dtype).requires_grad_()
        sn(x_half).float().sum().backward()
        assert x_half.grad.dtype == dtype and torch.isfinite(x_half.grad).all()

    def test_inplace_activation_after_norm(self):
        sn = SwitchableNorm(4)
        x = torch.randn(2, 4, 3, 3, requires_grad=True)
        F.relu(sn(x), inplace=True).sum().backward()
        assert x.grad is not None

    def test_stateless_functional_does_not_touch_inputs(self):
        x = make_input((3, 4, 5))
        rm, rv = torch.zeros(4, dtype=x.dtype), torch.ones(4, dtype=x.dtype)
        switchable_norm(x, torch.zeros(3, dtype=x.dtype), torch.zeros(3, dtype=x.dtype),
                        running_mean=rm, running_var=rv, training=False)
        assert torch.equal(rm, torch.zeros(4, dtype=x.dtype))


class TestSavedOptions:

    def test_in_unbiased_travels_with_the_weights(self):
        source = _sn_with_params(in_unbiased=True)
        state = source.state_dict()
        assert bool(state['in_var_unbiased'])
        assert all(isinstance(v, torch.Tensor) for v in state.values())
        target = _sn_with_params(seed=5)
        assert not target.in_unbiased
        target.load_state_dict(state)
        assert target.in_unbiased
        x = make_input((3, 6, 4, 5))
        assert_close(target.eval()(x), source.eval()(x))
        target.in_unbiased = False
        assert not bool(target.state_dict()['in_var_unbiased'])

    def test_checkpoint_without_the_option_keeps_the_configured_one(self):
        state = _sn_with_params().state_dict()
        del state['in_var_unbiased']
        target = _sn_with_params(in_unbiased=True)
        target.load_state_dict(state)  # strict: no missing key
        assert target.in_unbiased
