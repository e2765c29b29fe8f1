# Copyright (c) mmnorm contributors. All rights reserved.
"""A trained SSN layer (every ratio vector one-hot and fixed), in eval and trained further (a
finetuning run loads it): it takes the one-hot ratios it kept at ``.eval()`` / a load instead
of running SparsestMax and the choice update every forward, and must still compute them
whenever what it kept may not hold."""
import copy
import pickle

import pytest
import torch

from mmnorm import SparseSwitchableNorm
from mmnorm.analysis.launches import count_ops, step_ops
from mmnorm.functional import compiled as compiled_form
from mmnorm.functional import row_affine

EPS = 1e-5


@pytest.fixture(autouse=True)
def eager(monkeypatch):
    monkeypatch.setattr(compiled_form.COMPILED, 'mode', 'never')


def _trained(channels=6, groups=None, mean=(0.6, 0.3, 0.2), var=(0.1, 0.3, 0.9),
             dtype=torch.float64):
    """An SSN layer after training: radius 1, one training forward fixed both choices (each
    group's: the scores' argmax), running statistics moved off 0 / 1."""
    kwargs = {} if groups is None else dict(ratio_groups=groups)
    layer = SparseSwitchableNorm(channels, momentum=0.5, **kwargs).to(dtype)
    with torch.no_grad():
        for scores, values in ((layer.mean_scores, mean), (layer.var_scores, var)):
            scores.copy_(torch.tensor(values, dtype=dtype).expand_as(scores))
            if groups is not None:  # a different order per group
                scores.add_(torch.linspace(0, 1, groups, dtype=dtype).view(-1, 1)
                            * torch.tensor([0.0, 0.0, 2.0], dtype=dtype))
        layer.weight.copy_(torch.linspace(0.5, 1.5, channels))
        layer.bias.copy_(torch.linspace(-0.2, 0.3, channels))
        layer.set_progress(1.0)
        layer.train()(torch.randn(3, channels, 4, 4, dtype=dtype) * 2 + 1)
    assert bool((layer.mean_choice >= 0).all() and (layer.var_choice >= 0).all())
    return layer


def _oracle(layer, x, training=False):
    """One plain normalizer per channel, the fixed choices' statistics, in float64 plain ops
    (BN: the running statistics, or in ``training`` the batch's, biased)."""
    x = x.double()
    n, c = x.shape[:2]
    dims = tuple(range(2, x.dim()))
    ones = [1] * len(dims)
    if training:
        bn = (x.mean((0, ) + dims, keepdim=True), x.var((0, ) + dims, unbiased=False,
                                                        keepdim=True))
    else:
        bn = (layer.running_mean.double().view(1, c, *ones),
              layer.running_var.double().view(1, c, *ones))
    stats = {
        0: (x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)),  # IN
        1: (x.mean((1, ) + dims, keepdim=True).expand(n, c, *ones),                   # LN
            x.var((1, ) + dims, unbiased=False, keepdim=True).expand(n, c, *ones)),
        2: tuple(t.expand(n, c, *ones) for t in bn),
    }
    per_channel = c // layer.mean_choice.numel()
    mean_choice = layer.mean_choice.reshape(-1).repeat_interleave(per_channel)
    var_choice = layer.var_choice.reshape(-1).repeat_interleave(per_channel)
    mean = torch.stack([stats[int(k)][0][:, i] for i, k in enumerate(mean_choice)], 1)
    var = torch.stack([stats[int(k)][1][:, i] for i, k in enumerate(var_choice)], 1)
    shape = (1, c) + (1, ) * len(dims)
    return ((x - mean) / torch.sqrt(var + EPS) * layer.weight.double().view(shape)
            + layer.bias.double().view(shape))


def _eval_ops(layer, x):
    step_ops(layer, x, train=False)
    return sum(step_ops(layer, x, train=False).values())


@pytest.mark.parametrize('groups', [None, 3])
def test_trained_layer_is_one_plain_normalizer_in_few_ops(groups, monkeypatch):
    layer = _trained(groups=groups).eval()
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64) * 3 - 1
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(y, _oracle(layer, x), rtol=1e-10, atol=1e-10)
    # As on CUDA: the layer's own eval forward (SN's is 12, with the softmax)
    monkeypatch.setattr(row_affine, 'FEW_LAUNCHES_NOT_NEEDED', ())
    assert _eval_ops(layer, x) <= 12


def test_a_layer_with_a_free_choice_computes_its_ratios():
    layer = _trained()
    with torch.no_grad():
        layer.var_choice.fill_(-1)  # free again: the radius and scores matter
        layer.radius.fill_(0.3)
    computed = _eval_ops(layer, torch.randn(2, 6, 5, 5, dtype=torch.float64))
    assert computed > 20  # SparsestMax's rounds run
    reference = _trained()
    assert _eval_ops(reference, torch.randn(2, 6, 5, 5, dtype=torch.float64)) < computed - 10


def test_a_choice_changed_in_place_after_eval_is_followed():
    # Freed after .eval() (the version counter sees it): the kept one-hot ratios no longer hold.
    layer = _trained().eval()
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        first = layer(x)
        layer.mean_choice.fill_(-1)
        layer.radius.fill_(0.2)
        changed = layer(x)
    reference = _trained()
    reference.load_state_dict(layer.state_dict())
    reference.train()  # never kept anything: computes them
    with torch.no_grad():
        expected = reference.eval().requires_grad_(False)(x)
    assert reference._fixed_ratios is None  # a free choice: nothing kept
    torch.testing.assert_close(changed, expected, rtol=0, atol=0)
    assert not torch.allclose(changed, first)


def test_a_load_in_eval_mode_takes_the_loaded_choices(monkeypatch):
    layer = _trained().eval()
    other = _trained(mean=(0.1, 0.2, 0.9), var=(0.9, 0.1, 0.2))
    assert int(other.mean_choice) != int(layer.mean_choice)
    layer.load_state_dict(other.state_dict())
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(y, _oracle(other, x), rtol=1e-10, atol=1e-10)
    monkeypatch.setattr(row_affine, 'FEW_LAUNCHES_NOT_NEEDED', ())
    count = sum(step_ops(layer, x, train=False).values())  # (this call of .eval() checks too)
    layer.train(False)
    layer.load_state_dict(other.state_dict())  # without another .eval(): still kept
    with torch.no_grad():
        assert sum(count_ops(lambda: layer(x)).values()) == count <= 12


def test_gradients_in_eval_still_reach_the_scores():
    # norm_eval=True trains with the layer in eval mode: its scores must stay in the graph
    # (zero gradients, as SparsestMax's fixed rows give), or DDP finds parameters without one.
    layer = _trained().eval()
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    for scores in (layer.mean_scores, layer.var_scores):
        assert scores.grad is not None
        assert not scores.grad.any()


def test_another_dtype_after_eval_computes_them_in_it():
    layer = _trained(dtype=torch.float32).eval()
    layer.double()
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, _oracle(layer, x), rtol=1e-10, atol=1e-10)


def test_copies_pickles_and_meta_layers():
    layer = _trained().eval()
    assert layer._fixed_ratios is not None
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone._fixed_ratios is None  # kept for the original's tensors only
        x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(clone(x), layer(x), rtol=0, atol=0)
        clone.eval()
        assert clone._fixed_ratios is not None
    meta = SparseSwitchableNorm(6, device='meta')
    with torch.no_grad():
        meta.mean_choice.fill_(0)
        meta.var_choice.fill_(1)
    meta.eval()  # nothing to read on the meta device: no error, nothing kept
    assert meta._fixed_ratios is None


def test_eval_before_a_load_does_not_read_unloaded_choices():
    # Built on meta, given memory (uninitialized), put in eval before the checkpoint loads: a
    # choice out of range is not fixed (it indexed past the normalizers), and the load that
    # follows is checked.
    trained = _trained(dtype=torch.float32)
    layer = SparseSwitchableNorm(6, momentum=0.5, device='meta').to_empty(device='cpu')
    with torch.no_grad():
        layer.mean_choice.fill_(2 ** 33)
        layer.var_choice.fill_(3)
    layer.eval()
    assert layer._fixed_ratios is None
    layer.load_state_dict(trained.state_dict())
    x = torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), _oracle(trained, x), rtol=1e-5, atol=1e-5)
    assert layer._fixed_ratios is not None


def test_eval_again_after_a_change_checks_again(monkeypatch):
    # Fixed again in place while in eval mode: the next .eval() (already in eval) reads them.
    monkeypatch.setattr(row_affine, 'FEW_LAUNCHES_NOT_NEEDED', ())
    layer = _trained().eval()
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        layer.var_choice.fill_(-1)
    layer.eval()
    assert _eval_ops(layer, x) > 20
    with torch.no_grad():
        layer.var_choice.fill_(1)
    with torch.no_grad():
        assert sum(count_ops(lambda: layer(x)).values()) > 20  # changed since the check
        layer.eval()
        assert sum(count_ops(lambda: layer(x)).values()) <= 12
        torch.testing.assert_close(layer(x), _oracle(layer, x), rtol=1e-10, atol=1e-10)


def _train_step(layer, x, dy):
    """One training step: the output and the gradients of the input and every parameter."""
    x = x.detach().clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    y = layer.train()(x)
    y.backward(dy)
    return y.detach(), {'input': x.grad, **{n: p.grad for n, p in layer.named_parameters()}}


@pytest.mark.parametrize('groups', [None, 3])
def test_finetuning_a_trained_layer_takes_its_one_hot_ratios(groups, monkeypatch):
    # A finetuning run loads the trained checkpoint in training mode: that load's check keeps
    # the one-hot ratios, and training steps neither run SparsestMax nor write the choices.
    layer = _trained(groups=groups)
    computing = copy.deepcopy(layer)  # (a copy keeps nothing: computes them every step)
    layer.load_state_dict(layer.state_dict())
    assert layer.training and layer._fixed_ratios is not None
    gen = torch.Generator().manual_seed(5)
    versions = [t._version for t in (layer.mean_choice, layer.var_choice)]
    for _ in range(2):
        x = torch.randn(3, 6, 4, 5, dtype=torch.float64, generator=gen) * 2 - 1
        dy = torch.randn(3, 6, 4, 5, dtype=torch.float64, generator=gen)
        expected = _oracle(layer, x, training=True)
        y, grads = _train_step(layer, x, dy)
        y_ref, grads_ref = _train_step(computing, x, dy)
        torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        assert grads.keys() == grads_ref.keys()
        for name in grads:
            assert grads[name] is not None, name  # the scores too: zeros (DDP needs one)
            torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-10, atol=1e-12,
                                       msg=name)
        for name in ('mean_scores', 'var_scores'):
            assert not grads[name].any()
        for (name, a), b in zip(layer.named_buffers(), computing.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    assert [t._version for t in (layer.mean_choice, layer.var_choice)] == versions
    # As on CUDA: SN's step (40), not SparsestMax's rounds and the choice update (87)
    monkeypatch.setattr(row_affine, 'FEW_LAUNCHES_NOT_NEEDED', ())
    assert sum(step_ops(layer, x).values()) <= 42
    assert sum(step_ops(computing, x).values()) > 80


def test_a_choice_freed_during_finetuning_is_computed_and_fixed_again():
    layer = _trained()
    layer.load_state_dict(layer.state_dict())
    x = torch.randn(3, 6, 4, 4, dtype=torch.float64)
    stale = _oracle(layer, x, training=True)  # what the kept one-hot ratios give
    with torch.no_grad():
        layer.var_choice.fill_(-1)
        layer.radius.fill_(0.2)  # soft ratios again: the choice stays free
    reference = copy.deepcopy(layer)  # (keeps nothing: computes them)
    y = layer.train()(x)
    torch.testing.assert_close(y, reference.train()(x), rtol=0, atol=0)
    assert (y - stale).abs().max() > 1e-3
    assert int(layer.var_choice) == -1
    with torch.no_grad():
        layer.radius.fill_(1.0)
    layer.train()(x)  # a training step that computes them fixes the choice again
    assert int(layer.var_choice) == int(layer.var_scores.argmax())


def test_finetuning_under_activation_checkpointing_and_batched_ratios():
    from torch import nn
    from torch.utils.checkpoint import checkpoint

    from mmnorm import batched_ratios
    x = torch.randn(3, 6, 4, 4, dtype=torch.float64)
    dy = torch.randn(3, 6, 4, 4, dtype=torch.float64)
    reference = _trained()
    y_ref, grads_ref = _train_step(copy.deepcopy(reference), x, dy)
    for reentrant in (False, True):
        layer = copy.deepcopy(reference)
        layer.load_state_dict(layer.state_dict())
        wrapped = nn.Module()
        wrapped.layer = layer
        wrapped.forward = lambda t: checkpoint(layer, t, use_reentrant=reentrant)
        inp = x.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        out = wrapped(inp)
        out.backward(dy)
        torch.testing.assert_close(out.detach(), y_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(inp.grad, grads_ref['input'], rtol=1e-10, atol=1e-12)
        assert not layer.mean_scores.grad.any() and not layer.var_scores.grad.any()
    # With a layer still training its ratios beside it, under batched_ratios: the trained one
    # is left out of the shared computation and takes its kept ratios.
    model = nn.Sequential(copy.deepcopy(reference), SparseSwitchableNorm(6).double())
    model[1].set_progress(0.3)
    plain = copy.deepcopy(model)
    model.load_state_dict(model.state_dict())
    with batched_ratios(model):
        y, grads = _train_step(model, x, dy)
    y_plain, grads_plain = _train_step(plain, x, dy)
    torch.testing.assert_close(y, y_plain, rtol=1e-12, atol=1e-12)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_plain[name], rtol=1e-10, atol=1e-12,
                                   msg=name)


def test_a_check_under_inference_mode_serves_later_training_steps():
    # Hard-ratio finetuning (scores frozen) validated under torch.inference_mode(): the ratios
    # kept by that validation's .eval() must not be an inference tensor, which the next
    # training step would save for its backward.
    layer = _trained()
    layer.harden_ratios_()
    x = torch.randn(3, 6, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        layer.var_choice.fill_(int(layer.var_choice))  # (changed: the next .eval() checks)
    with torch.inference_mode():
        layer.eval()
        layer(x)
    assert layer._fixed_ratios is not None
    xg = x.clone().requires_grad_()
    y = layer.train()(xg)
    y.square().sum().backward()
    torch.testing.assert_close(y.detach(), _oracle(layer, x, training=True), rtol=1e-10,
                               atol=1e-10)
    assert layer.weight.grad is not None and layer.mean_scores.grad is None  # (frozen)


def test_choices_swapped_in_through_data_after_finetuning_steps_are_checked():
    # mmengine's EMAHook (update_buffers=True) swaps the EMA model's buffers in through .data
    # before the validation loop calls .eval(): no version counter moves. A training step that
    # took the kept ratios leaves the next .eval() to check again, as a step that wrote the
    # choices did.
    layer = _trained()
    layer.load_state_dict(layer.state_dict())
    x = torch.randn(3, 6, 4, 4, dtype=torch.float64)
    layer.train()(x)  # took the kept ratios, wrote nothing
    with torch.no_grad():
        layer.var_choice.data.fill_(-1)  # (the EMA copy's choices: free)
        layer.radius.data.fill_(0.2)
    reference = copy.deepcopy(layer)  # (keeps nothing: computes them)
    with torch.no_grad():
        y = layer.eval()(x)
        torch.testing.assert_close(y, reference.eval()(x), rtol=0, atol=0)
    assert layer._fixed_ratios is None
