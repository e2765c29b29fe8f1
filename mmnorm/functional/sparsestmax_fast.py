# Copyright (c) mmnorm contributors. All rights reserved.
r"""SparsestMax with frozen choices in few ops, for the light eager form.

:func:`~mmnorm.functional.sparse_switchable.sparsestmax` unrolls ``K`` rounds of pairwise
comparisons and ``torch.where`` so that it traces, exports and compiles: it stays the
specification, and the plain form (exporters, ``torch.jit.trace``, eager ``torch.func``
transforms, more than three entries) uses it. The light eager form calls
:func:`fast_sparsestmax` instead: the same function of the ratio parameters for ``K`` = 2 or 3
entries, in a fixed handful of ops whatever the number of rows, with a closed-form backward
(one ``bmm``). The light form traced by ``torch.compile`` (mmnorm's compiled form, ``torch.compile``
of a model) takes the same closed form as :func:`elementwise_sparsestmax`, elementwise ops
that a compiler fuses (the unrolled specification compiled to about fifty kernels per training
step).

**Faces.** Every face ``F`` of the simplex (a non-empty subset of the entries) has a centre
:math:`u_F` (uniform on ``F``) and a projector :math:`P_F` onto the differences within ``F``
(:math:`(P_F z)_i = z_i - \bar z_F` on ``F``, 0 elsewhere). Sparsemax's threshold is
:math:`\tau = \max_F (\sum_F z - 1)/|F|` (for the support ``S`` equality holds, and any other
``F`` gives no more since :math:`\sum_F (z_i - \tau) \le \sum_i \max(z_i - \tau, 0) = 1`), so
the face of ``sparsemax(z)`` is an argmax over the ``2^K - 1`` faces (one ``addmm``; vertices
come first, so an exact tie goes to the smaller face, as the specification's strict support
test does) and :math:`\mathrm{sparsemax}(z) = u_S + P_S z`.

**Rounds.** Every later point of SparsestMax is :math:`u_F + \alpha P_F z` on its face ``F``:
a push out to radius :math:`r_F` sets :math:`\alpha = r_F/\|P_F z\|`, and projecting a pushed
point onto a smaller face ``F' ⊂ F`` keeps :math:`\alpha` (:math:`P_{F'} P_F = P_{F'}`). A
round is therefore: the face of the current point, :math:`d = P_F z` (one ``bmm`` with the
face's projector), and :math:`\alpha \leftarrow \max(\alpha, r_F / \|d\|)`
(stays when :math:`\alpha\|d\| \ge r_F`, the specification's test, or at the centre,
:math:`\alpha\|d\| \le 8\epsilon`). The sphere on a smaller face has radius
:math:`r_F^2 = r^2 - \|u_F - u_{S_1}\|^2 = r^2 - 1/|F| + 1/|S_1|` (Pythagoras over the
rounds). With three entries only a push from the full face can leave onto an edge, so the
second round uses :math:`1/|S_1| = 1/3`; on a face the previous round ended on it changes
nothing (a pushed point is on that sphere, a point that stayed is outside it). A push that
leaves an edge ends one-hot: a clamp to [0, 1] gives exactly that. A fixed choice ``c``
(>= 0) selects vertex ``c`` in every round, whose projector is 0: exactly one-hot, without
gradient.

**Backward.** On the final face, :math:`y = u_F + \alpha P_F z` with :math:`\alpha` constant
(not pushed) or :math:`r_F/\|d\|` (pushed): the Jacobian is
:math:`\alpha (P_F - \hat d \hat d^T)` when pushed and :math:`\alpha P_F` otherwise (0 on a
vertex); for an edge :math:`P_F = \hat d \hat d^T`, so a pushed edge point gets none up to
rounding, and a result one-hot now (a push that left an edge) exactly none, as the
specification's detached one-hot results.
"""
import functools
import operator
from typing import Dict, Tuple

import torch
from torch import Tensor

from .sparsestmax_kernel import kernel_sparsestmax

__all__ = ['fast_sparsestmax', 'elementwise_sparsestmax', 'FAST_DTYPES']

#: The dtypes of the fast form; others (half precision) take the specification.
FAST_DTYPES = (torch.float32, torch.float64)

_TABLES: Dict[tuple, Tuple[Tensor, Tensor, Tensor, Tensor]] = {}


def _faces(k: int):
    """The non-empty subsets of ``range(k)``, smallest first (vertices ``0..k-1`` first)."""
    subsets = [tuple(i for i in range(k) if mask >> i & 1) for mask in range(1, 2 ** k)]
    return sorted(subsets, key=lambda s: (len(s), s))


def _tables(k: int, dtype: torch.dtype, device: torch.device, cache: bool = True):
    """For ``k`` entries: ``W`` ``(k, M)`` and ``c`` ``(M,)`` with ``z @ W + c`` each face's
    threshold; ``table`` ``(k + 1, M, k + 3, k)``: each face's projector (rows ``:k``), centre
    (row ``k``), centre minus 1 off the face (row ``k + 1``) and ``1/k - 1/|F|`` (row
    ``k + 2``), first in ``k`` blocks of vertex ``c`` only
    (a fixed choice ``c`` indexes block ``c``), then the free block (choice ``-1``); and the
    scalar 0. Built once per dtype and device; with ``cache=False`` (scores that are a tensor
    subclass: a fake tensor's values, a tracer's) built for this call and not kept, so that a
    real run never gets another mode's tensors, nor such a run real ones it refuses."""
    key = (k, dtype, device)
    if key not in _TABLES or not cache:
        faces = _faces(k)
        m = len(faces)
        w = torch.zeros(k, m, dtype=torch.float64)
        c = torch.empty(m, dtype=torch.float64)
        rows = torch.zeros(m, k + 3, k, dtype=torch.float64)
        for f, face in enumerate(faces):
            size = len(face)
            c[f] = -1.0 / size
            rows[f, k + 1] = -1.0
            rows[f, k + 2, 0] = 1.0 / k - 1.0 / size
            for i in face:
                w[i, f] = 1.0 / size
                rows[f, k, i] = rows[f, k + 1, i] = 1.0 / size
                for j in face:
                    rows[f, i, j] = float(i == j) - 1.0 / size
        blocks = [rows[v].expand(m, k + 3, k) for v in range(k)] + [rows]
        table = torch.stack(blocks)
        tables = tuple(t.to(dtype=dtype, device=device).contiguous() for t in (
            w, c, table, torch.zeros(())))
        if not cache:
            return tables
        _TABLES[key] = tables
    return _TABLES[key]


def _round(z: Tensor, point: Tensor, choices: Tensor, tables, alpha, radius, first: bool):
    """One round: the face ``F`` of ``sparsemax(point)`` (or a fixed choice's vertex),
    ``d = P_F z``, its norm and the new ``alpha``. Returns ``(alpha, d, |d|, rows of F,
    moved)``: ``moved`` where ``alpha |d|`` is off the centre."""
    w, c, table, zero = tables
    k = z.shape[-1]
    face = torch.addmm(c, point, w).argmax(-1)
    rows = table[choices, face]                               # (R, k + 3, k)
    d = torch.bmm(z.unsqueeze(1), rows[:, :k]).squeeze(1)     # P_F z (P_F symmetric)
    n = torch.linalg.vector_norm(d, dim=-1, keepdim=True)
    tol = 8 * torch.finfo(z.dtype).eps
    if first:
        moved = n > tol
        rho = torch.where(moved, radius / n, zero)
        alpha = rho.clamp(min=1)
    else:  # the sphere on this face: r^2 - 1/|F| + 1/k
        face_radius = torch.addcmul(rows[:, k + 2, :1], radius, radius).clamp_(min=0).sqrt_()
        moved = alpha * n > tol
        rho = torch.where(moved, face_radius / n, zero)
        alpha = torch.maximum(alpha, rho)
    return alpha, d, n, rows, moved


def _shifted(z: Tensor) -> Tensor:
    """Rows ``(R, k)`` minus their first entry."""
    return z - z[:, :1]


class _FastSparsestMax(torch.autograd.Function):

    @staticmethod
    def forward(ctx, scores: Tensor, radius: Tensor, choices: Tensor) -> Tensor:
        k = scores.shape[-1]
        # Shifted by each row's first entry (SparsestMax is shift-invariant): near the centre,
        # P_F z of nearly equal large scores is all rounding (of |z|, not of their spread),
        # which the push scales by r / |d|, off the simplex (equal scores [5, 5, 5] in float64
        # gave [0.39, 0.39, 0.39]); differences of nearly equal numbers are exact.
        # The face is chosen from the shifted scores too: its thresholds' rounding is then of
        # the scores' spread, not of their size (scores near 1000 in float32 took the wrong
        # face up to 3e-4 from a boundary, 0.18 off the float64 specification).
        z = _shifted(scores.reshape(-1, k))
        choices = choices.reshape(-1)
        # (FakeTensorMode, as memory estimators run a model, makes every tensor a subclass.)
        tables = _tables(k, z.dtype, z.device, cache=type(z) is Tensor)
        alpha, d, n, rows, moved = _round(z, z, choices, tables, None, radius, True)
        if k == 3:  # a push from the full face may leave it: the face of the pushed point,
            # with -1 off the first face (ties of a point on it go to it, not to a larger face)
            point = torch.addcmul(rows[:, k + 1], alpha, d)
            alpha, d, n, rows, moved = _round(z, point, choices, tables, alpha, radius, False)
        result = torch.addcmul(rows[:, k], alpha, d).clamp_(0, 1)
        if ctx.needs_input_grad[0]:
            pushed = moved & (alpha > 1) if k == 3 else alpha > 1
            unit = torch.where(pushed, d / n, tables[3])
            # A result one-hot now gets none (as the specification's detached one); on an edge
            # the Jacobian is 0 only up to rounding.
            scale = alpha * ((result > 0).sum(-1, keepdim=True) != 1)
            jacobian = torch.baddbmm(rows[:, :k], unit.unsqueeze(2), unit.unsqueeze(1),
                                     alpha=-1).mul_(scale.unsqueeze(2))
            # The rest only for a double backward (create_graph=True): nothing computed for it.
            ctx.save_for_backward(jacobian, scores, rows[:, :k], pushed, scale, alpha, n)
        return result.view(scores.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        jacobian, scores, projector, pushed, scale, alpha, n = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a gradient that is differentiable
            return _second_order_grad(scores, projector, pushed, scale, alpha, n, grad), None, \
                None
        k = grad.shape[-1]
        g = torch.bmm(grad.reshape(-1, 1, k), jacobian)
        return g.view(grad.shape), None, None


def _second_order_grad(scores: Tensor, projector: Tensor, pushed: Tensor, scale: Tensor,
                       alpha: Tensor, n: Tensor, grad: Tensor) -> Tensor:
    """The backward for a double backward: the result's dependence on ``scores`` on its final
    face, run again in differentiable ops and differentiated with ``create_graph=True``.
    There the result is ``u_F + alpha P_F z`` with ``alpha`` constant, or, pushed, ``u_F +
    (alpha n) P_F z / |P_F z|`` (the pushed distance ``alpha n`` constant): its Jacobian is the
    forward's (module docstring), and its derivative the Jacobian's."""
    k = scores.shape[-1]
    with torch.enable_grad():  # (the shift's derivative vanishes under P_F: P_F 1 = 0)
        d = torch.bmm(_shifted(scores.reshape(-1, k)).unsqueeze(1), projector).squeeze(1)
        # (|d| of the pushed rows only: a norm's derivative at 0, a vertex's d, is 0/0)
        norm = torch.linalg.vector_norm(torch.where(pushed, d, 1.0), dim=-1, keepdim=True)
        factor = torch.where(pushed, alpha * n / norm, alpha)
        result = d * factor * (scale != 0)
    return torch.autograd.grad(result, scores, grad.reshape(-1, k), create_graph=True)[0]


def fast_sparsestmax(scores: Tensor, radius: Tensor, choices: Tensor) -> Tensor:
    """SparsestMax of ``scores`` ``(..., K)`` (K = 2 or 3, float32/float64) at ``radius`` (a
    0-dim tensor), rows with a fixed choice (``choices`` ``(...)`` >= 0) the one-hot vector of
    it, and rows one-hot now without gradient: what
    ``_frozen(sparsestmax(scores, radius), choices)`` computes, differentiable in ``scores``
    (see the module docstring)."""
    radius = radius.to(scores.dtype)
    # One kernel on a GPU (sparsestmax_kernel); its second operand has no rows (not a view of
    # the scores, whose gradient autograd would scatter back).
    ratios = kernel_sparsestmax(scores, scores.new_empty((0, scores.shape[-1])), radius,
                                choices, choices.new_empty((0, )))
    if ratios is not None:
        return ratios.view(scores.shape)
    return _FastSparsestMax.apply(scores, radius, choices)


def _total(columns) -> Tensor:
    """The sum of a list of columns (tensors of one shape), elementwise."""
    return functools.reduce(operator.add, columns)


def _projected(member, size: Tensor, columns):
    """``P_F z`` of the columns ``z`` of ``(R, K)`` rows on each row's face ``F`` (``member``:
    each entry's boolean column, ``size``: ``|F|``), and its squared norm; columns."""
    mean = _total([torch.where(m, c, 0) for m, c in zip(member, columns)]) / size
    d = [torch.where(m, c - mean, 0) for m, c in zip(member, columns)]
    return d, _total([c * c for c in d])


def _face_columns(point, choices: Tensor, faces, z):
    """The face ``F`` of ``sparsemax(point)`` (``point``: the ``K`` columns of ``(R, K)``
    rows), or a fixed choice's vertex: each entry's membership (boolean columns), ``|F|``,
    ``d = P_F z`` (columns) and ``|d|``. Elementwise ops only: the argmax over the faces'
    thresholds ``(sum_F point - 1)/|F|`` is a chain of comparisons (strict: a tie goes to the
    earlier, smaller face, as ``argmax`` does in :func:`_round`)."""
    best = face = None
    for index, members in enumerate(faces):
        threshold = (_total([point[i] for i in members]) - 1) / len(members)
        if best is None:
            best, face = threshold, torch.zeros_like(choices)
        else:
            better = threshold > best
            best, face = torch.where(better, threshold, best), torch.where(better, index, face)
    face = torch.where(choices >= 0, choices, face)  # (vertex c is face c)
    member = [functools.reduce(operator.or_, [face == index for index, members in
                                              enumerate(faces) if i in members])
              for i in range(len(z))]
    size = _total([m.to(z[0].dtype) for m in member])
    d, square = _projected(member, size, z)
    return member, size, d, square.sqrt()


def elementwise_sparsestmax(scores: Tensor, radius: Tensor, choices: Tensor) -> Tensor:
    """:func:`fast_sparsestmax` (same arguments; the same values, NaN rows and first and second
    derivatives in the scores up to rounding, and at exact ties the face rounding picks) in
    elementwise ops over the ``K`` = 2 or 3 entries: no reduction, table, matrix product or
    Function, so that a compiler fuses each pass into a kernel or two. It is the form
    ``torch.compile`` traces (mmnorm's compiled form, mmengine's ``compile=True``): the
    specification's unrolled rounds of sparsemax generated some fifty kernels per training
    step of an SSN layer's ratios. Eagerly it is a hundred small ops, which is why the light
    eager form calls :func:`fast_sparsestmax`.

    The values are the module docstring's rounds, computed without gradient. The derivative
    is that of ``alpha P_F z`` on the final face, with ``alpha`` constant or, pushed,
    ``alpha |d| / |P_F z|`` (the pushed distance constant), added to the values as
    ``part - part.detach()`` (exactly 0)."""
    k = scores.shape[-1]
    faces = _faces(k)
    z = _shifted(scores.reshape(-1, k))  # (shifted: see _FastSparsestMax.forward)
    choices = choices.reshape(-1)
    radius = radius.detach().to(z.dtype)  # (a constant of the step, as in fast_sparsestmax)
    tol = 8 * torch.finfo(z.dtype).eps
    columns = z.detach().unbind(-1)
    # NaN for a row with a score not finite, 0 otherwise: as the other forms, whose matrix
    # products carry it into every entry (the comparisons below would pass over it and give
    # a finite, even one-hot, row, from which a training step fixed a choice).
    not_finite = _total(columns) * 0
    member, size, d, norm = _face_columns(columns, choices, faces, columns)
    alpha = torch.where(norm > tol, radius / norm, 0).clamp(min=1)
    moved = None
    if k == 3:  # a push from the full face may leave it (as in _FastSparsestMax.forward)
        point = [torch.where(m, 1 / size, -1) + alpha * c for m, c in zip(member, d)]
        member, size, d, norm = _face_columns(point, choices, faces, columns)
        face_radius = (radius * radius + (1 / k - 1 / size)).clamp(min=0).sqrt()
        moved = alpha * norm > tol
        alpha = torch.maximum(alpha, torch.where(moved, face_radius / norm, 0))
    value = [(torch.where(m, 1 / size, 0) + alpha * c).clamp(0, 1) + not_finite
             for m, c in zip(member, d)]
    if not z.requires_grad:
        return torch.stack(value, -1).view(scores.shape)
    pushed = alpha > 1 if moved is None else moved & (alpha > 1)
    # No gradient for a result one-hot now (as the specification's detached one), nor for a
    # pushed point on an edge: there P_F = dd^T/|d|^2, so the Jacobian
    # alpha (P_F - dd^T/|d|^2) is 0 (differentiated, it is a rounding error of alpha's size).
    hot = _total([(v > 0).int() for v in value]) == 1
    direction, square = _projected(member, size, z.unbind(-1))
    # (|P_F z| of the pushed rows only: a norm's derivative at 0, a vertex's, is 0/0)
    factor = torch.where(pushed, alpha * norm / torch.where(pushed, square, 1).sqrt(), alpha)
    factor = factor * ~(hot | (pushed & (size == 2)))
    return torch.stack([v + (p - p.detach()) for v, p in
                        zip(value, [factor * c for c in direction])], -1).view(scores.shape)
