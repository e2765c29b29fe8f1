# Copyright (c) mmnorm contributors. All rights reserved.
"""tools/gpu_check.py, the prepared GPU check, in its CPU short mode (CI also runs all of it:
make gpu-check DEVICE=cpu): sections stop before their budgets, failures are rows with their
error (exit status 1), cases not run for time an incomplete check (exit status 3), the JSON and
Markdown reports; mmnorm's core and mmnorm.testing import without OpenMMLab, pytest or tests/;
the float64 oracles import nothing from mmnorm; tools/benchmark_norms.py's device options; the
distributed helpers' backend choice. The installed wheel's copy through mim is in
tests/test_packaging.py."""
import ast
import contextlib
import json
import os.path as osp
import subprocess
import sys
import time

import pytest
import torch

from mmnorm.testing.distributed import backend_and_devices
from tests.conftest import ROOT


@pytest.fixture(scope='module')
def gpu_check():
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    import gpu_check
    return gpu_check


class _Clock:
    """A clock that the cases advance (each takes 3 s)."""
    now = 0.0

    def perf_counter(self):
        return self.now


def test_sections_stop_before_their_budget(gpu_check, monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(gpu_check, 'time', clock)
    section = gpu_check.Section('s', budget=8)
    ran = []

    def case(i):
        clock.now += 3
        ran.append(i)
        return {}

    for i in section.cases(range(10)):
        section.run(str(i), lambda: case(i))
    # 0 (0 -> 3 s), 1 (3 + 3 <= 8), not 2 (6 + 3 > 8: it would end past the budget)
    assert ran == [0, 1] and section.not_run == [str(i) for i in range(2, 10)]
    assert section.summary()['passed'] == 2


def test_a_failing_case_is_a_row_and_the_check_goes_on(gpu_check):
    section = gpu_check.Section('s', budget=10)
    section.run('bad', lambda: 1 / 0)
    section.run('bound', lambda: dict(err=1.0, ok=False))
    section.run('good', lambda: dict(err=0.0))
    rows = section.summary()['rows']
    assert [r['ok'] for r in rows] == [False, False, True]
    assert 'ZeroDivisionError' in rows[0]['error'] and section.failures == 2


def test_short_mode_writes_json_and_markdown(gpu_check, tmp_path, capsys):
    code = gpu_check.main(['--device', 'cpu', '--sections', 'environment', 'fallbacks',
                           'distributed', '--out', str(tmp_path)])
    assert code == 0, capsys.readouterr().out[-3000:]
    report = json.loads((tmp_path / 'gpu_check.json').read_text())
    assert report['short'] and report['failed'] == 0
    names = [s['name'] for s in report['sections']]
    assert names == ['environment', 'fallbacks', 'distributed']
    fallbacks = report['sections'][1]['rows']
    assert [r['case'] for r in fallbacks] == ['forward compile', 'backward compile', 'first run']
    assert all(r['messages'] == 1 and r['same_as_public'] for r in fallbacks)
    text = (tmp_path / 'gpu_check.md').read_text()
    assert '| fallbacks | 3 | 0 | 0 |' in text and '## distributed' in text


def test_a_failed_case_fails_the_check(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_check.TOLERANCE, torch.float32, (0.0, 0.0))  # nothing can pass
    monkeypatch.setattr(gpu_check, 'SHORT_BUDGETS', dict(gpu_check.SHORT_BUDGETS, parity=0.01))
    code = gpu_check.main(['--device', 'cpu', '--sections', 'parity', '--out', str(tmp_path)])
    report = json.loads((tmp_path / 'gpu_check.json').read_text())
    assert code == 1 and report['failed'] == 1  # one case ran, then the budget stopped it
    assert len(report['sections'][0]['not_run']) == 4  # a failure wins over cases not run
    assert report['exit_status'] == 1


def test_cases_not_run_for_time_fail_the_check(gpu_check, tmp_path, monkeypatch, capsys):
    """Nothing failed, but a budget stopped a section: an incomplete check, exit status 3."""
    def section(s, device, short):
        for case in s.cases(['first', 'second', 'third']):
            s.run(case, lambda: time.sleep(0.05) or {})

    monkeypatch.setitem(gpu_check.SECTIONS, 'amp', section)
    monkeypatch.setattr(gpu_check, 'SHORT_BUDGETS', dict(gpu_check.SHORT_BUDGETS, amp=0.01))
    code = gpu_check.main(['--device', 'cpu', '--sections', 'environment', 'amp',
                           '--out', str(tmp_path)])
    out = capsys.readouterr().out
    report = json.loads((tmp_path / 'gpu_check.json').read_text())
    assert code == gpu_check.EXIT_NOT_RUN == 3, out[-3000:]
    assert report['failed'] == 0 and report['not_run'] == 2 and report['exit_status'] == 3
    assert report['sections'][1]['not_run'] == ['second', 'third']
    assert '2 case(s) were not run' in out.splitlines()[-1]
    text = (tmp_path / 'gpu_check.md').read_text()
    assert 'Verdict: INCOMPLETE' in text and 'Not run (budget): second, third' in text


def test_cuda_without_a_gpu_is_refused(gpu_check):
    if torch.cuda.is_available():
        pytest.skip('this machine has a GPU')
    with pytest.raises(SystemExit):
        gpu_check.main(['--device', 'cuda'])


#: Python that makes the OpenMMLab packages, OpenCV, pytest and the checkout's tests/
#: unimportable, as on the GPU machine (torch, Triton and ONNX Runtime only) or in an installed
#: package.
BLOCK_OPENMMLAB = ('import sys, importlib.abc\n'
                   'class Block(importlib.abc.MetaPathFinder):\n'
                   '    def find_spec(self, name, path, target=None):\n'
                   "        if name.split('.')[0] in ('mmcv', 'mmengine', 'mmdet', 'mmseg',\n"
                   "                                  'mmpretrain', 'mim', 'cv2', 'pytest',\n"
                   "                                  'tests'):\n"
                   "            raise ModuleNotFoundError(name)\n"
                   'sys.meta_path.insert(0, Block())\n')


def _assert_core_runs(code: str) -> None:
    """Run ``code`` (which prints ``core ok`` at its end) in a fresh interpreter."""
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and 'core ok' in result.stdout, result.stderr[-2000:]


def test_the_core_imports_without_openmmlab():
    """What the GPU machine has: torch, no mmcv / mmengine / mmdet / ... (blocked here)."""
    code = (BLOCK_OPENMMLAB +
            'import mmnorm, torch\n'
            'from mmnorm import SwitchableNorm\n'
            'from mmnorm.utils.timing import time_rounds\n'
            'assert not mmnorm.WITH_OPENMMLAB\n'
            'from mmnorm import *  # noqa\n'
            'import mmnorm.testing.compile_failures, mmnorm.testing.distributed\n'
            'import mmnorm.testing.host_sync, mmnorm.testing.layers, mmnorm.testing.oracles\n'
            'SwitchableNorm(4)(torch.randn(2, 4, 3, 3)).sum().backward()\n'
            "print('core ok')\n")
    _assert_core_runs(code)


def test_the_core_imports_and_trains_without_numpy():
    """torch runs without NumPy (it is optional to torch), and so must the core the GPU check
    imports: a flag check that imported NumPy stopped ``import mmnorm`` there."""
    # (as if not installed: ``import numpy`` fails and ``importlib.util.find_spec`` says None)
    code = (BLOCK_OPENMMLAB + "sys.modules['numpy'] = None\n"
            'import mmnorm, torch\n'
            'from mmnorm import BatchChannelNorm, SparseSwitchableNorm, SwitchableNorm\n'
            'for layer in (SwitchableNorm(4, affine=True), SparseSwitchableNorm(4),\n'
            '              BatchChannelNorm(4, num_groups=2, estimate=False)):\n'
            '    layer(torch.randn(2, 4, 3, 3)).sum().backward()\n'
            "assert sys.modules['numpy'] is None\n"
            "print('core ok')\n")
    _assert_core_runs(code)


def test_the_oracles_import_nothing_from_mmnorm():
    """The float64 oracles live in the package but stay independent of what they check."""
    with open(osp.join(ROOT, 'mmnorm', 'testing', 'oracles.py')) as f:
        tree = ast.parse(f.read())
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names]
    imported += [node.module or '.' for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)]
    assert imported and all(name.split('.')[0] in ('typing', 'torch', 'math')
                            for name in imported), imported


def test_gpu_check_runs_with_torch_only(tmp_path):
    """tools/gpu_check.py itself with OpenMMLab, pytest and tests/ unimportable (the compiled
    graphs' reports then go to the standard library's logger, shown)."""
    code = (BLOCK_OPENMMLAB + 'import runpy\n'
            f"sys.argv = ['gpu_check.py', '--device', 'cpu', '--out', {str(tmp_path)!r},\n"
            "            '--sections', 'environment', 'fallbacks', 'recompiles']\n"
            "runpy.run_path('tools/gpu_check.py', run_name='__main__')\n")
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    report = json.loads((tmp_path / 'gpu_check.json').read_text())
    assert report['sections'][0]['rows'][0]['openmmlab'] is False
    assert report['failed'] == 0 and 'mmnorm: compiled' in result.stdout + result.stderr


def test_distributed_backend_by_device(monkeypatch):
    assert backend_and_devices('cpu', 2) == ('gloo', ['cpu', 'cpu'])
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setattr(torch.distributed, 'is_nccl_available', lambda: True)
    # NCCL refuses two ranks on one GPU: gloo, both ranks on it.
    assert backend_and_devices('cuda', 2) == ('gloo', ['cuda:0', 'cuda:0'])
    assert backend_and_devices('cuda', 1) == ('nccl', ['cuda:0'])
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    assert backend_and_devices('cuda', 2) == ('nccl', ['cuda:0', 'cuda:1'])


def test_benchmark_norms_variants_and_ratios_to_bn(capsys):
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    import benchmark_norms
    layers = {k: v for k, v in benchmark_norms.norm_layers(8).items()
              if k in ('BN', 'GN', 'SN')}
    results = benchmark_norms.measure(layers, (2, 8, 6, 6), rounds=2, inner=1,
                                      reference='GN', variant='channels_last')
    assert results['GN']['train_ratio'] == 1.0 and results['BN']['train_ratio_x_bn'] == 1.0
    assert all(r['saved_x_input'] > 0 for r in results.values())
    assert 'peak_x_input' not in results['SN']  # CUDA only
    benchmark_norms.print_table('t', results, 'GN')
    assert 'x BN' in capsys.readouterr().out
    results = benchmark_norms.measure(layers, (2, 8, 6, 6), rounds=1, inner=1,
                                      reference='GN', variant='bf16')
    assert set(results) == {'BN', 'GN', 'SN'}


def test_benchmark_norms_saved_bytes_frees_the_graph():
    """``saved_bytes`` counts what autograd saves without keeping the graph alive: a layer that
    saves its own output (ReLU) held itself through its output's ``grad_fn`` when the pack hook
    returned the tensor as it is, a cycle the garbage collector cannot see."""
    import gc
    import weakref
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    import benchmark_norms
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU())
    outputs = []
    model.register_forward_hook(lambda module, args, out: outputs.append(weakref.ref(out)))
    x = torch.randn(4, 16, requires_grad=True)
    enabled = gc.isenabled()
    gc.disable()  # what the reference count alone frees
    try:
        saved = benchmark_norms.saved_bytes(model, x)
        alive = [ref() is not None for ref in outputs]
    finally:
        if enabled:
            gc.enable()
    # Linear saves its input (64 floats, the input's storage); ReLU its output (64 floats).
    assert saved == 2 * 4 * 16 * 4
    assert alive == [False]


def test_benchmark_norms_batched_ratios_rows():
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    import benchmark_norms
    results = benchmark_norms.measure_batched(3, (2, 8, 4, 4), rounds=2, inner=1)
    assert set(results) == {'SN', 'SSN'}
    for row in results.values():
        assert set(row) == {'train_own_ms', 'train_ratio', 'eval_own_ms', 'eval_ratio'}
        assert all(value > 0 for value in row.values())


def test_parity_copies_nothing_from_host_memory_under_the_sync_check(gpu_check, monkeypatch):
    """On CUDA a copy from host memory is a synchronizing operation: inside ``no_host_sync``
    (``set_sync_debug_mode('error')``) it raises, and every parity case would fail before the
    layer ran. The CPU cannot raise there, so the calls that copy a tensor to a device inside
    the checked blocks are recorded instead (none may come from the check itself)."""
    from torch.overrides import TorchFunctionMode

    copies = []

    class Copies(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.Tensor.to and ('device' in kwargs or any(
                    isinstance(a, (torch.device, str)) for a in args[1:])):
                copies.append(func)
            return func(*args, **kwargs)

    checked = gpu_check.no_host_sync

    @contextlib.contextmanager
    def recorded(device):
        with checked(device), Copies():
            yield

    monkeypatch.setattr(gpu_check, 'no_host_sync', recorded)
    row = gpu_check._parity_case('SN', 'fp32', torch.device('cpu'))
    assert row['public_no_sync'] and row['compiled_no_sync']
    assert copies == []
