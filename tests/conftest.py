# Copyright (c) mmnorm contributors. All rights reserved.
import logging
import math
import os
import warnings

import pytest
import torch

import mmnorm.functional.compiled as compiled_form
import mmnorm.layers.base as layer_base

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
    'tests/test_layers/test_sparsestmax_kernel.py',
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


# The suite runs the layers in the form users get by default, 'never' (MMNORM_COMPILE unset; the
# tools the tests start inherit it): the eager forms. Each test starts from a fresh state (no
# compiled graphs counted, no failure, 'auto''s switch off), so every test runs the same form
# whatever ran before it. Tests that take the ``job`` fixture run twice, the second time with the
# compiled form opted in (use_compiled('always'): compiled by Inductor), and fail unless it ran;
# tests/test_layers/test_compiled.py checks the choice itself and its failures. The terminal
# summary counts the tests that ran compiled.
DEFAULT_MODE = compiled_form.COMPILED.mode
# Dynamo's caches outlive a test (mmnorm's count of graphs does not), so a Dynamo limit of 8
# graphs per computation would be reached across tests (mmnorm raises it to RECOMPILE_LIMIT
# itself at the first graph it compiles in a process; this does it before any test).
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                           compiled_form.RECOMPILE_LIMIT)
#: Graphs compiled in this process since Dynamo's caches were last cleared (an estimate: each
#: test counts its own); cleared before Dynamo's recompile limit (RECOMPILE_LIMIT) is near.
_graphs_since_reset = 0
_tests_compiled = []


def _manager_classes(cls):
    yield cls
    for sub in cls.__subclasses__():
        yield from _manager_classes(sub)


@pytest.fixture(autouse=True)
def _no_visualizer_of_an_earlier_test():
    """mmengine keeps each Visualizer by name, and a Runner names it by the second it was built:
    a Runner built in the same second as an earlier test's reused that test's visualizer, whose
    directory (a passing test's tmp_path) is gone by then (setup.cfg). Each test starts without
    them, as each run does."""
    yield
    try:
        from mmengine.visualization import Visualizer
    except ImportError:
        return
    for cls in _manager_classes(Visualizer):
        cls._instance_dict.clear()


@pytest.fixture(autouse=True)
def _default_form():
    global _graphs_since_reset
    if _graphs_since_reset > compiled_form.RECOMPILE_LIMIT // 2:
        torch._dynamo.reset()
        _graphs_since_reset = 0
    compiled_form.COMPILED.reset(mode=DEFAULT_MODE, backend='inductor')
    # Each test is a run of its own: the layers' once-per-run warnings may be logged again.
    layer_base._LOGGED.clear()
    yield
    _graphs_since_reset += compiled_form.COMPILED.graphs


def _served(module, args) -> bool:
    """Whether a call of an mmnorm normalization layer is one the compiled form serves: this
    process's batch (not a synchronized layer), a device it compiles for, at least one value,
    more than one value per row (mmnorm.functional.moments._compiles, restated)."""
    from mmnorm.functional.moments import COMPILED_DEVICES
    from mmnorm.layers.base import BatchStatsNorm, SyncNorm
    if not isinstance(module, BatchStatsNorm) or isinstance(module, SyncNorm) or not args:
        return False
    x = args[0]
    return (isinstance(x, torch.Tensor) and x.device.type in COMPILED_DEVICES and x.dim() > 2
            and x.numel() > 0 and math.prod(x.shape[2:]) > 1)


@pytest.fixture(params=['short job', 'long job'])
def job(request):
    """The layers in both forms a job can run: the eager forms (a short job: the default), and
    the compiled form, opted in (a long job: use_compiled('always'), compiled by Inductor). A
    long job's test fails if the compiled form fell back, or if none of its calls ran compiled
    while some were calls the compiled form serves (L = 1 and N = 0 run the eager forms by
    design)."""
    long = request.param == 'long job'
    if long and os.environ.get('MMNORM_COMPILE', '').strip() and DEFAULT_MODE == 'never':
        pytest.skip('MMNORM_COMPILE=0 turned the compiled form off')
    if not long:
        yield request.param
        return
    served = []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: served.append(True) if _served(module, args) else None)
    compiled_form.use_compiled('always')
    try:
        yield request.param
    finally:
        handle.remove()
        compiled_form.use_compiled(DEFAULT_MODE)
    state = compiled_form.COMPILED
    assert state.failed is None, state.failed
    if served:
        assert state.compiled_calls > 0, (
            f'{len(served)} layer calls the compiled form serves, none ran compiled')


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield
    if compiled_form.COMPILED.compiled_calls:
        _tests_compiled.append(item.nodeid)


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(
        f'mmnorm: {len(_tests_compiled)} tests ran the compiled form in this process '
        f'(default mode {DEFAULT_MODE!r}; the tools the tests start are not counted)')


def logged(records, text: str) -> list:
    """The messages among ``records`` (the ``mmnorm_log`` fixture's) that contain ``text``."""
    return [r.getMessage() for r in records if text in r.getMessage()]


@pytest.fixture
def mmnorm_log():
    """The messages mmnorm reports during the test (mmnorm.functional.compiled.report): the
    records reaching mmengine's current logger and the standard library's ``mmnorm`` logger."""
    records = []

    class Handler(logging.Handler):

        def emit(self, record):
            records.append(record)

    handler = Handler(logging.DEBUG)
    loggers = [logging.getLogger('mmnorm')]
    try:
        from mmengine.logging import MMLogger
    except ImportError:
        pass
    else:
        loggers.append(MMLogger.get_current_instance())
    for logger in loggers:
        logger.addHandler(handler)
    yield records
    for logger in loggers:
        logger.removeHandler(handler)


@pytest.fixture
def repo_root():
    return ROOT


#: Devices the layer tests run on: the CPU, and every accelerator torch sees (inputs are made on
#: the CPU, then moved, so they are identical across devices).
DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
