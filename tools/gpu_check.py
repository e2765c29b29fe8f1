# Copyright (c) mmnorm contributors. All rights reserved.
"""The prepared check of mmnorm on a GPU, in one run: what the CPU test suite cannot show.

Needs torch only (Triton comes with CUDA torch; no OpenMMLab package, no pytest, no network):
mmnorm's core (functional forms and layers) and what it shares with the test suite
(``mmnorm.testing``: the float64 oracles, the layer configurations, the failing compile backends,
the host-sync checker, the multi-process runner), nothing from ``tests/``. From a checkout it
imports the working tree's mmnorm; installed (a wheel carries this tool in ``mmnorm/.mim/tools``),
it runs as ``mim run mmnorm gpu_check``. Sections, each stopped before its time budget (the
cases it had no time for are listed as not run):

- ``environment``: torch, CUDA, Triton, the GPU; mmnorm imported without OpenMMLab; a compiler
  warm-up (one small ``torch.compile``: Inductor's one-time start on a cold cache is paid here,
  not in the next section's budget).
- ``parity``: every layer configuration in fp32, fp16, bf16, channels_last, N=1 and a 3-d input:
  the compiled form and the public-op form against a float64 CPU oracle (output, input and
  parameter gradients), and against each other; a warm training step and eval under
  ``torch.cuda.set_sync_debug_mode('error')`` (no host-device sync; on the CPU every host read
  of a tensor raises, ``mmnorm.testing.host_sync``); gradients in the input's
  memory format.
- ``amp``: training steps of a small ConvNet with SN, SSN and BCN+WS in fp16 autocast with a
  ``GradScaler``, and in bf16 autocast: finite losses that fall, steps not all skipped.
- ``batched``: the SN and SSN ConvNets under ``mmnorm.batched_ratios`` (one ratio computation
  per forward for all layers) against the same nets computing their own, in fp32 and fp16
  autocast: outputs, gradients and SSN's fixed choices after SGD steps.
- ``kernels``: Sparse SN's one-kernel SparsestMax and choice update (Triton) against its
  public-op form on many rows (float32 and float64: values, a vector-Jacobian product, the
  fixed choices), that it ran and did not fall back, and the ops of an SSN layer's training
  step and eval forward on the device (issue 26's budget: 50 / 12; on the CPU the kernel runs
  through Triton's interpreter).
- ``fallbacks``: compile failures injected through ``torch.compile`` backends (forward compile,
  backward compile, first run): one warning, the step completes, the public-op result.
- ``distributed``: the synchronized layers in a one-process NCCL group (gloo on the CPU), and
  two gloo ranks sharing the one GPU, against the local layer on the whole batch.
- ``recompiles``: multi-scale training and eval shapes (random N, H, W, some of size 1): graphs
  compiled, cold and warm time, no fallback.
- ``benchmark``: ``tools/benchmark_norms.py``'s layer table on the device (fp32, fp16, bf16,
  channels_last), ratios to GroupNorm and BatchNorm2d.

It writes ``gpu_check.json`` and ``gpu_check.md`` to ``--out`` (default ``work_dirs/gpu_check``
in the current directory). Exit status: 0 when every case ran and passed; 1 when a case failed;
3 when none failed but some were not run (a section's budget was reached: the check is
incomplete); 2 for bad arguments.

    python tools/gpu_check.py                    # CUDA, all sections (at most ~9 min on one GPU)
    python tools/gpu_check.py --device cpu       # the short mode (CI: make gpu-check DEVICE=cpu)
    python tools/gpu_check.py --sections parity fallbacks --out work_dirs/gpu_check
    mim run mmnorm gpu_check --device cpu        # the installed package's copy, from anywhere
"""
import argparse
import contextlib
import copy
import logging
import os
import platform
import random
import sys
import time
import traceback
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional

#: This tool's folder: ``tools/`` of a checkout, or ``mmnorm/.mim/tools`` of an installed package
#: (``tools/benchmark_norms.py`` lies next to it in both).
TOOLS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TOOLS)
if (os.path.isfile(os.path.join(ROOT, 'mmnorm', '__init__.py'))
        and ROOT not in sys.path):  # a checkout: the working tree's mmnorm
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import mmnorm  # noqa: E402
import mmnorm.functional.compiled as compiled_form  # noqa: E402
from mmnorm import SwitchableNorm, WSConv2d, convert_sync_norm  # noqa: E402
from mmnorm.testing import oracles  # noqa: E402
from mmnorm.testing.compile_failures import FAILURES  # noqa: E402
from mmnorm.testing.distributed import (backend_and_devices, rank_device,  # noqa: E402
                                        run_distributed)
from mmnorm.testing.host_sync import no_host_sync  # noqa: E402
from mmnorm.utils.files import atomic_write, check_writable, write_json  # noqa: E402
from mmnorm.testing.layers import (LAYERS, CHANNELS, batches, float64_oracle,  # noqa: E402
                                   make_layer, train_step)

#: Exit status: every case ran and passed; a case failed; none failed but some were not run.
EXIT_PASSED, EXIT_FAILED, EXIT_NOT_RUN = 0, 1, 3

#: Section -> time budget in seconds: full mode on a GPU (at most 9 minutes in all), and the short
#: mode (CPU, CI: fewer cases, which compile with Inductor's C++ backend on a cold cache).
BUDGETS = {'environment': 30, 'parity': 150, 'amp': 60, 'batched': 30, 'kernels': 30,
           'fallbacks': 45,
           'distributed': 60, 'recompiles': 75, 'benchmark': 60}
SHORT_BUDGETS = {'environment': 60, 'parity': 90, 'amp': 45, 'batched': 20, 'kernels': 30,
                 'fallbacks': 30,
                 'distributed': 30, 'recompiles': 60, 'benchmark': 60}
#: Input variants of the parity section: (dtype, memory format, shape).
VARIANTS = {
    'fp32': (torch.float32, torch.contiguous_format, (4, CHANNELS, 6, 7)),
    'fp16': (torch.float16, torch.contiguous_format, (4, CHANNELS, 6, 7)),
    'bf16': (torch.bfloat16, torch.contiguous_format, (4, CHANNELS, 6, 7)),
    'channels_last': (torch.float32, torch.channels_last, (4, CHANNELS, 6, 7)),
    'N=1': (torch.float32, torch.contiguous_format, (1, CHANNELS, 6, 7)),
    '3-d': (torch.float32, torch.contiguous_format, (3, CHANNELS, 4, 5, 3)),
}
#: Relative error bounds against the float64 oracle (output, gradients), by dtype.
TOLERANCE = {torch.float32: (1e-4, 1e-3), torch.float16: (1e-2, 5e-2),
             torch.bfloat16: (5e-2, 2e-1)}


class Section:
    """One section's rows, status and clock; :meth:`cases` stops before the budget: a case
    starts only if the longest case so far would still end within it (the first always runs, so
    a section of one slow case can overrun)."""

    def __init__(self, name: str, budget: float):
        self.name, self.budget = name, budget
        self.start = time.perf_counter()
        self.rows: List[Dict[str, Any]] = []
        self.not_run: List[str] = []
        self.failures = 0
        self.note = ''

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def cases(self, cases: Iterable, label: Callable[[Any], str] = str):
        """The cases, while the longest one so far would still end within the budget."""
        cases, longest = list(cases), 0.0
        for i, case in enumerate(cases):
            if self.elapsed() + longest > self.budget:
                self.not_run = [label(c) for c in cases[i:]]
                print(f'  [{self.name}] budget of {self.budget:.0f} s reached: '
                      f'{len(self.not_run)} case(s) not run', flush=True)
                return
            begin = time.perf_counter()
            yield case
            longest = max(longest, time.perf_counter() - begin)

    def run(self, case: str, fn: Callable[[], Dict[str, Any]]) -> None:
        """One case: its row, or a failed row with the error; progress on stdout."""
        begin = time.perf_counter()
        try:
            row = dict(case=case, **fn())
            row.setdefault('ok', True)
        except Exception as error:  # a case's failure is a row, not the end of the check
            row = self._failed_row(case, error)
        row['seconds'] = round(time.perf_counter() - begin, 2)
        self.failures += not row['ok']
        self.rows.append(row)
        print(f'  [{self.name}] {"ok  " if row["ok"] else "FAIL"} {case} ({row["seconds"]} s)'
              + ('' if row['ok'] else f': {row.get("error", "a check above its bound")}'),
              flush=True)

    @staticmethod
    def _failed_row(case: str, error: BaseException) -> Dict[str, Any]:
        return dict(case=case, ok=False, error=f'{type(error).__name__}: {error}'[:300],
                    trace=traceback.format_exc(limit=-3))

    def fail(self, case: str, error: BaseException) -> None:
        """A failure outside :meth:`run` (the section itself), as a failed row."""
        self.rows.append(dict(self._failed_row(case, error), seconds=0.0))
        self.failures += 1
        print(f'  [{self.name}] FAIL {case}: {self.rows[-1]["error"]}', flush=True)

    def summary(self) -> Dict[str, Any]:
        return dict(name=self.name, budget_s=self.budget, seconds=round(self.elapsed(), 1),
                    passed=sum(r['ok'] for r in self.rows), failed=self.failures,
                    not_run=self.not_run, note=self.note, rows=self.rows)


@contextlib.contextmanager
def form(mode: str, backend: Any = 'inductor'):
    """mmnorm's layers in the given form ('always' compiled, 'never' public ops), fresh."""
    compiled_form.COMPILED.reset(mode=mode, backend=backend)
    try:
        yield compiled_form.COMPILED
    finally:
        compiled_form.COMPILED.reset(mode='never', backend='inductor')


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double().cpu()
    scale = float(expected.abs().max().clamp_min(1e-12))
    return float((actual.double().cpu() - expected).abs().max()) / scale


# ---------------------------------------------------------------------------------- sections


def environment(section: Section, device: torch.device, short: bool) -> None:
    def facts():
        row = dict(torch=torch.__version__, python=platform.python_version(),
                   device=str(device), mmnorm=mmnorm.__version__,
                   mmnorm_from=os.path.dirname(os.path.abspath(mmnorm.__file__)),
                   openmmlab=mmnorm.WITH_OPENMMLAB, compile_mode=compiled_form.compile_mode(),
                   cuda=torch.version.cuda)
        if device.type == 'cuda':
            row.update(gpu=torch.cuda.get_device_name(device),
                       capability='.'.join(map(str, torch.cuda.get_device_capability(device))))
        try:
            import triton
            row['triton'] = triton.__version__
        except ImportError:
            row['triton'] = None
        try:
            import onnxruntime
            row['onnxruntime'] = onnxruntime.__version__
        except ImportError:
            row['onnxruntime'] = None
        return row

    def compiler():
        # Inductor's first compile in a process on a cold cache builds its toolchain's headers
        # (about 25 s of C++ on the CPU, then 7 s per layer graph; Triton on a GPU): paid here,
        # once, so that the sections' budgets measure their cases, not the cache.
        x = torch.randn(8, device=device, requires_grad=True)
        torch.compile(lambda t: (t.sin() * 2).sum(), backend='inductor')(x).backward()
        if not torch.allclose(x.grad, 2 * x.detach().cos()):
            raise RuntimeError('a compiled sin(x) * 2 gave the wrong gradient')
        return dict(backend='inductor')

    section.run('versions', facts)
    section.run('compiler warm-up', compiler)


def _oracle_step(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, name: str):
    """Float64 CPU oracle of one training step of ``layer`` (a CPU copy): output, input and
    parameter gradients."""
    reference = copy.deepcopy(layer).cpu().double()
    x64 = x.detach().cpu().double().requires_grad_()
    if name.endswith('est'):  # BCN Algorithm 1: estimates moved first, then normalized with
        p = dict(reference.named_parameters())
        moved = oracles.algorithm1_step(x64.detach(), reference.running_mean,
                                        reference.running_var, float(layer.estimate_rate))
        y = oracles.bcn(x64, reference.num_groups, p['weight'], p['bias'], p['bn_weight'],
                        p['bn_bias'], bn_stats=moved, eps=reference.eps)
    else:
        y = float64_oracle(reference, x64, differentiable=True)
    y.backward(grad.detach().cpu().double())
    # SparsestMax's oracle finds its threshold by bisection, outside autograd: no gradient for
    # SSN's scores (None; they are compared between the two forms, and gradchecked in the tests).
    no_oracle = set(layer.ratio_params) if name.startswith('SSN') else set()
    return y.detach(), x64.grad, [None if n in no_oracle else p.grad
                                  for n, p in reference.named_parameters()]


def parity(section: Section, device: torch.device, short: bool) -> None:
    if short:  # each variant once, each kind of layer once
        cases = [('SN', 'fp32'), ('BCN_est', 'bf16'), ('SSN', 'channels_last'), ('BCN', 'N=1'),
                 ('SN_tied', '3-d')]
    else:
        cases = [(name, variant) for variant in VARIANTS for name in LAYERS]
    for name, variant in section.cases(cases, lambda c: f'{c[0]} {c[1]}'):
        section.run(f'{name} {variant}', lambda: _parity_case(name, variant, device))


def _parity_case(name: str, variant: str, device: torch.device) -> Dict[str, Any]:
    dtype, memory_format, shape = VARIANTS[variant]
    x = batches(1, shape=shape)[0].to(dtype)  # rounded once: the oracle sees the same values
    grad = batches(1, shape=shape, seed=7)[0].to(dtype)
    fresh = make_layer(name)  # float32 parameters: a half input is autocast's case
    expected = _oracle_step(fresh, x, grad, name)
    out_tol, grad_tol = TOLERANCE[dtype]
    row: Dict[str, Any] = {}
    results = {}
    for mode in ('never', 'always'):
        with form(mode) as state:
            layer = copy.deepcopy(fresh).to(device)
            xd = x.to(device).contiguous(memory_format=memory_format)
            # (copied here: a copy from host memory inside no_host_sync is a CUDA sync itself)
            gd = grad.to(device)
            y, x_grad, p_grads = train_step(layer, xd, gd)
            key = 'compiled' if mode == 'always' else 'public'
            if mode == 'always':
                row['compiled_calls'] = state.compiled_calls
            row[f'{key}_out_err'] = _relative(y, expected[0])
            row[f'{key}_grad_err'] = max([_relative(x_grad, expected[1])] +
                                         [_relative(g, e) for g, e in zip(p_grads, expected[2])
                                          if e is not None])
            row[f'{key}_grad_format_kept'] = (memory_format == torch.contiguous_format
                                              or x_grad.is_contiguous(memory_format=memory_format))
            # A warm step and eval with every host-device sync an error (CUDA). Entering eval
            # after training reads SSN's choices once, by design (are they all fixed?); a
            # second .eval() with nothing changed reads nothing, and no forward does.
            with no_host_sync(device):
                train_step(layer, xd, gd)
            layer.eval()
            with no_host_sync(device):
                layer.eval()
                with torch.no_grad():
                    layer(xd)
            row[f'{key}_no_sync'] = True
            results[key] = [y, x_grad, *p_grads]
    row['compiled_vs_public'] = max(_relative(a, b)
                                    for a, b in zip(results['compiled'], results['public']))
    # A parity case whose compiled form never ran compared the eager form with itself.
    row['ok'] = bool(all(row[f'{k}_out_err'] <= out_tol and row[f'{k}_grad_err'] <= grad_tol
                         and row[f'{k}_grad_format_kept'] for k in ('public', 'compiled'))
                     and row['compiled_vs_public'] <= grad_tol and row['compiled_calls'] > 0)
    return row


class _SmallNet(torch.nn.Module):
    """conv - norm - relu - conv - norm - relu - pool - linear, with the given norm / conv."""

    def __init__(self, norm: Callable[[int], torch.nn.Module], conv=torch.nn.Conv2d):
        super().__init__()
        self.body = torch.nn.Sequential(
            conv(3, 16, 3, padding=1, bias=False), norm(16), torch.nn.ReLU(),
            conv(16, 32, 3, padding=1, stride=2, bias=False), norm(32), torch.nn.ReLU())
        self.head = torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


NETS = {
    'SN': lambda: _SmallNet(SwitchableNorm),
    'SSN': lambda: _SmallNet(lambda c: _progress(mmnorm.SparseSwitchableNorm(c))),
    'BCN+WS': lambda: _SmallNet(lambda c: mmnorm.BatchChannelNorm(c, num_groups=4), WSConv2d),
}


def _progress(layer):
    layer.set_progress(0.3)
    return layer


def amp(section: Section, device: torch.device, short: bool) -> None:
    if short:
        cases = [('SN', 'fp16+GradScaler'), ('BCN+WS', 'bf16')]
    else:
        cases = [(net, p) for p in ('fp16+GradScaler', 'bf16') for net in NETS]
    for net, precision in section.cases(cases, lambda c: f'{c[0]} {c[1]}'):
        section.run(f'{net} {precision}',
                    lambda: _amp_case(net, precision, device, steps=8 if short else 30))


def _amp_case(net: str, precision: str, device: torch.device, steps: int) -> Dict[str, Any]:
    torch.manual_seed(0)
    model = NETS[net]().to(device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 16, 16, generator=gen).to(device)
    target = torch.randint(0, 4, (8,), generator=gen).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dtype = torch.float16 if precision.startswith('fp16') else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=precision.startswith('fp16'))
    losses, skipped = [], 0
    with form('always'):
        for _ in range(steps):
            optimizer.zero_grad()
            with torch.autocast(device.type, dtype=dtype):
                loss = torch.nn.functional.cross_entropy(model(x), target)
            scale = scaler.get_scale() if scaler.is_enabled() else 1.0
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            skipped += scaler.is_enabled() and scaler.get_scale() < scale
            losses.append(float(loss))
    finite = all(torch.isfinite(torch.tensor(losses)).tolist())
    return dict(first_loss=round(losses[0], 4), last_loss=round(losses[-1], 4),
                skipped_steps=int(skipped), steps=steps,
                ok=finite and losses[-1] < losses[0] and skipped < steps // 2)


def batched(section: Section, device: torch.device, short: bool) -> None:
    cases = [(net, p) for net in ('SN', 'SSN') for p in ('fp32', 'fp16 autocast')]
    for net, precision in section.cases(cases, lambda c: f'{c[0]} {c[1]}'):
        section.run(f'{net} {precision}', lambda: _batched_case(net, precision, device))


def _batched_case(net: str, precision: str, device: torch.device) -> Dict[str, Any]:
    torch.manual_seed(0)
    own = NETS[net]().to(device)
    if net == 'SSN':  # radii at which choices are fixed along the steps
        for i, layer in enumerate(m for m in own.modules() if mmnorm.layers.has_ratios(m)):
            layer.set_progress(0.6 + 0.4 * i)
    twin = copy.deepcopy(own)
    mmnorm.batched_ratios(twin)
    gen = torch.Generator().manual_seed(1)
    autocast = precision != 'fp32'
    worst = 0.0
    for _ in range(4):
        x = torch.randn(8, 3, 16, 16, generator=gen).to(device)
        grads = []
        for model in (own, twin):
            with torch.autocast(device.type, dtype=torch.float16, enabled=autocast):
                out = model(x)
            out.float().square().mean().backward()
            grads.append([out.float()] + [p.grad for p in model.parameters()])
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.05 * p.grad
                    p.grad = None
        worst = max([worst] + [_relative(b, a) for a, b in zip(*grads)])
    pairs = [(a.cpu(), b.cpu()) for (name, a), b in zip(own.named_buffers(), twin.buffers())
             if name.endswith('_choice')]
    equal = all(bool((a == b).all()) for a, b in pairs)
    return dict(worst_relative=float(worst), choices_equal=equal,
                choices_fixed=sum(int((a >= 0).sum()) for a, _ in pairs),
                ok=worst <= 1e-4 and equal)


def kernels(section: Section, device: torch.device, short: bool) -> None:
    for dtype in section.cases([torch.float32, torch.float64], str):
        section.run(f'SparsestMax kernel {dtype}', lambda: _kernel_case(dtype, device))
    section.run('SSN ops per step', lambda: _kernel_ops(device))


def _kernel_devices(device: torch.device, on: bool):
    """The SparsestMax kernel on (on the CPU: through Triton's interpreter) or off."""
    from mmnorm.functional import sparsestmax_kernel
    types = ((device.type, 'cuda') if on else ())
    return sparsestmax_kernel.kernel_devices(*types)


def _kernel_case(dtype: torch.dtype, device: torch.device) -> Dict[str, Any]:
    from mmnorm.analysis.launches import count_ops
    from mmnorm.functional import sparsestmax_kernel
    from mmnorm.functional.sparse_switchable import (_stacked_sparsest_ratios, fixed_choices,
                                                     update_choice_pair)
    gen = torch.Generator().manual_seed(11)
    rows = 2048 if device.type == 'cuda' else 128  # (the CPU interprets the kernel)
    scores = (torch.randn(2, rows, 3, generator=gen, dtype=dtype)
              * torch.rand(2, rows, 1, generator=gen, dtype=dtype) * 3).to(device)
    choices = torch.randint(-1, 3, (2, rows), generator=gen)
    choices[torch.rand(2, rows, generator=gen) < 0.8] = -1
    choices = choices.to(device)
    weights = torch.randn(2, rows, 3, generator=gen, dtype=dtype).to(device)
    row: Dict[str, Any] = {}
    results = {}
    for on in (True, False):
        out = []
        for radius in (0.0, 0.3, 0.6, 0.9):
            pair = [t.clone().requires_grad_() for t in scores]
            radius_t = torch.tensor(radius, dtype=dtype, device=device)
            with _kernel_devices(device, on):
                ops = count_ops(lambda: out.append(_stacked_sparsest_ratios(
                    pair[0], pair[1], radius_t, choices[0], choices[1])))
                ratios = out[-1]
                grads = torch.autograd.grad((ratios * weights).sum(), pair)
                fixed = [c.clone() for c in choices]
                update_choice_pair(ratios[0].detach(), ratios[1].detach(), *fixed)
            out += [*grads, torch.stack(fixed)]
            if on:
                row['kernel_launched'] = row.get('kernel_launched', True) and any(
                    name.startswith('mmnorm.sparsestmax_rows') for name in ops)
        results[on] = out
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    row['max_rel_diff'] = max(_relative(a, b) for a, b in zip(results[True], results[False]))
    expected_fixed = fixed_choices(results[False][0].detach(), choices)
    row['choices_match'] = bool(torch.equal(results[True][3], expected_fixed))
    row['fell_back'] = dict(sparsestmax_kernel._FAILED)
    row['ok'] = bool(row['kernel_launched'] and row['max_rel_diff'] <= tol
                     and row['choices_match'] and not row['fell_back'])
    return row


def _kernel_ops(device: torch.device) -> Dict[str, Any]:
    from mmnorm.analysis.launches import step_ops
    from mmnorm.functional import row_affine
    layer = mmnorm.SparseSwitchableNorm(64).to(device)
    layer.set_progress(0.3)
    x = torch.randn(8, 64, 28, 28, device=device)
    slow = row_affine.FEW_LAUNCHES_NOT_NEEDED
    row_affine.FEW_LAUNCHES_NOT_NEEDED = ()  # (the GPU's structure, on the CPU too)
    try:
        with _kernel_devices(device, True), form('never'):
            step_ops(layer, x)
            train = sum(step_ops(layer, x).values())
            step_ops(layer, x, train=False)
            evaluation = sum(step_ops(layer, x, train=False).values())
    finally:
        row_affine.FEW_LAUNCHES_NOT_NEEDED = slow
    return dict(train_step=train, eval_forward=evaluation, ok=train <= 50 and evaluation <= 12)


def fallbacks(section: Section, device: torch.device, short: bool) -> None:
    for stage in section.cases(FAILURES):
        section.run(stage, lambda: _fallback_case(stage, device))


def _fallback_case(stage: str, device: torch.device) -> Dict[str, Any]:
    torch._dynamo.reset()
    reference = make_layer('SN', device=device)
    layer = copy.deepcopy(reference)
    x, grad = (t.to(device) for t in (batches(1)[0], batches(1, seed=5)[0]))
    with fallback_messages() as messages, form('always', FAILURES[stage]()) as st:
        ours = train_step(layer, x, grad)
        ours_again = train_step(layer, x, grad)
        failed = st.failed
    torch._dynamo.reset()
    fell_back = [m for m in messages if 'compiling the normalization layers failed' in m]
    with form('never'):
        expected = train_step(reference, x, grad)
        expected_again = train_step(reference, x, grad)
    same = all(torch.equal(a, b) for a, b in zip((*ours[:2], *ours_again[:2]),
                                                   (*expected[:2], *expected_again[:2])))
    return dict(messages=len(fell_back), why=(failed or '')[:120], same_as_public=same,
                ok=len(fell_back) == 1 and failed is not None and 'injected' in failed and same)


@contextlib.contextmanager
def fallback_messages():
    """The messages mmnorm gives inside, as a list of strings filled on exit: its warnings, and
    what it logs through ``mmnorm.functional.compiled.report`` (wrapped meanwhile), so that a
    fallback is counted whichever way it is announced."""
    messages: List[str] = []
    report = getattr(compiled_form, 'report', None)

    def recorded(message, *args, **kwargs):
        messages.append(str(message))
        return report(message, *args, **kwargs)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        if report is not None:
            compiled_form.report = recorded
        try:
            yield messages
        finally:
            if report is not None:
                compiled_form.report = report
    messages.extend(str(w.message) for w in caught)


def _sync_worker(rank: int, world: int, out_dir: str) -> None:
    """Each rank: its shard through the synchronized layers equals the local layer on the whole
    batch (float64 on the CPU), output and input gradient."""
    device = rank_device()
    for name in ('SN', 'SN_tied', 'BCN', 'SSN'):
        full = batches(1, shape=(6, CHANNELS, 5, 4))[0].double()
        grad = batches(1, shape=(6, CHANNELS, 5, 4), seed=3)[0].double()
        x_full = full.clone().requires_grad_()
        y_full = make_layer(name, dtype=torch.float64)(x_full)
        y_full.backward(grad)
        sync = convert_sync_norm(make_layer(name, dtype=torch.float64)).to(device)
        shard = slice(3 * rank, 3 * rank + 3)
        x = full[shard].to(device).requires_grad_()
        y = sync(x)
        y.backward(grad[shard].to(device))
        torch.testing.assert_close(y.cpu(), y_full[shard].detach(), rtol=1e-7, atol=1e-7)
        torch.testing.assert_close(x.grad.cpu(), x_full.grad[shard], rtol=1e-7, atol=1e-7)


def distributed(section: Section, device: torch.device, short: bool) -> None:
    cases = ['one process', 'two ranks on one device']
    for case in section.cases(cases):
        if case == 'one process':
            section.run(f'{case} ({backend_and_devices(device.type, 1)[0]})',
                        lambda: _one_process_group(device))
        else:
            def two_ranks():
                backend = run_distributed(_sync_worker, world=2, device=device.type)
                return dict(backend=backend)
            section.run(f'{case} ({backend_and_devices(device.type, 2)[0]})', two_ranks)


def _one_process_group(device: torch.device) -> Dict[str, Any]:
    import tempfile
    backend = 'nccl' if device.type == 'cuda' else 'gloo'
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(backend, init_method=f'file://{tmp}/init', rank=0,
                                world_size=1)
        try:
            local = make_layer('SN', device=device)
            sync = convert_sync_norm(copy.deepcopy(local))
            x, grad = (t.to(device) for t in (batches(1)[0], batches(1, seed=2)[0]))
            ours, expected = train_step(sync, x, grad), train_step(local, x, grad)
            dist.barrier()
            torch.testing.assert_close(ours, expected)
        finally:
            dist.destroy_process_group()
    return dict(backend=backend, layer=type(sync).__name__)


def recompiles(section: Section, device: torch.device, short: bool) -> None:
    rng = random.Random(0)
    count = 4 if short else 40
    shapes = [(rng.choice([1, 2, 3, 4, 8]), CHANNELS, rng.choice([1, 5, 13, 32, 57]),
               rng.choice([1, 7, 19, 40, 64])) for _ in range(count)]
    names = ['SN'] if short else ['SN', 'SN_tied', 'BCN', 'BCN_est', 'SSN']
    torch._dynamo.reset()
    with form('always') as state:
        layers = {name: make_layer(name, device=device) for name in names}
        for rounds in section.cases(['first pass (compiles)', 'second pass']):
            def one_pass():
                begin, graphs = time.perf_counter(), state.graphs
                for shape in shapes:
                    x = torch.randn(shape, device=device, requires_grad=True)
                    for layer in layers.values():
                        layer.train()(x).sum().backward()
                        with torch.no_grad():
                            layer.eval()(x)
                return dict(shapes=len(shapes), layers=len(layers),
                            new_graphs=state.graphs - graphs,
                            seconds_total=round(time.perf_counter() - begin, 1),
                            fell_back=state.failed, ok=state.failed is None)
            section.run(f'{rounds} ({len(shapes)} random shapes x {len(names)} layers, '
                        'train + eval)', one_pass)
    torch._dynamo.reset()


def benchmark(section: Section, device: torch.device, short: bool) -> None:
    if TOOLS not in sys.path:
        sys.path.insert(0, TOOLS)
    import benchmark_norms
    shapes = [(2, 32, 16, 16)] if short else [(8, 64, 56, 56), (2, 256, 100, 152)]
    variants = ['fp32'] if short else list(benchmark_norms.VARIANTS)
    compiled_form.use_compiled('always')  # the steady state (compiled in the warm-up calls)
    try:
        for shape, variant in section.cases([(s, v) for s in shapes for v in variants]):
            def table():
                results = benchmark_norms.measure(benchmark_norms.norm_layers(shape[1]), shape,
                                                  3 if short else 15, 2, 'GN', device, variant)
                return dict(shape=list(shape), variant=variant, table={
                    name: {k: round(v, 3) for k, v in r.items()}
                    for name, r in results.items()})
            section.run(f'{shape} {variant}', table)
    finally:
        compiled_form.use_compiled('never')


SECTIONS = {'environment': environment, 'parity': parity, 'amp': amp, 'batched': batched,
            'kernels': kernels, 'fallbacks': fallbacks, 'distributed': distributed,
            'recompiles': recompiles, 'benchmark': benchmark}


# ------------------------------------------------------------------------------------ report


def markdown(report: Dict[str, Any]) -> str:
    env = report['sections'][0]['rows'][0] if report['sections'] else {}
    lines = [f'# mmnorm GPU check ({report["date"]}, {env.get("gpu", report["device"])})', '',
             f'torch {env.get("torch")} (CUDA build {env.get("cuda")}), Triton '
             f'{env.get("triton")}; '
             f'mode {"short" if report["short"] else "full"}; {report["seconds"]} s; '
             f'{report["failed"]} failed case(s), {report["not_run"]} not run; '
             f'mmnorm {env.get("mmnorm")} from `{env.get("mmnorm_from")}`', '',
             f'Verdict: {verdict(report)}', '',
             '| section | passed | failed | not run | s (budget) |', '|---|---|---|---|---|']
    for s in report['sections']:
        lines.append(f'| {s["name"]} | {s["passed"]} | {s["failed"]} | {len(s["not_run"])} | '
                     f'{s["seconds"]} ({s["budget_s"]:.0f}) |')
    for s in report['sections']:
        rows = [r for r in s['rows'] if 'table' not in r]
        if s['name'] == 'environment' or not s['rows']:
            continue
        lines += ['', f'## {s["name"]}', '']
        if rows:
            keys = []
            for r in rows:
                keys += [k for k in r if k not in keys and k != 'trace']
            lines.append('| ' + ' | '.join(keys) + ' |')
            lines.append('|' + '---|' * len(keys))
            for r in rows:
                lines.append('| ' + ' | '.join(_cell(r.get(k)) for k in keys) + ' |')
        for r in s['rows']:
            if 'table' in r:
                lines += ['', f'{r["case"]}: time ratios to GN and BN (fwd+bwd, eval)', '',
                          '| layer | fwd+bwd ms | x GN | x BN | eval ms | x GN | x BN | '
                          'peak/input |', '|---|---|---|---|---|---|---|---|']
                for name, t in r['table'].items():
                    lines.append(f'| {name} | {t["train_ms"]} | {t["train_ratio"]} | '
                                 f'{t.get("train_ratio_x_bn", "")} | {t["eval_ms"]} | '
                                 f'{t["eval_ratio"]} | {t.get("eval_ratio_x_bn", "")} | '
                                 f'{t.get("peak_x_input", "")} |')
        if s['not_run']:
            lines += ['', f'Not run (budget): {", ".join(s["not_run"])}']
    return '\n'.join(lines) + '\n'


def _cell(value) -> str:
    if isinstance(value, float):
        return f'{value:.2e}' if value and abs(value) < 1e-2 else f'{value:.3g}'
    return '' if value is None else str(value).replace('|', '/')


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', default='cuda', help='cuda (default) or cpu')
    parser.add_argument('--short', action='store_true',
                        help='fewer cases, shorter budgets (the default on the CPU)')
    parser.add_argument('--sections', nargs='+', choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument('--out', default=os.path.join('work_dirs', 'gpu_check'),
                        help='folder for gpu_check.json and gpu_check.md (default: '
                        'work_dirs/gpu_check in the current directory)')
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda, but torch sees no GPU (use --device cpu for the short mode)')
    short = args.short or device.type == 'cpu'
    # mmnorm's reports (each compiled graph) go to the standard library's logger without
    # mmengine: show them.
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    if os.path.lexists(args.out) and not os.path.isdir(args.out):
        parser.error(f'--out {args.out} is a file; give a folder')
    try:  # a folder that cannot take the report fails now, not after the check
        check_writable(os.path.join(args.out, 'gpu_check.json'))
    except OSError as error:
        parser.error(f'--out: {error}')
    compiled_form.use_compiled('never')  # each section chooses its form
    begin = time.perf_counter()
    sections = []
    for name in args.sections:
        budget = (SHORT_BUDGETS if short else BUDGETS)[name]
        print(f'[gpu_check] {name} (budget {budget:.0f} s)', flush=True)
        section = Section(name, budget)
        try:
            SECTIONS[name](section, device, short)
        except Exception as error:  # outside its cases (they catch their own): one failed row
            section.fail('section', error)
        sections.append(section.summary())
    report = dict(date=time.strftime('%Y-%m-%d'), device=str(device), short=short,
                  seconds=round(time.perf_counter() - begin, 1),
                  failed=sum(s['failed'] for s in sections),
                  not_run=sum(len(s['not_run']) for s in sections), sections=sections)
    report['exit_status'] = exit_status(report)
    text = markdown(report)
    print('\n' + text, flush=True)  # (before the files: whatever happens to them, it is shown)
    write_json(os.path.join(args.out, 'gpu_check.json'), report, indent=1, default=str)
    atomic_write(os.path.join(args.out, 'gpu_check.md'), lambda tmp: _write_text(tmp, text))
    print(f'[gpu_check] wrote {args.out}/gpu_check.json and gpu_check.md; '
          f'{report["failed"]} failed case(s), {report["not_run"]} not run')
    print(f'[gpu_check] {verdict(report)}')
    return report['exit_status']


def _write_text(path: str, text: str) -> None:
    with open(path, 'w') as f:
        f.write(text)


def exit_status(report: Dict[str, Any]) -> int:
    """:data:`EXIT_FAILED` when a case failed, else :data:`EXIT_NOT_RUN` when a case was not run
    (a budget reached), else :data:`EXIT_PASSED`."""
    if report['failed']:
        return EXIT_FAILED
    return EXIT_NOT_RUN if report['not_run'] else EXIT_PASSED


def verdict(report: Dict[str, Any]) -> str:
    """One line: what the exit status says."""
    status = exit_status(report)
    if status == EXIT_FAILED:
        return f'FAILED: {report["failed"]} case(s) failed (exit status {status})'
    if status == EXIT_NOT_RUN:
        return (f'INCOMPLETE: nothing failed, but {report["not_run"]} case(s) were not run '
                f'(section budgets reached; exit status {status})')
    return f'PASSED: every case ran and passed (exit status {status})'


if __name__ == '__main__':
    sys.exit(main())
