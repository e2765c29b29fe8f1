# Copyright (c) mmnorm contributors. All rights reserved.
import os
import warnings

import pytest
import torch

import mmnorm.functional.compiled as compiled_form

# Deterministic, single-threaded-safe defaults for the suite.
torch.manual_seed(0)
warnings.filterwarnings('ignore', message='.*torch.cuda.amp.*', category=FutureWarning)

#: Tolerances by dtype (kornia style): fix the test data before relaxing these.
TOLERANCES = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=1e-4, atol=2e-5),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The fast tier (``pytest -m fast``, ``make test-fast``, under 90 s on 2 cores): the layers and
#: their functional forms against the oracles, the OpenMMLab contract, batch statistics, WS
#: folding and the output rules; no training runs beyond one step, no exports, no compilation.
FAST_FILES = (
    'tests/test_layers/test_switchable_norm.py',
    'tests/test_layers/test_batch_channel_norm.py',
    'tests/test_layers/test_conv_ws.py',
    'tests/test_layers/test_contract.py',
    'tests/test_layers/test_sparse_switchable_norm.py',
    'tests/test_layers/test_precision_and_devices.py',
    'tests/test_openmmlab_contract.py',
    'tests/test_engine/test_batch_stats.py',
    'tests/test_ws_folding.py',
    'tests/test_tool_outputs.py',
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if os.path.relpath(str(item.fspath), ROOT) in FAST_FILES:
            item.add_marker(pytest.mark.fast)


def assert_close(actual, expected, dtype=None, **override):
    tol = dict(TOLERANCES[dtype or actual.dtype])
    tol.update(override)
    torch.testing.assert_close(actual, expected.to(actual.dtype), **tol)


def make_input(shape, dtype=torch.float64, seed=0, scale=2.0, offset=0.5):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset).to(dtype)


# The suite runs the layers in the form users get by default, 'auto' (MMNORM_COMPILE unset; the
# tools the tests start inherit it): a kind of call in public eager ops for its first
# COMPILE_AFTER calls in a process, compiled after. Each test starts from a count of zero, as a
# fresh job does, so every test runs the same form whatever ran before it: a short job's (public
# ops). Tests that take the ``job`` fixture run twice, the second time as a long job meets the
# default (past COMPILE_AFTER: compiled by Inductor); tests/test_layers/test_compiled.py checks
# the choice itself and its failures. The terminal summary counts the tests that ran compiled.
DEFAULT_MODE = compiled_form.COMPILED.mode
#: Graphs compiled in this process since Dynamo's caches were last cleared (an estimate: each
#: test counts its own); cleared before Dynamo's recompile limit (RECOMPILE_LIMIT) is near.
_graphs_since_reset = 0
_tests_compiled = []


@pytest.fixture(autouse=True)
def _default_form():
    global _graphs_since_reset
    if _graphs_since_reset > compiled_form.RECOMPILE_LIMIT // 2:
        torch._dynamo.reset()
        _graphs_since_reset = 0
    compiled_form.COMPILED.reset(mode=DEFAULT_MODE, backend='inductor')
    yield
    _graphs_since_reset += compiled_form.COMPILED.graphs


@pytest.fixture(params=['short job', 'long job'])
def job(request, monkeypatch):
    """The default form as a job of either length meets it: public eager ops (short), or
    compiled once the job has made COMPILE_AFTER calls of a kind (long; the same 'auto' code
    path, its threshold passed). A long job's test fails if the compiled form fell back."""
    long = request.param == 'long job'
    if long and DEFAULT_MODE == 'never':
        pytest.skip('MMNORM_COMPILE=0 turned the compiled form off')
    if long:
        monkeypatch.setattr(compiled_form, 'COMPILE_AFTER', 0)
    yield request.param
    if long:
        # (Calls the compiled form does not serve by design, L = 1 or N = 0, run public ops.)
        assert compiled_form.COMPILED.failed is None, compiled_form.COMPILED.failed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield
    if compiled_form.COMPILED.compiled_calls:
        _tests_compiled.append(item.nodeid)


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(
        f'mmnorm: {len(_tests_compiled)} tests ran the compiled form in this process '
        f'(default mode {DEFAULT_MODE!r}; the tools the tests start are not counted)')


@pytest.fixture
def repo_root():
    return ROOT


#: Devices the layer tests run on: the CPU, and every accelerator torch sees (inputs are made on
#: the CPU, then moved, so they are identical across devices).
DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
