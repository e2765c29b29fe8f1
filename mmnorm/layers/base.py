# Copyright (c) mmnorm contributors. All rights reserved.
"""State that every mmnorm normalizer shares with ``nn.BatchNorm``: the BN-shaped constructor,
running buffers with PyTorch's momentum convention, and the batch-average evaluation guard."""
import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ['BatchStatsNorm', 'EVAL_STATS_MODES']

#: How the BN statistics used in eval are produced. ``'moving'``: the momentum average kept in
#: training. ``'batch_average'``: recomputed after training from K batches with frozen weights
#: (SN study Sec. 3; :func:`mmnorm.engine.recompute_batch_stats`), and flagged until then.
EVAL_STATS_MODES = ('moving', 'batch_average')

_STALE_STATS_MSG = (
    "mmnorm: a layer configured with eval_stats='batch_average' is evaluated with statistics that "
    'were not recomputed after training (they are the training-time moving average). Add '
    "dict(type='BatchAverageStatsHook') to custom_hooks, or run tools/recompute_stats.py on the "
    'checkpoint, before evaluating.')


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

    _version = 1

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
                           ) -> Tuple[Optional[Tensor], Optional[Tensor], bool, float]:
        """``(running_mean, running_var, use_batch_stats, momentum)`` for the functional form,
        following ``nn.BatchNorm``; also does the per-step bookkeeping."""
        momentum = 0.0
        # An empty batch changes nothing, except in a synchronized layer, whose statistics are
        # the global batch's (and the same on every process).
        counts = input.numel() > 0 or self._batch_stats_fn() is not None
        if self.training and self.track_running_stats and counts:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
            else:
                momentum = self.momentum
            # The running buffers move away from any recomputed batch average.
            self.stats_ready.fill_(False)
        if not self.training:
            self._check_eval_stats()
        use_batch_stats = self.training or self.running_mean is None
        if self.training and not self.track_running_stats:
            return None, None, use_batch_stats, momentum
        return self.running_mean, self.running_var, use_batch_stats, momentum

    def _batch_stats_fn(self):
        """Factory of the object forming BN statistics from per-(n, c) moments (see
        :func:`mmnorm.functional.switchable_norm`); ``None``: this batch's. The Sync layers
        override it."""
        return None

    def _check_eval_stats(self) -> None:
        if (self.eval_stats == 'batch_average' and not getattr(self, '_stale_warned', False)
                and not bool(self.stats_ready)):
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
