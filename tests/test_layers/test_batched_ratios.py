# Copyright (c) mmnorm contributors. All rights reserved.
"""``mmnorm.batched_ratios``: one ratio computation per forward of a model for all its ratio
layers, with the values, gradients and SSN choices of each layer's own computation."""
import copy
from functools import partial

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmnorm import (SparseSwitchableNorm, SwitchableNorm, SwitchableNormTied, batched_ratios,
                    frozen_ratios)
from mmnorm.analysis.launches import count_ops
from mmnorm.functional import row_affine
from mmnorm.functional import sparse_switchable as ssn_functional

from .test_light_form import eager  # noqa: F401 (the fixture: the eager form)


def _ssn(progress, channels=8, **kwargs):
    layer = SparseSwitchableNorm(channels, **kwargs)
    layer.set_progress(progress)
    return layer


def _every_kind():
    """One of each ratio layer (and SSN radii that fix choices along the steps)."""
    return [SwitchableNorm(8), SwitchableNormTied(8), SwitchableNorm(8, using_bn=False),
            SwitchableNorm(8, ratio_groups=4), SwitchableNorm(8, mix='std'),
            _ssn(0.2), _ssn(0.5, ratio_groups=4), _ssn(0.3, using_bn=False), _ssn(0.75),
            _ssn(0.4, mix='std')]


class Net(nn.Module):
    """Layers in a row; ``reentrant`` checkpoints the middle ones (True / False: which kind),
    ``share`` calls the first layer again at the end (a head shared by pyramid levels)."""

    def __init__(self, layers, reentrant=None, share=False):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.reentrant, self.share = reentrant, share

    def _middle(self, x):
        for layer in self.layers[1:]:
            x = layer(x) * 1.25
        return x

    def forward(self, x):
        y = self.layers[0](x)
        y = self._middle(y) if self.reentrant is None else checkpoint(
            self._middle, y, use_reentrant=self.reentrant)
        return y + self.layers[0](y * 0.5) if self.share else y


def _twins(layers, dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    own = Net(layers, **kwargs).to(dtype)
    with torch.no_grad():  # ratio parameters off the centre, different per group
        for name, p in own.named_parameters():
            p.add_(torch.randn(p.shape, dtype=dtype) * 0.4)
    batched = copy.deepcopy(own)
    return own, batched, batched_ratios(batched)


def _step(model, x, dy, autocast=None):
    x = x.clone().requires_grad_()
    if autocast is None:
        out = model(x)
    else:
        with torch.autocast('cpu', dtype=autocast):
            out = model(x)
    out.float().backward(dy)
    grads = [x.grad] + [p.grad for p in model.parameters()]
    with torch.no_grad():  # an SGD step, so that the next step's ratios differ
        for p in model.parameters():
            p.sub_(0.3 * p.grad)
            p.grad = None
    return out, grads


def _assert_twins(own, batched, steps=4, dtype=torch.float64, autocast=None, atol=0.0):
    torch.manual_seed(1)
    for _ in range(steps):
        x = torch.randn(3, 8, 4, 5, dtype=dtype)
        dy = torch.randn(3, 8, 4, 5)
        out_own, grads_own = _step(own, x, dy, autocast)
        out_batched, grads_batched = _step(batched, x, dy, autocast)
        torch.testing.assert_close(out_batched, out_own, rtol=atol, atol=atol)
        for g_own, g_batched in zip(grads_own, grads_batched):
            torch.testing.assert_close(g_batched, g_own, rtol=atol, atol=atol)
    for (name, b_own), b_batched in zip(own.named_buffers(), batched.buffers()):
        # (SSN's choices exactly, running statistics up to the rounding of atol)
        torch.testing.assert_close(b_batched, b_own, rtol=atol, atol=atol, msg=name)


@pytest.mark.usefixtures('eager')
def test_values_gradients_and_choices_are_each_layers_own():
    own, batched, _ = _twins(_every_kind())
    _assert_twins(own, batched)
    fixed = [int(layer.mean_choice) for layer in own.layers
             if isinstance(layer, SparseSwitchableNorm) and layer.mean_choice.dim() == 0]
    assert max(fixed) >= 0  # some choice was fixed along the steps (radius 0.75)
    own.eval(), batched.eval()
    with torch.no_grad():
        x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
        torch.testing.assert_close(batched(x), own(x), rtol=0, atol=0)
    # Nothing is left on the layers between forwards.
    assert all(layer._step_ratios is None for layer in batched.layers)


@pytest.mark.usefixtures('eager')
@pytest.mark.parametrize('reentrant', [True, False])
def test_activation_checkpointing_and_a_layer_called_twice(reentrant):
    # A non-reentrant recomputation must save what its first pass saved (the step ratios); a
    # reentrant first pass runs without gradients and its recomputation computes the ratios.
    own, batched, _ = _twins(_every_kind()[:8], reentrant=reentrant, share=True)
    # (The shared layer's two gradients add up before the ratio computation's backward here,
    # after it there: rounding, which the SGD steps carry on.)
    _assert_twins(own, batched, atol=1e-9)


@pytest.mark.usefixtures('eager')
def test_autocast_and_half_precision_layers():
    own, batched, _ = _twins(_every_kind(), dtype=torch.float32)
    _assert_twins(own, batched, steps=2, dtype=torch.float32, autocast=torch.bfloat16)
    own, batched, _ = _twins(_every_kind(), dtype=torch.bfloat16)  # the plain SparsestMax
    _assert_twins(own, batched, steps=2, dtype=torch.bfloat16)


@pytest.mark.usefixtures('eager')
@pytest.mark.parametrize('kind, train_budget', [('SN', 40), ('SSN', 50), ('SSN-G4', 50)])
def test_launches_per_layer_and_per_forward(kind, train_budget, monkeypatch):
    # Issue 26's budgets as on CUDA: inside a model under batched_ratios, each layer's own ops
    # within the training step's and the eval forward's budgets (an SSN layer's are SN's and
    # its two choice copies), and the shared ratio computation counted once per forward.
    monkeypatch.setattr(row_affine, 'FEW_LAUNCHES_NOT_NEEDED', ())
    make = {'SN': lambda: SwitchableNorm(16), 'SSN': lambda: _ssn(0.3, channels=16),
            'SSN-G4': lambda: _ssn(0.3, channels=16, ratio_groups=4)}[kind]
    x = torch.randn(4, 16, 7, 7)

    def ops(layers, batched, train, make=make):
        model = nn.Sequential(*[make() for _ in range(layers)]).train(train)
        if batched:
            batched_ratios(model)
        xg = x.clone().requires_grad_(train)
        with torch.set_grad_enabled(train):
            model(xg)  # the first step checks the setup (SSN)
            dy = torch.randn_like(x)
            return sum(count_ops((lambda: model(xg).backward(dy)) if train
                                 else (lambda: model(x))).values())

    for train, budget in ((True, train_budget), (False, 12)):
        own = ops(2, False, train) - ops(1, False, train)
        one, two = ops(1, True, train), ops(2, True, train)
        per_layer, shared = two - one, 2 * one - two
        assert per_layer <= min(budget, own), (train, per_layer, own)
        assert 0 < shared and ops(4, True, train) == 4 * per_layer + shared, (train, shared)
        if kind != 'SN':  # SparsestMax left the layer: SN's ops, and two choice copies
            groups = 4 if kind == 'SSN-G4' else 1
            sn = partial(ops, make=lambda: SwitchableNorm(16, ratio_groups=groups))
            assert per_layer <= sn(2, True, train) - sn(1, True, train) + 2 * train, (
                train, per_layer, own)


@pytest.mark.usefixtures('eager')
def test_one_sparsestmax_per_forward(monkeypatch):
    calls = []
    fast = ssn_functional.fast_sparsestmax

    def counting(*args):
        calls.append(args[0].shape[0])
        return fast(*args)
    monkeypatch.setattr(ssn_functional, 'fast_sparsestmax', counting)
    own, batched, _ = _twins([_ssn(0.3), _ssn(0.4, ratio_groups=4), _ssn(0.5)], share=True)
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    own(x)
    assert len(calls) == 4  # each call of each layer
    calls.clear()
    batched(x).sum().backward()
    assert calls == [2 + 8 + 2]  # one for every row of every layer, the shared layer once


@pytest.mark.usefixtures('eager')
def test_gradients_on_inside_a_forward_without_them():
    # The pre-hook ran without gradients: a layer run with them computes its own ratios, so
    # that its ratio parameters get their gradients.
    class Inner(nn.Module):

        def __init__(self):
            super().__init__()
            self.norm = _ssn(0.3)

        def forward(self, x):
            with torch.enable_grad():
                return self.norm(x)
    own, batched = Inner(), Inner()
    batched.load_state_dict(own.state_dict())
    batched_ratios(batched)
    x = torch.randn(2, 8, 3, 3)
    for model in (own, batched):
        with torch.no_grad():
            out = model(x)
        out.sum().backward()
    assert batched.norm.mean_scores.grad is not None
    torch.testing.assert_close(batched.norm.mean_scores.grad, own.norm.mean_scores.grad,
                               rtol=0, atol=0)


@pytest.mark.usefixtures('eager')
def test_errors_remove_and_functional_call():
    model = nn.Sequential(SwitchableNorm(8), _ssn(0.3))
    handle = batched_ratios(model)
    x = torch.randn(2, 8, 3, 3)
    with pytest.raises(ValueError, match='channels'):
        model(torch.randn(2, 5, 3, 3))
    assert model[0]._step_ratios is None and not handle._given  # nothing left by the error
    # functional_call: the pre-hook reads the parameters the call brings.
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-1.5)
    state = {**dict(other.named_parameters()), **dict(other.named_buffers())}
    torch.testing.assert_close(torch.func.functional_call(model, state, (x, )), other(x),
                               rtol=0, atol=0)
    with handle:
        assert len(model._forward_pre_hooks) == 1 and len(model._forward_hooks) == 1
    assert not model._forward_pre_hooks and not model._forward_hooks
    with pytest.raises(TypeError, match='nn.Module'):
        batched_ratios(lambda x: x)


@pytest.mark.usefixtures('eager')
def test_frozen_ratios_serve_inference_forwards_first(monkeypatch):
    monkeypatch.setattr(row_affine, 'FEW_LAUNCHES_NOT_NEEDED', ())
    model = nn.Sequential(_ssn(0.3), _ssn(0.4)).eval()
    batched_ratios(model)
    x = torch.randn(2, 8, 3, 3)
    with frozen_ratios(model), torch.no_grad():
        model(x)
        in_scope = sum(count_ops(lambda: model(x)).values())
    with torch.no_grad():
        batched_only = sum(count_ops(lambda: model(x)).values())
    assert in_scope < batched_only  # no SparsestMax at all in the frozen scope


@pytest.mark.usefixtures('eager')
def test_traced_and_compiled_models_compute_their_own_ratios():
    torch._dynamo.reset()
    model = nn.Sequential(SwitchableNorm(8), _ssn(0.3))
    reference = copy.deepcopy(model)
    batched_ratios(model)
    x = torch.randn(2, 8, 3, 3)
    compiled = torch.compile(model, backend='eager')
    torch.testing.assert_close(compiled(x), reference(x), rtol=1e-6, atol=1e-6)
    model.eval(), reference.eval()
    traced = torch.jit.trace(model, (x, ))
    # The traced graph holds the ratio computation (not constants): other parameters are seen.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.5)
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(traced(x), reference(x), rtol=1e-6, atol=1e-6)
    assert all(layer._step_ratios is None for layer in model)


@pytest.mark.usefixtures('eager')
def test_one_softmax_for_sn_and_sn_tied_and_none_under_the_compiled_form(monkeypatch):
    from mmnorm.layers import base
    softmaxes = []
    model = nn.Sequential(SwitchableNorm(8), SwitchableNormTied(8), SwitchableNorm(8,
                                                                                ratio_groups=2))
    batched_ratios(model)
    x = torch.randn(2, 8, 3, 3)
    ops = count_ops(lambda: model(x))
    softmaxes = [name for name in ops.elements() if 'softmax' in name]
    assert softmaxes == ['aten._softmax.default']
    # With the compiled form on, the layers' graphs compute their ratios: no batch is made,
    # and SSN layers fix their own choices.
    monkeypatch.setattr(base, 'compiled_enabled', lambda: True)
    ssn = nn.Sequential(_ssn(1.0))
    with torch.no_grad():
        ssn[0].mean_scores.copy_(torch.tensor([0.2, 0.5, 0.3]))
    batched_ratios(ssn)
    seen = []
    ssn[0].register_forward_pre_hook(lambda m, args: seen.append(m._step_ratios))
    ssn(x)
    assert seen == [None] and int(ssn[0].mean_choice) >= 0


class _Uses(nn.Module):
    """A model whose forward runs ``body`` (a conv, SN, SSN) as ``how`` says; ``unused`` is a
    ratio branch it never calls."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.body = nn.Sequential(nn.Conv2d(8, 8, 1), SwitchableNorm(8), _ssn(0.6))
        self.unused = nn.Sequential(SwitchableNorm(8), _ssn(0.9))

    def forward(self, x):
        if self.how == 'checkpoint, then without gradients':
            y = checkpoint(self.body, x, use_reentrant=False)
            with torch.no_grad():
                target = self.body(x.flip(0))
            return y - target
        if self.how == 'reentrant checkpoint, then outside':
            y = checkpoint(self.body, x.detach().requires_grad_(), use_reentrant=True)
            return y + self.body(y)
        if self.how == 'a submodule reparametrized':  # MAML-style fast weights
            fast = {name: p * 1.5 for name, p in self.body.named_parameters()}
            return torch.func.functional_call(self.body, fast, (x, ))
        if self.how == 'progress set in the forward':
            self.body[2].set_progress(0.95)
            return self.body(x)
        return self.body(x)


@pytest.mark.usefixtures('eager')
@pytest.mark.parametrize('how', ['checkpoint, then without gradients',
                                 'reentrant checkpoint, then outside',
                                 'a submodule reparametrized', 'progress set in the forward'])
def test_what_changes_inside_a_forward_is_seen(how):
    # A layer whose ratio inputs changed after the pre-hook read them, or whose forward
    # activation checkpointing records or recomputes, computes its own ratios; a branch the
    # forward never calls is left alone (no gradients, no weight decay, choices unchanged).
    torch.manual_seed(0)
    own = _Uses(how).double()
    with torch.no_grad():
        for p in own.parameters():
            p.add_(torch.randn(p.shape, dtype=p.dtype) * 0.4)
    batched = copy.deepcopy(own)
    batched_ratios(batched)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9, weight_decay=0.1)
                  for m in (own, batched)]
    for step in range(3):
        x = torch.randn(3, 8, 4, 4, dtype=torch.float64)
        outs = []
        for model, optimizer in zip((own, batched), optimizers):
            optimizer.zero_grad()
            outs.append(model(x))
            outs[-1].square().mean().backward()
            optimizer.step()
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
    for (name, a), b in zip(own.state_dict().items(), batched.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=name)
    for (name, a), b in zip(own.named_parameters(), batched.parameters()):
        assert (a.grad is None) == (b.grad is None), name
    assert int(batched.unused[1].mean_choice) == -1


@pytest.mark.usefixtures('eager')
def test_layers_after_an_interrupted_forward_and_frozen_layers():
    # KeyboardInterrupt skips always_call hooks: a layer called on its own afterwards must not
    # take the interrupted forward's ratios once its parameters changed, and the model's next
    # forward leaves nothing behind.
    class Interrupted(nn.Module):

        def __init__(self):
            super().__init__()
            self.norm, self.stem = SwitchableNorm(8), SwitchableNorm(8)

        def forward(self, x):
            self.norm(x)
            raise KeyboardInterrupt
    model = Interrupted()
    handle = batched_ratios(model)
    x = torch.randn(2, 8, 3, 3)
    with pytest.raises(KeyboardInterrupt):
        model(x)
    assert model.norm._step_ratios is not None
    with torch.no_grad():
        model.norm.mean_logits.add_(torch.tensor([2.0, -1.0, 0.0]))
    reference = copy.deepcopy(model.norm)
    reference._step_ratios = None
    torch.testing.assert_close(model.norm(x), reference(x), rtol=0, atol=0)
    model.forward = lambda x: model.norm(x)
    model(x)
    assert model.norm._step_ratios is None and model.stem._step_ratios is None
    assert not handle._given
    # Layers whose ratio parameters are frozen (frozen stages) get ratios without a graph.
    frozen = nn.Sequential(SwitchableNorm(8), nn.Conv2d(8, 8, 1), SwitchableNorm(8))
    frozen[0].requires_grad_(False)
    outputs = []
    frozen[0].register_forward_hook(lambda m, args, out: outputs.append(out))
    batched_ratios(frozen)
    frozen(x).sum().backward()
    assert not outputs[0].requires_grad and frozen[2].mean_logits.grad is not None


@pytest.mark.usefixtures('eager')
def test_a_gradient_penalty_differentiates_the_ratios_twice():
    # create_graph=True (a penalty on the parameters' gradients): the shared computation's
    # backward builds a graph from each used layer's own ratio function, so the ratio
    # functions' second derivatives reach the parameters.
    own, batched, _ = _twins([SwitchableNorm(8), _ssn(0.3), SwitchableNorm(8, ratio_groups=2)])
    x = torch.randn(3, 8, 4, 5, dtype=torch.float64)
    for model in (own, batched):
        params = list(model.parameters())
        grads = torch.autograd.grad(model(x).sin().sum(), params, create_graph=True)
        sum(g.square().sum() for g in grads).backward()
    for (name, a), b in zip(own.named_parameters(), batched.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12, msg=name)
    assert batched.layers[0].mean_logits.grad.abs().sum() > 0


@pytest.mark.usefixtures('eager')
def test_gradients_of_a_shared_layer_under_create_graph():
    # A layer called twice per forward: a backward that builds a graph gives the gradients of
    # a plain one, batched or not.
    own, batched, _ = _twins([SwitchableNorm(8), _ssn(0.3)], share=True)
    x = torch.randn(3, 8, 4, 5, dtype=torch.float64)
    for model in (own, batched):
        params = list(model.parameters())
        plain = torch.autograd.grad(model(x).sin().sum(), params)
        built = torch.autograd.grad(model(x).sin().sum(), params, create_graph=True)
        for a, b in zip(plain, built):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.usefixtures('eager')
def test_changes_between_forward_and_backward_and_inference_tensors():
    # A momentum encoder updates ratio parameters in place after its forward, before the
    # backward (as the layers' own computation allows); SSN's radius may be set there too.
    own, batched, _ = _twins([SwitchableNorm(8), _ssn(0.3)])
    x = torch.randn(3, 8, 4, 5, dtype=torch.float64)
    for model in (own, batched):
        loss = model(x).sin().sum()
        with torch.no_grad():
            model.layers[0].mean_logits.mul_(0.9)
            model.layers[1].set_progress(0.5)
        loss.backward()
    for (name, a), b in zip(own.named_parameters(), batched.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=name)
    # Parameters that are inference tensors (a model built under inference_mode) have no
    # version counter: their layers compute their own ratios, in and out of frozen_ratios.
    with torch.inference_mode():
        model = nn.Sequential(SwitchableNorm(8), _ssn(0.3)).eval()
        reference = copy.deepcopy(model)
    batched_ratios(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x.float()), reference(x.float()), rtol=0, atol=0)
        with frozen_ratios(model):
            torch.testing.assert_close(model(x.float()), reference(x.float()), rtol=0, atol=0)


@pytest.mark.usefixtures('eager')
def test_parameters_unfrozen_inside_the_forward_get_gradients():
    class Unfreezing(nn.Module):

        def __init__(self):
            super().__init__()
            self.norm = SwitchableNorm(8)
            self.norm.requires_grad_(False)

        def forward(self, x):
            self.norm.requires_grad_(True)  # after the pre-hook computed ratios without a graph
            return self.norm(x)
    model = Unfreezing()
    batched_ratios(model)
    model(torch.randn(2, 8, 3, 3)).sin().sum().backward()
    assert model.norm.mean_logits.grad is not None
