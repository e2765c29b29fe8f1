# Copyright (c) mmnorm contributors. All rights reserved.
"""Which form an eager call of mmnorm's layers runs, in one place: the plain form compiled by
``torch.compile`` (Inductor: C++ / OpenMP on CPU, Triton on GPUs) or public eager ops.

**Modes** (:func:`use_compiled`; the environment variable ``MMNORM_COMPILE`` sets the default
when mmnorm is imported and overrides nothing afterwards, like timm's ``set_fast_norm``):

- ``'auto'`` (the default; ``MMNORM_COMPILE=auto`` or unset): a kind of call (one normalizer's
  computation on one device type) runs in public eager ops until the process has made
  :data:`COMPILE_AFTER` calls of it, then compiled. Compiling costs seconds per graph (minutes
  over a multi-scale run on a cold cache); a unit test, one evaluation or a short finetune does
  not make enough calls to win them back, a training run makes that many calls in its first
  iterations (a ResNet-50 makes 53 per forward).
- ``'always'`` (``True``, ``MMNORM_COMPILE=1``): compiled from the first call.
- ``'never'`` (``False``, ``MMNORM_COMPILE=0``): public eager ops only.

**Failures fall back loudly, once**: the compiled form is given up for the process, with one
warning, and the call runs in public eager ops when

- a graph fails to compile (``BackendCompilerFailed``);
- its *backward* fails to compile: AOTAutograd compiles a backward lazily, inside the user's
  ``loss.backward()``, where nothing could fall back; so the first call of every new graph that
  will be differentiated is differentiated once at once, on detached copies (a probe);
- a new graph fails on its first run (Triton out of resources, autotuning out of memory);
- more than :data:`RECOMPILE_LIMIT` graphs would be needed, past which Dynamo would silently run
  the rest uncompiled (``fail_on_recompile_limit_hit``).

An error of a graph that has already run passes through (it is the caller's). Each new graph (a
computation, dtype, rank, device, grad mode, and the size-1 dimensions ``torch.compile``
specializes) is reported once with its compile time, through mmengine's logger.
"""
import logging
import os
import time
import warnings
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

__all__ = ['MODES', 'COMPILE_AFTER', 'RECOMPILE_LIMIT', 'CompiledForm', 'COMPILED', 'use_compiled',
           'compiled_enabled', 'compile_mode', 'resolve_mode']

#: What :func:`use_compiled` accepts (besides True / False).
MODES = ('auto', 'always', 'never')
#: Calls of one kind before ``'auto'`` compiles it.
COMPILE_AFTER = 5000
#: Compiled graphs per process (computations x dtypes x ranks x modes x specializations), above
#: Dynamo's default of 8 per function.
RECOMPILE_LIMIT = 64

_ENV_MODES = {'0': 'never', 'false': 'never', 'never': 'never', '1': 'always', 'true': 'always',
              'always': 'always', 'auto': 'auto', '': 'auto'}


def resolve_mode(value: Any) -> str:
    """The mode ``value`` names (a mode, True / False, or a value of ``MMNORM_COMPILE``)."""
    if value is True or value is False:
        return 'always' if value else 'never'
    mode = _ENV_MODES.get(str(value).strip().lower())
    if mode is None:
        raise ValueError(f'compiled form: expected one of {MODES} (or True / False), got '
                         f'{value!r}')
    return mode


def report(message: str, level: int = logging.INFO) -> None:
    """mmnorm's messages: through mmengine's current logger when mmengine is installed (the
    OpenMMLab log), else the ``mmnorm`` logger of the standard library."""
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


def _graph_key(what: str, x: Tensor, args) -> Tuple:
    """What ``torch.compile`` guards on besides dynamic sizes: one compiled graph per key."""
    ones = tuple(axis for axis, size in enumerate(x.shape) if size == 1)
    grads = tuple(t.requires_grad for t in (x, *args) if isinstance(t, Tensor))
    return (what, x.dtype, x.dim(), x.device.type, torch.is_grad_enabled(), ones, grads)


class CompiledForm:
    """The state of the choice for one process (:data:`COMPILED`)."""

    def __init__(self, mode: Any = 'auto', backend: Any = 'inductor'):
        self.mode = resolve_mode(mode)
        #: ``torch.compile``'s backend (tests inject failing ones).
        self.backend = backend
        #: Why the compiled form was given up (None while it has not).
        self.failed: Optional[str] = None
        self._functions: Dict[str, Callable] = {}
        self._calls: Dict[str, int] = {}
        self._graphs: set = set()
        #: Calls that ran compiled so far.
        self.compiled_calls = 0

    def reset(self, mode: Any = None, backend: Any = None) -> None:
        """Forget compiled functions, counts, reported graphs and failures (for tests)."""
        self.__init__(self.mode if mode is None else mode,
                      self.backend if backend is None else backend)

    def enabled(self) -> bool:
        return self.mode != 'never' and self.failed is None

    def wants(self, what: str) -> bool:
        """Whether this call of kind ``what`` should run compiled (counts it in ``'auto'``)."""
        if not self.enabled():
            return False
        if self.mode == 'always':
            return True
        calls = self._calls.get(what, 0) + 1
        self._calls[what] = calls
        return calls > COMPILE_AFTER

    @property
    def calls(self) -> Dict[str, int]:
        """Calls counted per kind so far (``'auto'`` counts them)."""
        return dict(self._calls)

    @property
    def graphs(self) -> int:
        """The graphs compiled so far in this process."""
        return len(self._graphs)

    def run(self, name: str, fn: Callable, what: str, x: Tensor, *args, **kwargs):
        """``fn(x, *args, **kwargs)`` compiled (``dynamic=True``, one compiled function per
        ``name``), or ``None`` when the compiled form failed now (the caller runs its eager
        form)."""
        key = _graph_key(what, x, args)
        new = key not in self._graphs
        if name not in self._functions:
            self._functions[name] = torch.compile(fn, dynamic=True, backend=self.backend)
        compiled = self._functions[name]
        start = time.perf_counter()
        try:
            # Parameters' sizes dynamic like the input's (Dynamo makes them static by default:
            # one graph per channel count, six for a ResNet-50).
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT,
                                            fail_on_recompile_limit_hit=True,
                                            force_parameter_static_shapes=False):
                result = compiled(x, *args, **kwargs)
                if new:
                    self._probe_backward(compiled, x, args, kwargs, result)
        except _BackwardFailed as error:
            self._give_up(f'the backward of a new graph failed to compile or run: '
                          f'{_summary(error.__cause__)}')
            return None
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            self._give_up(f'more than {RECOMPILE_LIMIT} compiled graphs would be needed')
            return None
        except torch._dynamo.exc.BackendCompilerFailed as error:
            self._give_up(_summary(error))
            return None
        except Exception as error:
            if not new or _stop_recomputation(error):
                raise
            self._give_up(f'a new graph failed on its first run: {_summary(error)}')
            return None
        self.compiled_calls += 1
        if new:
            self._graphs.add(key)
            ones = f', size-1 dims {list(key[5])}' if key[5] else ''
            report(f'mmnorm: compiled {what} for {x.dim()}-d {x.dtype} inputs on '
                   f'{x.device.type} ({"training" if key[4] else "inference"}{ones}) in '
                   f'{time.perf_counter() - start:.1f} s (graph {len(self._graphs)} of this '
                   f'process; cached on disk for later runs)')
        return result

    @staticmethod
    def _probe_backward(compiled: Callable, x: Tensor, args, kwargs, result) -> None:
        """Differentiate a new graph once, on detached copies, so that its backward compiles
        and runs here (inside the fallback) rather than in the caller's ``backward()``."""
        outputs = [t for t in _tensors(result) if t.requires_grad]
        if not outputs:
            return

        def leaf(value):
            # The same types as the call's (a Parameter stays one): the probe must hit the
            # graph just compiled, not compile another.
            if isinstance(value, torch.nn.Parameter):
                return torch.nn.Parameter(value.detach(), requires_grad=value.requires_grad)
            if isinstance(value, Tensor):
                return value.detach().requires_grad_(value.requires_grad)
            return value

        leaves = [leaf(x)] + [leaf(a) for a in args]
        # Its own (identity) saved-tensor hooks: a checkpointed region's hooks must not see the
        # probe's saved tensors (they count them against the recomputation's).
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            probe = [t for t in _tensors(compiled(*leaves, **kwargs)) if t.requires_grad]
            inputs = [t for t in leaves if isinstance(t, Tensor) and t.requires_grad]
            if probe and inputs:
                try:
                    torch.autograd.grad(probe, inputs, [torch.ones_like(t) for t in probe],
                                        allow_unused=True)
                except Exception as error:
                    if _stop_recomputation(error):
                        raise
                    raise _BackwardFailed() from error

    def _give_up(self, why: str) -> None:
        self.failed = why
        warnings.warn(f'mmnorm: compiling the normalization layers failed ({why}); they run with '
                      'public eager ops from now on (same results, slower). Set MMNORM_COMPILE=0 '
                      'to skip the attempt.', stacklevel=5)


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


#: The process's choice (mode from ``MMNORM_COMPILE`` at import).
COMPILED = CompiledForm(os.environ.get('MMNORM_COMPILE', 'auto'))


def use_compiled(mode: Any = True) -> None:
    """Choose the form of eager calls: ``'auto'``, ``'always'`` (``True``) or ``'never'``
    (``False``); see the module doc. A failure recorded earlier is forgotten."""
    COMPILED.mode = resolve_mode(mode)
    COMPILED.failed = None


def compile_mode() -> str:
    """The current mode (``'auto'``, ``'always'`` or ``'never'``)."""
    return COMPILED.mode


def compiled_enabled() -> bool:
    """Whether eager calls may run the compiled form (the mode is not ``'never'`` and it has not
    failed in this process)."""
    return COMPILED.enabled()
