# Copyright (c) mmnorm contributors. All rights reserved.
"""Double backward (``create_graph=True``: gradient penalties, second derivatives) through the
eager layers: their hand-written backward passes would give gradients that are constants of
the input, so a second derivative taken through them would be silently wrong. Checked with
``gradgradcheck`` (finite differences of the first derivative, in float64) with respect to the
input and every parameter, in both op structures."""
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call

from mmnorm import BatchChannelNorm, SparseSwitchableNorm, SwitchableNorm, SwitchableNormTied
from mmnorm.functional import compiled as compiled_form
from mmnorm.functional import row_affine
from mmnorm.functional.sparsestmax_fast import fast_sparsestmax
from mmnorm.testing.layers import float64_oracle


def _ssn(**kwargs):
    layer = SparseSwitchableNorm(8, **kwargs)
    layer.set_progress(0.4)  # pushed ratios: SparsestMax's second derivative is not 0
    return layer


def _estimated():
    layer = BatchChannelNorm(8, num_groups=2, estimate=True)
    layer.set_estimate_rate(0.0)  # estimates that stay put over gradgradcheck's many calls
    return layer


LAYERS = {
    'SN': lambda: SwitchableNorm(8),
    'SN_tied': lambda: SwitchableNormTied(8),
    'SN_noBN': lambda: SwitchableNorm(8, using_bn=False),
    # The public-op form (mix='std', and the authors' IN variance of converted models).
    'SN_std': lambda: SwitchableNorm(8, mix='std'),
    'SN_unbiased': lambda: SwitchableNorm(8, in_unbiased=True),
    'SSN_std': lambda: _ssn(mix='std'),
    'SN-G2': lambda: SwitchableNorm(8, ratio_groups=2),
    'SSN': _ssn,
    'SSN-G2': lambda: _ssn(ratio_groups=2),
    'BCN': lambda: BatchChannelNorm(8, num_groups=2),
    'BCN_est': _estimated,
}


@pytest.fixture
def eager(monkeypatch):
    """The eager form whatever the compiled-form mode."""
    monkeypatch.setattr(compiled_form.COMPILED, 'mode', 'never')


def _layer_fn(layer):
    """``f(x, *params)``: the layer with its parameters as inputs (perturbed away from their
    initial, symmetric values)."""
    gen = torch.Generator().manual_seed(2)
    names, params = [], []
    for name, p in layer.named_parameters():
        names.append(name)
        params.append((p.detach() + 0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
                      .requires_grad_())

    def fn(x, *values):
        return functional_call(layer, dict(zip(names, values)), (x, ))

    return fn, params


@pytest.mark.parametrize('name', list(LAYERS))
@pytest.mark.parametrize('train', [True, False])
@pytest.mark.parametrize('structure', ['cpu', 'gpu'])
def test_second_derivatives(name, train, structure, eager, monkeypatch):
    if structure == 'gpu':  # a GPU's op structure, run on the CPU
        monkeypatch.setattr(row_affine, 'FEW_LAUNCHES_NOT_NEEDED', ())
    torch.manual_seed(0)
    layer = LAYERS[name]().double().train(train)
    fn, params = _layer_fn(layer)
    x = (torch.randn(2, 8, 2, 3, dtype=torch.float64) * 2 + 1).requires_grad_()
    assert gradcheck(fn, (x, *params))
    assert gradgradcheck(fn, (x, *params))


@pytest.mark.parametrize('name', ['SN', 'BCN'])
def test_gradient_penalty_equals_oracle(name, eager):
    # An R1-style penalty, ||d loss / d x||^2, differentiated again: the layer against the
    # float64 oracle (plain torch ops, its own autograd) on the same parameters.
    torch.manual_seed(0)
    layer = LAYERS[name]().double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64) * 2 + 1
    weights = torch.randn(2, 8, 4, 4, dtype=torch.float64)

    def penalty_grads(forward):
        xg = x.clone().requires_grad_()
        layer.zero_grad()
        grad, = torch.autograd.grad((forward(xg).tanh() * weights).sum(), xg,
                                    create_graph=True)
        grad.square().sum().backward()
        return [xg.grad] + [p.grad.clone() for p in layer.parameters()]

    found = penalty_grads(layer)
    expected = penalty_grads(lambda xg: float64_oracle(layer, xg, differentiable=True))
    assert found[0].abs().max() > 0
    torch.testing.assert_close(found, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize('name', ['SN', 'SSN', 'SN-G2', 'BCN'])
@pytest.mark.parametrize('structure', ['cpu', 'gpu'])
def test_a_layer_called_twice_keeps_its_gradients_under_create_graph(name, structure, eager,
                                                                      monkeypatch):
    # A head shared by the pyramid's levels: its second call's input depends on its own
    # parameters through the first call. The gradients of a backward that builds a graph are
    # those of a plain backward (each call's own, not the total derivative through its input,
    # which the outer backward adds again).
    monkeypatch.setattr(row_affine, 'FEW_LAUNCHES_NOT_NEEDED', (
        'cpu', ) if structure == 'cpu' else ())
    torch.manual_seed(0)
    layer = LAYERS[name]().double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    params = list(layer.parameters())

    def grads(create_graph):
        y = layer(x)
        out = (layer(y * 1.5 + 0.2).sin() * y).sum()
        return torch.autograd.grad(out, params, create_graph=create_graph)

    for found, expected in zip(grads(True), grads(False)):
        torch.testing.assert_close(found, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('k', [2, 3])
@pytest.mark.parametrize('radius', [0.0, 0.3, 0.6])
def test_fast_sparsestmax_second_derivative(k, radius):
    gen = torch.Generator().manual_seed(k)
    choices = torch.tensor([-1, -1, 0, -1, -1, -1])  # a fixed choice: its vertex, no gradient
    r = torch.tensor(radius, dtype=torch.float64)
    for _ in range(5):
        z = (0.3 * torch.randn(6, k, generator=gen, dtype=torch.float64)).requires_grad_()
        assert gradgradcheck(lambda z: fast_sparsestmax(z, r, choices), (z, ))


@pytest.mark.parametrize('name', ['SN', 'SN_std', 'BCN'])
def test_inputs_without_spatial_dims(name, eager):
    # (N, C) inputs take the public-op form: its double backward runs the forward again too.
    torch.manual_seed(0)
    layer = LAYERS[name]().double()
    fn, params = _layer_fn(layer)
    x = (torch.randn(5, 8, dtype=torch.float64) * 2 + 1).requires_grad_()
    assert gradgradcheck(fn, (x, *params))


@pytest.mark.parametrize('structure', ['cpu', 'gpu'])
@pytest.mark.parametrize('name', ['SN', 'SN_std', 'SSN', 'BCN'])
@pytest.mark.parametrize('case', ['constant channel', 'H*W = 1'])
def test_gradient_penalty_where_a_row_has_zero_variance(name, case, structure, eager,
                                                        monkeypatch):
    # A dead feature map (a channel constant per sample) or 1x1 maps: rows of zero variance,
    # where the norm of the centered row has a 0/0 second derivative. The penalty's gradients
    # are finite and those of the float64 oracle.
    if structure == 'gpu':
        monkeypatch.setattr(row_affine, 'FEW_LAUNCHES_NOT_NEEDED', ())
    torch.manual_seed(0)
    layer = LAYERS[name]().double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    shape = (3, 8, 4, 4) if case == 'constant channel' else (3, 8, 1, 1)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    if case == 'constant channel':
        x[:, 2] = torch.arange(3, dtype=torch.float64).view(3, 1, 1)

    # (The oracle's SparsestMax finds its threshold on detached values: its gradient in the
    # scores is not SparsestMax's, so SSN's scores are checked by gradgradcheck instead.)
    names = [n for n, _ in layer.named_parameters() if not n.endswith('_scores')]

    def penalty_grads(forward):
        xg = x.clone().requires_grad_()
        layer.zero_grad()
        grad, = torch.autograd.grad(forward(xg).tanh().sum(), xg, create_graph=True)
        grad.square().sum().backward()
        return [xg.grad] + [p.grad.clone() for n, p in layer.named_parameters() if n in names]

    found = penalty_grads(layer)
    expected = penalty_grads(lambda xg: float64_oracle(layer, xg, differentiable=True))
    assert all(g.isfinite().all() for g in found)
    torch.testing.assert_close(found, expected, rtol=1e-7, atol=1e-9)
    if name == 'SSN':
        fn, params = _layer_fn(layer)
        assert gradgradcheck(fn, (x.clone().requires_grad_(), *params))


def _sync_refuses(rank, world, out_dir):
    from mmnorm import SyncSwitchableNorm
    layer = SyncSwitchableNorm(8).double()
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    grad, = torch.autograd.grad(layer(x).square().sum(), x)  # first order: fine
    assert grad.shape == x.shape
    with pytest.raises(RuntimeError, match='synchronized layers while they synchronize'):
        torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)


def test_double_backward_refused_by_synchronizing_layers():
    # Their statistics come from a collective, which a backward must not run again: refused
    # with a message, not a second derivative silently wrong. Two gloo processes.
    from mmnorm.testing.distributed import run_on_gloo
    run_on_gloo(_sync_refuses)


def test_double_backward_moves_estimates_once(eager):
    # Estimated BCN's map runs again for a double backward: with the estimates the forward
    # moved, not moving them a second time.
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64) + 2
    moved = []
    for create_graph in (False, True):
        layer = BatchChannelNorm(8, num_groups=2, estimate=True).double()
        layer.set_estimate_rate(0.5)
        xg = x.clone().requires_grad_()
        grad, = torch.autograd.grad(layer(xg).square().sum(), xg, create_graph=create_graph)
        if create_graph:
            grad.square().sum().backward()
        moved.append([layer.running_mean.clone(), layer.running_var.clone()])
    torch.testing.assert_close(moved[0], moved[1], rtol=0, atol=0)
    assert (moved[0][0] != 0).all()
