# Copyright (c) mmnorm contributors. All rights reserved.
"""A trained SSN layer (every ratio vector one-hot and fixed) in eval: it takes the one-hot
ratios it kept at ``.eval()`` / a load instead of running SparsestMax every forward, and must
still compute them whenever what it kept may not hold."""
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


def _oracle(layer, x):
    """One plain normalizer per channel, the fixed choices' statistics, in float64 plain ops."""
    x = x.double()
    n, c = x.shape[:2]
    dims = tuple(range(2, x.dim()))
    stats = {
        0: (x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)),  # IN
        1: (x.mean((1, ) + dims, keepdim=True).expand(n, c, *[1] * len(dims)),        # LN
            x.var((1, ) + dims, unbiased=False, keepdim=True).expand(n, c, *[1] * len(dims))),
        2: (layer.running_mean.double().view(1, c, *[1] * len(dims)).expand(n, c, *[1] * len(dims)),
            layer.running_var.double().view(1, c, *[1] * len(dims)).expand(n, c, *[1] * len(dims))),
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
