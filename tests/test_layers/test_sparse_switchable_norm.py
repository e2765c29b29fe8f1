# Copyright (c) mmnorm contributors. All rights reserved.
"""Sparse SN: SparsestMax against an independent float64 oracle, the layer against SN's oracle
with SparsestMax ratios, frozen ratios and their checkpoint round trip, the radius, exceptions."""

import pytest
import torch

import mmnorm.layers.base as layer_base
from tests.conftest import logged
from mmcv.cnn import build_norm_layer

import mmnorm  # noqa: F401  (registers the layers)
from mmnorm.functional import sparse_switchable_norm
from mmnorm.functional.sparse_switchable import (fixed_choices, sparsemax, sparsestmax,
                                                 update_choice_pair, update_choices)
from mmnorm.layers import SparseSwitchableNorm, SyncSparseSwitchableNorm
from mmnorm.testing import oracles
from tests.conftest import make_input


def _random_cases(count=400, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for index in range(count):
        size = (2, 3, 3, 4)[index % 4]
        scores = torch.randn(size, generator=gen, dtype=torch.float64) * (0.2 + index % 5)
        yield scores, float(torch.rand((), generator=gen, dtype=torch.float64))


class TestSparsestMax:

    def test_against_oracle_on_random_scores_and_radii(self):
        recursions = 0
        for scores, radius in _random_cases():
            expected = oracles.sparsestmax(scores, radius)
            actual = sparsestmax(scores, torch.tensor(radius, dtype=torch.float64))
            torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9,
                                       msg=lambda m: f'{scores.tolist()} r={radius}: {m}')
            torch.testing.assert_close(actual.sum(), torch.tensor(1.0, dtype=torch.float64))
            assert bool((actual >= 0).all())
            projected = oracles.simplex_projection(scores)
            support = projected > 0
            centre = support.double() / support.sum()
            pushed = centre + radius * (projected - centre) / (projected - centre).norm()
            recursions += int(support.sum() > 1 and float(pushed.min()) < 0
                              and float((projected - centre).norm()) < radius)
        assert recursions > 20  # the smaller-face case really ran

    def test_radius_zero_is_sparsemax(self):
        for scores, _ in _random_cases(100, seed=1):
            expected = oracles.simplex_projection(scores)
            torch.testing.assert_close(sparsestmax(scores, torch.tensor(0.0)), expected,
                                       rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(sparsemax(scores), expected, rtol=1e-9, atol=1e-9)

    def test_radius_one_is_one_hot_at_the_argmax(self):
        for scores, _ in _random_cases(100, seed=2):
            result = sparsestmax(scores, torch.tensor(1.0))
            expected = torch.zeros_like(scores)
            expected[scores.argmax()] = 1.0
            assert torch.equal(result, expected), scores.tolist()

    def test_on_the_sphere_stays_inside_is_pushed_out(self):
        scores = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)  # its own projection
        centre = torch.full((3, ), 1 / 3, dtype=torch.float64)
        distance = float((scores - centre).norm())
        on = sparsestmax(scores, torch.tensor(distance, dtype=torch.float64))
        torch.testing.assert_close(on, scores, rtol=0, atol=1e-15)  # the boundary case: kept
        outside = sparsestmax(scores, torch.tensor(distance * 0.9, dtype=torch.float64))
        torch.testing.assert_close(outside, scores, rtol=0, atol=1e-15)
        radius = distance + 0.05
        inside = sparsestmax(scores, torch.tensor(radius, dtype=torch.float64))
        torch.testing.assert_close((inside - centre).norm(),
                                   torch.tensor(radius, dtype=torch.float64))
        torch.testing.assert_close(inside, oracles.sparsestmax(scores, radius))

    def test_one_hot_and_centre_are_defined(self):
        # a support of one entry is exactly one-hot, even where rounding would say otherwise
        assert sparsestmax(torch.tensor([1000.3, 0.0, -1.0]), torch.tensor(0.5)).tolist() == [
            1.0, 0.0, 0.0]
        # equal scores: the centre, with no direction to push, stays (float32 rounding included)
        for dtype in (torch.float32, torch.float64):
            result = sparsestmax(torch.ones(3, dtype=dtype), torch.tensor(0.5, dtype=dtype))
            torch.testing.assert_close(result, torch.full((3, ), 1 / 3, dtype=dtype))

    def test_huge_scores_stay_on_the_simplex(self):
        # 1 + z rounds to z past 2^24 in float32 (256 in bfloat16): the support test failed
        # for the top entry, the support was empty and the result infinite; huge tied scores
        # rounded tau onto them (zeros). Expected from the float64 oracle of the shifted scores
        # (the projection is shift-invariant) and by hand.
        cases = [([3e8, 0.0, -1.0], torch.float32), ([3e8, 3e8, 0.0], torch.float32),
                 ([3e8, 3e8 + 0.25, 3e8 - 0.5], torch.float64), ([300.0, 0.0, 0.0], torch.bfloat16),
                 ([3000.0, 1.0, 0.0], torch.float16), ([1e30, 1e30], torch.float32)]
        for values, dtype in cases:
            scores = torch.tensor(values, dtype=dtype)
            top = torch.tensor(values, dtype=torch.float64).max()
            expected = oracles.simplex_projection(torch.tensor(values, dtype=torch.float64) - top)
            for radius in (0.0, 0.3):
                result = sparsestmax(scores, torch.tensor(radius))
                oracle = oracles.sparsestmax(torch.tensor(values, dtype=torch.float64) - top,
                                             radius)
                assert result.dtype == dtype
                torch.testing.assert_close(result.double(), oracle, rtol=0, atol=1e-6)
            torch.testing.assert_close(sparsemax(scores).double(), expected, rtol=0, atol=1e-6)
        assert sparsemax(torch.tensor([3e8, 3e8, 0.0])).tolist() == [0.5, 0.5, 0.0]

    @pytest.mark.parametrize('dtype, tolerance', [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
    def test_half_precision_scores_are_computed_in_float32(self, dtype, tolerance):
        # In their own precision the rounds moved results by up to 0.67 (the centre's
        # tolerance, 8 epsilons, was 0.06 in bfloat16); against the float64 oracle of the same
        # (rounded) scores, each result within a rounding of the output.
        for scores, radius in _random_cases(200, seed=5):
            low = scores.to(dtype)
            result = sparsestmax(low, torch.tensor(radius, dtype=dtype))
            assert result.dtype == dtype
            expected = oracles.sparsestmax(low.double(), float(torch.tensor(radius).to(dtype)))
            torch.testing.assert_close(result.double(), expected, rtol=0, atol=tolerance,
                                       msg=lambda m: f'{low.tolist()} r={radius}: {m}')
            torch.testing.assert_close(sparsemax(low).double(),
                                       oracles.simplex_projection(low.double()), rtol=0,
                                       atol=tolerance)

    def test_gradcheck(self):
        for scores, radius in list(_random_cases(40, seed=3)):
            scores = scores.clone().requires_grad_()
            torch.autograd.gradcheck(
                lambda s: sparsestmax(s, torch.tensor(radius, dtype=torch.float64)), (scores, ))

    def test_second_derivatives(self):
        # A double backward (create_graph=True) through the specification, which the plain
        # form, converted authors' models and half precision run: a later round's unused
        # branch at the face's centre took a norm's derivative at 0 (NaN) times 0, NaN at
        # radius 0 for every row with more than one entry in the support.
        for scores, radius in list(_random_cases(24, seed=6)):
            for r in (0.0, radius):
                scores = scores.clone().requires_grad_()
                torch.autograd.gradgradcheck(
                    lambda s: sparsestmax(s, torch.tensor(r, dtype=torch.float64)), (scores, ))
        # At a centre (equal scores, an edge's midpoint) nothing is differentiable, but nothing
        # is NaN either.
        for values in ([0.2, 0.2, 0.2], [0.2, 0.2, -0.5], [0.3, 0.3]):
            for r in (0.0, 0.4):
                scores = torch.tensor(values, dtype=torch.float64, requires_grad=True)
                out = sparsestmax(scores, torch.tensor(r, dtype=torch.float64))
                grad, = torch.autograd.grad(out, scores, torch.linspace(-1, 1, len(values),
                                                                        dtype=torch.float64),
                                            create_graph=True)
                if grad.requires_grad:
                    second, = torch.autograd.grad(grad.square().sum(), scores)
                    assert torch.isfinite(second).all(), (values, r)

    def test_one_graph_for_every_branch(self):
        """No data-dependent Python control flow: one exported graph, with the radius as an
        input, computes every case (sparsemax, pushed, smaller face, one-hot)."""
        program = torch.export.export(_SparsestMax(), (torch.randn(3, dtype=torch.float64),
                                                       torch.tensor(0.3, dtype=torch.float64)))
        for scores, radius in _random_cases(60, seed=4):
            if scores.numel() != 3:
                continue
            radius_t = torch.tensor(radius, dtype=torch.float64)
            torch.testing.assert_close(program.module()(scores, radius_t),
                                       oracles.sparsestmax(scores, radius), rtol=1e-9, atol=1e-9)


class _SparsestMax(torch.nn.Module):

    def forward(self, scores, radius):
        return sparsestmax(scores, radius)


def _layer(using_bn=True, radius=0.3, seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = SparseSwitchableNorm(6, using_bn=using_bn, momentum=0.3, **kwargs).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
        layer.mean_scores.normal_(0, 0.4)
        layer.var_scores.normal_(0, 0.4)
    layer.set_progress(radius)
    return layer


class TestLayer:

    def test_builds_through_mmcv_with_its_state(self):
        name, layer = build_norm_layer(dict(type='SSN', using_bn=False), 8, postfix=2)
        assert name == 'ssn2' and type(layer) is SparseSwitchableNorm
        assert [n for n, _ in layer.named_parameters()] == [
            'weight', 'bias', 'mean_scores', 'var_scores']
        assert {'radius', 'mean_choice', 'var_choice'} <= set(dict(layer.named_buffers()))
        assert layer.normalizers == ('IN', 'LN') and float(layer.radius) == 0.0
        assert int(layer.mean_choice) == int(layer.var_choice) == -1
        torch.testing.assert_close(layer.ratios()[0], torch.full((2, ), 0.5))
        assert repr(layer).startswith('SparseSwitchableNorm(8, eps=1e-05')
        assert type(build_norm_layer(dict(type='SyncSSN'), 8)[1]) is SyncSparseSwitchableNorm

    def test_float64_layer_and_function_keep_the_radius_exact(self):
        # Built in float64 (dtype=), the radius buffer is float64 too, and so is the
        # functional form's radius for float64 scores: 0.3 in float32 moved the ratios by 4e-9.
        # A half-precision layer keeps it in float32, where its ratios are computed.
        assert SparseSwitchableNorm(6, dtype=torch.bfloat16).radius.dtype == torch.float32
        torch.manual_seed(0)
        layer = SparseSwitchableNorm(6, momentum=0.3, dtype=torch.float64)
        assert layer.radius.dtype == torch.float64
        with torch.no_grad():
            layer.mean_scores.copy_(torch.tensor([0.1, 0.2, 0.15]))
            layer.var_scores.copy_(torch.tensor([0.3, -0.1, 0.05]))
        layer.set_progress(0.3)
        x = make_input((4, 6, 3, 3))
        ratios = [oracles.sparsestmax(s.detach(), 0.3) for s in (layer.mean_scores,
                                                                  layer.var_scores)]
        expected = oracles.mixture(x, *ratios)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
        functional = sparse_switchable_norm(x, layer.mean_scores, layer.var_scores, 0.3)
        torch.testing.assert_close(functional, expected, rtol=0, atol=1e-12)

    @pytest.mark.parametrize('using_bn', [True, False])
    @pytest.mark.parametrize('shape', [(4, 6, 5), (3, 6, 4, 5), (2, 6, 3, 2, 3)])
    @pytest.mark.parametrize('in_unbiased', [False, True])
    def test_against_oracle_train_and_eval(self, using_bn, shape, in_unbiased, job):
        layer = _layer(using_bn, in_unbiased=in_unbiased)
        x = make_input(shape)
        ratios = [oracles.sparsestmax(s.detach(), 0.3) for s in (layer.mean_scores,
                                                                  layer.var_scores)]
        expected = oracles.mixture(x, *ratios, layer.weight.detach(), layer.bias.detach(),
                                   in_unbiased=in_unbiased)
        torch.testing.assert_close(layer(x), expected, rtol=1e-9, atol=1e-9)
        if using_bn and not in_unbiased:  # (with in_unbiased the BN variance is the authors')
            _, _, unbiased = oracles.batch_stats(x)
            torch.testing.assert_close(layer.running_var, 0.7 + 0.3 * unbiased)
        layer.eval()
        bn = (layer.running_mean, layer.running_var) if using_bn else None
        expected = oracles.mixture(x, *ratios, layer.weight.detach(), layer.bias.detach(),
                                   bn_stats=bn, in_unbiased=in_unbiased)
        torch.testing.assert_close(layer(x), expected, rtol=1e-9, atol=1e-9)

    def test_gradcheck(self):
        layer = _layer(radius=0.25)
        x = make_input((3, 6, 3, 3)).requires_grad_()

        def run(x, weight, mean_scores, var_scores):
            return sparse_switchable_norm(x, mean_scores, var_scores, layer.radius,
                                          weight=weight, bias=layer.bias.detach())

        torch.autograd.gradcheck(run, (x, layer.weight.detach().clone().requires_grad_(),
                                       layer.mean_scores.detach().clone().requires_grad_(),
                                       layer.var_scores.detach().clone().requires_grad_()))

    def test_one_hot_ratios_are_frozen_and_saved(self):
        layer = _layer(radius=1.0)
        x = make_input((4, 6, 3, 3))
        winners = (int(layer.mean_scores.argmax()), int(layer.var_scores.argmax()))
        layer(x).square().sum().backward()
        assert (int(layer.mean_choice), int(layer.var_choice)) == winners
        assert torch.equal(layer.mean_scores.grad, torch.zeros(3, dtype=torch.float64))
        assert torch.equal(layer.var_scores.grad, torch.zeros(3, dtype=torch.float64))
        # Frozen: smaller radius and other scores no longer move the ratios.
        with torch.no_grad():
            layer.mean_scores.copy_(torch.tensor([5.0, 0.0, 0.0]) if winners[0] else
                                    torch.tensor([0.0, 5.0, 0.0]))
        layer.set_progress(0.0)
        mean_ratios, _ = layer.ratios()
        assert mean_ratios.tolist() == [float(i == winners[0]) for i in range(3)]
        # The frozen state travels with the weights.
        restored = SparseSwitchableNorm(6, momentum=0.3).double()
        restored.load_state_dict(layer.state_dict())
        assert (int(restored.mean_choice), int(restored.var_choice)) == winners
        layer.eval(), restored.eval()
        torch.testing.assert_close(restored(x), layer(x), rtol=0, atol=0)

    def test_choices_update_rules(self):
        """A free choice takes the argmax of one-hot ratios and stays free otherwise; a fixed
        one never changes, whatever the ratios; the pair form updates both buffers alike."""
        ratios = torch.tensor([[0.0, 1.0, 0.0], [0.2, 0.8, 0.0], [0.0, 0.0, 1.0],
                               [1.0, 0.0, 0.0]], dtype=torch.float64)
        choices = torch.tensor([-1, -1, 0, 2])
        expected = [1, -1, 0, 2]
        assert fixed_choices(ratios, choices).tolist() == expected
        assert choices.tolist() == [-1, -1, 0, 2]  # a new tensor
        mean, var = choices.clone(), choices.flip(0)
        update_choice_pair(ratios, ratios.flip(0), mean, var)
        assert mean.tolist() == expected and var.tolist() == expected[::-1]
        one = torch.tensor(-1)  # a layer-wise (0-dim) choice
        update_choices(ratios[0], one)
        assert int(one) == 1

    def test_free_ratios_get_gradients_and_stay_free(self):
        layer = _layer(radius=0.1)
        layer(make_input((4, 6, 3, 3))).square().mean().backward()
        assert int(layer.mean_choice) == -1 and layer.mean_scores.grad.abs().sum() > 0

    def test_eval_does_not_fix(self):
        layer = _layer(radius=1.0).eval()
        layer(make_input((2, 6, 3, 3)))
        assert int(layer.mean_choice) == -1  # state changes in training steps only
        assert set(layer.ratios()[0].tolist()) == {0.0, 1.0}  # still one-hot at radius 1

    def test_harden(self):
        layer = _layer(radius=0.0)
        soft = layer.ratios()
        layer.harden_ratios_()
        assert int(layer.mean_choice) == int(soft[0].argmax())
        assert not layer.mean_scores.requires_grad and not layer.var_scores.requires_grad
        for ratios in layer.ratios():
            assert sorted(ratios.tolist()) == [0.0, 0.0, 1.0]

    def test_warns_when_the_radius_is_never_set(self, mmnorm_log):
        layer = SparseSwitchableNorm(4)
        layer(torch.randn(2, 4, 3, 3))
        assert len(logged(mmnorm_log, 'SSNRadiusHook')) == 1
        layer(torch.randn(2, 4, 3, 3))
        SparseSwitchableNorm(4)(torch.randn(2, 4, 3, 3))  # another layer: still once per run
        assert len(mmnorm_log) == 1
        layer_base._LOGGED.clear()
        scheduled = SparseSwitchableNorm(4)
        scheduled.set_progress(0.0)
        scheduled(torch.randn(2, 4, 3, 3))
        assert len(mmnorm_log) == 1

    def test_exceptions(self):
        layer = SparseSwitchableNorm(4)
        for bad in (-0.1, 1.5):
            with pytest.raises(ValueError, match='radius'):
                layer.set_progress(bad)
        with pytest.raises(ValueError, match='channels'):
            layer(torch.randn(2, 3, 4, 4))
        with pytest.raises(ValueError, match='same shape'):
            sparse_switchable_norm(torch.randn(2, 4, 3), torch.ones(3), torch.ones(2), 0.0)
        with pytest.raises(ValueError, match='3 entries'):
            sparse_switchable_norm(torch.randn(2, 4, 3), torch.ones(4), torch.ones(4), 0.0)
        with pytest.raises(ValueError, match='radius'):
            sparse_switchable_norm(torch.randn(2, 4, 3), torch.ones(3), torch.ones(3), 2.0)
