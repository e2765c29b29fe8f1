# Copyright (c) mmnorm contributors. All rights reserved.
"""The compiled plain form computes what the public-op forms compute: outputs, gradients,
buffers, in training and eval, and each parity test checks that the compiled form ran. The
choice of form (mmnorm.functional.compiled): opt-in ('never' by default); 'auto' compiles only
after its switch, counting no calls; every failure of the compiled form (forward compile,
backward compile, first run, recompile limit; injected through custom torch.compile backends)
falls back to the eager forms with one message through mmengine's logger; each new graph
(every option that changes it included) is reported and probed once; no Dynamo setting changes;
compiled calls from two threads."""
import copy
import logging
import threading
import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import mmnorm.functional.compiled as core
from mmnorm import SwitchableNorm
from mmnorm.functional import row_affine
from tests.helpers.compile_failures import backward_fails, failing_compiler, first_run_fails
from tests.helpers.layers import LAYERS, batches, make_layer, train_step

FELL_BACK = 'compiling the normalization layers failed'


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
    assert core.COMPILED.compiled_calls >= 4 and core.COMPILED.failed is None  # it ran compiled
    core.use_compiled(False)
    expected = _run(reference, inputs, grads)
    # SSN's eager form computes SparsestMax in closed form with tables and matrix products,
    # the compiled form the same closed form in elementwise ops: the same math (1e-10 apart in
    # float64), whose float32 roundings differ in the score gradients by up to ~3e-5 of their
    # size.
    if dtype == torch.float32 and name.startswith('SSN'):
        # Relative to each tensor's scale: a near-zero score gradient is a difference of
        # terms of that size.
        for actual, wanted in zip(_flat(ours), _flat(expected)):
            scale = float(wanted.abs().max()) if wanted.is_floating_point() else 0.0
            torch.testing.assert_close(actual, wanted, rtol=5e-5, atol=max(tol, 1e-5 * scale))
        return
    torch.testing.assert_close(ours, expected, rtol=tol, atol=tol)


def test_sparse_ratios_compile_to_a_few_kernels():
    """Under ``torch.compile`` SSN's ratio function (SparsestMax of the mean and variance
    scores, the variances' fixed) takes the elementwise closed form, which Inductor fuses: its
    training step, forward and backward, generates a few kernels (the unrolled specification
    generated 53 loop nests on the CPU), with the specification's values and gradients in
    float64 (the free vector pushed inside the simplex: neither one-hot nor without
    gradient)."""
    from torch._inductor import metrics
    from mmnorm.functional.sparse_switchable import _frozen, _stacked_sparsest_ratios, sparsestmax
    f64 = dict(dtype=torch.float64)
    scores = torch.tensor([[0.4, 0.35, 0.25], [0.1, 0.5, 0.2]], **f64)
    radius, choices = torch.tensor(0.3, **f64), torch.tensor([-1, 2])
    grad = torch.tensor([[0.3, -1.2, 0.5], [1.0, 2.0, 3.0]], **f64)
    leaves = [scores.clone().requires_grad_() for _ in range(2)]
    expected = _frozen(sparsestmax(leaves[0], radius), choices)
    expected.backward(grad)
    assert (expected[0] > 0).all() and leaves[0].grad[0].abs().min() > 0.5  # (not trivial)
    torch._dynamo.reset()
    metrics.reset()
    compiled = torch.compile(_stacked_sparsest_ratios, backend='inductor', fullgraph=True)
    actual = compiled(leaves[1][0], leaves[1][1], radius, choices[0], choices[1])
    actual.backward(grad)
    torch._dynamo.reset()
    assert 0 < metrics.generated_kernel_count <= 10, metrics.generated_kernel_count
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(leaves[1].grad, leaves[0].grad, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize('tied', [False, True])
def test_softmax_ratios_compile_into_their_neighbours(tied):
    """Under ``torch.compile`` SN's stacked softmax ratios are elementwise ops over the three
    logits, which Inductor fuses (in a layer, with the coefficient math that follows): the
    ratios' forward and backward alone generate fewer kernels than ``torch.softmax``'s
    reductions, with the same values and gradients in float64 (logits up to 1e3 apart: the
    shift by the maximum)."""
    from torch._inductor import metrics
    from mmnorm.functional import switchable
    f64 = dict(dtype=torch.float64)
    weights = torch.tensor([[1.0, -2.0, 0.5], [0.25, 3.0, -1.0]], **f64)
    logits = [torch.tensor([0.3, -1.2, 0.8], **f64), torch.tensor([1e3, 0.0, -1e3], **f64)]
    inputs = logits[:1] if tied else logits

    def step(fn):
        leaves = [t.clone().requires_grad_() for t in inputs]
        torch._dynamo.reset()
        metrics.reset()
        (fn(*leaves) * weights).sum().backward()
        torch._dynamo.reset()
        return metrics.generated_kernel_count, [t.grad for t in leaves], fn(*leaves)

    def reference(*leaves):  # (torch.softmax, not traced)
        stacked = torch.stack([leaves[0], leaves[-1]])
        return torch.softmax(stacked, -1)

    compiled = torch.compile(switchable._stacked_softmax_ratios, fullgraph=True)
    kernels, grads, ratios = step(compiled)
    _, expected_grads, expected = step(reference)
    plain, _, _ = step(torch.compile(reference, fullgraph=True))
    assert kernels < plain, (kernels, plain)
    torch.testing.assert_close(ratios, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads, expected_grads, rtol=1e-12, atol=1e-14)


def _flat(results) -> list:
    """The tensors of :func:`_run`'s nested results, in order."""
    return [t for item in results for t in (item if isinstance(item, (list, tuple)) else [item])]


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
        ran = core.COMPILED.compiled_calls
        y = layer(x.requires_grad_())
        y.float().square().sum().backward()
        assert core.COMPILED.compiled_calls == ran + 1, (shape, dtype, fmt)  # it ran compiled
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


def _bcn_case(momentum):
    """A BCN (non-trivial BN scale and GN shift) and its copy, three inputs and gradients."""
    from mmnorm import BatchChannelNorm
    reference = BatchChannelNorm(8, num_groups=4, momentum=momentum)
    with torch.no_grad():
        reference.bn_weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-1, 1)
    inputs, grads = batches(3, shape=(3, 8, 5, 6)), batches(3, shape=(3, 8, 5, 6), seed=4)
    return reference, copy.deepcopy(reference), inputs, grads


@pytest.mark.parametrize('momentum, calls, gpu_structure', [
    (0.3, {'batch_channel_light': 4}, True),
    (None, {'batch_channel': 3, 'batch_channel_light': 1}, True),
    (0.3, {'batch_channel': 4}, False)])
def test_bcn_compiles_batch_then_group_normalization_where_it_serves(fresh, monkeypatch,
                                                                     momentum, calls,
                                                                     gpu_structure):
    """With a GPU's op structure, BCN's compiled form is GN(BN(x)) by ATen's normalizations
    (what torch.compile of a model traces there), except for training steps with a tensor
    momentum (momentum=None: the cumulative average), which compile the plain form; on the CPU
    the plain form. Either way, outputs, gradients and running buffers equal the eager forms'
    over three training steps and an eval forward."""
    if gpu_structure:
        monkeypatch.setattr(row_affine, 'FEW_LAUNCHES_NOT_NEEDED', ())
    reference, layer, inputs, grads = _bcn_case(momentum)
    ours = _run(layer, inputs, grads)
    assert fresh.calls == calls
    core.use_compiled(False)
    torch.testing.assert_close(ours, _run(reference, inputs, grads), rtol=2e-5, atol=2e-5)


def test_compiled_form_under_activation_checkpointing(compiled):
    plain = make_layer('BCN_est')
    checkpointed = copy.deepcopy(plain)
    inputs, grads = batches(2), batches(2, seed=3)
    ours = _run(checkpointed, inputs, grads,
                forward=lambda x: checkpoint(checkpointed, x, use_reentrant=False))
    assert core.COMPILED.compiled_calls >= 4 and core.COMPILED.failed is None  # it ran compiled
    core.use_compiled(False)
    expected = _run(plain, inputs, grads)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_compiled_bcn_runs_one_graph_per_step_and_recomputation(fresh, monkeypatch):
    """BCN's batch then group normalization, compiled (a GPU's op structure), under
    non-reentrant activation checkpointing and a momentum that changes every step: the forward
    and its recomputation (which updates no buffer) run one graph, which saves the same tensors
    (a second graph may not: torch.utils.checkpoint then raises), and no momentum makes a
    graph of its own (a schedule would recompile every step). Outputs, gradients and buffers
    are the eager forms'."""
    monkeypatch.setattr(row_affine, 'FEW_LAUNCHES_NOT_NEEDED', ())
    fresh.backend = 'aot_eager'  # saves what the joint graph's partition says, as Inductor does
    reference, layer, inputs, grads = _bcn_case(momentum=0.1)

    def steps(model, checkpointed):
        results = []
        for step, (x, g) in enumerate(zip(inputs, grads)):
            model.momentum = 0.1 * (step + 1)
            x = x.clone().requires_grad_()
            y = checkpoint(model, x, use_reentrant=False) if checkpointed else model(x)
            y.backward(g)
            results.append((y.detach(), x.grad))
        return results + [[p.grad for p in model.parameters()], list(model.buffers())]

    ours = steps(layer, checkpointed=True)
    # (A recomputation stops once it has saved what the backward needs: uncounted.)
    assert fresh.failed is None and fresh.calls == {'batch_channel_light': 3}, fresh.calls
    assert fresh.graphs == 1
    core.use_compiled(False)
    torch.testing.assert_close(ours, steps(reference, checkpointed=False))


def _fell_back(records):
    """The fallback messages among mmnorm's reports."""
    return [r for r in records if FELL_BACK in r.getMessage()]


@pytest.mark.parametrize('name', ['SN', 'BCN'])
@pytest.mark.parametrize('backend, stage', [(failing_compiler, 'forward compile'),
                                            ('backward', 'backward compile'),
                                            (first_run_fails, 'first run')])
def test_every_compile_failure_falls_back_once_with_the_same_results(fresh, monkeypatch,
                                                                      backend, stage, name,
                                                                      mmnorm_log):
    """The compiled form fails (injected through the torch.compile backend) at each stage: one
    warning in mmengine's log (not a Python warning), the training step completes, including the
    caller's backward() (which would raise without the probe for a backward that fails to
    compile), and equals the public-op form, running buffers included (a graph that ran before
    its backward failed has not updated them: the eager rerun does, once); later calls are
    silent and eager."""
    fresh.backend = backward_fails() if backend == 'backward' else backend
    if name == 'BCN':  # its batch then group normalization, compiled with a GPU's op structure
        monkeypatch.setattr(row_affine, 'FEW_LAUNCHES_NOT_NEEDED', ())
    reference = make_layer(name)
    layer = copy.deepcopy(reference)
    x, g = batches(1)[0], batches(1, seed=5)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        ours = train_step(layer, x, g)
        assert not core.compiled_enabled() and 'injected' in fresh.failed, fresh.failed
        ours_again = train_step(layer, x, g)  # reported once; eager now
    assert not [w for w in caught if 'mmnorm' in str(w.message)]  # not a Python warning
    fell_back = _fell_back(mmnorm_log)
    assert len(fell_back) == 1 and fell_back[0].levelno == logging.WARNING, fell_back
    assert 'injected' in fell_back[0].getMessage()
    core.use_compiled(False)
    torch.testing.assert_close(ours, train_step(reference, x, g))
    torch.testing.assert_close(ours_again, train_step(reference, x, g))
    torch.testing.assert_close(list(layer.buffers()), list(reference.buffers()))


def test_messages_once_per_run_on_rank_0(monkeypatch, mmnorm_log):
    """report(): rank 0's messages only, when torch.distributed is initialized."""
    monkeypatch.setattr(core, '_rank', lambda: 1)
    core.report('mmnorm: from rank 1', logging.WARNING)
    assert not mmnorm_log
    monkeypatch.setattr(core, '_rank', lambda: 0)
    core.report('mmnorm: from rank 0', logging.WARNING)
    assert [(r.getMessage(), r.levelno) for r in mmnorm_log] == [('mmnorm: from rank 0',
                                                                   logging.WARNING)]


def test_recompile_limit_falls_back_instead_of_running_silently_uncompiled(fresh, monkeypatch,
                                                                            mmnorm_log):
    monkeypatch.setattr(core, 'RECOMPILE_LIMIT', 1)
    layer = make_layer('SN_tied')
    x = batches(1)[0]
    with torch.no_grad():
        layer(x)  # graph 1
        assert core.compiled_enabled() and fresh.graphs == 1
        y = layer(x.double().float()[:, :, :3])  # a new dtype/shape: a second graph
    assert [r.getMessage() for r in _fell_back(mmnorm_log)] == [
        m for m in [r.getMessage() for r in mmnorm_log] if 'more than 1 compiled graphs' in m]
    assert len(_fell_back(mmnorm_log)) == 1
    assert not core.compiled_enabled()
    core.use_compiled(False)
    torch.testing.assert_close(y, make_layer('SN_tied')(x[:, :, :3]))


def test_dynamos_recompile_limit_per_computation_falls_back(fresh, monkeypatch, mmnorm_log):
    """More graphs of one computation than Dynamo's recompile_limit (one set after mmnorm raised
    it at its first graph is respected): the compiled form falls back before Dynamo would run the
    rest uncompiled."""
    monkeypatch.setattr(core, '_LIMIT_RAISED', True)  # a limit set after the first graph
    layer = make_layer('SN').eval()
    with torch._dynamo.config.patch(recompile_limit=2), torch.no_grad():
        for shape in ((3, 8, 5, 6), (1, 8, 5, 6), (2, 8, 1, 6)):  # three specializations
            layer(torch.randn(shape))
    assert fresh.graphs == 2 and not core.compiled_enabled()
    assert 'recompile_limit' in fresh.failed and len(_fell_back(mmnorm_log)) == 1


def test_auto_runs_the_eager_forms_until_its_switch(fresh):
    """'auto' counts no calls: the eager forms, however many calls, until auto_switch (which
    CompiledFormHook throws at a training-iteration boundary); use_compiled resets the switch;
    the switch does nothing in the other modes."""
    core.use_compiled('auto')
    layer = make_layer('SN')
    x = batches(1)[0]
    with torch.no_grad():
        for _ in range(5):
            layer(x)
        assert fresh.graphs == 0 and fresh.compiled_calls == 0 and not core.compiled_enabled()
        core.auto_switch(True)
        layer(x)
        assert fresh.graphs == 1 and fresh.compiled_calls == 1 and core.compiled_enabled()
        core.use_compiled('auto')  # a new run: the eager forms again
        layer(x)
        assert fresh.compiled_calls == 1
        core.auto_switch(True)
        core.use_compiled('never')
        layer(x)
        core.auto_switch(True)
        layer(x)
    assert fresh.compiled_calls == 1 and core.compile_mode() == 'never'
    with pytest.raises(ValueError, match='expected one of'):
        core.use_compiled('sometimes')


def _probes(monkeypatch):
    """The probes of new graphs, recorded."""
    probes = []
    probe = core.CompiledForm._probe_backward

    def recorded(*args):
        probes.append(args[1])
        return probe(*args)

    monkeypatch.setattr(core.CompiledForm, '_probe_backward', staticmethod(recorded))
    return probes


def _fails_after(count: int):
    """AOTAutograd with a working forward compiler, and a backward compiler that works for the
    first ``count`` graphs and fails after."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    compiled = []

    def backward(gm, example_inputs):
        compiled.append(gm)
        if len(compiled) > count:
            return failing_compiler(gm, example_inputs)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward),
                        bw_compiler=backward)


@pytest.mark.parametrize('option, value, base', [
    ('eps', 1e-3, {}), ('mix', 'std', {}), ('in_unbiased', True, {}), ('using_bn', False, {}),
    # group-wise ratio tables (G, K): another G, or another K, is another graph
    ('ratio_groups', 4, dict(ratio_groups=2)), ('using_bn', False, dict(ratio_groups=2))])
def test_every_option_that_changes_the_graph_makes_a_new_probed_graph(fresh, monkeypatch,
                                                                       option, value, base):
    """Two layers differing only in an option: the second call is a new graph, reported and
    probed; when its backward fails to compile (injected), the step falls back to the eager
    forms instead of raising in the caller's backward()."""
    messages = []
    monkeypatch.setattr(core, 'report', lambda message, level=None: messages.append(message))
    probes = _probes(monkeypatch)
    fresh.backend = _fails_after(1)
    x, g = batches(1)[0], batches(1, seed=5)[0]
    first, second = SwitchableNorm(8, **base), SwitchableNorm(8, **dict(base, **{option: value}))
    train_step(first, x, g)
    assert fresh.graphs == 1 and len(probes) == 1 and len(messages) == 1
    ours = train_step(second, x, g)  # raises here if the new graph was not probed
    assert fresh.graphs + (fresh.failed is not None) == 2, messages
    assert len(probes) == 2, f'the {option} graph was not probed'
    if fresh.failed is not None:  # a graph Dynamo compiled again: its backward failed
        assert 'injected' in fresh.failed and FELL_BACK in messages[-1]
    core.use_compiled(False)
    reference = SwitchableNorm(8, **dict(base, **{option: value}))
    torch.testing.assert_close(ours, train_step(reference, x, g))


def test_compiled_calls_change_no_dynamo_setting(fresh, monkeypatch):
    """No process-global Dynamo setting is changed per call, not even during a compiled call
    (two threads interleaving a patch's enter and exit could leave it changed): only
    recompile_limit, raised once, at the first graph; and parameters' sizes are dynamic all the
    same: one graph for two channel counts."""
    from torch._dynamo.config import get_config_copy
    monkeypatch.setattr(core, '_LIMIT_RAISED', False)  # as in a fresh process
    seen = []

    def backend(gm, example_inputs):
        seen.append(get_config_copy())
        return gm.forward

    fresh.backend = backend
    with torch._dynamo.config.patch(recompile_limit=8):  # Dynamo's default
        before = get_config_copy()
        with torch.no_grad():
            SwitchableNorm(8).eval()(torch.randn(2, 8, 5, 6))  # the first graph
        raised = get_config_copy()
        assert raised == dict(before, recompile_limit=core.RECOMPILE_LIMIT)
        with torch.no_grad():
            SwitchableNorm(16).eval()(torch.randn(2, 16, 5, 6))  # the same graph
        x = torch.randn(2, 16, 5, 6, requires_grad=True)
        SwitchableNorm(16)(x).sum().backward()  # a new graph (training), probed
        assert fresh.compiled_calls == 3 and fresh.graphs == 2 and len(seen) == 2
        assert all(s == raised for s in seen), [
            {k: (raised[k], v) for k, v in s.items() if raised[k] != v} for s in seen]
        assert get_config_copy() == raised
        core.use_compiled('never')
        core.use_compiled('always')
        with torch.no_grad():
            SwitchableNorm(8).eval()(torch.randn(2, 8, 5, 6))
        assert get_config_copy() == raised


def test_compiled_kernels_run_on_threads_whatever_size_compiles_first(fresh):
    """Sizes are dynamic, so a graph compiled at a tiny input serves every later size:
    Inductor's C++ code for it still has OpenMP parallel regions (it would decide from the tiny
    size that one thread suffices, and cache that code for every size and later process)."""
    from torch._inductor.utils import run_and_get_code
    layer = SwitchableNorm(8).eval()
    with torch._inductor.config.patch(force_disable_caches=True), torch.no_grad():
        _, codes = run_and_get_code(layer, torch.randn(2, 8, 2, 2))
    assert fresh.compiled_calls == 1 and codes
    assert all('#pragma omp parallel' in code for code in codes)


def test_one_compiled_function_per_name(fresh):
    """Two computations under one name would run the first one's compiled function for the
    second's calls: a programming error, raised at once (not taken for a compile failure)."""
    def double(x):
        return x * 2

    def square(x):
        return x * x

    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(fresh.run('same name', double, 'double', x), x * 2)
    with pytest.raises(ValueError, match='double, not .*square'):
        fresh.run('same name', square, 'square', x)
    assert fresh.failed is None


def test_compiled_calls_from_two_threads(fresh):
    """Two threads run compiled calls of the same layers at once, first compiling new graphs
    (each compiled and counted once), then on graphs that have run (every call compiled); the
    results are the eager forms'."""
    layers = {'SN': make_layer('SN').eval(), 'BCN': make_layer('BCN').eval()}
    inputs = [torch.randn(2 + i % 3, 8, 5, 6) for i in range(3)]
    results, errors = {}, []

    def work(thread, start):
        try:
            start.wait()
            with torch.no_grad():
                results[thread] = {name: [layer(x) for x in inputs]
                                   for name, layer in layers.items()}
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    def in_two_threads():
        start = threading.Barrier(2)
        threads = [threading.Thread(target=work, args=(thread, start)) for thread in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors

    for _ in range(3):  # new graphs (while one thread compiles, the other's calls run eager)
        in_two_threads()
        assert fresh.failed is None and fresh.compiled_calls == sum(fresh.calls.values())
        if fresh.graphs == 2:
            break
    assert fresh.graphs == 2  # each compiled and counted once
    ran = fresh.compiled_calls
    in_two_threads()  # known graphs: all compiled
    assert fresh.failed is None and fresh.graphs == 2 and fresh.compiled_calls == ran + 12
    assert sum(fresh.calls.values()) == ran + 12
    core.use_compiled(False)
    with torch.no_grad():
        expected = {name: [layer(x) for x in inputs] for name, layer in layers.items()}
    torch.testing.assert_close(results, {0: expected, 1: expected})


def test_each_new_graph_is_reported_once_with_its_specializations(fresh, monkeypatch):
    messages = []
    monkeypatch.setattr(core, 'report', lambda message, level=None: messages.append(message))
    layer = make_layer('SN').eval()
    with torch.no_grad():
        for shape in ((2, 8, 5, 6), (4, 8, 7, 6), (1, 8, 5, 6), (2, 8, 1, 6)):
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
    assert (core.COMPILED.compiled_calls > 0) == (mode == 'always')


def test_env_modes():
    assert core.CompiledForm('0').mode == 'never' and core.CompiledForm('1').mode == 'always'
    assert core.CompiledForm('').mode == 'never' and core.CompiledForm('auto').mode == 'auto'
    assert core.CompiledForm().mode == 'never'  # opt-in
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
