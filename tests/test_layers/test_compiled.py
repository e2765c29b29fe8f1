# Copyright (c) mmnorm contributors. All rights reserved.
"""The compiled plain form (the default for eager calls outside the test suite) computes what
the public-op forms compute: outputs, gradients, buffers, in training and eval; it falls back,
with one warning, when compilation fails."""
import copy
import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import mmnorm.functional.moments as core
from tests.helpers.layers import LAYERS, batches, make_layer


@pytest.fixture
def compiled():
    core.use_compiled(True)
    yield
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


def test_compile_failure_falls_back_with_one_warning(compiled, monkeypatch):
    """A machine without a working C++ compiler: one warning, then public eager ops."""
    import torch._inductor.config as inductor_config
    monkeypatch.setattr(core, '_compiled', dict(core._compiled, fn=None, failed=None))
    torch._dynamo.reset()
    layer = make_layer('SN_tied')
    x = batches(1)[0]
    # Inductor's own config.patch (monkeypatching its config module does not restore it).
    with inductor_config.patch({'cpp.cxx': ('/nonexistent/c++', ), 'fx_graph_cache': False}):
        with pytest.warns(UserWarning, match='compiling the normalization layers failed'):
            y = layer(x)
        assert not core.compiled_enabled()
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            layer(x)  # warned once
    torch._dynamo.reset()
    core.use_compiled(False)
    torch.testing.assert_close(y, make_layer('SN_tied')(x))


def test_compiled_form_in_two_process_training(tmp_path):
    """The default (compiled) form in a real 2-process gloo DDP run of tools/dist_train.sh (the
    rest of the suite trains with it off): it trains, and both ranks end with equal weights."""
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
