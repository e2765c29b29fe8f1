# Copyright (c) mmnorm contributors. All rights reserved.
r"""Batch-average statistics: recompute BN running buffers from K batches after training.

SN study, Sec. 3: "BN in SN is evaluated by using batch average ... rather than moving average".
:func:`recompute_batch_stats` does this for every layer of a model that keeps batch statistics:
the BN branch of SN / SN_tied (and the Sync versions), BCN's batch normalization when it is not
estimated, and plain ``nn.BatchNorm*`` (``_BatchNorm``). Weights are not touched: the model runs
``K`` training-mode forward passes without gradients while each layer reports the statistics of
every batch it sees.

Estimators (``estimator=``), for batches :math:`b` with :math:`N_b` samples and :math:`n_b`
values per channel (:math:`N_b \times` spatial size):

- ``'batch_average'`` (default; the SN study's batch average, also what precise-BN tools compute):
  :math:`\mu = \sum_b N_b \mu_b / \sum_b N_b`, :math:`\sigma^2 = \sum_b N_b s^2_b / \sum_b N_b`
  with :math:`s^2_b` the batch's *unbiased* variance. It estimates the statistics a batch of the
  training batch size has, which is what BN normalized with in training. The mean is invariant to
  how the data is split into equal-size batches; the variance depends on the batch size (not on
  the order of batches or on how they are spread over processes).
- ``'population'``: the mean and unbiased variance of all values seen, pooled exactly across
  batches (:math:`\sigma^2 = \sum_b n_b(v_b + (\mu_b - \mu)^2) / (\sum_b n_b - 1)`, :math:`v_b`
  biased), independent of the batching.

With one value per channel in a batch (:math:`n_b = 1`: e.g. ASPP's image pooling branch at one
image per process) a batch has no variance (the layers leave their running variance unchanged for
such batches, in training too), so ``'batch_average'`` cannot be formed: those layers get the
``'population'`` estimate, pooled over the K batches, and the function says which. With a single
value seen in all (:math:`\sum_b n_b = 1`) no variance can be estimated at all: the layer keeps
its statistics, is *not* marked ready, and a warning names it.

In distributed runs the sums are all-reduced (one collective per pass over all layers), so every
rank ends with identical buffers. Layers configured with ``eval_stats='batch_average'`` are marked
ready (``stats_ready``), which silences the guard that warns when they are evaluated with
training-time moving averages.
"""
import itertools
from typing import Callable, Dict, Iterable, List, Optional

import torch
from mmengine.dist import all_reduce, get_world_size
from mmengine.logging import print_log
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..layers import BatchChannelNorm, BatchStatsNorm, SwitchableNorm

__all__ = ['recompute_batch_stats', 'find_batch_stats_layers', 'ESTIMATORS']

ESTIMATORS = ('batch_average', 'population')


def find_batch_stats_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """Layers whose running buffers hold batch statistics that a batch average can replace."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and module.track_running_stats:
            found[name] = module
        elif isinstance(module, BatchStatsNorm) and module.track_running_stats:
            if isinstance(module, SwitchableNorm) and not module.using_bn:
                continue
            if isinstance(module, BatchChannelNorm) and module.estimate:
                continue  # Algorithm 1 estimates are the statistics; nothing to average
            found[name] = module
    return found


class _Accumulator:
    """Per-layer sums of batch statistics, fed by a forward hook."""

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.batches: List[tuple] = []  # (num_samples, num_values, mean, unbiased var)
        self.calls = 0

    def __call__(self, module: nn.Module, inputs: tuple, output) -> None:
        x = inputs[0]
        if x.numel() == 0 or not module.training:
            return  # frozen layers (e.g. norm_eval=True) keep their statistics
        num_samples = x.shape[0]
        num_values = x.numel() // x.shape[1]
        # momentum is 1 during the pass: the buffers now hold exactly this call's batch stats.
        self.batches.append((num_samples, num_values, module.running_mean.detach().double().clone(),
                             module.running_var.detach().double().clone()))
        self.calls += 1


def _combine(accumulators: List[_Accumulator], estimator: str) -> List[tuple]:
    """All-reduced (mean, var, count) per layer; one or two collectives for all layers together.
    ``count``: values per channel seen (all processes), for the population estimate."""
    device = accumulators[0].layer.running_mean.device
    if estimator == 'batch_average':
        sums = []
        for acc in accumulators:
            weight = sum(b[0] for b in acc.batches)
            mean = sum(b[0] * b[2] for b in acc.batches)
            var = sum(b[0] * b[3] for b in acc.batches)
            sums.append(torch.cat([torch.tensor([float(weight)], dtype=torch.float64,
                                                device=device), mean.to(device), var.to(device)]))
        flat = _all_reduce_sum(torch.cat(sums))
        return [(s[1:1 + (len(s) - 1) // 2] / s[0], s[1 + (len(s) - 1) // 2:] / s[0], None)
                for s in _split(flat, sums)]
    # population: exact pooled mean first, then the pooled variance around it.
    firsts = []
    for acc in accumulators:
        count = sum(b[1] for b in acc.batches)
        total = sum(b[1] * b[2] for b in acc.batches)
        firsts.append(torch.cat([torch.tensor([float(count)], dtype=torch.float64,
                                              device=device), total.to(device)]))
    flat = _all_reduce_sum(torch.cat(firsts))
    means = [(s[1:] / s[0], s[0]) for s in _split(flat, firsts)]
    seconds = []
    for acc, (mean, _) in zip(accumulators, means):
        spread = sum(b[1] * ((b[3] * (b[1] - 1) / b[1]) + (b[2].to(device) - mean) ** 2)
                     for b in acc.batches)
        seconds.append(spread)
    flat = _all_reduce_sum(torch.cat(seconds))
    return [(mean, spread / max(count.item() - 1, 1.0), count.item())
            for (mean, count), spread in zip(means, _split(flat, seconds))]


def _all_reduce_sum(tensor: Tensor) -> Tensor:
    if get_world_size() > 1:
        all_reduce(tensor, op='sum')
    return tensor


def _split(flat: Tensor, parts: List[Tensor]) -> List[Tensor]:
    return list(torch.split(flat, [p.numel() for p in parts]))


@torch.no_grad()
def recompute_batch_stats(model: nn.Module, batches: Iterable, num_iters: int,
                          forward: Optional[Callable[[nn.Module, object], None]] = None,
                          estimator: str = 'batch_average',
                          progress: Optional[Callable[[int], None]] = None,
                          logger: str = 'current') -> Dict[str, dict]:
    """Recompute the running statistics of every batch-statistics layer from ``num_iters`` batches.

    Args:
        model (nn.Module): the model; parameters, step counters (``num_batches_tracked``) and
            Algorithm-1 estimates are not modified, only ``running_mean``/``running_var`` of the
            batch-statistics layers (and ``stats_ready`` of mmnorm layers).
        batches (Iterable): training batches; iterated again from the start if shorter than
            ``num_iters``.
        num_iters (int): number of batches K.
        forward (callable, optional): ``forward(model, batch)`` running one training-mode
            forward pass. Defaults to mmengine's ``model.data_preprocessor`` then
            ``model(**data, mode='loss')``.
        estimator (str): ``'batch_average'`` or ``'population'``, see the module docstring.
        progress (callable, optional): called with the number of batches done after each one.
        logger (str): mmengine logger for the summary line.

    Returns:
        dict: per layer name, ``{'calls': int, 'samples': int}`` (local to this process).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f'estimator must be one of {ESTIMATORS}, got {estimator!r}')
    if num_iters < 1:
        raise ValueError(f'num_iters must be >= 1, got {num_iters}')
    layers = find_batch_stats_layers(model)
    if not layers:
        print_log('recompute_batch_stats: the model has no layer with batch statistics',
                  logger=logger, level=30)
        return {}
    forward = forward or _mmengine_forward
    saved = {name: (m.momentum, m.training) for name, m in layers.items()}
    # The pass is not training: no layer's step counter may move.
    counters = {m: m.num_batches_tracked.clone() for m in model.modules()
                if isinstance(m, (_BatchNorm, BatchStatsNorm))
                and getattr(m, 'num_batches_tracked', None) is not None}
    accumulators = {name: _Accumulator(m) for name, m in layers.items()}
    handles = [m.register_forward_hook(accumulators[name]) for name, m in layers.items()]
    was_training = model.training
    # Algorithm-1 estimates move in training mode; they must not change here (eval mode
    # normalizes with them exactly as a training step with rate 0 would).
    estimated = {m: m.training for m in model.modules()
                 if isinstance(m, BatchChannelNorm) and m.estimate}
    try:
        for m in layers.values():
            m.momentum = 1.0  # running buffers = the last batch's statistics
        model.train()
        for m in estimated:
            m.eval()
        for index, batch in enumerate(_cycle(batches, num_iters)):
            forward(model, batch)
            if progress is not None:
                progress(index + 1)
    finally:
        for h in handles:
            h.remove()
        for name, m in layers.items():
            m.momentum, training = saved[name]
            m.train(training)
        for m, count in counters.items():
            m.num_batches_tracked.copy_(count)
        model.train(was_training)
        for m, training in estimated.items():
            m.train(training)

    used = [acc for acc in accumulators.values() if acc.batches]
    unused = [name for name, acc in accumulators.items() if not acc.batches]
    # Every rank must join the same collectives: agree on which layers saw data.
    seen = torch.tensor([float(bool(acc.batches)) for acc in accumulators.values()],
                        dtype=torch.float64)
    seen = _all_reduce_sum(seen.to(next(iter(layers.values())).running_mean.device))
    if get_world_size() > 1 and bool(((seen > 0) & (seen < get_world_size())).any()):
        raise RuntimeError('recompute_batch_stats: some layers saw data on some processes only; '
                           'the processes must run the same layers')
    names = {acc: name for name, acc in accumulators.items()}
    # A batch with one value per channel has no variance: batch-average those layers'
    # variances is impossible, pool over all their batches instead (every rank decides alike:
    # the flag is all-reduced).
    single = torch.tensor([float(any(b[1] <= 1 for b in acc.batches)) for acc in used],
                          dtype=torch.float64)
    if used:
        single = _all_reduce_sum(single.to(used[0].layer.running_mean.device)) > 0
    fallback = [a for a, s in zip(used, single.tolist()) if s] \
        if estimator == 'batch_average' else []
    groups = [(estimator, [a for a in used if a not in fallback]), ('population', fallback)]
    if fallback:
        print_log(f'recompute_batch_stats: {len(fallback)} layer(s) saw one value per channel '
                  f'in a batch (no batch variance): population estimate instead: '
                  f'{[names[a] for a in fallback][:5]}', logger=logger, level=30)
    stale = []
    for group_estimator, group in groups:
        if not group:
            continue
        for acc, (mean, var, count) in zip(group, _combine(group, group_estimator)):
            acc.layer.running_mean.copy_(mean.to(acc.layer.running_mean.dtype))
            if count is not None and count <= 1:
                stale.append(names[acc])  # one value in all: no variance to estimate
                continue
            acc.layer.running_var.copy_(var.to(acc.layer.running_var.dtype))
            if isinstance(acc.layer, BatchStatsNorm):
                acc.layer.stats_ready.fill_(True)
                acc.layer._stale_warned = False
    if stale:
        print_log(f'recompute_batch_stats: {len(stale)} layer(s) saw a single value per channel '
                  f'in all; their running variance cannot be estimated, is kept, and they are '
                  f'not marked recomputed (use more batches): {stale[:5]}', logger=logger,
                  level=30)
    if unused:
        print_log(f'recompute_batch_stats: {len(unused)} layer(s) received no input and keep '
                  f'their statistics: {unused[:5]}{"..." if len(unused) > 5 else ""}',
                  logger=logger, level=30)
    print_log(f'recomputed batch statistics ({estimator}) of {len(used)} layer(s) from '
              f'{num_iters} batch(es)', logger=logger)
    return {name: dict(calls=acc.calls, samples=sum(b[0] for b in acc.batches))
            for name, acc in accumulators.items()}


def _cycle(batches: Iterable, num_iters: int):
    """``num_iters`` items, restarting ``batches`` whenever it is exhausted."""
    produced = 0
    while produced < num_iters:
        empty = True
        for batch in itertools.islice(batches, num_iters - produced):
            empty = False
            produced += 1
            yield batch
        if empty:
            raise RuntimeError('recompute_batch_stats: the data source produced no batch')


def _mmengine_forward(model: nn.Module, batch) -> None:
    data = model.data_preprocessor(batch, True)
    if isinstance(data, dict):
        model(**data, mode='loss')
    else:
        model(*data, mode='loss')
