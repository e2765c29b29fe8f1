# Copyright (c) mmnorm contributors. All rights reserved.
import os
import warnings

import pytest
import torch

# The suite runs the layers' public-op eager forms: compiling every configuration in every test
# process (and in the tools the tests start, which inherit this) would add minutes.
# tests/test_layers/test_compiled.py checks the compiled form, the default outside tests,
# against them.
os.environ.setdefault('MMNORM_COMPILE', '0')

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


@pytest.fixture
def repo_root():
    return ROOT


#: Devices the layer tests run on: the CPU, and every accelerator torch sees (inputs are made on
#: the CPU, then moved, so they are identical across devices).
DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
