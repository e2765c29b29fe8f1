# Copyright (c) mmnorm contributors. All rights reserved.
"""``mmnorm.frozen_ratios``: inference forwards inside the scope compute each layer's ratios
once; everything else (training, gradients, tracing, after the scope) computes them as
always."""
import copy

import pytest
import torch
from torch import nn

from mmnorm import SparseSwitchableNorm, SwitchableNorm, SwitchableNormTied, frozen_ratios
from mmnorm.analysis.launches import step_ops
from mmnorm.functional import row_affine

from .test_light_form import eager  # noqa: F401 (the fixture: the eager form)

LAYERS = {
    'SN': lambda c: SwitchableNorm(c),
    'SN_tied': lambda c: SwitchableNormTied(c),
    'SN_noBN': lambda c: SwitchableNorm(c, using_bn=False),
    'SN-G4': lambda c: SwitchableNorm(c, ratio_groups=4),
    'SSN': lambda c: _ssn(SparseSwitchableNorm(c)),
    'SSN-G4': lambda c: _ssn(SparseSwitchableNorm(c, ratio_groups=4)),
}


def _ssn(layer):
    layer.set_progress(0.3)  # between sparsemax and one-hot
    return layer


def _layer(name, channels=8):
    torch.manual_seed(0)
    layer = LAYERS[name](channels)
    with torch.no_grad():  # ratios off the centre, different per group
        for p in layer.ratio_inputs():
            if p.is_floating_point() and p.dim() >= 1:
                p.copy_(torch.randn(p.shape) * 0.5)
    return layer.eval()


@pytest.mark.usefixtures('eager')
@pytest.mark.parametrize('name', list(LAYERS))
def test_inference_forwards_in_scope_are_within_budget_and_unchanged(name, monkeypatch):
    # Issue 26's eval budget (12 ops as on CUDA) for every ratio layer inside the scope, with
    # outputs equal to the forwards outside it.
    monkeypatch.setattr(row_affine, 'FEW_LAUNCHES_NOT_NEEDED', ())
    layer = _layer(name, 16)
    x = torch.randn(4, 16, 7, 7)
    with torch.no_grad():
        outside = layer(x)
    every_call = sum(step_ops(layer, x, train=False).values())
    with frozen_ratios(layer):
        first = sum(step_ops(layer, x, train=False).values())
        later = [sum(step_ops(layer, x, train=False).values()) for _ in range(2)]
        with torch.no_grad():
            inside = layer(x)
    assert first == every_call and later[0] == later[1] <= 12 and later[0] < every_call, (
        every_call, first, later)
    assert torch.equal(inside, outside)


@pytest.mark.usefixtures('eager')
@pytest.mark.parametrize('name', ['SN', 'SSN', 'SSN-G4'])
def test_only_inference_forwards_reuse_and_the_scope_ends(name):
    x = torch.randn(2, 8, 4, 5)
    layer = _layer(name)
    with frozen_ratios(layer):
        with torch.no_grad():
            before = layer(x)
            for p in layer.ratio_inputs():  # what the scope's caller promised not to do
                if p.is_floating_point() and p.dim() >= 1:
                    p.data.mul_(-1.5)
            reference = LAYERS[name](8).eval()
            reference.load_state_dict(layer.state_dict())
            expected = reference(x)
            assert not torch.equal(expected, before)
            # An inference forward in the scope reuses the ratios of its first one ...
            assert torch.equal(layer(x), before)
        # ... a forward with gradients computes them (as a training forward does) ...
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
        reference.train()
        layer.train()
        torch.testing.assert_close(layer(x), reference(x), rtol=0, atol=0)
        layer.eval()
    # ... and after the scope every forward does.
    assert layer._frozen_ratios is None
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference.eval()(x), rtol=0, atol=0)


def test_scopes_nest_end_on_errors_and_follow_dtype():
    model = nn.Sequential(_layer('SN'), nn.ReLU(), _layer('SSN'))
    x = torch.randn(2, 8, 3, 3)
    with frozen_ratios(model) as scoped:
        assert scoped is model
        caches = [m._frozen_ratios for m in (model[0], model[2])]
        with frozen_ratios(model):  # the outer scope's ratios are kept
            assert [m._frozen_ratios for m in (model[0], model[2])] == caches
            assert all(a is b for a, b in zip(caches, [model[0]._frozen_ratios,
                                                         model[2]._frozen_ratios]))
        assert model[0]._frozen_ratios is caches[0]
        with torch.no_grad():
            model(x)
            model.double()  # a new dtype: ratios computed again, in float64
            out = model(x.double())
        assert {key[1] for key in caches[1]} == {torch.float32, torch.float64}
    reference = nn.Sequential(LAYERS['SN'](8), nn.ReLU(), LAYERS['SSN'](8)).double().eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(out, reference(x.double()), rtol=0, atol=0)
    assert model[0]._frozen_ratios is None and model[2]._frozen_ratios is None
    with pytest.raises(RuntimeError, match='boom'):
        with frozen_ratios(model):
            raise RuntimeError('boom')
    assert model[0]._frozen_ratios is None and model[2]._frozen_ratios is None


def _scaled(layer, factor=-1.5):
    with torch.no_grad():
        for p in layer.ratio_inputs():
            if p.is_floating_point() and p.dim() >= 1:
                p.mul_(factor)
    return layer


@pytest.mark.usefixtures('eager')
@pytest.mark.parametrize('change', ['load_state_dict', 'functional_call', 'deepcopy',
                                    'half and back'])
def test_changes_the_scope_can_see_compute_the_ratios_again(change):
    # Updates through the public routes bump a version counter or bring other tensors: inside a
    # scope they are seen (the key holds the inputs' storages and counters).
    x = torch.randn(2, 8, 4, 5)
    layer, other = _layer('SSN'), _scaled(_layer('SSN'))
    with frozen_ratios(layer), torch.no_grad():
        before = layer(x)
        expected = other(x)
        if change == 'load_state_dict':
            layer.load_state_dict(other.state_dict())
            out = layer(x)
        elif change == 'functional_call':
            state = {**dict(other.named_parameters()), **dict(other.named_buffers())}
            out = torch.func.functional_call(layer, state, (x, ))
        elif change == 'deepcopy':  # the copy starts outside the scope
            twin = copy.deepcopy(layer)
            assert twin._frozen_ratios is None and layer._frozen_ratios
            twin.load_state_dict(other.state_dict())
            out = twin(x)
        else:  # the parameters rounded to half precision and back
            layer.half().float()
            reference = LAYERS['SSN'](8).eval()
            reference.load_state_dict(layer.state_dict())
            out, expected = layer(x), reference(x)
    assert not torch.equal(out, before)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.usefixtures('eager')
@pytest.mark.parametrize('option', [dict(mix='std'), dict(in_unbiased=True)])
def test_layers_whose_form_takes_no_ratios_compute_them_once_per_forward(option):
    # mix='std' and the authors' unbiased IN variance run the plain form, which computes its
    # ratios itself: the scope must not compute them besides.
    layer = _layer('SN')
    for key, value in option.items():
        setattr(layer, key, value)
    calls = []

    def counting(*inputs):
        calls.append(1)
        return SwitchableNorm.ratio_fn(*inputs)
    layer.ratio_fn = counting
    with frozen_ratios(layer), torch.no_grad():
        for _ in range(3):
            layer(torch.randn(2, 8, 3, 3))
    assert len(calls) == 3


@pytest.mark.usefixtures('eager')
def test_a_model_compiled_by_torch_compile_reads_its_parameters_in_scope():
    # torch.compile of a whole model (mmengine's compile=True) traces the layers: the graph
    # computes the ratios from the parameters, never from a scope's cache.
    torch._dynamo.reset()
    layer = _layer('SSN')
    x = torch.randn(2, 8, 4, 5)
    compiled = torch.compile(layer, backend='eager')
    with frozen_ratios(layer), torch.no_grad():
        before = compiled(x)
        _scaled(layer)
        reference = LAYERS['SSN'](8).eval()
        reference.load_state_dict(layer.state_dict())
        after = compiled(x)
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, reference(x), rtol=1e-6, atol=1e-6)


def test_traced_forwards_in_scope_keep_the_ratio_computation():
    # An export inside the scope must not bake a cached tensor in as a constant in place of
    # the ratio function of the parameters.
    layer = _layer('SSN')
    x = torch.randn(2, 8, 3, 3)
    with frozen_ratios(layer), torch.no_grad():
        layer(x)
        program = torch.export.export(layer, (x, ))
    with torch.no_grad():
        for p in layer.ratio_inputs():
            if p.is_floating_point() and p.dim() >= 1:
                p.mul_(-1.5)
        state = {**dict(layer.named_parameters()), **dict(layer.named_buffers())}
        out = torch.func.functional_call(program.module(), state, (x, ))
        torch.testing.assert_close(out, layer(x), rtol=1e-6, atol=1e-6)
