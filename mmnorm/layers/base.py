# Copyright (c) mmnorm contributors. All rights reserved.
"""What every mmnorm normalizer shares: the BN-shaped constructor, running buffers with
PyTorch's momentum convention, the batch-average evaluation guard, and the **normalizer
contract**, the facts about a normalizer that tools read from the layer itself.

The contract (members of :class:`BatchStatsNorm`; a new normalizer overrides what differs from
the defaults), and who reads each:

- ``_abbr_``: mmcv's name prefix (``sn1``, ``bcn1``), hence the checkpoint keys (mmcv);
- ``config()``: the constructor arguments (``repr``, the Sync conversion);
- ``sync_class()`` / ``local_class``: the synchronized twin, recorded by defining
  ``class SyncX(SyncNorm, X)`` (:func:`~mmnorm.layers.convert_sync_norm`, ``--sync-norm``);
- ``keeps_batch_stats``: the running buffers hold BN statistics of batches, which a batch
  average may replace (:func:`~mmnorm.engine.recompute_batch_stats`);
- ``estimated``: the statistics are estimates moved at a rate, BCN's Algorithm 1
  (``EstimateRateHook``);
- ``channel_groups`` / ``grouped_moments()``: the channels normalized together and the moments
  they see (StatDiff);
- ``ratio_fn``, ``ratio_state``, ``ratio_params``, ``tied_ratios``, ``normalizers``: a mixture
  of normalizers: the module-level function of its ratios, the names of its inputs (parameters
  and buffers, in order), the trainable ones among them, whether means and variances share one
  vector, the names of the mixed normalizers (ratio logging and plots, the optimizer's ratio
  rules, reading ratios from a state dict);
- ``ratios()``, ``harden_ratios_()``, ``ratio_details()``: the current ratios, making them
  exactly one-hot and frozen (hard-ratio finetuning, the deploy form), and other state worth
  logging with them;
- ``follows_progress`` / ``set_progress()``: the computation depends on how far training has gone
  (a hook sets the progress, from 0 to 1, every iteration).
"""
import contextlib
import logging
import sys
import warnings
from typing import Any, Callable, ClassVar, Dict, NamedTuple, Optional, Tuple, Type, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..functional import in_recomputation, is_tracing
from ..functional.moments import saved_tensors_hooks_active, stat_dtype
from ..functional.compiled import compiled_enabled, report
from ..functional.arguments import check_eps, check_flag, check_positive_int
from ..functional.switchable import (check_unit_interval, stacked_ratios,
                                     wide_ratio_inputs)

__all__ = ['BatchStatsNorm', 'SyncNorm', 'EVAL_STATS_MODES', 'BatchedRatios', 'batched_ratios',
           'frozen_ratios', 'full_precision', 'has_ratios', 'log_once', 'runner_training',
           'training_runner']

#: How the BN statistics used in eval are produced. ``'moving'``: the momentum average kept in
#: training. ``'batch_average'``: recomputed after training from K batches with frozen weights
#: (SN study Sec. 3; :func:`mmnorm.engine.recompute_batch_stats`), and flagged until then.
EVAL_STATS_MODES = ('moving', 'batch_average')

_STALE_STATS_MSG = (
    "mmnorm: a layer configured with eval_stats='batch_average' is evaluated with statistics that "
    'were not recomputed after training (they are the training-time moving average). Add '
    "dict(type='BatchAverageStatsHook') to custom_hooks, or run tools/recompute_stats.py on the "
    'checkpoint, before evaluating. (A layer frozen in eval mode during training, e.g. by '
    "norm_eval=True, is evaluated too, and keeps its statistics: use eval_stats='moving' "
    'there.)')

_NORM_DECAY_MSG = (
    'mmnorm: the optimizer config sets paramwise_cfg.norm_decay_mult={mult}, but its constructor '
    '({constructor}) recognizes norm layers by their torch class, which mmnorm\'s layers do not '
    'have: their {params} trained with the base weight decay ({decay}). Set '
    "optim_wrapper.constructor='NormAwareOptimWrapperConstructor' (mmengine's default "
    'constructor plus rules for mmnorm\'s layers) for the multiplier to reach them.')

#: The layers' warnings already logged in this process (:func:`log_once`).
_LOGGED: set = set()


def log_once(message: str) -> None:
    """Log one of the layers' warnings through the run's log (mmengine's logger), once per
    process and on rank 0 only, however many layers meet it (a model with fifty SSN layers and
    no ``SSNRadiusHook`` says so once). Called on a layer's first step, never on every call."""
    if message not in _LOGGED:
        _LOGGED.add(message)
        report(message, logging.WARNING)


def runner_training() -> bool:
    """Whether the caller runs inside the training loop of a live mmengine Runner
    (:func:`training_runner` is not None)."""
    return training_runner() is not None


def training_runner():
    """The live mmengine Runner whose training loop the caller runs inside, or None.

    The current message hub (``MessageHub.get_current_instance()``) says the loop stage is
    ``'train'`` and has a ``max_iters``, what mmengine's ``RuntimeInfoHook`` writes in
    ``before_train`` (a validation inside training is stage ``'val'``), and it is the hub of a
    runner whose train loop is running: that loop's ``run()`` is on this thread's stack. The hub
    alone would not do: it stays current after its run, and a run that raised never pops its
    ``loop_stage``, so a plain PyTorch loop after it would pass for a run.

    Walks the stack: call it once per layer (on its first training step), never on every call.
    None without mmengine's runner imported or a message hub created."""
    runner_module = sys.modules.get('mmengine.runner')
    logging_module = sys.modules.get('mmengine.logging')
    if runner_module is None or logging_module is None:
        return None
    hub_class = logging_module.MessageHub
    # get_current_instance() raises when no hub exists (and then holds mmengine's lock)
    if not getattr(hub_class, '_instance_dict', None):
        return None
    hub = hub_class.get_current_instance()
    if hub.get_info('loop_stage') != 'train' or hub.get_info('max_iters') is None:
        return None
    frame = sys._getframe(1)
    while frame is not None:
        # Every loop implements run(); Runner.train() calls its train loop's.
        if frame.f_code.co_name == 'run':
            loop = frame.f_locals.get('self')
            if isinstance(loop, runner_module.BaseLoop):
                runner = getattr(loop, 'runner', None)
                if (getattr(runner, '_train_loop', None) is loop
                        and getattr(runner, 'message_hub', None) is hub):
                    return runner
        frame = frame.f_back
    return None


def full_precision(input: Tensor):
    """Context that turns autocast off for ``input``'s device if it is on: the layers compute
    their statistics and affine map in float32 (or wider) themselves, and autocast would run the
    ``(N, C)`` coefficient math in half precision. A no-op otherwise, so traced graphs carry no
    autocast regions (nor on devices without autocast, such as ``meta``)."""
    device = input.device.type
    # (Dynamo is not asked whether autocast is available: torch 2.11's cannot trace the query,
    # a graph break; of the devices it compiles for, meta alone has no autocast)
    available = device != 'meta' if torch.compiler.is_dynamo_compiling() else \
        torch.amp.is_autocast_available(device)
    if available and torch.is_autocast_enabled(device):
        return torch.autocast(device_type=device, enabled=False)
    return contextlib.nullcontext()


class StepRatios(NamedTuple):
    """What :func:`batched_ratios`' pre-hook leaves on a layer for one forward of the model."""

    #: The layer's stacked ratios ``(2, [G,] K)``, a view of the computation shared by all.
    ratios: Tensor
    #: Whether they were computed with a graph (gradients on, inputs requiring them): a forward
    #: with gradients takes ratios without one only for inputs that require none.
    has_graph: bool
    #: :func:`_ratio_key` of the inputs they were computed from.
    key: tuple
    #: What the layer's training step writes besides (SSN: its new choices), or None.
    state: Optional[Tensor]


def _ratio_key(inputs) -> Optional[tuple]:
    """The identity of ratio inputs' values as far as PyTorch tracks it: each floating-point
    input's storage and version counter (integer state such as SSN's choices is the layer's
    own bookkeeping); None for inference tensors, which have no version counter."""
    if any(t.is_inference() for t in inputs):
        return None
    return tuple((t.data_ptr(), t._version) for t in inputs if t.is_floating_point())


class BatchStatsNorm(nn.Module):
    """Base of the mmnorm normalizers: BN-shaped constructor, buffers and bookkeeping.

    Subclasses hold their own affine parameters and call their functional form in ``forward``.
    Buffers: ``running_mean`` / ``running_var`` ``(C,)`` initialised to 0 / 1,
    ``num_batches_tracked``, and ``stats_ready`` (1 once batch-average statistics have been
    computed and no training step has run since).

    Args:
        num_features (int): number of channels ``C`` of the ``(N, C, *)`` input.
        eps (float): added to variances. Defaults to 1e-5.
        momentum (float, optional): ``running = (1 - momentum) * running + momentum * batch``
            (PyTorch's convention; the SN authors' code uses the complement, e.g. their 0.997 is
            0.003 here). ``None``: cumulative average. Defaults to 0.1.
        track_running_stats (bool): keep running buffers for eval. Defaults to True.
        eval_stats (str): ``'moving'`` or ``'batch_average'``, see :data:`EVAL_STATS_MODES`.
            Defaults to ``'moving'``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 track_running_stats: bool = True, eval_stats: str = 'moving',
                 device=None, dtype=None):
        super().__init__()
        num_features = check_positive_int(num_features, 'num_features')
        check_eps(eps, type(self).__name__)
        if momentum is not None:
            check_unit_interval(momentum, 'momentum', 'the weight of the new batch, or None for '
                                'a cumulative average')
        track_running_stats = check_flag(track_running_stats, 'track_running_stats')
        if momentum is not None and 0.5 < momentum < 1.0:
            warnings.warn(
                f'momentum={momentum} follows the PyTorch convention here (weight of the *new* '
                f'batch); if you meant "keep {momentum} of the old value" as in the SN authors\' '
                f'code, use momentum={1 - momentum:.4g}', stacklevel=3)
        if eval_stats not in EVAL_STATS_MODES:
            raise ValueError(f'eval_stats must be one of {EVAL_STATS_MODES}, got {eval_stats!r}')
        if eval_stats == 'batch_average' and not track_running_stats:
            raise ValueError("eval_stats='batch_average' needs track_running_stats=True")
        factory = {'device': device, 'dtype': dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.track_running_stats = track_running_stats
        self.eval_stats = eval_stats
        if track_running_stats:
            self.register_buffer('running_mean', torch.zeros(num_features, **factory))
            self.register_buffer('running_var', torch.ones(num_features, **factory))
            self.register_buffer('num_batches_tracked',
                                 torch.tensor(0, dtype=torch.long, device=device))
            self.register_buffer('stats_ready', torch.tensor(False, device=device))
        else:
            self.register_buffer('running_mean', None)
            self.register_buffer('running_var', None)
            self.register_buffer('num_batches_tracked', None)
            self.register_buffer('stats_ready', None)
        # A host copy of ``stats_ready``: an eval forward reads it without waiting for the
        # device (``bool()`` of a CUDA tensor is a host-device sync). Written with the buffer by
        # :meth:`mark_stats_ready`, read back from the buffer on loading.
        self._stats_ready = False

    def register_buffer(self, name: str, tensor: Optional[Tensor], persistent: bool = True
                        ) -> None:
        """``nn.Module.register_buffer``, keeping the buffers that are None (no running
        statistics) after the others: ``torch.export``'s non-strict tracing of a layer as the
        root module paired the root's buffers with the graph's inputs counting the None ones, and
        failed (``IndexError``) when one came before a tensor (SN's ``in_var_unbiased``)."""
        super().register_buffer(name, tensor, persistent)
        if tensor is not None:
            for key in [key for key, value in self._buffers.items() if value is None]:
                self._buffers[key] = self._buffers.pop(key)

    #: The ratio function of a normalizer that mixes others (None: it does not), as a
    #: ``staticmethod`` of a module-level function.
    ratio_fn: ClassVar[Optional[Callable[..., Tuple[Tensor, Tensor]]]] = None
    #: Names of the parameters and buffers ``ratio_fn`` takes, in order.
    ratio_state: ClassVar[Tuple[str, ...]] = ()
    #: The trainable ones among them (the optimizer's ratio rules apply to these).
    ratio_params: ClassVar[Tuple[str, ...]] = ()
    #: Whether means and variances share one ratio vector.
    tied_ratios: ClassVar[bool] = False
    #: Whether the computation follows the training progress (see :meth:`set_progress`).
    follows_progress: ClassVar[bool] = False
    #: Set on a synchronized twin: the local class it synchronizes.
    local_class: ClassVar[Optional[Type['BatchStatsNorm']]] = None
    #: mmengine's FLOP analysis counts the arithmetic ops traced inside this layer
    #: (:mod:`mmnorm.integration.mmengine_flops`; it has no handler for the layer itself).
    flops_from_traced_ops: ClassVar[bool] = True
    #: Floating-point buffers kept in the statistics dtype (float32 for a half-precision layer)
    #: when the layer is converted: values set from the host that half precision would round
    #: (SSN's radius, estimated BCN's rate), as the constructor's ``dtype=`` keeps them.
    full_precision_buffers: ClassVar[Tuple[str, ...]] = ()

    def _apply(self, fn, recurse: bool = True):
        # .half() / .bfloat16() / .to(dtype) convert every floating-point buffer: those of
        # full_precision_buffers get their value as it was, in the statistics dtype (in float16
        # an estimate rate of 1e-8 became 0, in bfloat16 a radius of 0.999 became 1).
        kept = {name: self._buffers[name] for name in self.full_precision_buffers
                if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            wanted = stat_dtype(new.dtype)
            if new.dtype != wanted:
                self._buffers[name] = new.to(wanted) if old.is_meta else old.to(
                    device=new.device, dtype=wanted)
        return self

    def config(self) -> Dict[str, Any]:
        """The constructor arguments that rebuild this layer (``type(self)(**config())``)."""
        return dict(num_features=self.num_features, eps=self.eps, momentum=self.momentum,
                    track_running_stats=self.track_running_stats, eval_stats=self.eval_stats)

    def extra_repr(self) -> str:
        config = self.config()
        return ', '.join([str(config.pop('num_features'))] +
                         [f'{key}={value!r}' for key, value in config.items()])

    @classmethod
    def sync_class(cls) -> Optional[Type['BatchStatsNorm']]:
        """The synchronized twin of this very class (not inherited from a parent), or None."""
        return cls.__dict__.get('_sync_twin')

    @property
    def keeps_batch_stats(self) -> bool:
        """The running buffers hold BN statistics of training batches (a batch average computed
        after training may replace them, :func:`mmnorm.engine.recompute_batch_stats`)."""
        return self.track_running_stats and not self.estimated

    @property
    def estimated(self) -> bool:
        """The BN statistics are estimates moved at a rate (BCN Algorithm 1), not averages."""
        return False

    @property
    def channel_groups(self) -> Optional[int]:
        """Groups of channels normalized together, or None (each channel over the batch)."""
        return None

    def grouped_moments(self, mean: Tensor, var: Tensor) -> Tuple[Tensor, Tensor]:
        """Per-channel batch moments of what :attr:`channel_groups` normalize, given those of
        the layer's input (the same, unless the layer transforms its input first)."""
        return mean, var

    @property
    def normalizers(self) -> Tuple[str, ...]:
        """Names of the mixed normalizers, in the order of :meth:`ratios` (empty: no mixture)."""
        return ()

    def ratio_inputs(self) -> Tuple[Tensor, ...]:
        """The tensors :attr:`ratio_fn` takes (:attr:`ratio_state`, in order)."""
        return tuple(getattr(self, name) for name in self.ratio_state)

    #: Inside a :func:`frozen_ratios` scope, the stacked ratios its inference forwards computed,
    #: by the ratio inputs' device and dtype; None outside one.
    _frozen_ratios: Optional[Dict[tuple, Tensor]] = None
    #: During a forward of a model under :func:`batched_ratios`: what its pre-hook computed for
    #: this layer (:class:`StepRatios`); None otherwise.
    _step_ratios: Optional['StepRatios'] = None

    def takes_ratios(self) -> bool:
        """Whether this layer's form takes its stacked ratios computed elsewhere
        (:func:`frozen_ratios`, :func:`batched_ratios`); a form that computes them in its own
        way (SN with ``mix='std'``) overrides this with False."""
        return self.ratio_fn is not None

    def _scoped_ratios(self) -> Optional[Tensor]:
        """The stacked ratios computed for this forward by a scope, or None (the forward
        computes them):

        - an inference forward (eval, no gradient) inside a :func:`frozen_ratios` scope: those
          its first such forward computed;
        - a forward of a model under :func:`batched_ratios`: those its pre-hook computed for
          every layer at once, if the ratio inputs are still those it read (and, with
          gradients on, come with a graph if they need one), and unless gradients are on and
          activation checkpointing records or recomputes this forward
          (a non-reentrant recomputation must save what the first pass saved, and a reentrant
          one backpropagates on its own: both compute the ratios themselves, each time).

        Never under tracing (``torch.compile``, export, ``torch.func`` transforms)."""
        # torch.compile first (a constant there): a compiled graph does not depend on a scope.
        # Then the cheap tests, so that forwards outside a scope pay two attribute reads.
        if torch.compiler.is_compiling():
            return None
        cache, step = self._frozen_ratios, self._step_ratios
        if (cache is None and step is None) or is_tracing():
            return None
        grad = torch.is_grad_enabled()
        if cache is not None and not self.training and not grad:
            return self._frozen_cached(cache)
        if step is None or (grad and (in_recomputation() or saved_tensors_hooks_active())):
            return None
        inputs = self.ratio_inputs()
        if grad and not step.has_graph and any(t.requires_grad for t in inputs):
            return None
        key = _ratio_key(inputs)
        return step.ratios if key is not None and step.key == key else None

    def _holds_ratios(self) -> bool:
        """Whether this forward's ratios come without computing them for every layer at once
        (:func:`batched_ratios` leaves the layer out): an inference forward (eval, no
        gradient) inside a :func:`frozen_ratios` scope."""
        return (self._frozen_ratios is not None and not self.training
                and not torch.is_grad_enabled())

    def _frozen_cached(self, cache: Dict[tuple, Tensor]) -> Tensor:
        """:func:`frozen_ratios`' ratios of this layer, computed on the first call."""
        inputs = self.ratio_inputs()
        # Also keyed on the inputs' storages and version counters: a load_state_dict, a
        # functional_call with other tensors or a dtype round trip inside the scope computes
        # them again. (What the counters miss, fused optimizer steps and .data updates, is what
        # the scope's caller promises not to do.)
        key = _ratio_key(inputs)
        if key is None:  # inference tensors: nothing tells a change, so no reuse
            return stacked_ratios(self.ratio_fn, inputs)
        slot = (inputs[0].device, inputs[0].dtype)
        key += tuple((t.data_ptr(), t._version) for t in inputs if not t.is_floating_point())
        cached = cache.get(slot)
        if cached is None or cached[0] != key:
            cached = cache[slot] = (key, stacked_ratios(self.ratio_fn, inputs))
        return cached[1]

    #: Attributes that hold what a scope or a check computed for this process's tensors: a copy
    #: or a pickle starts without them.
    _transient: Tuple[str, ...] = ('_frozen_ratios', '_step_ratios')

    def __getstate__(self):
        # A copy or a pickle made inside a scope (frozen_ratios, batched_ratios) starts
        # outside one.
        state = dict(super().__getstate__())
        for name in self._transient:
            state.pop(name, None)
        return state

    @torch.no_grad()
    def ratios(self) -> Optional[Tuple[Tensor, Tensor]]:
        """``(mean_ratios, var_ratios)`` over :attr:`normalizers` now, or None."""
        if self.ratio_fn is None:
            return None
        return self.ratio_fn(*self.ratio_inputs())

    def harden_ratios_(self) -> None:
        """Make :meth:`ratios` exactly one-hot at their argmax, and frozen."""
        raise TypeError(f'{type(self).__name__} has no ratios to harden')

    def ratio_details(self) -> Dict[str, Any]:
        """State besides the ratios worth logging with them (JSON-serializable)."""
        return {}

    def set_progress(self, progress: float) -> None:
        """Tell a layer that :attr:`follows_progress` how far training has gone, from 0 (the
        first iteration) to 1 (the end). Does nothing by default."""

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, counters cleared."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()
            self.mark_stats_ready(False)

    def mark_stats_ready(self, ready: bool = True) -> None:
        """Record whether the running buffers hold a batch average computed after training
        (:func:`mmnorm.engine.recompute_batch_stats` marks them): the ``stats_ready`` buffer,
        saved with the weights, and its host copy, which eval forwards read. Write it through
        this method, not by filling the buffer."""
        if self.track_running_stats:
            self.stats_ready.fill_(bool(ready))
            self._stats_ready = bool(ready)
            if ready:  # a new batch average: warn again if it goes stale
                self._stale_warned = False
                _LOGGED.discard(_STALE_STATS_MSG)

    def _batch_stats_state(self, input: Tensor
                           ) -> Tuple[Optional[Tensor], Optional[Tensor], bool,
                                      Union[float, Tensor]]:
        """``(running_mean, running_var, use_batch_stats, momentum)`` for the functional form,
        following ``nn.BatchNorm``; also does the per-step bookkeeping.

        The running buffers are passed (and so updated) only by a training step's first forward:
        not when activation checkpointing recomputes it (:func:`in_recomputation`), so that a
        checkpointed model keeps the same buffers as a plain one.
        """
        group = self._sync_group()
        if self.training and not self._run_checked and not in_recomputation():
            self._check_run()
        update = self.training and self.track_running_stats and not in_recomputation()
        # An empty batch (no samples, or empty maps) changes nothing, except in a synchronized
        # layer, whose statistics are the global batch's (and the same on every process).
        momentum: Union[float, Tensor] = 0.0
        if update and (input.numel() > 0 or group is not None):
            self.num_batches_tracked.add_(1)
            # momentum=None: cumulative average, 1 / steps (a tensor: no host sync).
            momentum = (self.num_batches_tracked.to(self.running_mean.dtype).reciprocal()
                        if self.momentum is None else self.momentum)
            # The running buffers move away from any recomputed batch average (the host copy
            # says whether the buffer needs writing: no op on most steps).
            if getattr(self, '_stats_ready', True):
                self.mark_stats_ready(False)
        if not self.training:
            self._check_eval_stats()
        use_batch_stats = self.training or self.running_mean is None
        if self.training and not update:
            return None, None, use_batch_stats, momentum
        return self.running_mean, self.running_var, use_batch_stats, momentum

    #: Whether the layer made its once-per-layer check of the run (:meth:`_check_run`).
    _run_checked: bool = False
    #: Set by NormAwareOptimWrapperConstructor on the layers whose parameters it placed.
    _norm_rules_applied: bool = False

    def _check_run(self) -> None:
        """On the layer's first training step, once: inside an mmengine Runner whose optimizer
        config sets ``norm_decay_mult``, warn (once per run) when the optimizer gives this
        layer's affine parameters the base weight decay: its constructor (mmengine's default;
        upstream configs such as RTMDet's and YOLOX's set the multiplier) did not see them as a
        norm's. What the optimizer holds is read, so that a parameter another rule reached
        (``bias_decay_mult``, ``custom_keys``) is not named."""
        if is_tracing():  # (checked on the next eager step)
            return
        self._run_checked = True
        if self._norm_rules_applied:
            return
        runner = training_runner()
        optimizer = getattr(getattr(runner, 'optim_wrapper', None), 'optimizer', None)
        optim_cfg = runner.cfg.get('optim_wrapper') if runner is not None else None
        if not isinstance(optimizer, torch.optim.Optimizer) or not isinstance(optim_cfg, dict):
            return
        mult = (optim_cfg.get('paramwise_cfg') or {}).get('norm_decay_mult')
        base = optimizer.defaults.get('weight_decay') or 0
        if mult is None or mult == 1 or not base:
            return
        decay = {id(param): group.get('weight_decay', base)
                 for group in optimizer.param_groups for param in group['params']}
        missed = [name for name, param in self.named_parameters(recurse=False)
                  if name not in self.ratio_params and decay.get(id(param)) == base]
        if missed:
            constructor = optim_cfg.get('constructor', 'DefaultOptimWrapperConstructor')
            log_once(_NORM_DECAY_MSG.format(
                mult=mult, constructor=getattr(constructor, '__name__', constructor),
                params=', '.join(missed), decay=base))

    def _sync_group(self):
        """The process group whose batch forms the BN statistics of a training step, or
        ``None`` for this process's batch. The Sync layers override it."""
        return None

    def _check_eval_stats(self) -> None:
        # The host copy of stats_ready (modules pickled by older versions have none).
        if (self.eval_stats == 'batch_average' and not is_tracing()
                and not getattr(self, '_stale_warned', False)
                and not getattr(self, '_stats_ready', False)):
            self._stale_warned = True
            log_once(_STALE_STATS_MSG)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Checkpoints written before a buffer existed (or converted from other code) lack the
        # bookkeeping buffers: fill them in, as nn.BatchNorm does for num_batches_tracked.
        if self.track_running_stats:
            for name, default in (('num_batches_tracked', torch.tensor(0, dtype=torch.long)),
                                  ('stats_ready', torch.tensor(False))):
                state_dict.setdefault(prefix + name, default.to(getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if self.track_running_stats:
            self._stale_warned = False
            # Loading is not a forward: reading the loaded buffer here is the one sync it costs.
            self._stats_ready = bool(self.stats_ready)



def has_ratios(module: nn.Module) -> bool:
    """Whether ``module`` is a normalizer that mixes others by ratios (SN and its variants)."""
    return isinstance(module, BatchStatsNorm) and module.ratio_fn is not None


@contextlib.contextmanager
def frozen_ratios(model: nn.Module):
    """A scope in which ``model``'s parameters do not change, so that each of its ratio layers
    (:func:`has_ratios`) computes its ratios once, at its first inference forward (eval mode,
    no gradient), and reuses them until the scope ends.

    The ratios depend only on parameters and buffers, but a layer cannot see every update:
    fused optimizers and in-place updates through ``.data`` (an EMA teacher) leave PyTorch's
    version counters alone, and comparing values would be a host sync per forward. So eval
    forwards compute them every call (SSN: SparsestMax's rounds, about 25 small ops per
    layer; a trained SSN layer, every choice fixed, takes its one-hot ratios without this
    scope), except inside this scope, whose caller promises that nothing changes the ratio
    parameters, SSN's radius or its choices in place behind the version counters' back until
    it ends (what bumps a counter or brings other tensors, ``load_state_dict``,
    ``torch.func.functional_call``, ``.half()``, is seen). Training forwards, forwards with
    gradients and traced ones compute them as always, and so do layers whose form takes no
    ratios (SN with ``mix='std'`` or the authors' unbiased IN variance). ``FrozenRatiosHook``
    opens the scope for each validation and test epoch of an mmengine runner. Scopes nest (the
    outer one's ratios are kept); the ratios are dropped when the outermost ends, also on an
    error, and a copy or pickle made inside a scope starts outside one.

    Example:
        >>> import torch
        >>> from mmnorm import SparseSwitchableNorm, frozen_ratios
        >>> model = torch.nn.Sequential(SparseSwitchableNorm(8)).eval()
        >>> with frozen_ratios(model), torch.no_grad():
        ...     outputs = [model(torch.randn(2, 8, 5, 5)) for _ in range(3)]
    """
    layers = [m for m in model.modules() if has_ratios(m)]
    outer = [m._frozen_ratios for m in layers]
    for layer, cache in zip(layers, outer):
        layer._frozen_ratios = {} if cache is None else cache
    try:
        yield model
    finally:
        for layer, cache in zip(layers, outer):
            layer._frozen_ratios = cache


class _SharedRatios(torch.autograd.Function):
    """``ratio_fn.batched`` of many layers' ratio inputs as one autograd node whose backward
    gives gradients only to the layers whose ratios were used: a layer not called in a forward
    keeps ``grad=None`` (no weight decay or momentum step from a zero gradient), as it would
    computing its own. The batched computation runs on detached leaves in the forward, and its
    graph is differentiated in the backward (one pass for all the used layers); a backward that
    builds a graph (``create_graph=True``) differentiates each used layer's own ratio function
    of its inputs instead. Returns each layer's stacked ratios; the states it computes (SSN's new
    choices) are appended to ``states``."""

    @staticmethod
    def forward(ctx, ratio_fn, training, counts, states, *tensors):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
            bounds = [sum(counts[:i]) for i in range(len(counts) + 1)]
            layers = [leaves[a:b] for a, b in zip(bounds, bounds[1:])]
            results = ratio_fn.batched([wide_ratio_inputs(layer) for layer in layers], training)
        states.extend(state for _, state in results)
        ctx.ratio_fn, ctx.layers = ratio_fn, layers
        ctx.outputs = [ratios for ratios, _ in results]
        # (Integer state, SSN's choices, which the layers' steps write, is kept as it is.)
        ctx.save_for_backward(*[t if t.is_floating_point() else None for t in tensors])
        ctx.state = [None if t.is_floating_point() else t for t in tensors]
        ctx.set_materialize_grads(False)
        return tuple(ratios.detach() for ratios in ctx.outputs)

    @staticmethod
    def backward(ctx, *grads):
        used = [i for i, g in enumerate(grads) if g is not None]
        bounds = [sum(len(layer) for layer in ctx.layers[:i]) for i in range(len(ctx.layers))]
        wanted = [bounds[i] + j for i in used for j, leaf in enumerate(ctx.layers[i])
                  if leaf.requires_grad]
        result = [None] * (4 + sum(len(layer) for layer in ctx.layers))
        if not wanted:
            return tuple(result)
        if torch.is_grad_enabled():  # create_graph=True: gradients that are differentiable
            # (the inputs read only here: a plain backward allows them changed in place since,
            # as the layers' own computation does, e.g. a momentum encoder's update)
            tensors = [t if s is None else s for t, s in zip(ctx.saved_tensors, ctx.state)]
            outputs = [stacked_ratios(ctx.ratio_fn, tensors[bounds[i]:bounds[i] + len(
                ctx.layers[i])]) for i in used]
            inputs = [tensors[k] for k in wanted]
        else:
            outputs = [ctx.outputs[i] for i in used]
            leaves = [leaf for layer in ctx.layers for leaf in layer]
            inputs = [leaves[k] for k in wanted]
        found = torch.autograd.grad(outputs, inputs, [grads[i] for i in used],
                                    retain_graph=True, create_graph=torch.is_grad_enabled(),
                                    allow_unused=True)
        for k, g in zip(wanted, found):
            result[4 + k] = g
        return tuple(result)


class BatchedRatios:
    """What :func:`batched_ratios` returns: the handle of its two hooks on the model.
    ``remove()`` takes them off (also at the end of a ``with`` block)."""

    def __init__(self, model: nn.Module) -> None:
        # The layers given ratios by the running forward of each model (by id: replicas of a
        # DataParallel model run their copies of the hooks in threads).
        self._given: Dict[int, list] = {}
        self._handles = [model.register_forward_pre_hook(self._before),
                         model.register_forward_hook(self._after, always_call=True)]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> 'BatchedRatios':
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _before(self, model: nn.Module, args) -> None:
        # A traced graph does not depend on the hooks, and the compiled form computes the
        # ratios in its graph: each layer its own (also where no layer would take them).
        grad = torch.is_grad_enabled()
        if is_tracing() or compiled_enabled() or (grad and saved_tensors_hooks_active()):
            return
        groups: Dict[tuple, list] = {}
        for layer in model.modules():
            if not has_ratios(layer) or not layer.takes_ratios() or getattr(
                    layer.ratio_fn, 'batched', None) is None:
                continue
            if layer._holds_ratios():
                continue  # a frozen_ratios scope (or the layer's own state) serves it
            inputs = layer.ratio_inputs()
            if not inputs[0].numel() or any(type(t) not in (Tensor, nn.Parameter)
                                            or t.is_inference() for t in inputs):
                continue  # sharded or wrapped parameters (FSDP, DTensor), inference tensors
            needs_grad = grad and any(t.requires_grad for t in inputs)
            # (SN and SN_tied share a group: one softmax for both; frozen layers get no graph)
            key = (layer.ratio_fn, inputs[0].shape[-1], inputs[0].dtype, inputs[0].device,
                   needs_grad)
            groups.setdefault(key, []).append((layer, inputs))
        given = []
        for (ratio_fn, *_, needs_grad), members in groups.items():
            layers, inputs = zip(*members)
            training = [layer.training for layer in layers]
            with full_precision(inputs[0][0]):
                if needs_grad:
                    states: list = []
                    ratios = _SharedRatios.apply(ratio_fn, training, [len(i) for i in inputs],
                                                 states, *[t for i in inputs for t in i])
                else:  # no graph to keep: the batched computation as it is
                    ratios, states = zip(*ratio_fn.batched(
                        [wide_ratio_inputs(i) for i in inputs], training))
            for layer, layer_inputs, layer_ratios, state in zip(layers, inputs, ratios, states):
                layer._step_ratios = StepRatios(layer_ratios, needs_grad,
                                                _ratio_key(layer_inputs), state)
                given.append(layer)
        self._given[id(model)] = given

    def _after(self, model: nn.Module, args, output) -> None:
        if is_tracing():
            return
        for layer in self._given.pop(id(model), ()):
            layer._step_ratios = None


def batched_ratios(model: nn.Module) -> BatchedRatios:
    """Compute the ratios of all of ``model``'s ratio layers (:func:`has_ratios`) together, once
    per forward of ``model``, instead of in each layer at each call.

    A ratio layer's ratios depend only on its parameters (and SSN's radius and choices), and
    each layer computes them in a few small ops: a softmax for SN, SparsestMax's rounds for SSN
    (one kernel on a GPU with Triton, about 45 public ops per training step otherwise). With
    this, a forward pre-hook on ``model`` concatenates the ratio inputs of all its layers of
    one kind and computes their ratios in one such computation, before the layers run; each
    layer takes its own (a view), and the backward of the shared computation is one pass for
    all the layers that used theirs (a layer not called keeps ``grad=None``). SSN's new choices
    are computed there too; a layer writes them when it takes its ratios. A layer called
    several times per forward (a head shared by the pyramid's levels) takes the same ratios
    each time. Values, gradients (also with ``create_graph=True``) and choices are those of the
    layers' own computation, bit for bit but for the order in which a shared layer's gradients
    add up.

    A layer computes its own ratios, as without this: outside ``model``'s forward; when its
    ratio inputs changed after the pre-hook read them (a submodule reparametrized inside the
    forward with ``torch.func.functional_call``, ``set_progress`` called by the forward:
    PyTorch's storages and version counters tell); in a forward with gradients that activation
    checkpointing records or recomputes (a non-reentrant recomputation must save what its
    first pass saved; also under other saved-tensor hooks such as ``save_on_cpu``), or whose
    ratio parameters did not require gradients, or gradients were off, when the model's
    forward began; when its parameters are inference tensors (no version counter); when
    traced (``torch.compile``, export, ``torch.func`` transforms) or in mmnorm's compiled form;
    when its form takes no ratios (SN with ``mix='std'`` or the authors' unbiased IN
    variance); and in inference forwards inside a :func:`frozen_ratios` scope (it uses the
    scope's). Parameters that are not plain tensors (FSDP shards, DTensors) are left to their
    layers. Not seen: SSN choices set by hand inside the model's forward (``harden_ratios_``
    there), which the layer's own bookkeeping, not a version counter, tracks. The ratios stay
    on the layers until the model's forward ends, also on an error (an interrupt, which skips
    PyTorch's ``always_call`` hooks, leaves them until the model's next forward): not for
    forwards of one model running concurrently in several threads. ``BatchedRatiosHook`` does
    this for an mmengine runner's model.

    Args:
        model (nn.Module): the model whose forward computes the ratios (the model a runner
            calls, not a wrapper such as DDP: its forward calls the model's).

    Returns:
        BatchedRatios: the hooks' handle; ``remove()`` or a ``with`` block takes them off.

    Example:
        >>> import torch
        >>> from mmnorm import SparseSwitchableNorm, batched_ratios
        >>> model = torch.nn.Sequential(SparseSwitchableNorm(8), SparseSwitchableNorm(8))
        >>> with batched_ratios(model):
        ...     model(torch.randn(2, 8, 5, 5)).sum().backward()
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f'batched_ratios: model must be an nn.Module, got {type(model).__name__}')
    return BatchedRatios(model)


def _sync_active(group) -> bool:
    return (dist.is_available() and dist.is_initialized()
            and dist.get_world_size(group) > 1)


class SyncNorm:
    """Mixin of the synchronized normalizers: ``class SyncX(SyncNorm, X)`` is ``X`` whose batch
    statistics in a training step are those of the whole process group's batch
    (:func:`mmnorm.functional.batch_statistics` with a ``process_group``), and records itself as
    ``X``'s twin (``X.sync_class()``; ``SyncX.local_class`` is ``X``).

    Takes ``X``'s arguments plus ``process_group`` (default: the whole world). Outside a
    distributed run, with one process, or in eval mode it computes what ``X`` computes.
    """

    process_group = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        local = next((base for base in cls.__mro__[1:]
                      if issubclass(base, BatchStatsNorm) and not issubclass(base, SyncNorm)),
                     None)
        if local is None:
            raise TypeError(f'{cls.__name__}: a SyncNorm must also derive from the normalizer it '
                            'synchronizes, as in class SyncX(SyncNorm, X)')
        cls.local_class = local
        local._sync_twin = cls

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def _sync_group(self):
        if self.training and _sync_active(self.process_group):
            return self.process_group if self.process_group is not None else dist.group.WORLD
        return None
