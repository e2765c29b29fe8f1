# Copyright (c) mmnorm contributors. All rights reserved.
"""Accuracy against torch's own norms (half precision, zero-variance channels), exact zeros,
empty batches, agreement of the two forms of the core, and every available device."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmnorm.functional.moments as core
from mmnorm import (BatchChannelNorm, SwitchableNorm, SwitchableNormTied, batched_ratios,
                    frozen_ratios)
from mmnorm.testing import oracles
from mmnorm.testing.layers import (CHANNELS, LAYERS, batches, float64_oracle, make_layer,
                                   train_steps)
from tests.conftest import assert_close


def _max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).abs().max())


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('name', ['SN', 'SN_tied', 'SN_std', 'BCN', 'SSN'])
def test_half_precision_error_within_twice_torch_norms(name, dtype, job):
    # Values offset from their mean: an affine map rounded before it is applied loses them.
    gen = torch.Generator().manual_seed(0)
    x = ((torch.randn(4, 8, 6, 6, generator=gen) + 30).to(dtype))
    exact = x.double()
    layer = make_layer(name)
    ours = _max_error(layer(x), float64_oracle(layer, exact))
    bn, gn = nn.BatchNorm2d(8), nn.GroupNorm(4, 8)
    torch_error = max(_max_error(bn(x), bn.double()(exact)),
                      _max_error(gn(x), gn.double()(exact)))
    assert ours <= 2 * torch_error, (ours, torch_error)
    with torch.autocast('cpu', dtype=torch.bfloat16):  # autocast does not change the result
        torch.testing.assert_close(layer.float()(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('name', ['SN', 'SN_tied', 'SSN', 'SN_g4', 'SSN_g8'])
def test_half_precision_parameters_mix_with_float32_ratios(name, dtype):
    # A layer cast to half precision (model.half(), .to(torch.bfloat16)) on inputs far from 0:
    # ratios rounded to its precision do not sum to 1, and the mixed mean misses by that times
    # the input's mean (4.0 in bfloat16 at 1000). Computed in float32, the output is the exact
    # result rounded once, whether the layer computes its ratios or batched_ratios does.
    layer = make_layer(name)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param_name, param in layer.named_parameters():
            if param_name.endswith(('logits', 'scores')):
                param.copy_(torch.randn(param.shape, generator=gen))
    layer = layer.to(dtype)
    x = (1000 + torch.randn(4, layer.num_features, 5, 6, generator=gen)).to(dtype)
    exact = float64_oracle(layer, x.double())
    rounding = _max_error(exact.to(dtype), exact)
    with torch.no_grad():
        assert _max_error(layer(x), exact) <= 1.5 * rounding
    with batched_ratios(layer):  # (with a graph: the shared ratio node)
        assert _max_error(layer(x).detach(), exact) <= 1.5 * rounding
    layer.eval()  # running statistics; the same layer in float64 as the reference
    reference = copy.deepcopy(layer).double()(x.double())
    with torch.no_grad(), frozen_ratios(layer):
        for _ in range(2):  # computing, then reusing the ratios
            assert _max_error(layer(x), reference) <= 1.5 * _max_error(reference.to(dtype),
                                                                       reference)


def _bn_then_gn(bcn: BatchChannelNorm, x: torch.Tensor) -> torch.Tensor:
    """BCN composed from torch's own layers: BatchNorm2d, then GroupNorm with a per-group
    affine (Eq. 16)."""
    bn = nn.BatchNorm2d(bcn.num_features).to(x.dtype)
    with torch.no_grad():
        bn.weight.copy_(bcn.bn_weight), bn.bias.copy_(bcn.bn_bias)
    n, c = x.shape[:2]
    g = F.group_norm(bn(x), bcn.num_groups).view(n, bcn.num_groups, -1)
    g = g * bcn.weight.view(1, -1, 1).to(x.dtype) + bcn.bias.view(1, -1, 1).to(x.dtype)
    return g.view_as(x)


@pytest.mark.parametrize('value', [3.7, -2.0, 30.0, 1e3])
@pytest.mark.parametrize('batch', [1, 3, 4])
def test_bcn_zero_variance_channels_as_accurate_as_bn_then_gn(value, batch):
    bcn = make_layer('BCN')
    gen = torch.Generator().manual_seed(1)
    mixed = torch.randn(batch, 8, 5, 5, generator=gen) * 2
    mixed[:, ::3] = value  # some channels constant over the batch and space
    for x in (torch.full((batch, 8, 5, 5), value), mixed):
        exact = float64_oracle(bcn, x.double())
        ours = _max_error(bcn(x), exact)
        theirs = _max_error(_bn_then_gn(bcn, x), exact)
        assert ours <= 2 * theirs + 1e-6, (ours, theirs)


@pytest.mark.parametrize('traced', [False, True])
def test_bcn_gradient_is_exactly_zero_where_output_ignores_input(monkeypatch, traced):
    # N=1, H*W=1: BN maps every channel to its shift, so BCN's output does not depend on x.
    if traced:
        monkeypatch.setattr(core, 'is_tracing', lambda: True)
    bcn = make_layer('BCN')
    x = torch.randn(1, 8, 1, 1, requires_grad=True)
    bcn(x).backward(torch.randn(1, 8, 1, 1))
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize('name', list(LAYERS))
@pytest.mark.parametrize('shape', [(0, 8, 5, 5), (3, 8, 0, 5), (3, 8, 0)],
                         ids=['no samples', 'empty maps', 'empty 1-d maps'])
def test_empty_batch_keeps_parameters_in_the_graph(name, device, shape):
    layer = train_steps(make_layer(name, device=device))
    buffers = {n: b.clone() for n, b in layer.named_buffers()}
    x = torch.randn(shape, device=device, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.sum().backward()
    for n, p in layer.named_parameters():  # as nn.BatchNorm2d / nn.GroupNorm: zero gradients
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), n
    # Nothing to estimate from: running statistics, estimates and the step count stay.
    for n, b in layer.named_buffers():
        assert torch.equal(b, buffers[n]), n


@pytest.mark.parametrize('name', list(LAYERS))
def test_traced_form_equals_eager_training_form(monkeypatch, name):
    """The plain-op form (export, compile) and the fused eager form agree in float64."""
    results = []
    for traced in (False, True):
        monkeypatch.setattr(core, 'is_tracing', lambda traced=traced: traced)
        layer = make_layer(name).double()
        outs = []
        for x, g in zip(batches(2, dtype=torch.float64), batches(2, seed=5, dtype=torch.float64)):
            x = x.requires_grad_()
            y = layer(x)
            y.backward(g)
            outs.append((y.detach(), x.grad))
        grads = [p.grad for p in layer.parameters()]
        results.append((outs, grads, [b.clone() for b in layer.buffers()]))
    torch.testing.assert_close(results[1], results[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('name', list(LAYERS))
def test_layer_on_device_matches_float64float64_oracle(name, device, job):
    layer = make_layer(name, device=device)
    if name.endswith('est'):  # estimates are checked against Algorithm 1 in their own tests
        layer.eval()
    x = batches(1)[0]
    x_dev = x.to(device).requires_grad_()
    y = layer(x_dev)
    assert y.device == x_dev.device
    if name.endswith('est'):
        p = {n: t.detach().double().cpu() for n, t in layer.named_parameters()}
        expected = oracles.bcn(x.double(), 4, p['weight'], p['bias'], p['bn_weight'],
                               p['bn_bias'], bn_stats=(layer.running_mean.double().cpu(),
                                                       layer.running_var.double().cpu()))
    else:
        expected = float64_oracle(layer, x.double())
    assert_close(y.cpu(), expected)
    y.square().sum().backward()
    assert torch.isfinite(x_dev.grad).all()


@pytest.mark.parametrize('cls', [SwitchableNorm, SwitchableNormTied, BatchChannelNorm])
def test_layer_called_twice_before_backward(cls):
    """A shared head applies one layer to several inputs before one backward: each use's
    gradient is its own (independent oracle per use), though buffers change in between."""
    kwargs = dict(num_groups=4) if cls is BatchChannelNorm else {}
    layer = cls(8, **kwargs).double()
    a, b = batches(2, dtype=torch.float64)
    a, b = a.requires_grad_(), b[:, :, :3].requires_grad_()
    (layer(a).sum() + layer(b).square().sum()).backward()
    for x, loss in ((a, lambda y: y.sum()), (b, lambda y: y.square().sum())):
        x_ref = x.detach().clone().requires_grad_()
        loss(float64_oracle(layer, x_ref)).backward()
        assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize('name', list(LAYERS))
def test_meta_device_shapes_and_deferred_initialisation(name):
    # Shape inference on the meta device (no data), and the deferred initialisation of sharded
    # training (build on meta, to_empty(), reset_parameters()): a layer equal to a fresh one.
    with torch.device('meta'):
        layer = LAYERS[name]()
    x = torch.empty(2, 8, 5, 6, device='meta', requires_grad=True)
    out = layer.train()(x)
    out.sum().backward()
    assert out.shape == x.shape and out.device.type == 'meta' and x.grad.shape == x.shape
    assert layer.eval()(x).shape == x.shape
    layer = layer.to_empty(device='cpu')
    with torch.no_grad():
        for t in [*layer.parameters(), *layer.buffers()]:
            t.fill_(7)  # what uninitialised memory may hold
    layer.reset_parameters()
    fresh = LAYERS[name]()
    fresh.reset_parameters()  # (SSN's reset returns the radius to 0, as for a new run)
    for key, value in fresh.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value), key


@pytest.mark.parametrize('shape', [(4, 8, 7), (4, 8, 5, 6), (2, 8, 3, 4, 5)])
def test_exact_where_batch_norm_refuses_eps_0(monkeypatch, shape):
    # torch before 2.13 (2.11 is the GPU machine's) raises on F.batch_norm with eps 0, which the
    # public form's backward (mix='std', the synchronized layers, the authors' IN variance) used
    # as an exact per-row affine map. Its eps is now negligible: exact against the oracle.
    strict_batch_norm = F.batch_norm

    def batch_norm(*args, **kwargs):
        eps = kwargs['eps'] if 'eps' in kwargs else args[7] if len(args) > 7 else 1e-5
        if eps <= 0:
            raise ValueError(f'batch_norm eps must be positive, but got {eps}')
        return strict_batch_norm(*args, **kwargs)

    monkeypatch.setattr(F, 'batch_norm', batch_norm)
    layer = make_layer('SN_std', dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x.requires_grad_()
    grad = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = torch.autograd.grad(float64_oracle(layer, x, differentiable=True), x, grad)[0]
    assert_close(torch.autograd.grad(layer(x), x, grad)[0], expected)


@pytest.mark.parametrize('name', ['SN', 'BCN'])
def test_exported_on_the_meta_device(name):
    # torch.export traces with torch.compiler.is_compiling() true; the meta device has no
    # autocast, and asking whether it is on there raises.
    layer = LAYERS[name]().to('meta')
    program = torch.export.export(layer, (torch.empty(2, CHANNELS, 5, 6, device='meta'), ))
    out = program.module()(torch.empty(2, CHANNELS, 5, 6, device='meta'))
    assert out.shape == (2, CHANNELS, 5, 6) and out.device.type == 'meta'
