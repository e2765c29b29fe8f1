# Copyright (c) mmnorm contributors. All rights reserved.
"""Group-wise ratios (``ratio_groups=G``) on SN, SN_tied and SSN: the SN study's second future
direction, one ratio vector per group of contiguous channels.

The oracle (:func:`mmnorm.testing.oracles.grouped_mixture`) computes IN, LN and BN statistics from
the full tensor and mixes each channel by its group's row, one channel at a time, in float64; it
shares no code with the layers. Export, half precision, compile and host-sync coverage come from
the grouped configurations of :data:`mmnorm.testing.layers.LAYERS` (``SN_g4``, ``SSN_g8``), and
synchronized parity from tests/test_engine/test_sync_norm.py."""
import pytest
import torch
from torch import nn

import mmnorm.functional.moments as core
from mmnorm import SparseSwitchableNorm, SwitchableNorm, SwitchableNormTied
from mmnorm.functional import switchable_norm
from mmnorm.functional.sparse_switchable import sparse_switchable_norm
from mmnorm.testing import oracles

C = 8


def _randomize(layer, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            value = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.copy_(value.abs() + 0.5 if name == 'weight' else value)
    return layer


def _ratios_from_parameters(layer):
    """The layer's ratios from its parameters, by the paper's definitions, per row."""
    if isinstance(layer, SparseSwitchableNorm):
        radius = float(layer.radius)
        return [torch.stack([oracles.sparsestmax(row.detach(), radius) for row in scores])
                for scores in (layer.mean_scores, layer.var_scores)]
    if isinstance(layer, SwitchableNormTied):
        return [torch.softmax(layer.logits, -1)] * 2
    return [torch.softmax(layer.mean_logits, -1), torch.softmax(layer.var_logits, -1)]


MAKERS = {
    'SN': lambda g, **kw: SwitchableNorm(C, ratio_groups=g, momentum=0.3, **kw),
    'SN_tied': lambda g, **kw: SwitchableNormTied(C, ratio_groups=g, momentum=0.3, **kw),
    'SSN': lambda g, **kw: SparseSwitchableNorm(C, ratio_groups=g, momentum=0.3, **kw),
}


@pytest.fixture(params=['light', 'plain'])
def form(request, monkeypatch):
    """Both eager forms: the light one users get, and the plain one that tracing runs."""
    monkeypatch.setattr(core, 'is_tracing', lambda: request.param == 'plain')
    return request.param


class TestOption:

    @pytest.mark.parametrize('groups', [3, 5, 16])
    def test_channels_not_divisible_raise_naming_both(self, groups):
        with pytest.raises(ValueError, match=rf'ratio_groups={groups}.*\b{C} channels'):
            SwitchableNorm(C, ratio_groups=groups)

    @pytest.mark.parametrize('groups', [0, -2, 2.0, True, '4'])
    def test_bad_group_counts_raise(self, groups):
        with pytest.raises(ValueError, match='ratio_groups must be a positive int'):
            SparseSwitchableNorm(C, ratio_groups=groups)

    def test_functional_form_checks_the_groups_against_the_input(self):
        x = torch.randn(2, C, 3, 3)
        with pytest.raises(ValueError, match=r'ratio_groups=3 does not divide the 8 channels'):
            switchable_norm(x, torch.zeros(3, 3), torch.zeros(3, 3))
        with pytest.raises(ValueError, match='both 2 \\(IN, LN\\) in their last dim'):
            switchable_norm(x, torch.zeros(4, 3), torch.zeros(4, 2))
        with pytest.raises(ValueError, match=r'\(K,\) or \(G, K\)'):
            switchable_norm(x, torch.zeros(2, 4, 3), torch.zeros(2, 4, 3))

    @pytest.mark.parametrize('name', list(MAKERS))
    def test_parameter_and_ratio_shapes(self, name):
        layer = MAKERS[name](4)
        for pname in layer.ratio_params:
            assert getattr(layer, pname).shape == (4, 3)
        mean, var = layer.ratios()
        assert mean.shape == var.shape == (4, 3)
        assert layer.normalizers == ('IN', 'LN', 'BN')
        assert MAKERS[name](4, using_bn=False).ratios()[0].shape == (4, 2)
        assert layer.config()['ratio_groups'] == 4
        assert 'ratio_groups=4' in repr(layer)
        if name == 'SSN':
            assert layer.mean_choice.shape == layer.var_choice.shape == (4, )

    @pytest.mark.parametrize('name', list(MAKERS))
    def test_one_group_keeps_the_layerwise_state(self, name):
        """G = 1 is the paper's layer: its state dict has today's keys and shapes, so
        checkpoints load both ways."""
        layer = MAKERS[name](1)
        shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
        for pname in layer.ratio_params:
            assert shapes[pname] == (3, )
        if name == 'SSN':
            assert shapes['mean_choice'] == shapes['var_choice'] == () == shapes['radius']
        assert layer.ratios()[0].shape == (3, )

    @pytest.mark.parametrize('name', list(MAKERS))
    def test_layerwise_checkpoint_starts_every_group_from_its_ratios(self, name):
        layerwise = _randomize(MAKERS[name](1))
        grouped = MAKERS[name](4)
        grouped.load_state_dict(layerwise.state_dict())
        for mine, theirs in zip(grouped.ratios(), layerwise.ratios()):
            assert torch.equal(mine, theirs.expand(4, -1))
        x = torch.randn(3, C, 4, 4)
        layerwise.eval(), grouped.eval()
        torch.testing.assert_close(grouped(x), layerwise(x), rtol=1e-6, atol=1e-6)

    def test_grouped_checkpoint_into_other_group_count_fails_clearly(self):
        with pytest.raises(RuntimeError, match='size mismatch for mean_logits'):
            SwitchableNorm(C, ratio_groups=2).load_state_dict(
                SwitchableNorm(C, ratio_groups=4).state_dict())


class TestNumerics:

    @pytest.mark.parametrize('name', list(MAKERS))
    @pytest.mark.parametrize('groups', [2, C])
    @pytest.mark.parametrize('kwargs', [{}, dict(mix='std'), dict(using_bn=False)],
                             ids=['var', 'std', 'noBN'])
    @pytest.mark.parametrize('shape', [(4, C, 5, 3), (3, C, 7), (2, C, 2, 3, 2)],
                             ids=['2d', '1d', '3d'])
    def test_train_and_eval_match_the_oracle(self, name, groups, kwargs, shape, form):
        layer = _randomize(MAKERS[name](groups, **kwargs)).double()
        if name == 'SSN':
            layer.set_progress(0.2)
        gen = torch.Generator().manual_seed(5)
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2
             + torch.linspace(-1, 2, C, dtype=torch.float64).view(1, C, *[1] * (len(shape) - 2)))
        grad = torch.randn(shape, generator=gen, dtype=torch.float64)
        mean_ratios, var_ratios = _ratios_from_parameters(layer)
        torch.testing.assert_close(layer.ratios(), (mean_ratios.detach(), var_ratios.detach()),
                                   rtol=1e-12, atol=1e-12)

        # Training: batch BN statistics; input and affine gradients against the oracle's.
        xl, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        weight = layer.weight.detach().clone().requires_grad_()
        bias = layer.bias.detach().clone().requires_grad_()
        expected = oracles.grouped_mixture(xo, mean_ratios, var_ratios, weight, bias,
                                           eps=layer.eps, mix=layer.mix)
        actual = layer(xl)
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
        actual.backward(grad)
        expected.backward(grad)
        torch.testing.assert_close(xl.grad, xo.grad, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(layer.weight.grad, weight.grad, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(layer.bias.grad, bias.grad, rtol=1e-9, atol=1e-10)

        # The running buffers: batch mean and unbiased variance, PyTorch's convention (kept
        # when BN is in the mixture).
        flat = x.transpose(0, 1).reshape(C, -1)
        moved = layer.using_bn
        torch.testing.assert_close(layer.running_mean, 0.3 * flat.mean(1) * moved,
                                   rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.running_var, 1 + (0.3 * flat.var(1) - 0.3) * moved,
                                   rtol=1e-10, atol=1e-12)

        # Eval: BN from the running buffers, IN and LN per sample.
        layer.eval()
        with torch.no_grad():
            expected = oracles.grouped_mixture(
                x, mean_ratios, var_ratios, layer.weight, layer.bias,
                bn_stats=(layer.running_mean, layer.running_var), eps=layer.eps, mix=layer.mix)
            torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)

    @pytest.mark.parametrize('name', ['SN', 'SN_tied'])
    def test_ratio_gradients_match_the_oracle(self, name, form):
        layer = _randomize(MAKERS[name](4)).double()
        x = torch.randn(3, C, 4, 3, dtype=torch.float64) * 2 + 1
        grad = torch.randn(x.shape, dtype=torch.float64)
        layer(x).backward(grad)
        logits = {n: getattr(layer, n).detach().clone().requires_grad_()
                  for n in layer.ratio_params}
        mean_logits = logits.get('logits', logits.get('mean_logits'))
        var_logits = logits.get('logits', logits.get('var_logits'))
        oracles.grouped_mixture(x, torch.softmax(mean_logits, -1), torch.softmax(var_logits, -1),
                                layer.weight.detach(), layer.bias.detach(),
                                eps=layer.eps).backward(grad)
        for n, tensor in logits.items():
            assert getattr(layer, n).grad.abs().sum() > 0
            torch.testing.assert_close(getattr(layer, n).grad, tensor.grad, rtol=1e-9,
                                       atol=1e-11)

    def test_groups_with_equal_rows_equal_the_layerwise_layer(self, form):
        layerwise = _randomize(SwitchableNorm(C)).double()
        grouped = SwitchableNorm(C, ratio_groups=4).double()
        grouped.load_state_dict(layerwise.state_dict())
        x = torch.randn(4, C, 3, 3, dtype=torch.float64)
        torch.testing.assert_close(grouped(x), layerwise(x), rtol=1e-12, atol=1e-12)
        # ... and a different row changes only that group's channels.
        with torch.no_grad():
            grouped.mean_logits[1].add_(torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64))
        changed = (grouped(x) - layerwise(x)).abs().amax((0, 2, 3)) > 1e-9
        assert changed.tolist() == [False, False, True, True, False, False, False, False]

    @pytest.mark.parametrize('name', list(MAKERS))
    @pytest.mark.parametrize('train', [True, False])
    def test_gradcheck(self, name, train, form):
        layer = _randomize(MAKERS[name](2), seed=3).double().train(train)
        if name == 'SSN':
            layer.set_progress(0.1)
            with torch.no_grad():  # ratios strictly inside the simplex: differentiable
                layer.mean_scores.copy_(torch.tensor([[0.5, 0.4, 0.3], [0.2, 0.45, 0.35]]))
                layer.var_scores.copy_(torch.tensor([[0.3, 0.5, 0.4], [0.42, 0.3, 0.37]]))
        with torch.no_grad():
            layer.running_var.fill_(1.5)
        layer.momentum = 0.0
        x = torch.randn(3, C, 3, 2, dtype=torch.float64, requires_grad=True)
        names = [n for n, _ in layer.named_parameters()]

        def fn(x, *params):
            return torch.func.functional_call(layer, dict(zip(names, params)), (x, ))

        assert torch.autograd.gradcheck(fn, (x, *[p.detach().clone().requires_grad_()
                                                  for p in layer.parameters()]))


class TestSparseGroups:

    def test_each_group_freezes_on_its_own(self):
        layer = SparseSwitchableNorm(C, ratio_groups=2)
        layer.set_progress(0.5)
        with torch.no_grad():  # group 0 clearly BN (one-hot at r = 0.5); group 1 near the centre
            layer.mean_scores.copy_(torch.tensor([[0.0, 0.1, 2.0], [0.34, 0.33, 0.33]]))
            layer.var_scores.copy_(torch.tensor([[1.5, 0.0, 0.1], [0.3, 0.36, 0.34]]))
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(4, C, 3, 3, generator=gen)
        layer(x).backward(torch.randn(x.shape, generator=gen))
        assert layer.mean_choice.tolist() == [2, -1]
        assert layer.var_choice.tolist() == [0, -1]
        for scores in (layer.mean_scores, layer.var_scores):
            assert torch.equal(scores.grad[0], torch.zeros(3))   # the frozen row
            assert scores.grad[1].abs().sum() > 0                # the free one still learns
        assert layer.ratio_details() == {'radius': 0.5, 'fixed': [[True, False], [True, False]]}
        # A fixed choice stays whatever its scores do next.
        with torch.no_grad():
            layer.mean_scores[0].copy_(torch.tensor([3.0, 0.0, 0.0]))
        assert layer.ratios()[0][0].tolist() == [0.0, 0.0, 1.0]

    def test_radius_one_makes_every_group_one_hot(self):
        layer = _randomize(SparseSwitchableNorm(C, ratio_groups=C))
        layer.set_progress(1.0)
        layer(torch.randn(2, C, 3, 3))
        for ratios, choice in zip(layer.ratios(), (layer.mean_choice, layer.var_choice)):
            assert ((ratios > 0).sum(-1) == 1).all()
            assert torch.equal(choice, ratios.argmax(-1))

    def test_functional_form_fixes_choices_per_group(self):
        scores = torch.tensor([[0.0, 0.1, 2.0], [0.34, 0.33, 0.33]])
        choice = torch.full((2, ), -1)
        sparse_switchable_norm(torch.randn(2, 4, 3, 3), scores, scores.clone(), 0.5,
                               mean_choice=choice, fix_choices=True)
        assert choice.tolist() == [2, -1]

    def test_harden_fixes_every_group_at_its_argmax(self):
        layer = _randomize(SparseSwitchableNorm(C, ratio_groups=4))
        expected = [r.argmax(-1) for r in layer.ratios()]
        layer.harden_ratios_()
        assert torch.equal(layer.mean_choice, expected[0])
        assert torch.equal(layer.var_choice, expected[1])
        for ratios in layer.ratios():
            assert ((ratios == 0) | (ratios == 1)).all() and (ratios.sum(-1) == 1).all()


def test_sn_harden_makes_every_group_exactly_one_hot():
    layer = _randomize(SwitchableNorm(C, ratio_groups=4))
    expected = [r.argmax(-1) for r in layer.ratios()]
    layer.harden_ratios_()
    for ratios, winners in zip(layer.ratios(), expected):
        assert torch.equal(ratios, nn.functional.one_hot(winners, 3).float())
    assert not layer.mean_logits.requires_grad


def test_openmmlab_builders_take_the_option():
    from mmcv.cnn import ConvModule, build_norm_layer
    name, layer = build_norm_layer(dict(type='SSN', ratio_groups=4), 16, postfix=1)
    assert name == 'ssn1' and layer.ratio_groups == 4 and layer.mean_scores.shape == (4, 3)
    block = ConvModule(3, 16, 3, padding=1, norm_cfg=dict(type='SN_tied', ratio_groups=16))
    assert block.norm.logits.shape == (16, 3)
    assert block(torch.randn(2, 3, 6, 6)).shape == (2, 16, 6, 6)
    with pytest.raises(ValueError, match='ratio_groups=5 does not divide the 16 channels'):
        build_norm_layer(dict(type='SN', ratio_groups=5), 16)


@pytest.mark.parametrize('cls', [SwitchableNorm, SwitchableNormTied, SparseSwitchableNorm])
def test_device_and_dtype_keep_their_0_1_0_places(cls):
    """0.1.0's positional arguments, ``device`` and ``dtype`` last, still mean what they did:
    the option came after them."""
    layer = cls(8, 1e-5, 0.1, True, True, True, 'var', False, 'moving', 'cpu', torch.float64)
    assert layer.weight.dtype == torch.float64 and layer.ratio_groups == 1
    assert cls(8, 1e-5, 0.1, True, True, True, 'var', False, 'moving', None, None,
               4).ratio_groups == 4


@pytest.mark.parametrize('name', ['SN', 'SSN'])
def test_batch_average_statistics_and_eval(name):
    """eval_stats='batch_average': the BN branch of every group is evaluated with the average of
    the batches' statistics recomputed after training (SN study Sec. 3)."""
    from mmnorm.engine import recompute_batch_stats
    layer = _randomize(MAKERS[name](4, eval_stats='batch_average')).double()
    if name == 'SSN':
        layer.set_progress(0.2)
    gen = torch.Generator().manual_seed(2)
    data = [torch.randn(3, C, 4, 4, generator=gen, dtype=torch.float64) * 2 + 1
            for _ in range(3)]
    recompute_batch_stats(layer, data, 3, forward=lambda model, x: model(x))
    assert bool(layer.stats_ready)
    means = torch.stack([x.mean((0, 2, 3)) for x in data])
    variances = torch.stack([x.transpose(0, 1).reshape(C, -1).var(1) for x in data])
    torch.testing.assert_close(layer.running_mean, means.mean(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.running_var, variances.mean(0), rtol=1e-10, atol=1e-12)
    layer.eval()
    x = data[0][:2]
    mean_ratios, var_ratios = _ratios_from_parameters(layer)
    with torch.no_grad():
        expected = oracles.grouped_mixture(x, mean_ratios, var_ratios, layer.weight, layer.bias,
                                           bn_stats=(means.mean(0), variances.mean(0)))
        torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


def test_norm_eval_freezes_grouped_layers_in_an_mmdet_backbone():
    from mmdet.models.backbones import ResNet
    import mmnorm.integration  # noqa: F401  (norm_eval for mmnorm layers)
    backbone = ResNet(18, norm_cfg=dict(type='SN', ratio_groups=4), norm_eval=True)
    backbone.train()
    layer = backbone.bn1 if hasattr(backbone, 'bn1') else backbone.norm1
    assert layer.ratio_groups == 4 and not layer.training
    before = layer.running_mean.clone()
    backbone(torch.randn(2, 3, 32, 32))
    assert torch.equal(layer.running_mean, before)
