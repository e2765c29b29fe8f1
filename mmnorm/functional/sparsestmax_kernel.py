# Copyright (c) mmnorm contributors. All rights reserved.
r"""SparsestMax over two or three entries in one GPU kernel (Triton), for the light eager form.

:func:`~.sparsestmax_fast.fast_sparsestmax` computes SparsestMax with the frozen choices in
about 35 tensor ops (two rounds of face selection, projection and push over ``(R, K)`` rows,
then the Jacobian); on a GPU each is a kernel launch for a handful of numbers, and they were
most of a Sparse SN layer's launches per training step (87 of them, against 40 for SN). Here
the same rounds run per row in registers, in **one kernel**: :class:`KernelSparsestMax` returns
the ratios and, when a gradient is wanted, each row's Jacobian (the backward stays one
``bmm``) and what a double backward differentiates again (the row's projector, push and
scale). :func:`fix_choices_` writes the choices a training step fixes in a second kernel
(one launch where :func:`~.sparse_switchable.update_choice_pair` took eleven ops).

The rounds, the faces and the Jacobian are those of :mod:`.sparsestmax_fast` (whose docstring
derives them), written out per row for ``K`` = 2 or 3; the kernel computes the same values
with its own rounding: the projection ``P_F z`` from the scores' pairwise differences (exact
for close scores, so that its rounding is of their spread, as the public form's shift makes
it), float32 divisions and square roots correctly rounded (``tl.div_rn`` / ``tl.sqrt_rn``;
Triton's default ones are approximate on GPUs).

**Where it runs.** On the device types in :data:`KERNEL_DEVICES` (CUDA, which includes ROCm)
when Triton is installed (PyTorch's Linux CUDA wheels ship it), for float32 / float64 scores
and integer choices the kernel can read in place (contiguous, on the scores' device), outside
tracing (exporters and ``torch.func`` transforms keep the specification, and ``torch.compile``
traces the closed form in elementwise ops, as for the public-op fast form). Triton compiles
each variant on its first call (about a second, then cached on disk): from then on every call
and every rank runs the same kernel, so no form changes during a run. If Triton is missing on
such a device or a launch raises (an unsupported device, a compiler error), mmnorm reports it
once through the run's logger and computes the ratios with the public ops from then on for that
device type: more launches, the same values. ``MMNORM_SPARSESTMAX_KERNEL=0`` in the environment
turns the kernel off.

The tests and ``tools/analysis/count_launches.py`` run the same kernel on the CPU through
Triton's interpreter (:func:`kernel_devices` with ``'cpu'``): slow, exact, and what a CPU run
gets by default is the public ops.
"""
import contextlib
import logging
import os
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor

from .moments import is_tracing

try:
    import triton
    from triton import language as tl
except ImportError:  # (the kernel then never applies: the public ops)
    triton = None

    class tl:  # (the kernels' annotations; nothing here runs without Triton)
        constexpr = None

__all__ = ['KERNEL_DEVICES', 'kernel_devices', 'kernel_applies', 'kernel_takes',
           'kernel_sparsestmax', 'KernelSparsestMax', 'KernelFailed', 'fix_choices_']

#: Device types whose tensors take the kernel (the CPU only through :func:`kernel_devices`).
KERNEL_DEVICES: Tuple[str, ...] = ('cuda', )

#: Kernels by (name, device type), built on first use.
_KERNELS: Dict[Tuple[str, str], object] = {}
#: Device types where the kernel cannot run, with the reason (reported once).
_FAILED: Dict[str, str] = {}
_BLOCK = 64
#: Tensor types whose memory the kernel reads (not a fake tensor's, a tracer's, a subclass's).
_PLAIN = (Tensor, torch.nn.Parameter)


def _enabled() -> bool:
    return os.environ.get('MMNORM_SPARSESTMAX_KERNEL', '1') != '0'


@contextlib.contextmanager
def kernel_devices(*device_types: str) -> Iterator[None]:
    """Within the scope, the kernel runs on tensors of these device types (``'cpu'``: through
    Triton's interpreter, for tests and op counts; not thread-safe, a tool's switch)."""
    global KERNEL_DEVICES
    previous = KERNEL_DEVICES
    KERNEL_DEVICES = tuple(device_types)
    try:
        yield
    finally:
        KERNEL_DEVICES = previous


def kernel_applies(scores: Tensor) -> bool:
    """Whether the kernel takes these scores: a device type in
    :data:`KERNEL_DEVICES` whose kernel has not failed, float32 / float64, 2 or 3 entries, a
    plain tensor (not a fake or traced one), kernel not turned off."""
    if is_tracing():  # (first: nothing below is read while torch.compile traces)
        return False
    device = scores.device.type
    if not (device in KERNEL_DEVICES and device not in _FAILED and type(scores) in _PLAIN
            and scores.dtype in (torch.float32, torch.float64) and scores.shape[-1] in (2, 3)
            and _enabled()):
        return False
    if triton is None:
        _failed(device, 'Triton is not installed')
        return False
    return True


def _sparsestmax_body(first_ptr, second_ptr, split, radius_ptr, radius_stride, first_choices_ptr,
                      second_choices_ptr, out_ptr, jac_ptr, proj_ptr, aux_ptr, rows, tol,
                      not_a_number, K: tl.constexpr,
                      JACOBIAN: tl.constexpr, F32: tl.constexpr, BLOCK: tl.constexpr):
    """One program: ``BLOCK`` rows of ``K`` scores, straight-line per row (rows in lanes).
    Rows ``< split`` are those of the first scores and choices, the rest the second's (the
    means' and the variances' without stacking them)."""
    row = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = row < rows
    one_ = live & (row < split)
    two_ = live & (row >= split)
    own = tl.where(one_, row, row - split)
    s0 = tl.where(one_, tl.load(first_ptr + own * K, mask=one_, other=0.0),
                  tl.load(second_ptr + own * K, mask=two_, other=0.0))
    s1 = tl.where(one_, tl.load(first_ptr + own * K + 1, mask=one_, other=0.0),
                  tl.load(second_ptr + own * K + 1, mask=two_, other=0.0))
    if K == 3:
        s2 = tl.where(one_, tl.load(first_ptr + own * K + 2, mask=one_, other=0.0),
                      tl.load(second_ptr + own * K + 2, mask=two_, other=0.0))
    else:
        s2 = s0   # (K = 2: never on a face)
    radius = tl.load(radius_ptr + row * radius_stride, mask=live, other=0.0)
    choice = tl.where(one_, tl.load(first_choices_ptr + own, mask=one_, other=-1),
                      tl.load(second_choices_ptr + own, mask=two_, other=-1))
    # Scores not finite, a NaN radius, or a choice that is no normalizer's index (not checked
    # on an accelerator, where reading it would synchronize; the public ops index out of range
    # there): NaN ratios.
    # (x - x != 0: x is NaN or infinite; the public ops' rows are NaN there too)
    nan = ((s0 - s0 != 0) | (s1 - s1 != 0) | (s2 - s2 != 0) | (radius != radius)
           | (choice < -1) | (choice >= K))
    zero = tl.full([BLOCK], 0.0, s0.dtype)
    # Constants in the scores' dtype (a Python float is a float32 constant in Triton); float32
    # divisions and roots correctly rounded (Triton's default ones are approximate on GPUs).
    one = zero + 1.0
    if F32:
        third = tl.div_rn(one, one * 3.0)
    else:
        third = one / 3.0
    # The pairwise differences, exact for close scores: P_F z from them (the projection's
    # rounding is then of the scores' spread, not of their size).
    a = s0 - s1
    b = s0 - s2
    c = s1 - s2
    # The point whose sparsemax face a round takes: first the scores shifted by the first
    # entry (the faces' thresholds then round with the spread too).
    p0 = zero
    p1 = -a
    p2 = -b
    alpha = one
    moved = live & (zero != zero)
    in0 = moved
    in1 = moved
    in2 = moved
    inv = zero
    d0 = zero
    d1 = zero
    d2 = zero
    n = zero
    for step in tl.static_range(K - 1):
        # The face: argmax of sparsemax's thresholds over the faces, vertices first, then
        # edges, then the full face (a tie keeps the earlier, smaller face).
        best = p0 - 1.0
        face = choice * 0
        t = p1 - 1.0
        face = tl.where(t > best, 1, face)
        best = tl.maximum(best, t)
        if K == 3:
            t = p2 - 1.0
            face = tl.where(t > best, 2, face)
            best = tl.maximum(best, t)
            t = (p0 + p1) * 0.5 - 0.5
            face = tl.where(t > best, 3, face)
            best = tl.maximum(best, t)
            t = (p0 + p2) * 0.5 - 0.5
            face = tl.where(t > best, 4, face)
            best = tl.maximum(best, t)
            t = (p1 + p2) * 0.5 - 0.5
            face = tl.where(t > best, 5, face)
            best = tl.maximum(best, t)
            t = (p0 + p1 + p2) * third - third
            face = tl.where(t > best, 6, face)
            face = tl.where(choice >= 0, choice, face)   # a fixed choice: its vertex
            in0 = (face == 0) | (face == 3) | (face == 4) | (face == 6)
            in1 = (face == 1) | (face == 3) | (face == 5) | (face == 6)
            in2 = (face == 2) | (face == 4) | (face == 5) | (face == 6)
            size = tl.where(face == 6, 3, tl.where(face >= 3, 2, 1))
        else:
            t = (p0 + p1) * 0.5 - 0.5
            face = tl.where(t > best, 2, face)
            face = tl.where(choice >= 0, choice, face)
            in0 = (face == 0) | (face == 2)
            in1 = (face == 1) | (face == 2)
            size = tl.where(face == 2, 2, 1)
        inv = tl.where(size == 3, third, tl.where(size == 2, one * 0.5, one))
        # d = P_F z: (d_F)_i = sum over j in F of (s_i - s_j), over |F|.
        sum0 = tl.where(in1, a, 0.0) + tl.where(in2, b, 0.0)
        sum1 = tl.where(in0, -a, 0.0) + tl.where(in2, c, 0.0)
        sum2 = tl.where(in0, -b, 0.0) + tl.where(in1, -c, 0.0)
        sizes = one * size
        if F32:
            d0 = tl.where(in0, tl.div_rn(sum0, sizes), 0.0)
            d1 = tl.where(in1, tl.div_rn(sum1, sizes), 0.0)
            d2 = tl.where(in2, tl.div_rn(sum2, sizes), 0.0)
            n = tl.sqrt_rn(d0 * d0 + d1 * d1 + d2 * d2)
        else:
            d0 = tl.where(in0, sum0 / sizes, 0.0)
            d1 = tl.where(in1, sum1 / sizes, 0.0)
            d2 = tl.where(in2, sum2 / sizes, 0.0)
            n = tl.sqrt(d0 * d0 + d1 * d1 + d2 * d2)
        safe = tl.where(n > 0, n, one)
        if step == 0:
            moved = n > tol
            if F32:
                rho = tl.div_rn(radius, safe)
            else:
                rho = radius / safe
            alpha = tl.maximum(tl.where(moved, rho, 0.0), 1.0)
            # The pushed point, -1 off this face (ties of a point on it go to it).
            p0 = tl.where(in0, inv + alpha * d0, -1.0)
            p1 = tl.where(in1, inv + alpha * d1, -1.0)
            p2 = tl.where(in2, inv + alpha * d2, -1.0)
        else:  # the sphere on this face: r^2 - 1/|F| + 1/3
            squared = tl.maximum(radius * radius + (third - inv), 0.0)
            moved = alpha * n > tol
            if F32:
                rho = tl.div_rn(tl.sqrt_rn(squared), safe)
            else:
                rho = tl.sqrt(squared) / safe
            alpha = tl.maximum(alpha, tl.where(moved, rho, 0.0))
    y0 = tl.minimum(tl.maximum(tl.where(in0, inv, 0.0) + alpha * d0, 0.0), 1.0)
    y1 = tl.minimum(tl.maximum(tl.where(in1, inv, 0.0) + alpha * d1, 0.0), 1.0)
    y2 = tl.minimum(tl.maximum(tl.where(in2, inv, 0.0) + alpha * d2, 0.0), 1.0)
    y0 = tl.where(nan, not_a_number, y0)
    y1 = tl.where(nan, not_a_number, y1)
    y2 = tl.where(nan, not_a_number, y2)
    tl.store(out_ptr + row * K, y0, mask=live)
    tl.store(out_ptr + row * K + 1, y1, mask=live)
    if K == 3:
        tl.store(out_ptr + row * K + 2, y2, mask=live)
    if JACOBIAN:
        if K == 3:
            pushed = moved & (alpha > 1.0)
        else:
            pushed = alpha > 1.0
        if F32:
            u0 = tl.where(pushed, tl.div_rn(d0, safe), 0.0)
            u1 = tl.where(pushed, tl.div_rn(d1, safe), 0.0)
            u2 = tl.where(pushed, tl.div_rn(d2, safe), 0.0)
        else:
            u0 = tl.where(pushed, d0 / safe, 0.0)
            u1 = tl.where(pushed, d1 / safe, 0.0)
            u2 = tl.where(pushed, d2 / safe, 0.0)
        # None for a row one-hot now (as the specification's detached one); NaN rows NaN.
        hot = (y0 > 0).to(tl.int32) + (y1 > 0).to(tl.int32) + (y2 > 0).to(tl.int32)
        scale = tl.where(nan, not_a_number, tl.where(hot != 1, alpha, 0.0))
        # What a double backward differentiates again (sparsestmax_fast._second_order_grad):
        # this row's projector, whether it was pushed, the scale, alpha and |d|.
        aux = aux_ptr + row * 4
        tl.store(aux, pushed.to(alpha.dtype), mask=live)
        tl.store(aux + 1, scale, mask=live)
        tl.store(aux + 2, alpha, mask=live)
        tl.store(aux + 3, n, mask=live)
        # J = (P_F - u u^T) * scale, P_F = [i == j] - 1/|F| on the face, 0 off it.
        base = row * (K * K)
        p = tl.where(in0, 1.0 - inv, 0.0)
        tl.store(proj_ptr + base, p, mask=live)
        tl.store(jac_ptr + base, (p - u0 * u0) * scale, mask=live)
        p = tl.where(in0 & in1, -inv, 0.0)
        tl.store(proj_ptr + base + 1, p, mask=live)
        tl.store(proj_ptr + base + K, p, mask=live)
        tl.store(jac_ptr + base + 1, (p - u0 * u1) * scale, mask=live)
        tl.store(jac_ptr + base + K, (p - u1 * u0) * scale, mask=live)
        p = tl.where(in1, 1.0 - inv, 0.0)
        tl.store(proj_ptr + base + K + 1, p, mask=live)
        tl.store(jac_ptr + base + K + 1, (p - u1 * u1) * scale, mask=live)
        if K == 3:
            p = tl.where(in0 & in2, -inv, 0.0)
            tl.store(proj_ptr + base + 2, p, mask=live)
            tl.store(proj_ptr + base + 6, p, mask=live)
            tl.store(jac_ptr + base + 2, (p - u0 * u2) * scale, mask=live)
            tl.store(jac_ptr + base + 6, (p - u2 * u0) * scale, mask=live)
            p = tl.where(in1 & in2, -inv, 0.0)
            tl.store(proj_ptr + base + 5, p, mask=live)
            tl.store(proj_ptr + base + 7, p, mask=live)
            tl.store(jac_ptr + base + 5, (p - u1 * u2) * scale, mask=live)
            tl.store(jac_ptr + base + 7, (p - u2 * u1) * scale, mask=live)
            p = tl.where(in2, 1.0 - inv, 0.0)
            tl.store(proj_ptr + base + 8, p, mask=live)
            tl.store(jac_ptr + base + 8, (p - u2 * u2) * scale, mask=live)


def _fix_choices_body(mean_ratios_ptr, var_ratios_ptr, mean_choice_ptr, var_choice_ptr, rows,
                      K: tl.constexpr, BLOCK: tl.constexpr):
    """The choices after a training step: a free one (-1) becomes the index of the ratios'
    only positive entry when they are one-hot; rows ``< rows`` are the means', the rest the
    variances'."""
    row = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    means = row < rows
    variances = (row >= rows) & (row < 2 * rows)
    own = tl.where(means, row, row - rows)
    hot = own * 0
    index = own * 0
    for k in tl.static_range(K):
        value = tl.where(means, tl.load(mean_ratios_ptr + own * K + k, mask=means, other=0.0),
                         tl.load(var_ratios_ptr + own * K + k, mask=variances, other=0.0))
        hot += (value > 0).to(hot.dtype)
        index = tl.where(value > 0, k, index)
    mean_choice = tl.load(mean_choice_ptr + own, mask=means, other=0)
    var_choice = tl.load(var_choice_ptr + own, mask=variances, other=0)
    choice = tl.where(means, mean_choice, var_choice)
    new = tl.where((hot == 1) & (choice < 0), index, choice).to(choice.dtype)
    tl.store(mean_choice_ptr + own, new, mask=means)
    tl.store(var_choice_ptr + own, new, mask=variances)


_BODIES = {'sparsestmax': _sparsestmax_body, 'fix_choices': _fix_choices_body}


def _kernel(name: str, device_type: str):
    """The Triton kernel ``name`` for a device type: compiled by Triton for an accelerator,
    interpreted on the CPU."""
    key = (name, device_type)
    if key not in _KERNELS:
        body = _BODIES[name]
        if device_type == 'cpu':
            from triton.runtime.interpreter import InterpretedFunction
            _KERNELS[key] = InterpretedFunction(body)
        else:
            _KERNELS[key] = triton.jit(body)
    return _KERNELS[key]


def _launch(name: str, device: torch.device, rows: int, *args, **constants) -> bool:
    """Launch kernel ``name`` over ``rows`` rows; False (reported once, and the public ops from
    then on for this device type) if it raised."""
    try:
        grid = (max(1, -(-rows // _BLOCK)), )
        # Triton launches on the current device: make it the operands' (a process may hold
        # tensors on several GPUs).
        guard = torch.cuda.device(device) if device.type == 'cuda' else contextlib.nullcontext()
        with guard:
            _kernel(name, device.type)[grid](*args, BLOCK=_BLOCK, **constants)
        return True
    except Exception as error:  # noqa: BLE001 (any failure: the public ops compute it)
        _failed(device.type, f'{type(error).__name__}: {error}')
        return False


def _failed(device_type: str, why: str) -> None:
    """No kernel on this device type from now on; reported once, through the run's log."""
    _FAILED[device_type] = why
    from .compiled import report
    report(f'mmnorm: the SparsestMax kernel cannot run on {device_type} ({why}); Sparse SN '
           f'layers compute their ratios with public PyTorch ops from now on (the same values, '
           f'more kernel launches; MMNORM_SPARSESTMAX_KERNEL=0 silences this).', logging.WARNING)


@torch.library.custom_op('mmnorm::sparsestmax_rows', mutates_args=())
def _sparsestmax_op(first: Tensor, second: Tensor, radius: Tensor, first_choices: Tensor,
                    second_choices: Tensor, jacobian: bool
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    k = first.shape[-1]
    split = first.numel() // k
    rows = split + second.numel() // k
    out, jac, projector, aux = _outputs(first, rows, jacobian)
    stride = radius.stride(0) if radius.dim() else 0
    _launch('sparsestmax', first.device, rows, first, second, split, radius, stride,
            first_choices, second_choices, out, jac, projector, aux, rows,
            8 * torch.finfo(first.dtype).eps, float('nan'), K=k, JACOBIAN=jacobian,
            F32=first.dtype == torch.float32)
    return out, jac, projector, aux


def _outputs(scores: Tensor, rows: int, jacobian: bool):
    """The kernel's outputs, uninitialized: ratios ``(rows, K)``; with ``jacobian`` the
    Jacobians and the projectors ``(rows, K, K)`` and ``(rows, 4)``: pushed (0 / 1), scale,
    alpha and ``|d|`` (else no rows)."""
    k = scores.shape[-1]
    kept = rows if jacobian else 0
    return (scores.new_empty((rows, k)), scores.new_empty((kept, k, k)),
            scores.new_empty((kept, k, k)), scores.new_empty((kept, 4)))


@_sparsestmax_op.register_fake
def _(first, second, radius, first_choices, second_choices, jacobian):
    return _outputs(first, (first.numel() + second.numel()) // first.shape[-1], jacobian)


def _rows_of(scores: Tensor, choices: Tensor) -> bool:
    """Contiguous scores ``(..., K)`` and integer choices ``(...)`` on the scores' device."""
    return (scores.is_contiguous() and choices.is_contiguous()
            and choices.device == scores.device and choices.numel() * scores.shape[-1]
            == scores.numel() and not choices.is_floating_point()
            and choices.dtype != torch.bool)


def kernel_takes(first: Tensor, second: Tensor, radius: Tensor, first_choices: Tensor,
                 second_choices: Tensor) -> bool:
    """Whether :class:`KernelSparsestMax` computes SparsestMax of these (else the public ops
    do): :func:`kernel_applies` to the scores, and the kernel reads them as they are
    (contiguous, one device, a 0-dim radius or one per row in the scores' dtype)."""
    k = first.shape[-1]
    rows = (first.numel() + second.numel()) // k
    return (kernel_applies(first) and second.dtype == first.dtype and second.shape[-1] == k
            and _rows_of(first, first_choices) and _rows_of(second, second_choices)
            and second.device == first.device == radius.device
            and radius.dtype == first.dtype
            and (radius.dim() == 0 or tuple(radius.shape) == (rows, 1)))


class KernelSparsestMax(torch.autograd.Function):
    """SparsestMax of two score tensors' rows ``(..., K)`` with their choices, in one kernel:
    the rows of ``first`` then those of ``second``, as one ``(R, K)`` tensor. ``jacobian``:
    whether a backward may follow (gradients enabled; the kernel then writes the Jacobians).
    The backward is one ``bmm`` with the Jacobians; a double backward differentiates the final
    face's formula again (``sparsestmax_fast._second_order_grad``) with the face, push
    and scale the kernel chose. Call it where :func:`kernel_takes`; it raises
    :class:`KernelFailed` if the launch failed (reported)."""

    @staticmethod
    def forward(ctx, first: Tensor, second: Tensor, radius: Tensor, first_choices: Tensor,
                second_choices: Tensor, jacobian: bool) -> Tensor:
        jacobian = jacobian and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        out, jac, projector, aux = _sparsestmax_op(first, second, radius, first_choices,
                                                   second_choices, jacobian)
        if first.device.type in _FAILED:
            raise KernelFailed(_FAILED[first.device.type])
        if jacobian:
            # Only what the kernel wrote is saved: the scores and the radius may change in
            # place before the backward (set_progress, an optimizer step), as with the
            # public ops. A double backward needs the scores themselves, checked unchanged.
            ctx.save_for_backward(jac, projector, aux)
            ctx.scores = (first, second)
            ctx.versions = (first._version, second._version)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        jac, projector, aux = ctx.saved_tensors
        k = grad.shape[-1]
        first, second = ctx.scores
        split = first.numel() // k
        if torch.is_grad_enabled():  # create_graph=True: a gradient that is differentiable
            if (first._version, second._version) != ctx.versions:
                raise RuntimeError(
                    'SparsestMax: its scores were modified in place between the forward and a '
                    'double backward (create_graph=True), which differentiates them again')
            from .sparsestmax_fast import _second_order_grad
            with torch.enable_grad():
                scores = torch.cat([first.reshape(-1, k), second.reshape(-1, k)])
            pushed, scale, alpha, n = (aux[:, i:i + 1] for i in range(4))
            g = _second_order_grad(scores, projector, pushed != 0, scale, alpha, n, grad)
        else:
            g = torch.bmm(grad.reshape(-1, 1, k), jac).view(-1, k)
        return g[:split].view(first.shape), g[split:].view(second.shape), None, None, None, None


class KernelFailed(RuntimeError):
    """The kernel's launch raised (reported once): compute with the public ops."""


def kernel_sparsestmax(first: Tensor, second: Tensor, radius: Tensor, first_choices: Tensor,
                       second_choices: Tensor) -> Optional[Tensor]:
    """SparsestMax of the rows of ``first`` then ``second`` with their choices, ``(R, K)``, in
    one kernel (:class:`KernelSparsestMax`); None where the kernel does not take them
    (:func:`kernel_takes`) or its launch failed (reported once): the caller computes them with
    the public ops."""
    if not kernel_takes(first, second, radius, first_choices, second_choices):
        return None
    try:
        return KernelSparsestMax.apply(first, second, radius, first_choices, second_choices,
                                       torch.is_grad_enabled())
    except KernelFailed:
        return None


@torch.library.custom_op('mmnorm::fix_sparsest_choices_',
                         mutates_args=('mean_choice', 'var_choice'))
def _fix_choices_op(mean_ratios: Tensor, var_ratios: Tensor, mean_choice: Tensor,
                    var_choice: Tensor) -> None:
    rows = mean_choice.numel()
    _launch('fix_choices', mean_choice.device, 2 * rows, mean_ratios, var_ratios, mean_choice,
            var_choice, rows, K=mean_ratios.shape[-1])


@_fix_choices_op.register_fake
def _(mean_ratios, var_ratios, mean_choice, var_choice):
    return None


def fix_choices_(mean_ratios: Tensor, var_ratios: Tensor, mean_choice: Tensor,
                 var_choice: Tensor) -> bool:
    """:func:`~.sparse_switchable.update_choice_pair` in one kernel, where it applies
    (:func:`kernel_applies`, contiguous ratios, integer choices shaped as their rows); False
    where it does not or failed (the caller updates them with public ops)."""
    if not (kernel_applies(mean_ratios) and mean_ratios.is_contiguous()
            and var_ratios.is_contiguous() and var_ratios.dtype == mean_ratios.dtype
            and mean_ratios.shape == var_ratios.shape
            and mean_choice.dtype == var_choice.dtype
            and mean_choice.shape == var_choice.shape == mean_ratios.shape[:-1]
            and _rows_of(mean_ratios, mean_choice) and _rows_of(var_ratios, var_choice)):
        return False
    _fix_choices_op(mean_ratios.detach(), var_ratios.detach(), mean_choice, var_choice)
    return mean_choice.device.type not in _FAILED
