# Copyright (c) mmnorm contributors. All rights reserved.
r"""Sparse Switchable Normalization modules: ``SSN`` and ``SyncSSN``.

Reference::

    @inproceedings{shao2019ssn,
      title     = {SSN: Learning Sparse Switchable Normalization via SparsestMax},
      author    = {Shao, Wenqi and Meng, Tianjian and Li, Jingyu and Zhang, Ruimao and
                   Li, Yudian and Wang, Xiaogang and Luo, Ping},
      booktitle = {CVPR},
      year      = {2019}}

Implemented from the paper and the description of the authors' released layer
(switchablenorms/Sparse_SwitchNorm); none of their code is used.
"""
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..functional import in_recomputation, is_tracing
from ..functional.moments import stat_dtype
from ..functional.sparse_switchable import check_radius, sparsest_ratios, update_choice_pair
from ..functional.switchable import stacked_ratios
from ..registry import MODELS, register
from .base import SyncNorm, full_precision, log_once, runner_training
from .fx import fx_leaf
from .switchable_norm import SwitchableNorm

__all__ = ['SparseSwitchableNorm', 'SyncSparseSwitchableNorm']

_NO_RADIUS_MSG = (
    "mmnorm: an SSN layer is training but nothing sets its SparsestMax radius, which stays at "
    "{radius}; the paper grows it from 0 to 1 over training so that the ratios end one-hot. Add "
    "dict(type='SSNRadiusHook') to custom_hooks, or call set_progress() every iteration.")

#: What an mmengine run that trains SSN layers must provide: (what is wrong without it, the config
#: line that provides it), by the name of the check.
_RUN_NEEDS = {
    'progress': (
        'nothing sets their SparsestMax radius from the training progress (it would stay 0 and '
        'the ratios would never become one-hot)',
        "custom_hooks = [dict(type='SSNRadiusHook')]  # or append it to the config's custom_hooks"),
    'ratio_rules': (
        'the optimizer was not built by NormAwareOptimWrapperConstructor (the ratio parameters '
        'would train at the base learning rate and weight decay, unclipped)',
        "optim_wrapper = dict(constructor='NormAwareOptimWrapperConstructor', paramwise_cfg=dict("
        'ratio_lr_mult=0.1, ratio_decay_mult=0., ratio_clip_grad=dict(max_norm=1.0)))'),
}


def _run_needs_message(missing) -> str:
    reasons = ', and '.join(_RUN_NEEDS[need][0] for need in missing)
    lines = ''.join(f'\n    {_RUN_NEEDS[need][1]}' for need in missing)
    return (f'mmnorm: this run trains Sparse SN (SSN) layers, but {reasons}. Add to the config:'
            f"{lines}\nThe run stopped at these layers' first training step, before any optimizer "
            "step changed them. mmnorm's SSN configs (configs/*/*_ssn_*.py) have these lines.")


def _check_training_setup(layer: 'SparseSwitchableNorm') -> None:
    """On a layer's first step that trains it, once: inside an mmengine Runner's training, refuse
    to go on unless something sets the progress (``SSNRadiusHook``, or ``set_progress()``) and
    NormAwareOptimWrapperConstructor applied the ratio rules to the layer; outside a Runner, warn
    (once per run) when nothing set the radius. A layer whose ratio parameters are frozen (hard
    ratios) trains no ratio, and needs neither."""
    if runner_training():
        if any(getattr(layer, name).requires_grad for name in layer.ratio_params):
            missing = [need for need, met in (
                ('progress', layer._progress_set),
                ('ratio_rules', getattr(layer, '_ratio_rules_applied', False))) if not met]
            if missing:
                raise RuntimeError(_run_needs_message(missing))
        layer._setup_checked = True
    elif layer.training:
        layer._setup_checked = True
        # Reading the radius syncs with the device: once per layer.
        if not layer._progress_set and float(layer.radius) == 0.0:
            log_once(_NO_RADIUS_MSG.format(radius=0.0))
    else:  # eval mode with gradients outside a Runner (e.g. input gradients): no check
        layer._eval_checked = True


class _FixedRatios(torch.autograd.Function):
    """A layer's kept one-hot ratios in a graph: a copy (the kept tensor stays outside every
    graph), whose backward gives the scores zero gradients."""

    @staticmethod
    def forward(ctx, ratios: Tensor, *scores: Tensor) -> Tensor:
        ctx.scores = [(t.shape, t.dtype, t.device) for t in scores]
        return ratios.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (None, *[torch.zeros(shape, dtype=dtype, device=device) if needed else None
                        for (shape, dtype, device), needed in zip(ctx.scores,
                                                                   ctx.needs_input_grad[1:])])


@register(MODELS, 'SSN')
class SparseSwitchableNorm(SwitchableNorm):
    r"""Sparse Switchable Normalization (registered as ``SSN``): SN whose ratios are
    :math:`\mathrm{SparsestMax}` of the ratio parameters
    (:mod:`mmnorm.functional.sparse_switchable`).

    .. math::
        y = \gamma\,\frac{x - \sum_{z\in\Omega}\lambda^\mu_z\mu_z}
                        {\sqrt{\sum_{z\in\Omega}\lambda^\sigma_z\sigma^2_z + \epsilon}} + \beta,
        \quad \lambda^\mu = \mathrm{SparsestMax}(z^\mu; r),\;
        \lambda^\sigma = \mathrm{SparsestMax}(z^\sigma; r).

    The radius :math:`r` (buffer ``radius``) is the training progress, from 0 to 1
    (:class:`mmnorm.engine.SSNRadiusHook` sets it every iteration, as the authors' training
    script does): the ratios start as sparsemax and end one-hot, so that a trained layer is one
    plain normalizer (BN folds into the convolution at inference, ``tools/export_hard_ratios.py``).
    A ratio vector that becomes one-hot in training is fixed (``mean_choice`` / ``var_choice``
    hold the chosen index, -1 while free; saved with the weights) and gets no gradient from then
    on, as in the authors' layer. In eval the ratios are those of the saved radius and choices.

    Parameters ``mean_scores`` / ``var_scores`` (not logits; initialised to ones, equal ratios)
    replace SN's ``mean_logits`` / ``var_logits``; every other argument is SN's
    (:class:`~mmnorm.layers.SwitchableNorm`), ``using_bn=False`` giving Ω = {IN, LN} (the paper's
    algorithm on two entries; the authors' layer has three). ``in_unbiased=True`` reproduces the
    authors' IN variance (converted checkpoints turn it on).

    Examples:
        >>> from mmcv.cnn import build_norm_layer
        >>> name, ssn = build_norm_layer(dict(type='SSN'), 16, postfix=1)
        >>> name
        'ssn1'
        >>> ssn.set_progress(1.0)  # the end of training: every ratio vector is one-hot
        >>> with torch.no_grad():
        ...     _ = ssn.mean_scores.copy_(torch.tensor([0.2, 0.1, 0.6]))
        >>> ssn.ratios()[0].tolist()
        [0.0, 0.0, 1.0]
    """

    _abbr_ = 'ssn'
    ratio_fn = staticmethod(sparsest_ratios)
    ratio_state = ('mean_scores', 'var_scores', 'radius', 'mean_choice', 'var_choice')
    ratio_params = ('mean_scores', 'var_scores')
    follows_progress = True
    full_precision_buffers = ('radius', )
    #: ``(key, stacked ratios)`` when the last check (:meth:`_check_fixed`) found every choice
    #: fixed: the one-hot ratios, which depend on neither the scores nor the radius then; None
    #: otherwise (:meth:`_scoped_ratios`).
    _fixed_ratios: Optional[Tuple[tuple, Tensor]] = None
    #: The choices' key at the last check, whatever it found.
    _checked_key: Optional[tuple] = None
    _transient = SwitchableNorm._transient + ('_fixed_ratios', '_checked_key')

    def _create_logits(self, num_ratios: int, factory: dict) -> None:
        shape = self._ratio_shape(num_ratios)
        self.mean_scores = nn.Parameter(torch.empty(shape, **factory))
        self.var_scores = nn.Parameter(torch.empty(shape, **factory))
        device = factory['device']
        # (float32 for a half-precision layer, float64 for a float64 one: the progress exact)
        self.register_buffer('radius', torch.zeros((), device=device, dtype=stat_dtype(
            factory['dtype'] or torch.get_default_dtype())))
        # One choice per ratio vector: 0-dim, or (G,) with ratio groups.
        self.register_buffer('mean_choice',
                             torch.full(shape[:-1], -1, dtype=torch.long, device=device))
        self.register_buffer('var_choice',
                             torch.full(shape[:-1], -1, dtype=torch.long, device=device))
        self._progress_set = False

    def _logits(self) -> Tuple[nn.Parameter, ...]:
        return self.mean_scores, self.var_scores

    def reset_parameters(self) -> None:
        """SN's reset, with ratio parameters 1 (equal ratios, as the authors initialise them),
        radius 0 and both choices free."""
        super().reset_parameters()
        with torch.no_grad():
            for scores in self._logits():
                scores.fill_(1.0)
            self.radius.zero_()
            self.mean_choice.fill_(-1)
            self.var_choice.fill_(-1)

    @torch.no_grad()
    def set_progress(self, progress: float) -> None:
        """Set the SparsestMax radius to the training progress ``progress`` in [0, 1]."""
        check_radius(progress)
        self.radius.fill_(progress.reshape(()) if isinstance(progress, Tensor) else progress)
        self._progress_set = True

    @torch.no_grad()
    def harden_ratios_(self) -> None:
        """Fix both choices (of every group) at the argmax of the current ratios (one-hot from
        now on, without gradient); the ratio parameters stop training
        (``requires_grad=False``)."""
        mean_ratios, var_ratios = self.ratios()
        self.mean_choice.copy_(mean_ratios.argmax(-1))
        self.var_choice.copy_(var_ratios.argmax(-1))
        for scores in self._logits():
            scores.requires_grad_(False)
        self._check_fixed()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A choice out of range would index past the normalizers in the forward, or (negative)
        # free a fixed vector; a radius outside [0, 1] is no training progress. Refused and not
        # copied, as loading treats a wrong shape (loading is not a forward: reading values is
        # fine).
        size = self.mean_scores.shape[-1]
        refused = {}
        for name in ('mean_choice', 'var_choice'):
            saved = state_dict.get(prefix + name)
            if isinstance(saved, Tensor) and saved.numel() and (
                    saved.is_floating_point() or not bool(((saved >= -1) & (saved < size)).all())):
                refused[prefix + name] = (
                    f'{prefix}{name}: a fixed choice must be -1 (free) or the index of one of the '
                    f'{size} normalizers, got {saved.tolist()}')
        radius = state_dict.get(prefix + 'radius')
        if isinstance(radius, Tensor) and radius.numel() == 1 and not 0 <= float(radius) <= 1:
            refused[prefix + 'radius'] = (f'{prefix}radius: the SparsestMax radius must be in '
                                          f'[0, 1] (the training progress), got {float(radius)}')
        kept = {key: state_dict.pop(key) for key in refused}
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                          missing_keys, unexpected_keys, error_msgs)
        finally:
            state_dict.update(kept)
            self._check_fixed()
        missing_keys[:] = [key for key in missing_keys if key not in refused]
        error_msgs.extend(refused.values())

    def ratio_details(self) -> Dict[str, Any]:
        # 'fixed': one bool per ratio vector (μ, σ), a list of one per group with ratio groups.
        return {'radius': float(self.radius),
                'fixed': [(self.mean_choice >= 0).tolist(), (self.var_choice >= 0).tolist()]}

    def train(self, mode: bool = True) -> 'SparseSwitchableNorm':
        """``nn.Module.train``; ``.eval()`` also checks whether every choice is fixed (then
        forwards take the one-hot ratios without computing them, and training steps have no
        choice to update) when the choices changed since the last check, as their storages and
        version counters tell (a training step that computes the ratios writes them; a layer
        kept in eval, a teacher or a layer under ``norm_eval`` put in eval every iteration,
        does not)."""
        super().train(mode)
        if not mode and (self._checked_key is None or self._checked_key != self._choice_key()):
            self._check_fixed()
        return self

    def _choice_key(self) -> Optional[tuple]:
        """What PyTorch tracks of the choices and the ratios' type: storages, version
        counters, the scores' dtype and device (None for inference tensors, which have no
        counter, and tensor subclasses, fake ones among them, which have no storage)."""
        choices = (self.mean_choice, self.var_choice)
        if any(type(t) is not Tensor or t.is_inference() for t in choices):
            return None
        scores = self.mean_scores
        return tuple((t.data_ptr(), t._version) for t in choices) + (scores.dtype, scores.device)

    @torch.no_grad()
    def _check_fixed(self) -> None:
        """Outside tracing, on real tensors: when every choice is fixed, keep the one-hot ratios
        with the choices' key. Reads the choices (a host sync on an accelerator): called on
        ``.eval()``, a load and a hardening (in either mode: a finetuning run loads its trained
        checkpoint in training mode), never in a forward."""
        self._fixed_ratios = self._checked_key = None
        if 'var_choice' not in self._buffers:  # (not built yet)
            return
        choices = (self.mean_choice, self.var_choice)
        if (is_tracing() or torch.compiler.is_compiling()
                or any(type(t) is not Tensor or t.device.type == 'meta' for t in choices)):
            return
        key = self._checked_key = self._choice_key()
        size = self.mean_scores.shape[-1]
        both = torch.cat([t.reshape(-1) for t in choices])
        # One read of both; a choice out of range (memory not loaded yet) is not fixed.
        if key is not None and bool(((both >= 0) & (both < size)).all()):
            # (.eval() may be called under autocast, or under inference_mode: the kept ratios
            # must not be an inference tensor, which a later step's graph could not save; and
            # leaving inference mode turns gradients on, so off again)
            with full_precision(self.mean_scores), torch.inference_mode(False), \
                    torch.no_grad():
                self._fixed_ratios = key, stacked_ratios(self.ratio_fn, self.ratio_inputs())

    def _scoped_ratios(self) -> Optional[Tensor]:
        """SN's (a scope's ratios), and in any forward of a layer whose every choice was fixed
        at the last check (a trained layer: the radius reached the vertices, or a finetuning
        run loaded its trained checkpoint), its one-hot ratios, not computed again: SparsestMax's
        rounds and the choice update are two kernel launches a training step on a GPU with
        Triton (about 50 small ops in public ops), and the layer is one plain normalizer. Any
        change the version counters see (an in-place update, a load outside eval mode),
        another storage (a move to another device) or another dtype computes them as usual
        until the next check; an update through ``.data`` is not seen (mmengine's ``EMAHook``
        swaps before the loop calls ``.eval()``)."""
        fixed = self._fixed_now()
        return fixed if fixed is not None else super()._scoped_ratios()

    def _fixed_holds(self) -> bool:
        """Whether the one-hot ratios of the last check serve this forward: not traced or
        compiled, and the choices' key unchanged since (every choice still fixed, so a
        training step would not change them either)."""
        fixed = self._fixed_ratios
        return (fixed is not None and not torch.compiler.is_compiling() and not is_tracing()
                and fixed[0] == self._choice_key())

    def _fixed_now(self) -> Optional[Tensor]:
        """The one-hot ratios of the last check, if they serve this forward; with gradients
        on, through a node that gives the scores zero gradients, as SparsestMax's fixed rows
        do (DDP expects a gradient for every parameter that requires one)."""
        if not self._fixed_holds():
            return None
        ratios = self._fixed_ratios[1]
        scores = (self.mean_scores, self.var_scores)
        if torch.is_grad_enabled() and any(t.requires_grad for t in scores):
            return _FixedRatios.apply(ratios, *scores)
        return ratios

    def _holds_ratios(self) -> bool:
        return super()._holds_ratios() or self._fixed_holds()

    @fx_leaf
    def forward(self, input: Tensor) -> Tensor:
        # The first step that trains the layer (its ratio parameters train in eval mode too, e.g.
        # under norm_eval=True) checks what the run provides, once, before anything changes; a
        # host flag, nothing on later calls.
        if (not getattr(self, '_setup_checked', False)
                and (self.training or (torch.is_grad_enabled()
                                       and not getattr(self, '_eval_checked', False)))
                and not is_tracing() and not in_recomputation()):
            _check_training_setup(self)
        out, (mean_ratios, var_ratios) = self._mix(input)
        if not self.training or in_recomputation():
            return out
        if self._fixed_holds():
            # Every choice fixed: nothing to update. The next .eval() checks them again, as
            # after a step that wrote them: a swap through .data (EMAHook's) is seen there.
            self._checked_key = None
            return out
        step = self._step_ratios
        # The form used batched_ratios' ratios (what it returns are views of them), which
        # came with the choices they fix, computed for all layers at once.
        if (step is not None and step.state is not None
                and mean_ratios.data_ptr() == step.ratios.data_ptr()):
            self.mean_choice.copy_(step.state[0])
            self.var_choice.copy_(step.state[1])
        else:
            update_choice_pair(mean_ratios, var_ratios, self.mean_choice, self.var_choice)
        return out


@register(MODELS, 'SyncSSN')
class SyncSparseSwitchableNorm(SyncNorm, SparseSwitchableNorm):
    """:class:`SparseSwitchableNorm` whose BN branch uses the global batch's statistics
    (registered as ``SyncSSN``; :class:`~mmnorm.layers.SyncNorm`). Takes the same arguments
    plus ``process_group``."""
