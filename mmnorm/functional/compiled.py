# Copyright (c) mmnorm contributors. All rights reserved.
"""Which form an eager call of mmnorm's layers runs, in one place: the compiled form (a layer's
computation compiled by ``torch.compile``, Inductor: C++ / OpenMP on CPU, Triton on GPUs; the
light form of :mod:`.row_affine` for SN, SN_tied and SSN with ``mix='var'``; BCN's batch then
group normalization where launches count (a GPU), its plain form on the CPU; the plain form for
the others) or the eager forms (the light eager form, or public eager ops).

The compiled form is **opt-in**, as timm's fast-norm switch is: the eager forms are about as
fast on the CPU, cost no compilation, and every process runs them from its first call.

**Modes** (:func:`use_compiled`; the environment variable ``MMNORM_COMPILE`` sets the mode when
mmnorm is imported, and overrides the config of a :class:`~mmnorm.engine.CompiledFormHook`):

- ``'never'`` (the default; ``False``, ``MMNORM_COMPILE=0`` or unset): the eager forms only.
- ``'always'`` (``True``, ``MMNORM_COMPILE=1``): compiled from the first call.
- ``'auto'`` (``MMNORM_COMPILE=auto``): the eager forms until a *training-iteration boundary*,
  then compiled. The switch is :func:`auto_switch`, thrown by
  :class:`~mmnorm.engine.CompiledFormHook` before training iteration
  :data:`COMPILE_AFTER_ITERS` (the hook's ``compile_after_iters``): it depends on the iteration
  number only, so every rank of a distributed run switches at the same iteration whatever its
  data (no call is counted), and it is thrown before training iterations only, so a validation
  or test loop runs in the form it started with from its first batch to its last (a run that
  only evaluates never compiles). Without the hook (outside a Runner, or a Runner whose config
  lacks it) nothing throws the switch and ``'auto'`` behaves like ``'never'``; call
  :func:`auto_switch` yourself at a step every process reaches at the same time.

The whole model can be compiled instead, with mmengine's ``compile=True`` (``torch.compile`` of
the model): the layers are then traced into the model's graph, whatever the mode, in the same
forms as above (:func:`~mmnorm.functional.moments.eager_form`).

**Failures fall back loudly, once**: the compiled form is given up for the process, with one
warning through mmengine's logger (rank 0's), and the call runs in the eager forms when

- a graph fails to compile (``BackendCompilerFailed``);
- its *backward* fails to compile: AOTAutograd compiles a backward lazily, inside the user's
  ``loss.backward()``, where nothing could fall back; so the first call of every new graph that
  will be differentiated is differentiated once at once, on detached copies (a probe);
- a new graph fails on its first run (Triton out of resources, autotuning out of memory);
- more graphs would be needed than :data:`RECOMPILE_LIMIT` in the process, or than Dynamo's
  ``torch._dynamo.config.recompile_limit`` for one computation (past it Dynamo would silently
  run the rest uncompiled). mmnorm counts the graphs itself. Dynamo's default limit, 8 graphs
  per computation, is less than one model's layers need (channel counts of 1 to 4, size-1
  dimensions, training and eval, requires_grad patterns: 11 for mmdet's backbones), so the
  first graph mmnorm compiles in a process raises ``recompile_limit`` to :data:`RECOMPILE_LIMIT`
  if it is lower, once (``_raise_recompile_limit``): the one Dynamo setting mmnorm changes,
  only once the compiled form is used, never lowered, never per call.

A *new graph* is one whose key (``_graph_key``) has not run (everything ``torch.compile``
guards on besides dynamic sizes: the computation, its options, the dtypes, devices, ranks,
``requires_grad`` and size-1 dimensions of its tensors, the grad and autocast modes), or a call
during which Dynamo compiled a graph all the same. An error of a graph that has already run
passes through (it is the caller's). Each new graph is reported once with its compile time,
through mmengine's logger.

**No process-global setting is changed per call** (only that limit, once): tensors are
passed to the compiled function as views of themselves marked with
``torch._dynamo.maybe_mark_dynamic``, so that every size (parameters' included: one graph serves
every channel count) is dynamic without ``torch.compile(dynamic=True)`` (which patches
``assume_static_by_default`` around each call) or ``force_parameter_static_shapes=False``.

**Threads**: the state (:class:`CompiledForm`) is guarded by a lock; a new graph is compiled
and probed by one thread at a time, graphs that have run run concurrently. (While any thread
compiles, torch 2.13 reports ``torch.compiler.is_compiling()`` as True in every thread, so the
layers called meanwhile in other threads run the plain form in eager ops: same results.)
"""
import logging
import os
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

__all__ = ['MODES', 'COMPILE_AFTER_ITERS', 'RECOMPILE_LIMIT', 'CompiledForm', 'COMPILED',
           'use_compiled', 'auto_switch', 'compiled_enabled', 'compile_mode', 'resolve_mode',
           'report', 'INDUCTOR_OPTIONS']

#: What :func:`use_compiled` accepts (besides True / False).
MODES = ('auto', 'always', 'never')
#: Training iterations ``'auto'`` runs in the eager forms before
#: :class:`~mmnorm.engine.CompiledFormHook` switches it to the compiled form (the hook's
#: default ``compile_after_iters``): about as many calls as the 5000 after which ``'auto'``
#: compiled before, for a ResNet-50 (53 layer calls per iteration).
COMPILE_AFTER_ITERS = 100
#: Compiled graphs per process (computations x dtypes x ranks x modes x specializations).
RECOMPILE_LIMIT = 64

_ENV_MODES = {'0': 'never', 'false': 'never', 'never': 'never', '': 'never', '1': 'always',
              'true': 'always', 'always': 'always', 'auto': 'auto'}


def resolve_mode(value: Any) -> str:
    """The mode ``value`` names.

    Args:
        value: a mode, True / False, or a value of ``MMNORM_COMPILE`` (empty: ``'never'``).

    Returns:
        str: ``'auto'``, ``'always'`` or ``'never'``.

    Raises:
        ValueError: ``value`` names no mode.
    """
    if value is True or value is False:
        return 'always' if value else 'never'
    mode = _ENV_MODES.get(str(value).strip().lower())
    if mode is None:
        raise ValueError(f'compiled form: expected one of {MODES} (or True / False), got '
                         f'{value!r}')
    return mode


def _rank() -> int:
    """This process's rank in the default group (0 when it is not initialized)."""
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        return distributed.get_rank()
    return 0


def report(message: str, level: int = logging.INFO) -> None:
    """Log one of mmnorm's messages, once per run: on rank 0 only when ``torch.distributed`` is
    initialized, through mmengine's current logger when mmengine is installed (the OpenMMLab
    log), else through the ``mmnorm`` logger of the standard library.

    Args:
        message (str): the message.
        level (int): a ``logging`` level. Defaults to ``logging.INFO``.
    """
    if _rank() != 0:
        return
    try:
        from mmengine.logging import print_log
    except ImportError:  # the core runs without OpenMMLab packages (tools/gpu_check.py)
        logging.getLogger('mmnorm').log(level, message)
    else:
        print_log(message, logger='current', level=level)


def _stop_recomputation(error: BaseException) -> bool:
    """Activation checkpointing stops a recomputation early with an exception: control flow,
    not a failure."""
    return type(error).__name__ == '_StopRecomputationError'


def _ones(t: Tensor) -> Tuple[int, ...]:
    """The dims of ``t`` of size 0 or 1 (``torch.compile`` specializes them)."""
    return tuple(axis for axis, size in enumerate(t.shape) if size <= 1)


#: Tensors with at most this many values are keyed by their shape (the ratio inputs, whose
#: size is the number of normalizers, and scalars), and so are those of two or more dims (the
#: group-wise ratio tables ``(G, K)``: parameters, whose shapes Dynamo specializes); other
#: (per-channel) ones by their size-1 dims only.
_SMALL = 4


def _tensor_key(t: Any) -> Any:
    """What ``torch.compile`` guards on in one tensor argument besides dynamic sizes."""
    if not isinstance(t, Tensor):
        return _option_key(t)
    shape = tuple(t.shape) if t.numel() <= _SMALL or t.dim() > 1 else _ones(t)
    return (t.dtype, t.device.type, t.device.index, t.dim(), t.requires_grad, shape)


def _option_key(value: Any) -> Any:
    """A constant option as a hashable key (a function by identity, containers by value)."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, ) + tuple(_option_key(v) for v in value)
    if isinstance(value, dict):
        return ('dict', ) + tuple(sorted((k, _option_key(v)) for k, v in value.items()))
    if isinstance(value, Tensor):
        return _tensor_key(value)
    try:
        hash(value)
    except TypeError:
        return (type(value).__name__, repr(value))
    return (type(value).__name__, value)


def _layout(x: Tensor) -> str:
    """The memory format of ``x`` (its strides are guarded on)."""
    if x.is_contiguous():
        return 'contiguous'
    for name, fmt, dims in (('channels_last', torch.channels_last, 4),
                            ('channels_last_3d', torch.channels_last_3d, 5)):
        if x.dim() == dims and x.is_contiguous(memory_format=fmt):
            return name
    return 'strided'


def _graph_key(what: str, x: Tensor, args: tuple, kwargs: Optional[dict] = None) -> Tuple:
    """Everything that makes ``torch.compile`` compile another graph of ``what`` besides dynamic
    sizes: one compiled graph per key (a key may be finer than Dynamo's guards, never coarser).

    Args:
        what (str): the computation (its name).
        x (Tensor): the input ``(N, C, *)``.
        args (tuple): the tensors (parameters, buffers, ``None``) and other positional
            arguments.
        kwargs (dict, optional): the constant options (the coefficient function, the ratio
            function, ``eps``, ``mix``, ``batch``, ``in_unbiased``, ``num_groups``, ...).

    Returns:
        tuple: ``(what, dtype, dim, device type, grad mode, size-1 dims of x, layout of x,
        autocast, tensor arguments, options)``; the tensor arguments by dtype, device,
        ``requires_grad``, rank and size-1 dims (the whole shape of small ones: the number of
        normalizers).
    """
    device = x.device.type
    enabled = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    autocast = (enabled, torch.get_autocast_dtype(device) if enabled else None)
    options = tuple(sorted((k, _option_key(v)) for k, v in (kwargs or {}).items()))
    return (what, x.dtype, x.dim(), device, torch.is_grad_enabled(), _ones(x), _layout(x),
            autocast, x.device.index, x.requires_grad, tuple(_tensor_key(a) for a in args),
            options)


def _group(name: str, kwargs: dict) -> Tuple:
    """The graphs Dynamo counts together against ``recompile_limit``: one compiled function's
    graphs with the same functions among its arguments."""
    return (name, ) + tuple(sorted((k, id(v)) for k, v in kwargs.items() if callable(v)))


def _cached_graphs(fn: Callable) -> int:
    """The graphs Dynamo holds for ``fn`` (its code object's cache entries; -1 where this
    torch cannot tell)."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
        return len(_debug_get_cache_entry_list(fn.__code__))
    except Exception:  # pragma: no cover - a torch without the debug accessor
        return -1


def _dynamic(value: Any) -> Any:
    """A tensor as a view of itself whose sizes Dynamo treats as dynamic (gradients reach the
    tensor): marked with ``torch._dynamo.maybe_mark_dynamic``, which sets an attribute on the
    tensor it marks (on a view, not on the caller's tensor), instead of ``torch.compile(...,
    dynamic=True)``, which patches the process-global ``assume_static_by_default`` around every
    call; and a plain tensor, not a ``Parameter`` (Dynamo makes a ``Parameter``'s sizes static,
    one graph per channel count, unless the process-global ``force_parameter_static_shapes`` is
    off)."""
    if not isinstance(value, Tensor):
        return value
    view = value.view_as(value)
    if view.dim():
        torch._dynamo.maybe_mark_dynamic(view, list(range(view.dim())))
    return view


#: Inductor options of every function mmnorm compiles (given to that ``torch.compile`` only,
#: not to the process's Inductor config). Sizes are dynamic, so one graph serves every input
#: size, but Inductor's C++ backend decides whether a loop runs on OpenMP threads from the sizes
#: of the call it compiles at, and caches that code on disk: a graph first compiled at a small
#: size (a short test, a nearly empty RoI batch) ran single-threaded at every size after, in
#: every later process. With ``cpp.dynamic_threads`` every loop nest gets at least its outermost
#: loop in a parallel region, whose threads the OpenMP runtime sets when it runs (deeper loops
#: are still parallelized from the first sizes). (Triton's grids are sized at run time anyway.)
INDUCTOR_OPTIONS = {'cpp.dynamic_threads': True}

_LIMIT_RAISED = False


def _raise_recompile_limit() -> None:
    """Raise Dynamo's ``recompile_limit`` to :data:`RECOMPILE_LIMIT` if it is lower, once per
    process (at the first graph mmnorm compiles; a limit set afterwards is respected)."""
    global _LIMIT_RAISED
    if not _LIMIT_RAISED:
        _LIMIT_RAISED = True
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)


class CompiledForm:
    """The state of the choice of form for one process (:data:`COMPILED`), guarded by a lock.

    Args:
        mode: a mode (see :func:`resolve_mode`). Defaults to ``'never'``.
        backend: ``torch.compile``'s backend (tests inject failing ones). Defaults to
            ``'inductor'``.

    Attributes:
        mode (str): ``'auto'``, ``'always'`` or ``'never'``.
        backend: ``torch.compile``'s backend.
        failed (str | None): why the compiled form was given up (None while it has not).
        switched (bool): the switch of ``'auto'`` (:func:`auto_switch`): whether its calls run
            compiled now.
        compiled_calls (int): calls that ran compiled so far.
    """

    def __init__(self, mode: Any = 'never', backend: Any = 'inductor'):
        self._lock = threading.RLock()
        self.mode = resolve_mode(mode)
        self.backend = backend
        self.failed: Optional[str] = None
        self.switched = False
        self._functions: Dict[str, Tuple[Callable, Callable]] = {}  # name: (fn, compiled)
        self._graphs: set = set()
        self._groups: Dict[Tuple, int] = {}
        self._calls: Dict[str, int] = {}
        self._cached: Dict[Callable, int] = {}
        self._count = 0
        self.compiled_calls = 0

    def reset(self, mode: Any = None, backend: Any = None) -> None:
        """Forget compiled functions, counts, reported graphs, the switch and failures (for
        tests).

        Args:
            mode: the new mode. Defaults to None (the current one).
            backend: the new backend. Defaults to None (the current one).
        """
        with self._lock:
            lock = self._lock
            self.__init__(self.mode if mode is None else mode,
                          self.backend if backend is None else backend)
            self._lock = lock  # a thread waiting on the old lock must not be left behind

    def enabled(self) -> bool:
        """Whether eager calls run the compiled form now: ``'always'``, or ``'auto'`` after
        its switch, and not given up."""
        if self.failed is not None:
            return False
        return self.mode == 'always' or (self.mode == 'auto' and self.switched)

    def wants(self, what: str) -> bool:
        """Whether a call of kind ``what`` that the compiled form serves runs compiled: the
        same answer for every call until the mode or the switch changes (nothing is counted
        per call, so every rank decides alike).

        Args:
            what (str): the kind of call (for messages).

        Returns:
            bool: :meth:`enabled`.
        """
        return self.enabled()

    @property
    def calls(self) -> Dict[str, int]:
        """Calls that ran compiled so far, per kind of call."""
        with self._lock:
            return dict(self._calls)

    @property
    def graphs(self) -> int:
        """The graphs compiled so far in this process (reported ones)."""
        with self._lock:
            return self._count

    def run(self, name: str, fn: Callable, what: str, x: Tensor, *args, **kwargs):
        """``fn(x, *args, **kwargs)`` compiled (sizes dynamic, one compiled function per
        ``name``).

        Args:
            name (str): the compiled function's name (one ``torch.compile`` per name).
            fn (callable): the plain-form function.
            what (str): the computation, for the graph key and messages.
            x (Tensor): the input.
            *args: tensors (parameters are passed as views) and other arguments.
            **kwargs: constant options (part of the graph key).

        Returns:
            ``fn``'s result, or ``None`` when the compiled form failed now (the caller runs its
            eager form).
        """
        key = _graph_key(what, x, args, kwargs)
        x, args = _dynamic(x), tuple(_dynamic(a) for a in args)
        with self._lock:
            if name not in self._functions:
                options = dict(options=INDUCTOR_OPTIONS) if self.backend == 'inductor' else {}
                self._functions[name] = (fn, torch.compile(fn, backend=self.backend, **options))
            owner, compiled = self._functions[name]
            if owner is not fn:  # a programming error: two computations under one name
                raise ValueError(f'mmnorm: the compiled function {name!r} is '
                                 f'{owner.__qualname__}, not {fn.__qualname__}')
            new = key not in self._graphs
        if new:
            with self._lock:  # one new graph at a time: compiled, probed, counted, reported
                if self.failed is not None:
                    return None
                if key not in self._graphs:
                    result = self._first_call(compiled, key, _group(name, kwargs), what, x,
                                              args, kwargs)
                    self._cached[fn] = _cached_graphs(fn)
                    return result
        try:
            result = compiled(x, *args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            self._give_up(_summary(error))
            return None
        except Exception as error:
            if _cached_graphs(fn) <= self._cached.get(fn, 0) or _stop_recomputation(error):
                raise  # a graph that has run: the caller's error
            self._give_up(f'a new graph failed on its first run: {_summary(error)}')
            return None
        if _cached_graphs(fn) != self._cached.get(fn, 0):
            with self._lock:  # (a thread compiling a new graph holds it, and counts its own)
                cached = _cached_graphs(fn)
                if cached > self._cached.get(fn, 0):
                    # Dynamo compiled a graph the key did not tell apart: probe and count it.
                    try:
                        self._probe_backward(compiled, x, args, kwargs, result)
                    except _BackwardFailed as error:
                        self._give_up(f'the backward of a new graph failed to compile or run: '
                                      f'{_summary(error.__cause__)}')
                        return None
                    self._counted(key, _group(name, kwargs), what, x, None)
                self._cached[fn] = cached  # (fewer after torch._dynamo.reset())
        with self._lock:
            self._ran(what)
        return result

    def _first_call(self, compiled: Callable, key: Tuple, group: Tuple, what: str, x: Tensor,
                    args: tuple, kwargs: dict):
        """A new graph's first call (the lock held): within the limits, compiled, run,
        probed; ``None`` when the compiled form failed."""
        _raise_recompile_limit()
        limit = torch._dynamo.config.recompile_limit
        if self._count >= RECOMPILE_LIMIT:
            self._give_up(f'more than {RECOMPILE_LIMIT} compiled graphs would be needed')
            return None
        if self._groups.get(group, 0) >= limit:
            self._give_up(f'more than {limit} compiled graphs of {what} would be needed '
                          '(torch._dynamo.config.recompile_limit)')
            return None
        start = time.perf_counter()
        try:
            result = compiled(x, *args, **kwargs)
            self._probe_backward(compiled, x, args, kwargs, result)
        except _BackwardFailed as error:
            self._give_up(f'the backward of a new graph failed to compile or run: '
                          f'{_summary(error.__cause__)}')
            return None
        except torch._dynamo.exc.BackendCompilerFailed as error:
            self._give_up(_summary(error))
            return None
        except Exception as error:
            if _stop_recomputation(error):
                raise
            self._give_up(f'a new graph failed on its first run: {_summary(error)}')
            return None
        self._counted(key, group, what, x, time.perf_counter() - start)
        self._ran(what)
        return result

    def _ran(self, what: str) -> None:
        self.compiled_calls += 1
        self._calls[what] = self._calls.get(what, 0) + 1

    def _counted(self, key: Tuple, group: Tuple, what: str, x: Tensor,
                 seconds: Optional[float]) -> None:
        """Count a new graph and report it (the lock held)."""
        self._graphs.add(key)
        self._groups[group] = self._groups.get(group, 0) + 1
        self._count += 1
        ones = f', size-1 dims {list(_ones(x))}' if _ones(x) else ''
        took = f'in {seconds:.1f} s' if seconds is not None else 'again'
        report(f'mmnorm: compiled {what} for {x.dim()}-d {x.dtype} inputs on '
               f'{x.device.type} ({"training" if torch.is_grad_enabled() else "inference"}'
               f'{ones}) {took} (graph {self._count} of this process; cached on disk for '
               'later runs)')

    @staticmethod
    def _probe_backward(compiled: Callable, x: Tensor, args, kwargs, result) -> None:
        """Differentiate a new graph once, on detached copies, so that its backward compiles
        and runs here (inside the fallback) rather than in the caller's ``backward()``."""
        outputs = [t for t in _tensors(result) if t.requires_grad]
        if not outputs:
            return

        def leaf(value):
            # The same types as the call's (a Parameter stays one, a parameter's view one of a
            # Parameter: Dynamo guards on a view's base): the probe must hit the graph just
            # compiled, not compile another.
            if isinstance(value, torch.nn.Parameter):
                return torch.nn.Parameter(value.detach(), requires_grad=value.requires_grad)
            if isinstance(value, Tensor):
                base = value._base
                if base is None:
                    return value.detach().requires_grad_(value.requires_grad)
                base = leaf(base)
                if base.shape == value.shape and value.stride() == base.stride():
                    view = base.view_as(value)
                else:
                    view = base.as_strided(value.shape, value.stride(), value.storage_offset())
                if view.dim():  # marked as the call's views are
                    torch._dynamo.maybe_mark_dynamic(view, list(range(view.dim())))
                return view
            return value

        leaves = [leaf(x)] + [leaf(a) for a in args]
        # Its own (identity) saved-tensor hooks: a checkpointed region's hooks must not see the
        # probe's saved tensors (they count them against the recomputation's).
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            probe = [t for t in _tensors(compiled(*leaves, **kwargs)) if t.requires_grad]
            inputs = [t if t._base is None else t._base for t in leaves
                      if isinstance(t, Tensor) and t.requires_grad]
            if probe and inputs:
                try:
                    torch.autograd.grad(probe, inputs, [torch.ones_like(t) for t in probe],
                                        allow_unused=True)
                except Exception as error:
                    if _stop_recomputation(error):
                        raise
                    raise _BackwardFailed() from error

    def _give_up(self, why: str) -> None:
        """Give the compiled form up for the process, with one warning (rank 0's)."""
        with self._lock:
            if self.failed is not None:
                return
            self.failed = why
        report(f'mmnorm: compiling the normalization layers failed ({why}); they run in the '
               'eager forms from now on (same results, slower). Set MMNORM_COMPILE=0 to skip '
               'the attempt.', logging.WARNING)


class _BackwardFailed(Exception):
    """The probe's backward failed (the cause is the error)."""


def _tensors(result) -> list:
    if isinstance(result, Tensor):
        return [result]
    if isinstance(result, dict):
        return [t for value in result.values() for t in _tensors(value)]
    if isinstance(result, (tuple, list)):
        return [t for value in result for t in _tensors(value)]
    return []


def _summary(error: BaseException) -> str:
    """One line: the error, and the compiler's own error inside a ``BackendCompilerFailed``."""
    line = f'{type(error).__name__}: {(str(error).strip().splitlines() or [""])[0][:200]}'
    inner = getattr(error, 'inner_exception', None) or error.__cause__
    return f'{line} ({_summary(inner)})' if inner is not None and inner is not error else line


#: The process's choice (mode from ``MMNORM_COMPILE`` at import; unset: ``'never'``).
COMPILED = CompiledForm(os.environ.get('MMNORM_COMPILE', 'never'))


def use_compiled(mode: Any = True) -> None:
    """Choose the form of eager calls (see the module doc). A failure recorded earlier is
    forgotten, and ``'auto'``'s switch is off again (the eager forms until :func:`auto_switch`).

    Args:
        mode: ``'auto'``, ``'always'`` (``True``) or ``'never'`` (``False``). Defaults to True.
    """
    mode = resolve_mode(mode)
    with COMPILED._lock:
        COMPILED.mode = mode
        COMPILED.failed = None
        COMPILED.switched = False


def auto_switch(compiled: bool = True) -> None:
    """Throw ``'auto'``'s switch: its eager calls run compiled from now on (or the eager forms
    again). :class:`~mmnorm.engine.CompiledFormHook` throws it before training iteration
    ``compile_after_iters``; call it at a point that every process reaches at the same step
    (never inside an evaluation) to use ``'auto'`` outside a Runner. No effect in the other
    modes.

    Args:
        compiled (bool): compiled from now on. Defaults to True.
    """
    COMPILED.switched = bool(compiled)


def compile_mode() -> str:
    """The current mode (``'auto'``, ``'always'`` or ``'never'``)."""
    return COMPILED.mode


def compiled_enabled() -> bool:
    """Whether eager calls run the compiled form now (``'always'``, or ``'auto'`` after its
    switch, and it has not failed in this process)."""
    return COMPILED.enabled()
