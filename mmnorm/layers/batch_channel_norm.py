# Copyright (c) mmnorm contributors. All rights reserved.
r"""Batch-Channel Normalization module: ``BCN``, and its synchronized twin ``SyncBCN``.

Reference::

    @article{qiao2020rethinking,
      title   = {Rethinking Normalization and Elimination Singularity in Neural Networks},
      author  = {Qiao, Siyuan and Wang, Huiyu and Liu, Chenxi and Shen, Wei and Yuille, Alan},
      journal = {arXiv:1911.09738},
      year    = {2019}}

Implemented from the paper (Eq. (13)-(16), Algorithm 1).
"""
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..functional import (batch_channel_norm, batch_norm_step, check_norm_input,
                          check_num_groups, check_rate, in_recomputation, is_tracing)
from ..functional.arguments import check_flag
from ..functional.moments import stat_dtype
from ..registry import MODELS, register
from .base import BatchStatsNorm, SyncNorm, full_precision, log_once
from .fx import fx_leaf

__all__ = ['BatchChannelNorm', 'SyncBatchChannelNorm']

_ZERO_RATE_MSG = (
    'mmnorm: an estimated BCN layer (estimate=True) is training with estimate_rate == 0, so its '
    'batch statistics never move from 0 and 1. Algorithm 1 sets the rate to the learning rate: '
    "add dict(type='EstimateRateHook') to custom_hooks, or call set_estimate_rate().")


@register(MODELS, 'BCN')
class BatchChannelNorm(BatchStatsNorm):
    r"""Batch-Channel Normalization, ``BCN(x) = GN(BN(x))`` (registered as ``BCN``).

    .. math::
        \dot x_{\cdot c} = \gamma^b_c \frac{x_{\cdot c} - \hat\mu_c}
                                           {\sqrt{\hat\sigma^2_c + \epsilon}} + \beta^b_c,
        \qquad
        y_{bg} = \gamma^c_g \frac{\dot x_{bg} - \mu_{bg}}{\sqrt{\sigma^2_{bg} + \epsilon}}
                 + \beta^c_g .

    A batch normalization with per-channel affine (``bn_weight``, ``bn_bias``, running buffers)
    followed by a group normalization into ``num_groups`` groups with the **per-group** affine of
    Eq. (15) (``weight``, ``bias`` shaped ``(G,)``). Use it with weight-standardized convolutions
    (``conv_cfg=dict(type='WSConv')``), as the paper does.

    ``estimate=True`` is the micro-batch form (Algorithm 1): ``running_mean`` / ``running_var``
    hold the estimates :math:`\hat\mu, \hat\sigma^2` (initialised 0 and 1), which every training
    step moves towards the batch's statistics at rate ``estimate_rate`` *before* normalizing with
    them; no gradient flows through them and eval uses them as they are. The paper sets the rate
    to the learning rate: :class:`mmnorm.engine.EstimateRateHook` does that every iteration. A
    layer that trains with rate 0 warns once.

    Args:
        num_features (int): channels ``C``.
        num_groups (int): groups ``G`` of the channel normalization; must divide ``C``.
            Defaults to 32.
        eps (float): added to both variances. Defaults to 1e-5.
        momentum (float, optional): running-buffer momentum (large-batch form), PyTorch
            convention. Defaults to 0.1.
        affine (bool): learn ``bn_weight``/``bn_bias`` ``(C,)`` and ``weight``/``bias`` ``(G,)``.
            Defaults to True.
        track_running_stats (bool): keep running buffers for eval (large-batch form).
            Defaults to True.
        estimate (bool): micro-batch form with estimated statistics. Defaults to False.
        eval_stats (str): ``'moving'`` or ``'batch_average'`` (large-batch form only).
            Defaults to ``'moving'``.

    Shape:
        - Input: ``(N, C, *)``
        - Output: same as input.

    Examples:
        >>> from mmcv.cnn import build_norm_layer
        >>> name, bcn = build_norm_layer(dict(type='BCN', num_groups=8), 64)
        >>> name
        'bcn'
        >>> bcn.weight.shape, bcn.bn_weight.shape
        (torch.Size([8]), torch.Size([64]))
        >>> micro = BatchChannelNorm(64, num_groups=8, estimate=True)
        >>> micro.set_estimate_rate(0.02)
        >>> micro(torch.randn(1, 64, 7, 7)).shape
        torch.Size([1, 64, 7, 7])
    """

    _abbr_ = 'bcn'
    full_precision_buffers = ('estimate_rate', )

    def __init__(self, num_features: int, num_groups: int = 32, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, estimate: bool = False,
                 eval_stats: str = 'moving', device=None, dtype=None):
        affine, estimate = check_flag(affine, 'affine'), check_flag(estimate, 'estimate')
        if estimate and not track_running_stats:
            raise ValueError('estimate=True keeps its estimates in the running buffers: it '
                             'needs track_running_stats=True')
        if estimate and eval_stats != 'moving':
            raise ValueError("estimate=True uses its estimates in eval; eval_stats must be "
                             "'moving'")
        super().__init__(num_features, eps, momentum, track_running_stats, eval_stats, device,
                         dtype)
        num_groups = check_num_groups(self.num_features, num_groups)
        factory = {'device': device, 'dtype': dtype}
        self.num_groups = num_groups
        self.affine = affine
        self.estimate = estimate
        if affine:
            self.bn_weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bn_bias = nn.Parameter(torch.empty(num_features, **factory))
            self.weight = nn.Parameter(torch.empty(num_groups, **factory))
            self.bias = nn.Parameter(torch.empty(num_groups, **factory))
        else:
            for name in ('bn_weight', 'bn_bias', 'weight', 'bias'):
                self.register_parameter(name, None)
        if estimate:
            # (float32 for a half-precision layer, float64 for a float64 one: the rate exact)
            self.register_buffer('estimate_rate', torch.zeros((), device=device, dtype=stat_dtype(
                dtype or torch.get_default_dtype())))
        # A host copy of the rate, for the zero-rate check of the first step: reading the
        # buffer there would be a host-device sync. Written by set_estimate_rate(), read back
        # from the buffer on loading.
        self._estimate_rate = 0.0
        self._zero_rate_checked = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """All scales 1, shifts 0; running buffers (estimates) reset to 0 and 1; the
        ``estimate_rate`` buffer written again from the rate last set (after ``to_empty()``, a
        layer built on the ``meta`` device, it holds garbage)."""
        self.reset_running_stats()
        if self.estimate:
            with torch.no_grad():
                self.estimate_rate.fill_(self._estimate_rate)
        if self.affine:
            for p in (self.bn_weight, self.weight):
                nn.init.ones_(p)
            for p in (self.bn_bias, self.bias):
                nn.init.zeros_(p)

    @torch.no_grad()
    def set_estimate_rate(self, rate: float) -> None:
        """Set the update rate ``r`` of Algorithm 1 (the learning rate, per the paper)."""
        if not self.estimate:
            raise RuntimeError('set_estimate_rate() applies to BCN layers with estimate=True')
        check_rate(rate, 'the estimate rate')
        self.estimate_rate.fill_(rate.reshape(()) if isinstance(rate, Tensor) else rate)
        self._estimate_rate = float(rate)

    def _check_rate(self) -> None:
        # The first training step only, eagerly, from the host copy of the rate.
        if self._zero_rate_checked or is_tracing():
            return
        self._zero_rate_checked = True
        if getattr(self, '_estimate_rate', None) == 0.0:
            log_once(_ZERO_RATE_MSG)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A rate outside [0, 1] is no learning rate of Algorithm 1: refused and not copied, as
        # loading treats a wrong shape (the first training step refused it, naming neither the
        # layer nor the buffer).
        key = prefix + 'estimate_rate'
        saved = state_dict.get(key) if self.estimate else None
        refused = (isinstance(saved, Tensor) and saved.numel() == 1
                   and not 0.0 <= float(saved) <= 1.0)
        kept = state_dict.pop(key) if refused else None
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                          missing_keys, unexpected_keys, error_msgs)
        finally:
            if refused:
                state_dict[key] = kept
        if refused:
            missing_keys[:] = [k for k in missing_keys if k != key]
            error_msgs.append(f'{key}: the estimates\' update rate must be in [0, 1] (the '
                              f'learning rate), got {float(saved)}')
        if self.estimate:  # loading is not a forward: the one read of the buffer
            self._estimate_rate = float(self.estimate_rate)

    @fx_leaf
    def forward(self, input: Tensor) -> Tensor:
        check_norm_input(input, self.num_features)  # before any bookkeeping
        if self.estimate:
            # Algorithm 1 moves the estimates once per training step: not again when activation
            # checkpointing recomputes the step, which then normalizes with the moved estimates,
            # exactly as the first forward did.
            update = self.training and not in_recomputation()
            if update:
                if not self._run_checked:
                    self._check_run()
                self._check_rate()
                if input.numel() > 0:  # (an empty batch moves nothing, as in _batch_stats_state)
                    self.num_batches_tracked.add_(1)
            running_mean, running_var = self.running_mean, self.running_var
            use_batch_stats, momentum = update, 0.0
        else:
            running_mean, running_var, use_batch_stats, momentum = self._batch_stats_state(input)
        with full_precision(input):
            return batch_channel_norm(
                input, self.num_groups, self.weight, self.bias, self.bn_weight, self.bn_bias,
                running_mean, running_var, use_batch_stats, momentum, self.eps, self.estimate,
                self.estimate_rate if self.estimate else 0.0,
                self._sync_group() if use_batch_stats and not self.estimate else None)

    def config(self) -> Dict[str, Any]:
        return dict(super().config(), num_groups=self.num_groups, affine=self.affine,
                    estimate=self.estimate)

    @property
    def estimated(self) -> bool:
        return self.estimate

    @property
    def channel_groups(self) -> int:
        return self.num_groups

    @torch.no_grad()
    def grouped_moments(self, mean: Tensor, var: Tensor) -> Tuple[Tensor, Tensor]:
        """The moments of the batch normalization's output (Eq. 13), which the group
        normalization groups, from the input's batch moments (biased variance): normalized with
        those very moments in a large-batch training step, else with the running buffers
        (estimates), as the layer's forward does."""
        if self.training and not self.estimate:
            used_mean, used_var = mean, var
        else:
            used_mean, used_var = self.running_mean, self.running_var
        return batch_norm_step(mean, var, used_mean, used_var, self.bn_weight, self.bn_bias,
                               self.eps)[1:]


@register(MODELS, 'SyncBCN')
class SyncBatchChannelNorm(SyncNorm, BatchChannelNorm):
    """:class:`BatchChannelNorm` whose batch normalization uses the global batch's statistics
    (registered as ``SyncBCN``; :class:`~mmnorm.layers.SyncNorm`). The group normalization is
    per sample; estimated layers (``estimate=True``) stay local, their statistics being
    estimates. Takes the same arguments plus ``process_group``."""
