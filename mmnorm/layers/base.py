# Copyright (c) mmnorm contributors. All rights reserved.
"""State that every mmnorm normalizer shares with ``nn.BatchNorm``: the BN-shaped constructor,
running buffers with PyTorch's momentum convention, and the batch-average evaluation guard."""
import contextlib
import warnings
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..functional import in_recomputation, is_tracing

__all__ = ['BatchStatsNorm', 'EVAL_STATS_MODES', 'full_precision']

#: How the BN statistics used in eval are produced. ``'moving'``: the momentum average kept in
#: training. ``'batch_average'``: recomputed after training from K batches with frozen weights
#: (SN study Sec. 3; :func:`mmnorm.engine.recompute_batch_stats`), and flagged until then.
EVAL_STATS_MODES = ('moving', 'batch_average')

_STALE_STATS_MSG = (
    "mmnorm: a layer configured with eval_stats='batch_average' is evaluated with statistics that "
    'were not recomputed after training (they are the training-time moving average). Add '
    "dict(type='BatchAverageStatsHook') to custom_hooks, or run tools/recompute_stats.py on the "
    'checkpoint, before evaluating.')


def full_precision(input: Tensor):
    """Context that turns autocast off for ``input``'s device if it is on: the layers compute
    their statistics and affine map in float32 (or wider) themselves, and autocast would run the
    ``(N, C)`` coefficient math in half precision. A no-op otherwise, so traced graphs carry no
    autocast regions."""
    device = input.device.type
    if torch.is_autocast_enabled(device):
        return torch.autocast(device_type=device, enabled=False)
    return contextlib.nullcontext()


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
        if isinstance(num_features, bool) or not isinstance(num_features, int) \
                or num_features <= 0:
            raise ValueError(f'num_features must be a positive int, got {num_features!r}')
        if not eps >= 0:
            raise ValueError(f'eps must be >= 0, got {eps!r}')
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f'momentum must be in [0, 1] or None, got {momentum!r}')
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

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, counters cleared."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()
            self.stats_ready.fill_(False)

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
        update = self.training and self.track_running_stats and not in_recomputation()
        # An empty batch changes nothing, except in a synchronized layer, whose statistics are
        # the global batch's (and the same on every process).
        momentum: Union[float, Tensor] = 0.0
        if update and (input.shape[0] > 0 or group is not None):
            self.num_batches_tracked.add_(1)
            # momentum=None: cumulative average, 1 / steps (a tensor: no host sync).
            momentum = (self.num_batches_tracked.to(self.running_mean.dtype).reciprocal()
                        if self.momentum is None else self.momentum)
            # The running buffers move away from any recomputed batch average.
            self.stats_ready.fill_(False)
        if not self.training:
            self._check_eval_stats()
        use_batch_stats = self.training or self.running_mean is None
        if self.training and not update:
            return None, None, use_batch_stats, momentum
        return self.running_mean, self.running_var, use_batch_stats, momentum

    def _sync_group(self):
        """The process group whose batch forms the BN statistics of a training step, or
        ``None`` for this process's batch. The Sync layers override it."""
        return None

    def _check_eval_stats(self) -> None:
        if (self.eval_stats == 'batch_average' and not is_tracing()
                and not getattr(self, '_stale_warned', False) and not bool(self.stats_ready)):
            self._stale_warned = True
            warnings.warn(_STALE_STATS_MSG, stacklevel=4)

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

    def _base_repr(self) -> str:
        return (f'{self.num_features}, eps={self.eps}, momentum={self.momentum}, '
                f'track_running_stats={self.track_running_stats}, '
                f'eval_stats={self.eval_stats!r}')
