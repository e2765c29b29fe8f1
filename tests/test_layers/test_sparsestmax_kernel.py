# Copyright (c) mmnorm contributors. All rights reserved.
"""Sparse SN's one-kernel SparsestMax and choice update (mmnorm/functional/sparsestmax_kernel.py)
as a GPU runs them, here through Triton's interpreter: against the public-op form over whole
training runs (values, gradients, the choices it fixes), with batched ratios and double
backward; and its routes off: operands it cannot read, Triton missing, switched off, and a
launch that fails (reported once, the public ops from then on). The values against the
specification and the oracle are in test_sparsestmax_fast.py (run in both forms)."""
import contextlib

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mmnorm import SparseSwitchableNorm, batched_ratios
from mmnorm.functional import compiled as compiled_form
from mmnorm.functional import row_affine
from mmnorm.functional import sparsestmax_kernel as kernel
from mmnorm.functional.sparse_switchable import fixed_choices, update_choice_pair
from mmnorm.functional.sparsestmax_fast import fast_sparsestmax

pytest.importorskip('triton')

F64 = torch.float64
RATIOS_OP, CHOICES_OP = 'mmnorm.sparsestmax_rows.default', 'mmnorm.fix_sparsest_choices_.default'


class _Launches(TorchDispatchMode):
    """Counts the kernels' ops."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in (RATIOS_OP, CHOICES_OP):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture(autouse=True)
def gpu_structure(monkeypatch):
    """The eager form with a GPU's op structure; the kernel off until a test turns it on; no
    failure left behind."""
    monkeypatch.setattr(compiled_form.COMPILED, 'mode', 'never')
    monkeypatch.setattr(row_affine, 'FEW_LAUNCHES_NOT_NEEDED', ())
    monkeypatch.setattr(kernel, '_FAILED', {})
    monkeypatch.delenv('MMNORM_SPARSESTMAX_KERNEL', raising=False)


def _layers(**kwargs):
    torch.manual_seed(0)
    layer = SparseSwitchableNorm(6, **kwargs).double()
    with torch.no_grad():
        layer.mean_scores.add_(torch.randn(layer.mean_scores.shape, dtype=F64) * 0.3)
        layer.var_scores.add_(torch.randn(layer.var_scores.shape, dtype=F64) * 0.3)
    return layer


def _train(layer, on: bool, steps: int = 14):
    """A training run whose radius grows to 1 (choices get fixed on the way): each step's
    output, input gradient, ratio gradients and choices."""
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(5)
    record, launches = [], _Launches()
    with kernel.kernel_devices(*(('cuda', 'cpu') if on else ('cuda', ))), launches:
        for step in range(steps):
            layer.set_progress(min(1.0, step / (steps - 4)))
            x = torch.randn(4, 6, 3, 3, generator=gen, dtype=F64).requires_grad_()
            y = layer(x)
            (y * torch.randn(y.shape, generator=gen, dtype=F64)).sum().backward()
            record.append((y.detach(), x.grad, layer.mean_scores.grad.clone(),
                           layer.var_scores.grad.clone(), layer.mean_choice.clone(),
                           layer.var_choice.clone()))
            optimizer.step()
            optimizer.zero_grad()
    return record, launches.ops


@pytest.mark.parametrize('kwargs', [{}, dict(ratio_groups=3), dict(using_bn=False)],
                         ids=['SSN', 'SSN-G3', 'SSN-K2'])
def test_a_training_run_equals_the_public_ops(kwargs):
    public, none = _train(_layers(**kwargs), on=False)
    fused, launched = _train(_layers(**kwargs), on=True)
    assert not none
    # Every training step: one SparsestMax kernel and one choice update (until all are fixed).
    assert launched.count(RATIOS_OP) >= 8 and launched.count(CHOICES_OP) >= 8
    torch.testing.assert_close(fused, public, rtol=1e-10, atol=1e-12)
    assert (public[-1][4] >= 0).all() and (public[-1][5] >= 0).all()  # choices got fixed


def test_choice_update_equals_the_public_ops():
    gen = torch.Generator().manual_seed(2)
    ratios = torch.rand(2, 40, 3, generator=gen)
    hot = torch.rand(2, 40, generator=gen) < 0.5  # one-hot rows, at every index
    ratios[hot] = nn.functional.one_hot(torch.randint(0, 3, (int(hot.sum()), ), generator=gen),
                                        3).float()
    choices = torch.randint(-1, 3, (2, 40), generator=gen)
    choices[torch.rand(2, 40, generator=gen) < 0.5] = -1
    expected = fixed_choices(ratios, choices)
    mean_choice, var_choice = choices[0].clone(), choices[1].clone()
    with kernel.kernel_devices('cuda', 'cpu'), _Launches() as launches:
        update_choice_pair(ratios[0], ratios[1], mean_choice, var_choice)
    assert launches.ops == [CHOICES_OP]
    assert torch.equal(torch.stack([mean_choice, var_choice]), expected)
    assert (expected != choices).any()  # (some choice changed)


class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = _layers(), _layers(ratio_groups=2)

    def forward(self, x):
        return self.b(self.a(x))


@pytest.mark.parametrize('batched', [False, True])
def test_batched_ratios_and_double_backward(batched):
    """The gradient of a gradient with respect to the scores needs SparsestMax's second
    derivative (the kernel's Function hands it to the public ops' differentiable backward)."""
    x = torch.randn(3, 6, 4, 4, dtype=F64)
    results = []
    for on in (False, True):
        model = _Two()
        for layer in (model.a, model.b):  # (pushed inside the full face: a second derivative)
            layer.set_progress(0.3)
        scores = [model.a.mean_scores, model.b.var_scores]
        with kernel.kernel_devices(*(('cuda', 'cpu') if on else ('cuda', ))), \
                _Launches() as launches, \
                (batched_ratios(model) if batched else contextlib.nullcontext()):
            y = model(x)
            grads = torch.autograd.grad(y.square().mean(), scores, create_graph=True)
            sum(g.square().sum() for g in grads).backward()
        results.append((y, grads, [p.grad for p in model.parameters()]))
        assert bool(launches.ops) == on
    torch.testing.assert_close(results[1], results[0], rtol=1e-9, atol=1e-12)
    assert results[0][2][0].abs().sum() > 0


def _ratios(scores, radius=0.4):
    choices = torch.full(scores.shape[:-1], -1)
    return fast_sparsestmax(scores, torch.tensor(radius, dtype=scores.dtype), choices)


def test_operands_it_cannot_read_take_the_public_ops():
    scores = torch.randn(3, 5, dtype=F64).t()  # not contiguous
    with kernel.kernel_devices('cuda', 'cpu'), _Launches() as launches:
        actual = _ratios(scores[:, :3])
    assert not launches.ops
    torch.testing.assert_close(actual, _ratios(scores[:, :3].contiguous()))


@pytest.mark.parametrize('route', ['no triton', 'switched off'])
def test_without_triton_or_switched_off_the_public_ops_run(route, monkeypatch):
    messages = []
    monkeypatch.setattr(compiled_form, 'report', lambda message, level=0: messages.append(
        message))
    if route == 'no triton':
        monkeypatch.setattr(kernel, 'triton', None)
    else:
        monkeypatch.setenv('MMNORM_SPARSESTMAX_KERNEL', '0')
    scores = torch.randn(4, 3, dtype=F64)
    with kernel.kernel_devices('cuda', 'cpu'), _Launches() as launches:
        actual = [_ratios(scores) for _ in range(2)]
    assert not launches.ops
    torch.testing.assert_close(actual[0], _ratios(scores))
    # Triton missing where the kernel would run: said once; switched off: nothing to say.
    assert len(messages) == (route == 'no triton')
    assert all('Triton is not installed' in m for m in messages)


def test_a_failing_launch_is_reported_once_and_the_public_ops_take_over(monkeypatch):
    messages = []
    monkeypatch.setattr(compiled_form, 'report', lambda message, level=0: messages.append(
        message))

    def broken(name, device_type):
        raise RuntimeError('no compiler for this device')

    monkeypatch.setattr(kernel, '_kernel', broken)
    layer = _layers()
    layer.set_progress(0.5)
    x = torch.randn(2, 6, 3, 3, dtype=F64)
    expected = _layers()
    expected.set_progress(0.5)
    with kernel.kernel_devices('cuda', 'cpu'):
        for _ in range(3):  # the first launch fails; the later calls do not try again
            xg = x.clone().requires_grad_()
            layer(xg).sum().backward()
    y = expected(x.clone().requires_grad_())
    torch.testing.assert_close(layer(x), expected(x))
    assert y.shape == x.shape
    assert len(messages) == 1 and 'no compiler for this device' in messages[0]
    assert 'public PyTorch ops' in messages[0]
    assert list(kernel._FAILED) == ['cpu']
    torch.testing.assert_close(layer.mean_choice, expected.mean_choice)


def test_scores_not_finite_and_choices_out_of_range_give_nan_rows():
    """NaN or infinite scores give NaN ratios and gradients, as in public ops; a choice that
    indexes no normalizer (never read on an accelerator, where reading it would synchronize;
    the public ops index out of range there) gives NaN ratios too, not another normalizer's."""
    inf = float('inf')
    scores = torch.tensor([[0.2, float('nan'), 0.1], [inf, 0.0, 0.0], [inf, inf, 0.0],
                           [0.0, 0.0, -inf], [0.3, 0.2, 0.1], [0.3, 0.2, 0.1],
                           [1.0, 2.0, 3.0], [0.3, 0.2, 0.1]], dtype=F64, requires_grad=True)
    choices = torch.tensor([-1, -1, -1, -1, 3, -2, -1, 1])
    radius = torch.tensor(0.4, dtype=F64)
    with kernel.kernel_devices('cuda', 'cpu'), _Launches() as launches:
        actual = fast_sparsestmax(scores, radius, choices)
        (grad, ) = torch.autograd.grad(actual.sum(), scores)
    assert launches.ops == [RATIOS_OP]
    assert actual[:6].isnan().all() and not actual[6:].isnan().any()
    assert grad[:4].isnan().all() and not grad[6:].isnan().any()
    kept = [0, 1, 2, 3, 6, 7]  # (the public ops index out of range on the others)
    expected = fast_sparsestmax(scores[kept], radius, choices[kept])
    torch.testing.assert_close(actual[kept], expected, equal_nan=True)
    # A training step does not fix a choice from them.
    mean_choice, var_choice = torch.full((4, ), -1), torch.full((4, ), -1)
    with kernel.kernel_devices('cuda', 'cpu'):
        update_choice_pair(actual[:4].detach(), actual[4:].detach(), mean_choice, var_choice)
    assert (mean_choice == -1).all()


def _signature(body, dtype: str):
    """Triton's signature of a kernel body: pointers to ``dtype`` (int64 for choices), int32
    sizes and strides, a float32 tolerance, constexprs."""
    names = body.__code__.co_varnames[:body.__code__.co_argcount]
    types = {}
    for name in names:
        if name.isupper():
            types[name] = 'constexpr'
        elif name.endswith('_ptr'):
            types[name] = '*i64' if 'choice' in name else f'*{dtype}'
        else:
            types[name] = 'fp32' if name in ('tol', 'not_a_number') else 'i32'
    return types


# (backend, architecture, warp size): NVIDIA V100, A100, H100; AMD MI200, MI300.
TARGETS = [('cuda', 70, 32), ('cuda', 80, 32), ('cuda', 90, 32), ('hip', 'gfx90a', 64),
           ('hip', 'gfx942', 64)]


@pytest.mark.parametrize('target', TARGETS, ids=lambda t: f'{t[0]}-{t[1]}')
def test_the_kernels_compile_for_gpus(target):
    """No GPU here: Triton compiles the kernels ahead of time for GPU targets, to the binary a
    GPU loads (NVIDIA's cubin through the ptxas Triton ships, AMD's hsaco), every variant the
    layers launch; float32 divisions and roots correctly rounded (no ``.approx`` in the PTX)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    gpu = GPUTarget(*target)
    binary = 'cubin' if target[0] == 'cuda' else 'hsaco'
    for dtype, k, jacobian in [(d, k, j) for d in ('fp32', 'fp64') for k in (2, 3)
                               for j in (True, False)]:
        source = ASTSource(fn=triton.jit(kernel._sparsestmax_body),
                           signature=_signature(kernel._sparsestmax_body, dtype),
                           constexprs=dict(K=k, JACOBIAN=jacobian, F32=dtype == 'fp32',
                                           BLOCK=kernel._BLOCK))
        compiled = triton.compile(source, target=gpu)
        assert compiled.asm.get(binary), (dtype, k, jacobian)
        if target[0] == 'cuda' and dtype == 'fp32':
            ptx = compiled.asm['ptx']
            assert 'div.rn.f32' in ptx and 'sqrt.rn.f32' in ptx
            assert 'div.approx' not in ptx and 'sqrt.approx' not in ptx
        choices = ASTSource(fn=triton.jit(kernel._fix_choices_body),
                            signature=_signature(kernel._fix_choices_body, dtype),
                            constexprs=dict(K=k, BLOCK=kernel._BLOCK))
        assert triton.compile(choices, target=gpu).asm.get(binary)


def test_a_double_backward_differentiates_the_forward_it_ran():
    """``create_graph=True`` gives the same gradient as a plain backward, with the face the
    kernel chose (on rows on a face boundary up to rounding, where public ops and kernel may
    round to different faces: [0, .7, .3] at r = 0.3)."""
    gen = torch.Generator().manual_seed(4)
    scores = torch.cat([torch.tensor([[0.0, 0.7, 0.3]], dtype=F64),
                        torch.randn(40, 3, generator=gen, dtype=F64) * 0.3]).requires_grad_()
    weights = torch.randn(41, 3, generator=gen, dtype=F64)
    radius, choices = torch.tensor(0.3, dtype=F64), torch.full((41, ), -1)
    with kernel.kernel_devices('cuda', 'cpu'):
        y = fast_sparsestmax(scores, radius, choices)
        plain, = torch.autograd.grad((y * weights).sum(), scores, retain_graph=True)
        twice, = torch.autograd.grad((y * weights).sum(), scores, create_graph=True)
    torch.testing.assert_close(twice, plain, rtol=1e-12, atol=1e-12)
    assert twice.requires_grad


class _Twice(nn.Module):
    """An SSN layer called twice, its radius moved in between (a schedule in the forward)."""

    def __init__(self):
        super().__init__()
        self.ssn = _layers()

    def forward(self, x):
        y = self.ssn(x)
        self.ssn.set_progress(0.5)
        return self.ssn(y)


def test_radius_and_scores_changed_in_place_before_the_backward():
    """What the backward uses is what the kernel wrote, not the radius buffer or the scores,
    which may change in place before it (as with the public ops)."""
    results = []
    for on in (False, True):
        model = _Twice()
        model.ssn.set_progress(0.3)
        with kernel.kernel_devices(*(('cuda', 'cpu') if on else ('cuda', ))):
            loss = model(torch.randn(2, 6, 3, 3, generator=torch.Generator().manual_seed(0),
                                     dtype=F64)).square().sum()
            with torch.no_grad():
                model.ssn.mean_scores.add_(0.1)
            loss.backward()
        results.append([p.grad for p in model.parameters()])
    torch.testing.assert_close(results[1], results[0], rtol=1e-10, atol=1e-12)


def test_no_jacobian_without_gradients():
    """An inference forward (``torch.no_grad()``, parameters requiring gradients) launches the
    kernel without the Jacobians."""
    flags = []

    class Flags(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func) == RATIOS_OP:
                flags.append(args[-1])
            return func(*args, **(kwargs or {}))

    layer = _layers()
    x = torch.randn(2, 6, 3, 3, dtype=F64)
    with kernel.kernel_devices('cuda', 'cpu'), Flags():
        layer.eval()
        with torch.no_grad():
            layer(x)
        layer.train()
        layer(x).sum().backward()
    assert flags == [False, True]
