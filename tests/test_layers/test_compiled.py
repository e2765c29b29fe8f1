# Copyright (c) mmnorm contributors. All rights reserved.
"""The compiled plain form computes what the public-op forms compute: outputs, gradients,
buffers, in training and eval. The choice of form (mmnorm.functional.compiled): 'auto' compiles a
kind of call only after COMPILE_AFTER calls; every failure of the compiled form (forward compile,
backward compile, first run, recompile limit; injected through custom torch.compile backends)
falls back to public eager ops with one warning; each new graph is reported once."""
import copy
import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import mmnorm.functional.compiled as core
from tests.helpers.compile_failures import backward_fails, failing_compiler, first_run_fails
from tests.helpers.layers import LAYERS, batches, make_layer, train_step


@pytest.fixture
def compiled():
    core.use_compiled(True)
    yield
    core.use_compiled(False)


@pytest.fixture
def fresh(monkeypatch):
    """A fresh choice of form (no compiled functions, counts, graphs or failures), restored
    afterwards; Dynamo's caches cleared on both sides."""
    saved = copy.copy(core.COMPILED.__dict__)
    torch._dynamo.reset()
    core.COMPILED.reset(mode='always', backend='inductor')
    yield core.COMPILED
    torch._dynamo.reset()
    core.COMPILED.__dict__.update(saved)
    core.use_compiled(False)


def _run(layer, inputs, grads, forward=None):
    """Training steps, then one eval forward; everything a step produces."""
    results = []
    for x, g in zip(inputs, grads):
        x = x.clone().requires_grad_()
        y = (layer if forward is None else forward)(x)
        y.backward(g)
        results.append((y.detach(), x.grad))
    results.append([p.grad.clone() for p in layer.parameters()])
    results.append([b.clone() for b in layer.buffers()])
    layer.eval()
    with torch.no_grad():
        results.append(layer(inputs[0]))
    layer.train()
    return results


@pytest.mark.parametrize('dtype, tol', [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize('name', list(LAYERS))
def test_compiled_form_equals_public_op_form(compiled, name, dtype, tol):
    reference = make_layer(name, dtype=dtype)
    layer = copy.deepcopy(reference)
    inputs = batches(3, shape=(3, 8, 5, 6), dtype=dtype)
    grads = batches(3, shape=(3, 8, 5, 6), seed=4, dtype=dtype)
    ours = _run(layer, inputs, grads)
    core.use_compiled(False)
    expected = _run(reference, inputs, grads)
    torch.testing.assert_close(ours, expected, rtol=tol, atol=tol)


def test_compiled_form_in_half_precision_and_odd_shapes(compiled):
    """bfloat16, a single sample, a 3-d input and channels-last memory, against the public-op
    form (one compile each)."""
    for shape, dtype, fmt in (((4, 8, 6, 6), torch.bfloat16, torch.contiguous_format),
                              ((1, 8, 5, 7), torch.float32, torch.contiguous_format),
                              ((2, 8, 3, 4, 5), torch.float32, torch.contiguous_format),
                              ((2, 8, 5, 6), torch.float32, torch.channels_last)):
        x = batches(1, shape=shape)[0].to(dtype).contiguous(memory_format=fmt)
        layer = make_layer('SN')
        core.use_compiled(True)
        y = layer(x.requires_grad_())
        y.float().square().sum().backward()
        grad = x.grad
        x.grad = None
        core.use_compiled(False)
        y_ref = make_layer('SN')(x)
        y_ref.float().square().sum().backward()
        tol = 1e-2 if dtype == torch.bfloat16 else 2e-5
        tol = dict(rtol=tol, atol=tol)
        assert y.dtype == dtype and y.shape == shape
        torch.testing.assert_close(y, y_ref, **tol)
        torch.testing.assert_close(grad, x.grad, **tol)


def test_compiled_form_under_activation_checkpointing(compiled):
    plain = make_layer('BCN_est')
    checkpointed = copy.deepcopy(plain)
    inputs, grads = batches(2), batches(2, seed=3)
    ours = _run(checkpointed, inputs, grads,
                forward=lambda x: checkpoint(checkpointed, x, use_reentrant=False))
    expected = _run(plain, inputs, grads)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('backend, stage', [(failing_compiler, 'forward compile'),
                                            ('backward', 'backward compile'),
                                            (first_run_fails, 'first run')])
def test_every_compile_failure_falls_back_once_with_the_same_results(fresh, backend, stage):
    """The compiled form fails (injected through the torch.compile backend) at each stage: one
    warning, the training step completes, including the caller's backward() (which would raise
    without the probe for a backward that fails to compile), and equals the public-op form;
    later calls are silent and eager."""
    fresh.backend = backward_fails() if backend == 'backward' else backend
    reference = make_layer('SN')
    layer = copy.deepcopy(reference)
    x, g = batches(1)[0], batches(1, seed=5)[0]
    with pytest.warns(UserWarning, match='compiling the normalization layers failed'):
        ours = train_step(layer, x, g)
    assert not core.compiled_enabled() and 'injected' in fresh.failed, fresh.failed
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        ours_again = train_step(layer, x, g)  # warned once; eager now
    core.use_compiled(False)
    torch.testing.assert_close(ours, train_step(reference, x, g))
    torch.testing.assert_close(ours_again, train_step(reference, x, g))


def test_recompile_limit_falls_back_instead_of_running_silently_uncompiled(fresh, monkeypatch):
    monkeypatch.setattr(core, 'RECOMPILE_LIMIT', 1)
    layer = make_layer('SN_tied')
    x = batches(1)[0]
    with torch.no_grad():
        layer(x)  # graph 1
        assert core.compiled_enabled() and fresh.graphs == 1
        with pytest.warns(UserWarning, match='more than 1 compiled graphs'):
            y = layer(x.double().float()[:, :, :3])  # a new dtype/shape: a second graph
    assert not core.compiled_enabled()
    core.use_compiled(False)
    torch.testing.assert_close(y, make_layer('SN_tied')(x[:, :, :3]))


def test_auto_compiles_a_kind_only_after_enough_calls(fresh, monkeypatch):
    monkeypatch.setattr(core, 'COMPILE_AFTER', 3)
    fresh.mode = 'auto'
    layer = make_layer('SN')
    x = batches(1)[0]
    with torch.no_grad():
        for _ in range(3):
            layer(x)
        assert fresh.graphs == 0  # short jobs stay in public eager ops
        layer(x)
        assert fresh.graphs == 1
    core.use_compiled('never')
    with torch.no_grad():
        layer(x)
    assert fresh.graphs == 1 and core.compile_mode() == 'never'
    with pytest.raises(ValueError, match='expected one of'):
        core.use_compiled('sometimes')


def test_each_new_graph_is_reported_once_with_its_specializations(fresh, monkeypatch):
    messages = []
    monkeypatch.setattr(core, 'report', lambda message, level=None: messages.append(message))
    layer = make_layer('SN').eval()
    with torch.no_grad():
        for shape in ((3, 8, 5, 6), (4, 8, 7, 6), (1, 8, 5, 6), (2, 8, 1, 6)):
            layer(torch.randn(shape))
    assert len(messages) == 3, messages  # (4, 8, 7, 6) reuses the dynamic graph
    assert 'size-1 dims [0]' in messages[1] and 'size-1 dims [2]' in messages[2]
    assert all('inference' in m and ' s (graph ' in m for m in messages)


@pytest.mark.parametrize('mode', ['never', 'always'])
@pytest.mark.parametrize('fmt, shape', [(torch.channels_last, (2, 8, 5, 6)),
                                        (torch.channels_last_3d, (2, 8, 3, 4, 5))])
def test_outputs_and_gradients_keep_the_input_memory_format(fresh, mode, fmt, shape):
    core.use_compiled(mode)
    for name in ('SN', 'BCN'):
        leaf = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
        x = leaf * 1  # a non-leaf: what reaches it is the layer's own gradient (a leaf's .grad
        grads = []    # is restrided by autograd's accumulation)
        x.register_hook(grads.append)
        y = make_layer(name)(x)
        y.backward(torch.randn(shape).contiguous(memory_format=fmt))
        assert grads[0].is_contiguous(memory_format=fmt), (name, mode, grads[0].stride())
        expected = make_layer(name)(x.detach().contiguous())
        torch.testing.assert_close(y, expected, rtol=2e-5, atol=2e-5)


def test_env_modes():
    assert core.CompiledForm('0').mode == 'never' and core.CompiledForm('1').mode == 'always'
    assert core.CompiledForm('').mode == 'auto' and core.CompiledForm('auto').mode == 'auto'
    with pytest.raises(ValueError):
        core.CompiledForm('maybe')


def test_compiled_form_in_two_process_training(tmp_path):
    """The compiled form (from the first call, MMNORM_COMPILE=1) in a real 2-process gloo DDP run
    of tools/dist_train.sh on CPU ranks (the GPUs hidden): it trains, and both ranks end with
    equal weights."""
    import os
    import os.path as osp
    import socket
    import subprocess
    import sys

    from tests.conftest import ROOT
    from tests.helpers.images import make_class_folders
    data = make_class_folders(str(tmp_path / 'data'))
    work = str(tmp_path / 'work')
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, MMNORM_COMPILE='1', PORT=port, PYTHON=sys.executable,
               CUDA_VISIBLE_DEVICES='',
               PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    options = [f'{split}_dataloader.dataset.data_root={data}' for split in ('train', 'val', 'test')]
    result = subprocess.run(
        ['bash', osp.join(ROOT, 'tools', 'dist_train.sh'),
         osp.join(ROOT, 'tests', 'data', 'configs', 'tiny_classifier.py'), '2', '--work-dir', work,
         '--cfg-options', *options], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'mmnorm: compiled' in result.stdout + result.stderr  # the compiled form ran
    states = [torch.load(osp.join(work, f'rank{r}_state.pth'), weights_only=True) for r in (0, 1)]
    for key, value in states[0].items():
        if not key.endswith(('running_mean', 'running_var', 'num_batches_tracked')):
            torch.testing.assert_close(states[1][key], value, rtol=0, atol=0, msg=key)
