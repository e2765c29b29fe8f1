# Copyright (c) mmnorm contributors. All rights reserved.
"""``torch.func`` transforms (``grad``, ``vmap``, ``jvp``, ``jacrev``: per-sample gradients,
Jacobians, Hessian-vector products) and forward-mode AD through the layers.

The light form's autograd Functions support neither (a transform needs ``setup_context``,
forward-mode AD a ``jvp``): under them the layers take their plain form, as ``nn.BatchNorm2d``
works there. Each result is compared with what the default eager form (the light form and its
hand-written backward) or the float64 oracle computes without a transform. In train mode a
transform refuses in-place updates of running statistics for every layer, ``nn.BatchNorm2d``
included: there ``track_running_stats=False`` is the route, as PyTorch documents for BN.
"""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, grad, jacrev, jvp, vmap

from mmnorm import BatchChannelNorm, SwitchableNorm, SwitchableNormTied, WSConv2d
from mmnorm.functional import compiled as compiled_form
from mmnorm.functional import row_affine
from mmnorm.testing.layers import LAYERS, batches, float64_oracle, make_layer, train_steps


@pytest.fixture(params=['cpu', 'gpu'])
def structure(request, monkeypatch):
    """The eager form in the CPU's op structure and in a GPU's (run on the CPU)."""
    monkeypatch.setattr(compiled_form.COMPILED, 'mode', 'never')
    if request.param == 'gpu':
        monkeypatch.setattr(row_affine, 'FEW_LAUNCHES_NOT_NEEDED', ())
    return request.param


def _trained_eval(name):
    layer = train_steps(make_layer(name, dtype=torch.float64))
    return layer.eval()


def _input(n=3):
    return batches(1, shape=(n, 8, 3, 4), seed=5, dtype=torch.float64)[0]


@pytest.mark.parametrize('name', list(LAYERS))
def test_eval_jacobian_vmap_and_jvp(name, structure):
    layer = _trained_eval(name)
    x = _input()
    expected = torch.autograd.functional.jacobian(layer, x)  # the default form's backward
    torch.testing.assert_close(jacrev(layer)(x), expected, rtol=1e-10, atol=1e-12)
    # Per sample: the eval statistics do not mix samples, so vmap over them is the batch.
    torch.testing.assert_close(vmap(lambda xi: layer(xi[None])[0])(x), layer(x),
                               rtol=1e-12, atol=1e-12)
    tangent = torch.randn_like(x)
    out, out_tangent = jvp(layer, (x, ), (tangent, ))
    torch.testing.assert_close(out, layer(x), rtol=1e-12, atol=1e-12)
    flat = expected.reshape(x.numel(), x.numel())
    torch.testing.assert_close(out_tangent, (flat @ tangent.reshape(-1)).view_as(x),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('name', ['SN', 'BCN', 'SSN'])
def test_eval_per_sample_parameter_gradients(name, structure):
    # What per-sample-gradient tools (DP-SGD) run: vmap over samples of grad w.r.t. the
    # parameters, against one ordinary backward per sample.
    layer = _trained_eval(name)
    x = _input(4)
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p, xi):
        return functional_call(layer, p, (xi[None], )).sin().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        layer.zero_grad()
        layer(x[i:i + 1]).sin().sum().backward()
        for k, p in layer.named_parameters():
            torch.testing.assert_close(per_sample[k][i], p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('name', ['SN', 'SN_g4', 'BCN'])
def test_train_forward_mode_ad_equals_oracle(name, structure):
    # Forward-mode AD in a training step (running statistics update as usual): the tangent
    # against the float64 oracle's, itself from torch.func.jvp over plain torch ops.
    layer = make_layer(name, dtype=torch.float64)
    x, tangent = _input(), torch.randn(3, 8, 3, 4, dtype=torch.float64)
    with fwAD.dual_level():
        out = fwAD.unpack_dual(layer(fwAD.make_dual(x, tangent)))
    expected = jvp(lambda v: float64_oracle(layer, v), (x, ), (tangent, ))
    torch.testing.assert_close((out.primal, out.tangent), expected, rtol=1e-9, atol=1e-10)
    assert int(layer.num_batches_tracked) == 1


@pytest.mark.parametrize('make', [
    lambda: SwitchableNorm(8, track_running_stats=False),
    lambda: SwitchableNormTied(8, track_running_stats=False),
    lambda: BatchChannelNorm(8, num_groups=4, track_running_stats=False),
], ids=['SN', 'SN_tied', 'BCN'])
def test_train_grad_without_running_stats(make, structure):
    # Batch statistics under torch.func.grad, w.r.t. the input and the parameters: against the
    # default form's backward.
    torch.manual_seed(0)
    layer = make().double().train()
    x = _input()
    params = {k: v.detach() + 0.1 for k, v in layer.named_parameters()}

    def loss(p, v):
        return functional_call(layer, p, (v, )).sin().sum()

    found = grad(loss, argnums=(0, 1))(params, x)
    xg = x.clone().requires_grad_()
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    loss(leaves, xg).backward()
    torch.testing.assert_close(found[1], xg.grad, rtol=1e-10, atol=1e-12)
    for k, v in leaves.items():
        torch.testing.assert_close(found[0][k], v.grad, rtol=1e-10, atol=1e-12)


def test_ws_conv_under_transforms():
    conv = WSConv2d(8, 4, 3, padding=1).double()
    x = _input()
    expected = torch.autograd.functional.jacobian(conv, x)
    torch.testing.assert_close(jacrev(conv)(x), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('reentrant', [False, True])
@pytest.mark.parametrize('name', ['SN', 'BCN_est'])
def test_checkpointed_step_under_forward_mode_ad_updates_buffers_once(name, reentrant):
    # Activation checkpointing runs the forward again inside the backward; inside a dual level
    # too, that second run must leave the running statistics and estimates alone.
    from torch.utils.checkpoint import checkpoint
    layer = make_layer(name, dtype=torch.float64)
    x = _input().requires_grad_()
    with fwAD.dual_level():
        checkpoint(layer, x, use_reentrant=reentrant).sum().backward()
    assert int(layer.num_batches_tracked) == 1
    plain = make_layer(name, dtype=torch.float64)
    plain(_input())
    torch.testing.assert_close(list(layer.buffers()), list(plain.buffers()), rtol=1e-12,
                               atol=1e-12)  # (the plain form there, the light form here)



@pytest.mark.parametrize('train', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('name', list(LAYERS))
def test_batched_gradients_through_the_default_form(name, train, structure):
    """Vectorized Jacobians (``torch.autograd.functional.jacobian(vectorize=True)``,
    ``hessian(vectorize=True)``, ``gradcheck(check_batched_grad=True)``) are not transforms of
    the forward: they run the default form's own backward once under ``vmap``, over a batch of
    output gradients (``is_grads_batched``). Each row equals the backward of that one output
    gradient (what these tests check elsewhere against the float64 oracle)."""
    layer = make_layer(name, dtype=torch.float64) if train else _trained_eval(name)
    x = _input()
    if name not in ('BCN', 'BCN_est'):  # (their GroupNorm's backward, as nn.GroupNorm's, has
        # no batching rule for channels_last gradients)
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    inputs = [x] + [p for p in layer.parameters() if p.requires_grad]
    y = layer(x)
    cotangents = torch.randn((3, ) + y.shape, dtype=y.dtype,
                             generator=torch.Generator().manual_seed(2))
    batched = torch.autograd.grad(y, inputs, cotangents, is_grads_batched=True,
                                  retain_graph=True, allow_unused=True)
    for i, cotangent in enumerate(cotangents):
        single = torch.autograd.grad(y, inputs, cotangent, retain_graph=True, allow_unused=True)
        for rows, one in zip(batched, single):
            assert (rows is None) == (one is None)
            if one is not None:
                torch.testing.assert_close(rows[i], one, rtol=1e-10, atol=1e-12)


def test_vectorized_jacobian_equals_the_oracle():
    """``jacobian(vectorize=True)`` of a layer in train mode (batch statistics) against the
    float64 oracle's Jacobian, both in one call."""
    layer = make_layer('SN', dtype=torch.float64)
    x = _input()
    expected = torch.autograd.functional.jacobian(lambda t: float64_oracle(layer, t), x)
    got = torch.autograd.functional.jacobian(layer, x, vectorize=True)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)
