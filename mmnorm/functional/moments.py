# Copyright (c) mmnorm contributors. All rights reserved.
r"""The computational core shared by every normalizer in mmnorm.

SN, SN_tied and BCN have one structure. Every statistic they use (IN, LN, BN, group statistics
and their mixtures) is a function of the per-(sample, channel) moments of the input,

.. math::
    m_{nc} = \frac{1}{L}\sum_l x_{ncl}, \qquad v_{nc} = \frac{1}{L}\sum_l (x_{ncl} - m_{nc})^2,

and the output is a per-(n, c) affine map of the *centered* input,

.. math::
    y_{ncl} = a_{nc}\,(x_{ncl} - m_{nc}) + b_{nc}, \qquad (a, b) = f(m, v, \theta),

where the *coefficient function* :math:`f` is a small computation on ``(N, C)`` tensors and the
layer's parameters :math:`\theta` (``b`` is the output at the row mean). Centering makes a
channel whose values are all equal map to exactly ``b`` whatever the size of ``a`` (BCN's batch
step has ``a ~ 1/sqrt(eps)`` on zero-variance channels).

:func:`normalize_rows` computes this with public tensor ops only. One **plain form**
(``_forward``: moments, :math:`f`, the affine map as ordinary differentiable ops, no
data-dependent Python control flow) is the specification, and runs these ways:

- **traced** as it is by ``torch.export`` / ONNX, an outer ``torch.compile`` and
  ``torch.jit.trace``;
- **compiled** by mmnorm itself for eager calls on CPU and CUDA (``torch.compile``,
  ``dynamic=True``; when, and what happens when it fails, is decided in :mod:`.compiled`):
  Inductor fuses each full-size pass into one kernel and AOTAutograd derives the backward;
- for eager calls on this process's batch (the default), each normalizer has a **light form**
  of the same function in a few large ops (:mod:`.row_affine` for SN and its variants, ATen's
  batch then group normalization for BCN), which the tests hold to the plain form;
- in **public eager ops** where neither serves (the synchronized layers, whose :math:`f` holds
  a collective; inputs without a spatial dim or values): with a gradient, through
  ``_RowNormFunction``, whose backward touches the full-size tensors in four passes and gets
  the gradient of :math:`f` from ``torch.autograd.grad`` on the small ``(N, C)`` graph built in
  the forward. No calculus is written by hand; only the textbook full-size rules are:

  .. math::
      \frac{\partial \mathcal L}{\partial a} = \sum_l dy\,(x - m), \quad
      \frac{\partial \mathcal L}{\partial b} = \sum_l dy, \quad
      dx = a\,(dy - \overline{dy}) + \frac{2\,\partial v}{L}(x - m) + \frac{\partial m}{L},

  where :math:`\partial m, \partial v` are the gradients reaching the moments through :math:`f`.

Statistics, coefficients and the affine map are computed in float32 for float16/bfloat16 inputs
(float64 stays float64) and rounded to the input dtype once, at the end.
"""
import contextlib
import dataclasses
import functools
import math
import warnings
from typing import Any, Callable, Dict, Mapping, Optional, Protocol, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import forward_ad

from .compiled import COMPILED, compiled_enabled

__all__ = ['LOW_PRECISION', 'stat_dtype', 'as_rows', 'channel_moments', 'pool',
           'normalize_rows', 'CoefficientFn', 'Coefficients', 'is_tracing', 'in_recomputation',
           'COMPILED_DEVICES', 'eager_channel_moments', 'eager_form', 'compiled_rows',
           'compiled_call']


class CoefficientFn(Protocol):
    """What a normalizer contributes to :func:`normalize_rows`: forward-only code on ``(N, C)``
    tensors that turns the per-(n, c) moments into the coefficients of the affine map.

    Called as ``fn(mean, var, *tensors, length=L, process_group=group, **options)``:

    - ``mean``, ``var``: the per-(n, c) moments ``(N, C)`` (biased variance) in
      :func:`stat_dtype` of the input;
    - ``tensors``: the caller's parameters and buffers, in the caller's order (``None`` allowed);
      gradients reach those that require grad;
    - ``length``: the values per row ``L`` (a Python int; symbolic under ``torch.compile``);
    - ``process_group``: the group whose batch forms batch statistics, or ``None`` for this
      process's batch (:func:`~mmnorm.functional.running_stats.batch_statistics`);
    - ``options``: the caller's constants (eps, modes, ratio functions).

    Returns ``(scale, shift, aux)``: ``scale`` and ``shift`` broadcastable to ``(N, C)``, the
    output being ``scale * (x - mean) + shift``; ``aux`` a dict of tensors computed on the way,
    returned to the caller detached (e.g. ``'batch_mean'``, ``'batch_var'``, ``'batch_count'`` for
    the running buffers, see :meth:`~mmnorm.functional.BatchStats.as_aux`; ratios).

    The rules, and why:

    - plain differentiable tensor ops and no data-dependent Python control flow (shapes and
      ``options`` may steer it): it is traced by ``torch.export``, compiled by Inductor, and
      differentiated by autograd on its small graph;
    - a module-level function: ``torch.compile`` keys its cache on the function object, so a
      lambda or closure made per call would compile on every call (:func:`normalize_rows` runs
      such a function in eager ops and warns once);
    - a collective only through ``process_group``: a graph compiled once cannot hold one, so a
      call with a group runs in public eager ops.
    """

    def __call__(self, mean: Tensor, var: Tensor, *tensors: Optional[Tensor], length: int,
                 process_group: Any, **options: Any) -> Tuple[Tensor, Tensor, Dict[str, Tensor]]:
        ...


# (eq=False: compared and hashed by identity, as nothing needs more; torch 2.11's Dynamo failed
# to hash a frozen dataclass built inside a compiled graph, and the compiled form fell back.)
@dataclasses.dataclass(frozen=True, eq=False)
class Coefficients:
    """A coefficient function bound to its constants: what :func:`normalize_rows` runs.

    Attributes:
        fn (CoefficientFn): the module-level coefficient function.
        options (Mapping): its constant keyword arguments (what ``torch.compile`` specialises
            on; shapes stay dynamic).
        process_group: passed to ``fn``; ``None`` for this process's batch.
    """
    fn: CoefficientFn
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    process_group: Any = None

    def __call__(self, mean: Tensor, var: Tensor, *tensors: Optional[Tensor], length: int
                 ) -> Tuple[Tensor, Tensor, Dict[str, Tensor]]:
        return self.fn(mean, var, *tensors, length=length, process_group=self.process_group,
                       **self.options)

    @property
    def name(self) -> str:
        """``module.function``, for messages."""
        return f'{self.fn.__module__}.{self.fn.__qualname__}'

    @property
    def module_level(self) -> bool:
        """Whether ``fn`` is a module-level function (compiled once, cached on its identity)."""
        return '<' not in getattr(self.fn, '__qualname__', '<')


#: dtypes whose statistics and affine map are computed in float32.
LOW_PRECISION = (torch.float16, torch.bfloat16)


def static_shape_checks(fn: Callable) -> Callable:
    """Quiet ``torch.jit.trace``'s ``TracerWarning`` inside ``fn``, a check or a branch on sizes
    that are fixed for a model (channels, ratio shapes; a batch that is not empty).

    Under ``torch.jit.trace`` (and the TorchScript ONNX exporter, mmdeploy's route) sizes are
    tensors, and each Python comparison of one warns that the trace bakes its outcome in: for
    these sizes that is what is meant, and a dozen warnings per layer kind only hide the ones
    that matter. Eager calls run ``fn`` as it is."""
    @functools.wraps(fn)
    def checked(*args, **kwargs):
        if not torch.jit.is_tracing():
            return fn(*args, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', torch.jit.TracerWarning)
            return fn(*args, **kwargs)
    return checked


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in: float32 for float16/bfloat16, else ``dtype``."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def _per_row(t: Tensor, input: Tensor) -> Tensor:
    """``(N, C)`` coefficients shaped to broadcast against ``input`` ``(N, C, *)``."""
    return t.reshape(t.shape + (1, ) * (input.dim() - 2))


def as_rows(input: Tensor) -> Tensor:
    """``input`` ``(N, C, *)`` as ``(N, C, L)`` rows (a view when contiguous; N may be 0)."""
    return input.reshape(input.shape[0], input.shape[1], math.prod(input.shape[2:]))


@static_shape_checks
def _no_values(input: Tensor) -> bool:
    return bool(input.numel() == 0)


def _centered_moments(input: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(mean, var, centered, delta)`` of an ``(N, C, *)`` input; differentiable.

    The corrected two-pass algorithm: ``centered = x - mean(x)`` (a new tensor shaped like the
    input, in the statistics dtype), ``delta = mean(centered)`` (the rounding error of the first
    mean), ``mean = mean(x) + delta`` and ``var = mean(centered^2) - delta^2``. As stable as
    Welford's algorithm, several times faster than ``torch.var_mean`` on CPU, and *exact* for
    rows of equal values (their centered values and ``delta`` are equal, so the corrected mean is
    the value itself): BCN multiplies a mean's error by up to ``1/sqrt(eps)``. ``centered`` is
    ``x - mean + delta``; consumers fold ``delta`` into their ``(N, C)`` coefficients.
    """
    dtype = stat_dtype(input.dtype)
    if input.dim() == 2 or _no_values(input):  # one value per row, or no rows
        if input.dim() == 2:
            first = input.to(dtype)
        else:
            first = input.new_zeros(input.shape[:2], dtype=dtype)
        zeros = torch.zeros_like(first)
        return first, zeros, torch.sub(input, _per_row(first, input)), zeros
    # An exported graph (ONNX, torch.export) may run where every tensor is float16 (a TensorRT
    # engine in fp16 mode, a converted model): there the input is cast before its mean (a mean
    # with dtype= exports as a float16 ReduceMean, whose sum overflows), and the variance is
    # the mean of the squares, whose largest value is a square, not L times the variance (the
    # squared norm overflowed float16's 65504 at a std of 10 on 56 x 56 maps).
    traced = is_tracing()
    if traced and input.dtype != dtype:  # (no Cast where none is needed: see the end of
        input = input.to(dtype)          # normalize_rows)
    first = input.mean(tuple(range(2, input.dim())), dtype=None if traced else dtype)
    centered = torch.sub(input, _per_row(first, input))  # type promotion: one pass for halves
    rows = as_rows(centered)
    delta = rows.mean(-1)
    mean_square = rows.square().mean(-1) if traced else \
        sum_of_squares(rows, (-1, ), keepdim=False) / rows.shape[-1]
    return first + delta, (mean_square - delta.square()).clamp(min=0), centered, delta


def sum_of_squares(centered: Tensor, dims: Sequence[int], keepdim: bool = True) -> Tensor:
    """``sum(centered ** 2)`` over ``dims``: the square of the norm (one read, no temporary)
    when no graph is built, else the sum of the squares. The norm's second derivative is 0/0 at
    a zero row (a constant channel, H·W = 1), so a double backward through it (a gradient
    penalty) was NaN there; the squares' is 2 everywhere. Under ``torch.jit.trace`` always the
    squares: a traced graph must not depend on the grad mode (``torch.jit.trace`` checks its
    trace again under ``no_grad``, where a layer fed by another layer's output differed)."""
    if needs_grad(centered, ()) or torch.jit.is_tracing():
        return centered.square().sum(tuple(dims), keepdim=keepdim)
    return torch.linalg.vector_norm(centered, dim=tuple(dims), keepdim=keepdim).square()


def bessel_factor(input: Tensor) -> Tensor:
    """Bessel's correction ``L / (L - 1)`` for rows of ``L > 1`` values of ``input``
    ``(N, C, *)`` (1 for ``L <= 1``), a tensor of shape ``(1,)`` in :func:`stat_dtype`. Computed
    from the input by tensor ops, so that a traced graph (``torch.jit.trace``, both ONNX
    exporters, ``torch.export``) takes the size it is run at: a Python factor (or a test of
    ``L > 1``) is a constant of the example's size there (NaN or a dropped correction at other
    sizes). Shaped ``(1,)``, not 0-dim: TorchScript's ONNX exporter types a 0-dim result as a
    Python number would be, float32, and a float64 layer's factor lost its precision there."""
    # (summed over a dim, then to (1,) whatever N is: an empty batch's count is 0)
    length = torch.ones_like(input[:1, :1], dtype=stat_dtype(input.dtype)).flatten(1).sum(1).sum(
        0, keepdim=True)
    return length / (length - 1).clamp(min=1)


def channel_moments(input: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-(n, c) mean and biased variance of ``input`` ``(N, C, *)``, in :func:`stat_dtype`.

    Differentiable; see ``_centered_moments``. An input without spatial dims has
    ``mean = input``, ``var = 0``; empty rows get 0, 0.
    """
    return _centered_moments(input)[:2]


@static_shape_checks  # (a traced graph pools over the sizes it is given)
def pool(mean: Tensor, var: Tensor, dim: int) -> Tuple[Tensor, Tensor]:
    """Mean and biased variance of the union of equally sized groups, reduced over ``dim``
    (kept, size 1), by the law of total variance: ``Var = E[var] + E[(mean - E[mean])^2]``.

    The pooled mean is taken relative to the first group's, ``m_0 + E[m - m_0]``, so groups with
    equal means pool to exactly that mean (a constant channel stays exactly centered). An empty
    ``dim`` pools to 0, 0.
    """
    size = mean.shape[dim]
    first = mean.narrow(dim, 0, min(size, 1)).sum(dim, keepdim=True)
    count = max(size, 1)
    pooled_mean = first + (mean - first).sum(dim, keepdim=True) / count
    deviation = mean - pooled_mean
    pooled_var = (var.sum(dim, keepdim=True) + deviation.square().sum(dim, keepdim=True)) / count
    return pooled_mean, pooled_var


def needs_grad(x: Tensor, tensors: Sequence[Optional[Tensor]]) -> bool:
    """Whether a call on ``x`` with ``tensors`` (``None`` allowed) builds a graph: grad mode on
    and any of them requiring grad."""
    return torch.is_grad_enabled() and (
        x.requires_grad or any(t is not None and t.requires_grad for t in tensors))


def differentiable_grads(forward: Callable[..., Tensor], inputs: Sequence[Optional[Tensor]],
                         needs: Sequence[bool], grad_out: Tensor) -> list:
    """A custom Function's input gradients for a backward that builds a graph
    (``create_graph=True``: gradient penalties, second derivatives): ``forward(*inputs)`` run
    again in differentiable ops on the original inputs and differentiated with
    ``create_graph=True``, so that the gradients depend on the inputs as they should (a
    hand-written backward's would be constants, and the second derivative silently wrong).
    ``needs`` says which inputs want one; returns one gradient (or None) per input.

    The forward runs on aliases of the inputs (``view_as``), so that the gradients are this
    call's own: with the inputs themselves, a layer called twice (a head shared by the
    pyramid's levels), whose second input depends on the first call's parameters, got the
    total derivative through its input as well, and the outer backward added that path again.
    """
    with torch.enable_grad():
        aliases = [t.view_as(t) if t is not None and need else t
                   for t, need in zip(inputs, needs)]
        out = forward(*aliases)
    wanted = [t for t, need in zip(aliases, needs) if need]
    found = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True,
                                     allow_unused=True))
    grads = []
    for t, need in zip(inputs, needs):
        g = next(found) if need else None
        grads.append(torch.zeros_like(t) if need and g is None else g)
    return grads


def is_tracing() -> bool:
    """True under ``torch.compile`` / ``torch.export`` and TorchScript tracing: no host reads,
    no Python-side state; exporters get the plain form of :func:`normalize_rows`. Also under
    a ``transforms_active()`` transform, whose wrapped tensors allow neither."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or transforms_active()


def transforms_active() -> bool:
    """True under a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``, ``jacrev``,
    ``hessian``, ...) or inside ``torch.autograd.forward_ad.dual_level()``.

    There the light form's autograd Functions cannot run (a transform needs a Function's
    ``setup_context`` and forward-mode AD its ``jvp``, and a batched tensor has no host value):
    the layers take their plain form, public ops that every transform supports, as
    ``nn.BatchNorm2d`` does. PyTorch has no public query for either: these are the checks its
    own ``autograd.Function`` makes before refusing. (Not where ``torch.compile`` traces the
    transform: :func:`compiling_to_run` does not ask, since the functorch query costs estimated
    BCN's compiled graph one more break.)
    """
    return (torch._C._are_functorch_transforms_active()
            or getattr(forward_ad, '_current_level', -1) >= 0)


#: PyTorch's test for the batched tensors of its first vmap, which autograd's vectorized
#: backward (``is_grads_batched``, ``jacobian(vectorize=True)``, ``gradcheck``'s batched check)
#: still uses; private, and absent from a version that drops them (then nothing is such a batch).
_is_legacy_batched = getattr(torch._C._functorch, 'is_legacy_batchedtensor', lambda t: False)


def batched_gradient(grad: Tensor) -> bool:
    """Whether a backward runs on a batch of output gradients: under a ``torch.func``
    transform (:func:`transforms_active`) or in autograd's vectorized backward, which runs a
    Function's backward once under its own ``vmap`` (not a transform, and no public query says
    so). A batched tensor cannot be written into an unbatched buffer (``out=``, in place), so a
    backward that reuses buffers takes out-of-place ops there. False where ``torch.compile``
    traces the backward (its graphs take plain gradients; Dynamo cannot trace the private
    query, which would break the graph)."""
    if torch.compiler.is_compiling():
        return False
    return transforms_active() or _is_legacy_batched(grad)


def compiling_to_run() -> bool:
    """True while ``torch.compile`` (Dynamo) traces a model to run it, not to export it
    (``torch.export``, the ONNX exporter) nor under TorchScript tracing.

    There the light eager form's autograd Functions (:mod:`.row_affine`) are traced as they
    are, forward and hand-written backward, and Inductor fuses their few large operations into
    fewer kernels than it generates from the plain form's autograd graph. Exporters keep the
    plain form: ONNX and ``torch.export`` graphs of plain ATen ops, without custom Functions.
    """
    return (torch.compiler.is_dynamo_compiling() and not torch.compiler.is_exporting()
            and not torch.jit.is_tracing())


def in_recomputation() -> bool:
    """True while autograd recomputes a checkpointed forward (``torch.utils.checkpoint``,
    ``with_cp=True``), reentrant or not.

    Both kinds of activation checkpointing re-run the forward from inside the backward pass, and
    a forward never otherwise runs there. The layers use this to leave their running statistics
    and BCN's estimates alone the second time (``torch.autograd.graph`` uses the same graph-task
    query for the same purpose). Always False under ``torch.compile`` and TorchScript tracing
    (not under ``transforms_active()``: forward-mode AD runs checkpointed forwards again too).
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    return torch._C._current_graph_task_id() != -1


def saved_tensors_hooks_active() -> bool:
    """True while ``torch.autograd.graph.saved_tensors_hooks`` are active: the first pass of a
    non-reentrant activation checkpoint (``torch.utils.checkpoint(..., use_reentrant=False)``),
    whose recomputation must save what the first pass saved, or activation offloading
    (``save_on_cpu``). PyTorch has no public query; this is the one its own checkpoint and
    AOTAutograd code make."""
    return torch._C._autograd._top_saved_tensors_default_hooks(True) is not None


#: ``F.batch_norm``'s eps for an exact affine map: torch before 2.13 refuses eps 0 (the GPU
#: machine's torch is 2.11), and ``1 + 1e-30`` rounds to exactly 1 in every floating dtype, so
#: the running variance 1 still divides by exactly 1.
_UNIT_EPS = 1e-30


def _row_affine(rows: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``scale * rows + shift`` per row of contiguous ``(N, C, L)`` rows (a new tensor, viewed).

    Batch norm's inference kernel on the ``(1, N*C, L)`` view, with running mean 0, running
    variance 1 and a negligible eps (:data:`_UNIT_EPS`), is exactly this per-"channel" affine
    map, and on CPU it is 2-3x faster than broadcasting ``addcmul`` when rows are short (RoI
    features, ``L = 49``). The result is a view, so it serves gradients, not layer outputs
    (which callers may modify in place).
    """
    n, c, length = rows.shape
    if rows.numel() == 0:
        return torch.empty_like(rows)
    flat_scale, flat_shift = scale.reshape(n * c), shift.reshape(n * c)
    out = F.batch_norm(rows.view(1, n * c, length), torch.zeros_like(flat_scale),
                       torch.ones_like(flat_scale), flat_scale, flat_shift, False, 0.0, _UNIT_EPS)
    return out.view(n, c, length)


def _forward(input: Tensor, coefficients: Coefficients, tensors: Sequence[Optional[Tensor]],
             track: bool = False):
    """The plain form: ``y = a (x - m) + b`` with ``x - m = centered - delta``.
    Returns ``(out, aux, state)``.

    ``track=False``: plain differentiable ops (the plain form). ``track=True``: the moments are
    cut from ``x`` and the ``(N, C)`` graph of the coefficients is built on detached leaves, for
    ``_RowNormFunction``'s backward; ``delta`` is folded into the ``(N, C)`` shift.
    """
    mean, var, centered, delta = _centered_moments(input)
    leaves = [mean, var, *tensors]
    if track:  # the moments always get a gradient (they depend on x); tensors only if theirs
        leaves = [t.detach().requires_grad_(i < 2 or t.requires_grad) if t is not None else None
                  for i, t in enumerate(leaves)]
        delta = delta.detach()
    with torch.enable_grad() if track else contextlib.nullcontext():
        scale, shift, aux = coefficients(*leaves, length=math.prod(input.shape[2:]))
        scale, shift = scale.expand_as(mean), shift.expand_as(mean)
    a, b = (scale.detach(), shift.detach()) if track else (scale, shift)
    # A new tensor shaped like the input, never a view: callers may modify it in place.
    out = torch.addcmul(_per_row(b - a * delta, input), centered, _per_row(a, input))
    aux = {key: value.detach() for key, value in aux.items()}
    # (a Python test, not a no-op .to(): TorchScript's exporter writes that as a Cast node,
    # which onnxconverter-common's float16 conversion (1.16) mistypes or fails on)
    out = out if out.dtype == input.dtype else out.to(input.dtype)
    return out, aux, (leaves, scale, shift, centered, delta)


class _RowNormFunction(torch.autograd.Function):
    """Eager training form of :func:`normalize_rows` with public ops (see the module
    docstring): the fallback of the compiled plain form, and the form of the synchronized
    layers (their coefficient function holds a collective).

    Saves one full-size tensor (the centered input, or the input itself when that is narrower)
    and ``(N, C)``-sized tensors; the ``(N, C)`` graph of the coefficients rides on ``ctx``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, coefficients: Coefficients, aux_keys: list,
                *tensors: Optional[Tensor]):
        out, aux, (leaves, scale, shift, centered, delta) = _forward(x, coefficients, tensors,
                                                                     track=True)
        ctx.graph = (leaves, scale, shift)
        # The input is kept (the first-pass mean recenters it in backward: the same numbers)
        # where the centered input is wider (half precision), and wherever a double backward
        # can run the forward again on it: all but the synchronized layers, whose statistics
        # come from a collective that a backward must not run again. Those keep the centered
        # input (one pass less in their backward).
        ctx.coefficients = coefficients
        ctx.tensors = None if coefficients.process_group is not None else tensors
        ctx.recenter = centered.dtype != x.dtype or ctx.tensors is not None
        ctx.save_for_backward(x if ctx.recenter else centered, leaves[0].detach() - delta,
                              delta)
        aux_keys.extend(aux)  # an autograd.Function returns tensors: the names travel aside
        ctx.mark_non_differentiable(*aux.values())
        return (out, *aux.values())

    @staticmethod
    def backward(ctx, grad_out: Tensor, *_):
        saved, first, delta = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a gradient that is differentiable
            if ctx.tensors is None:
                # Its gradient would be a constant of the input (it keeps the centered input):
                # refused rather than a second derivative silently wrong.
                raise RuntimeError(
                    'mmnorm: a double backward (create_graph=True) is not supported by the '
                    'synchronized layers while they synchronize (training in a process group); '
                    'the other layers support it in eager mode')
            grads = differentiable_grads(
                lambda x, *tensors: _forward(x, ctx.coefficients, tensors)[0],
                (saved, *ctx.tensors), ctx.needs_input_grad[:1] + ctx.needs_input_grad[3:],
                grad_out)
            return (grads[0], None, None, *grads[1:])
        leaves, scale, shift = ctx.graph
        centered = torch.sub(saved, _per_row(first, saved)) if ctx.recenter else saved
        rows = as_rows(centered.contiguous())
        dy = as_rows(grad_out.contiguous()).to(rows.dtype)
        grad_shift = dy.sum(-1)
        grad_scale = torch.linalg.vecdot(dy, rows) - delta * grad_shift
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad((scale, shift), wanted, (grad_scale, grad_shift),
                                         retain_graph=True, allow_unused=True))
        found = {id(t): next(grads) for t in wanted}

        def grad_of(t: Optional[Tensor]) -> Optional[Tensor]:
            if t is None or not t.requires_grad:
                return None
            g = found[id(t)]
            return torch.zeros_like(t) if g is None else g

        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _input_grad(dy, rows, delta, scale.detach(), grad_shift,
                                 grad_of(leaves[0]), grad_of(leaves[1]))
            grad_x = grad_x.to(grad_out.dtype).view(grad_out.shape)
            # The rows were contiguous; the gradient takes the input's layout (channels_last
            # convolutions consume it as it is). Not for a batch of gradients: vmap cannot ask
            # a batched tensor its layout (and autograd takes the batch in any layout).
            if not batched_gradient(grad_out):
                grad_x = grad_x.contiguous(memory_format=_memory_format(saved))
        return (grad_x, None, None, *[grad_of(t) for t in leaves[2:]])


def _memory_format(t: Tensor) -> torch.memory_format:
    """The memory format ``t`` is laid out in (channels-last when it is and is not also
    contiguous, as for ``C = 1`` or ``H = W = 1``)."""
    if t.is_contiguous():
        return torch.contiguous_format
    for fmt, dims in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if t.dim() == dims and t.is_contiguous(memory_format=fmt):
            return fmt
    return torch.contiguous_format


def _input_grad(dy: Tensor, centered: Tensor, delta: Tensor, scale: Tensor, grad_shift: Tensor,
                grad_mean: Tensor, grad_var: Tensor) -> Tensor:
    """Public ops: ``dx = a (dy - mean(dy)) + (2 dv / L)(x - m) + dm / L`` for rows
    ``(N, C, L)``, ``L > 1``, with ``x - m = centered - delta``, in two full-size passes.

    ``dm``/``dv`` reach the moments through the coefficient function; ``-a mean(dy)`` is the
    moment's own share of ``y = a (x - m) + b``. Two full-size passes.
    """
    length = dy.shape[-1]
    if length <= 1:
        # x = m and dy = mean(dy): dx = dm exactly (0 where the output ignores the input).
        return grad_mean.unsqueeze(-1).expand_as(dy).clone()
    slope = (2.0 / length) * grad_var
    offset = (grad_mean - scale * grad_shift) / length - slope * delta
    return _row_affine(centered, slope, offset).addcmul_(dy, scale.unsqueeze(-1))


#: Devices whose eager calls run the compiled form (Inductor: C++ / OpenMP, Triton).
COMPILED_DEVICES = ('cpu', 'cuda')


_warned_not_module_level: set = set()


def _plain_form(x: Tensor, *tensors: Optional[Tensor], coefficient_fn: CoefficientFn,
                **options) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The plain form, with the coefficient function and its constant options as arguments:
    what ``torch.compile`` guards on (shapes stay dynamic)."""
    out, aux, _ = _forward(x, Coefficients(coefficient_fn, options), tensors)
    return out, aux


def compiled_call(name: str, fn: Callable, x: Tensor, *args, **kwargs):
    """``fn(x, *args, **kwargs)`` run by :data:`~mmnorm.functional.compiled.COMPILED`, the
    compiled form (one ``torch.compile`` of ``fn`` per ``name``; the keyword arguments are
    constant options, part of the graph key), or ``None`` when it failed now (the caller then
    runs the form :func:`eager_form` chooses next). ``fn`` is a module-level function."""
    return COMPILED.run(name, fn, _kind(fn, kwargs), x, *args, **kwargs)


def _kind(fn: Callable, kwargs) -> str:
    """The computation's name: the normalizer's module (or the function's name) and its ratio
    function, if any."""
    base = kwargs.get('coefficient_fn')
    name = base.__module__.split('.')[-1] if base is not None else fn.__name__.strip('_')
    return '/'.join([name] + [value.__name__ for value in kwargs.values()
                              if callable(value) and value is not base])


def eager_channel_moments(input: Tensor) -> Tuple[Tensor, Tensor]:
    """:func:`channel_moments` for an eager caller, compiled where the layers' forward is
    (BCN's Algorithm 1 update uses it: one fused pass instead of four)."""
    if not is_tracing() and _compiles(input, None) and COMPILED.wants('moments'):
        result = compiled_call('moments', channel_moments, input)
        if result is not None:
            return result
    return channel_moments(input)


def _compiles(x: Tensor, coefficients: Optional[Coefficients]) -> bool:
    """Whether this eager call runs the compiled form: compiled form on, a device it
    serves, more than one value per row (``L = 1`` has its own exact gradient rule), and, for a
    coefficient function, no process group (a collective forces the eager form) and a
    module-level function (see :class:`CoefficientFn`)."""
    if not (compiled_enabled() and x.device.type in COMPILED_DEVICES and x.dim() > 2
            and x.numel() > 0 and math.prod(x.shape[2:]) > 1):
        return False
    if coefficients is None:
        return True
    if not coefficients.module_level:
        if coefficients.name not in _warned_not_module_level:
            _warned_not_module_level.add(coefficients.name)
            warnings.warn(f'mmnorm: the coefficient function {coefficients.name} is not a '
                          'module-level function; it runs in eager ops (compiling it would '
                          'recompile on every call)', stacklevel=4)
        return False
    return coefficients.process_group is None


def eager_form(x: Tensor, coefficients: Coefficients) -> str:
    """The form of this call, decided once: ``'traced'`` (under tracing for export: the plain
    form; ``torch.compile`` of a model traces the light form, ``compiling_to_run``, which a
    layer may still trace in its plain form: BCN does on the CPU),
    ``'compiled'`` (:mod:`.compiled` wants it: the layer's form compiled), ``'light'`` (the light
    eager form of :mod:`.row_affine`, for this process's batch with a spatial dim and at least
    one value) or ``'public'`` (``_RowNormFunction`` / the plain form in eager ops: a
    process group, no spatial dim, an empty batch)."""
    if is_tracing():
        if (compiling_to_run() and coefficients.process_group is None and x.dim() > 2
                and x.numel() > 0):
            return 'light'
        return 'traced'
    if _compiles(x, coefficients) and COMPILED.wants(coefficients.name):
        return 'compiled'
    if coefficients.process_group is None and x.dim() > 2 and x.numel() > 0:
        return 'light'
    return 'public'


def compiled_rows(x: Tensor, coefficients: Coefficients, tensors: Sequence[Optional[Tensor]]
                  ) -> Optional[Tuple[Tensor, Dict[str, Tensor]]]:
    """:func:`normalize_rows`'s plain form compiled (:mod:`.compiled`), or ``None`` when the
    compiled form failed now (it is then off, and the caller runs the form
    :func:`eager_form` chooses next: the one every later call runs)."""
    result = compiled_call('fn', _plain_form, x, *tensors, coefficient_fn=coefficients.fn,
                           **coefficients.options)
    if result is None:
        return None
    out, aux = result
    return out, {key: value.detach() for key, value in aux.items()}


def normalize_rows(x: Tensor, coefficients: Coefficients, tensors: Sequence[Optional[Tensor]],
                   form: Optional[str] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """``y = a * (x - m) + b`` per (n, c), with ``(a, b, aux) = coefficients(m, v, *tensors,
    length=L)``.

    Under tracing (``torch.export``, an outer ``torch.compile``, ``torch.jit.trace``) this is
    the plain form. Eager calls run the plain form compiled by ``torch.compile`` (one fused
    kernel per pass; see :mod:`.compiled`), or, where that does not serve, public eager ops
    (``_RowNormFunction`` when a gradient is needed). All compute the same function.

    Args:
        x (Tensor): ``(N, C, *)``, any number of spatial dims.
        coefficients (Coefficients): the layer's coefficient function with its constants
            (:class:`CoefficientFn` says what it may do).
        tensors (sequence): its parameters and buffers (``None`` allowed); gradients reach those
            that require grad.
        form (str, optional): the form :func:`eager_form` chose for this call, when the caller
            asked (it counts calls); ``'light'`` is run by the caller itself, so anything else
            here. Defaults to None (decided here).

    Returns:
        tuple: ``y`` (a new tensor shaped and typed like ``x``, not a view) and the ``aux`` dict
        of the coefficient function (detached).
    """
    if form is None:
        form = 'traced' if is_tracing() else (
            'compiled' if _compiles(x, coefficients) and COMPILED.wants(coefficients.name)
            else 'public')
    if form == 'compiled':
        result = compiled_rows(x, coefficients, tensors)
        if result is not None:
            return result
    if not needs_grad(x, tensors) or is_tracing():
        out, aux, _ = _forward(x, coefficients, tensors)
        return out, aux
    aux_keys: list = []
    out, *aux = _RowNormFunction.apply(x, coefficients, aux_keys, *tensors)
    return out, dict(zip(aux_keys, aux))
