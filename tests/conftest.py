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
