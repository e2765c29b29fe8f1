# Copyright (c) mmnorm contributors. All rights reserved.
r"""Batch-average statistics: recompute BN running buffers from K batches after training.

SN study, Sec. 3: "BN in SN is evaluated by using batch average ... rather than moving average".
:func:`recompute_batch_stats` does this for every layer of a model that keeps batch statistics:
every mmnorm normalizer whose ``keeps_batch_stats`` says so (the BN branch of SN and its variants,
BCN's batch normalization when it is not estimated, and their Sync versions) and plain
``nn.BatchNorm*`` (``_BatchNorm``). Weights are not touched: the model runs ``K`` training-mode
forward passes without gradients while each layer reports the statistics of every batch it sees.

It is built from three small pieces, as fvcore's precise BN is:

- the layers run with ``momentum = 1``, so that after each forward their running buffers hold
  exactly that batch's mean and unbiased variance (a private recorder reads them);
- an **estimator** per layer combines the batches (:class:`BatchAverageEstimator`,
  :class:`PopulationEstimator`);
- one collective per estimator kind combines the processes, so every rank ends with identical
  buffers.

Estimators (``estimator=``), for batches :math:`b` with :math:`N_b` samples and :math:`n_b`
values per channel (:math:`N_b \times` spatial size):

- ``'batch_average'`` (default; the SN study's batch average, also what precise-BN tools compute):
  :math:`\mu = \sum_b N_b \mu_b / \sum_b N_b`, :math:`\sigma^2 = \sum_b N_b s^2_b / \sum_b N_b`
  with :math:`s^2_b` the batch's *unbiased* variance. It estimates the statistics a batch of the
  training batch size has, which is what BN normalized with in training. The mean is invariant to
  how the data is split into equal-size batches; the variance depends on the batch size (not on
  the order of batches or on how they are spread over processes).
- ``'population'``: the mean and unbiased variance of all values seen, pooled exactly across
  batches and processes (law of total variance, :func:`mmnorm.functional.pool_weighted`),
  independent of the batching.

With one value per channel in a batch (:math:`n_b = 1`: e.g. ASPP's image pooling branch at one
image per process) a batch has no variance (the layers leave their running variance unchanged for
such batches, in training too), so ``'batch_average'`` cannot be formed: those layers get the
``'population'`` estimate, pooled over the K batches, and the function says which. With a single
value seen in all (:math:`\sum_b n_b = 1`) no variance can be estimated at all: the layer keeps
its statistics, is *not* marked ready, and a warning names it.

A synchronized layer (``SyncSN``, ``SyncBCN``, ``nn.SyncBatchNorm``, ...) normalizes with the
statistics of the process group's whole batch: its batches are those global batches, with their
global counts of values (the one-value case above is then one value in the whole group's
batch), and a process whose part of a batch was empty still ran it. A layer that saw data on
some processes only (a mask head that got no positive RoI on one of them) gets the statistics of
the data seen.

Layers configured with ``eval_stats='batch_average'`` are marked ready (``stats_ready``), which
silences the guard that warns when they are evaluated with training-time moving averages.
"""
import contextlib
import itertools
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from mmengine.dist import all_reduce, get_rank, get_world_size
from mmengine.logging import print_log
from torch import Tensor, nn
from torch import distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

from ..functional import pool_weighted
from ..layers import BatchStatsNorm, SyncNorm
from ..layers.base import _sync_active

__all__ = ['recompute_batch_stats', 'find_batch_stats_layers', 'ESTIMATORS',
           'BatchAverageEstimator', 'PopulationEstimator']

ESTIMATORS = ('batch_average', 'population')


def find_batch_stats_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """Layers whose running buffers hold batch statistics that a batch average can replace."""
    return {name: module for name, module in model.named_modules()
            if (isinstance(module, _BatchNorm) and module.track_running_stats)
            or (isinstance(module, BatchStatsNorm) and module.keeps_batch_stats)}


def _all_reduce_sum(tensor: Tensor) -> Tensor:
    if get_world_size() > 1:
        all_reduce(tensor, op='sum')
    return tensor


class BatchAverageEstimator:
    """The batch average of one layer: sample-weighted means of the batches' means and
    unbiased variances. Its sums add across processes."""

    def __init__(self, channels: int, device):
        self.sums = torch.zeros(1 + 2 * channels, dtype=torch.float64, device=device)

    def update(self, mean: Tensor, unbiased_var: Tensor, samples: int, values: int,
               batch_values: int) -> None:
        self.sums += torch.cat([mean.new_tensor([1.0]), mean, unbiased_var]) * samples

    def local_state(self) -> Tensor:
        return self.sums

    @staticmethod
    def finish(state: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """``(mean, unbiased variance, values count or None)`` from the all-reduced state."""
        weight, mean, var = state.split([1, (state.numel() - 1) // 2, (state.numel() - 1) // 2])
        return mean / weight, var / weight, None


class PopulationEstimator:
    """The population statistics of one layer: every value seen, pooled exactly. Batches merge
    into a running (count, mean, biased variance) (law of total variance); processes meet in one
    slot each, pooled the same way."""

    def __init__(self, channels: int, device):
        self.count = 0
        self.mean = torch.zeros(channels, dtype=torch.float64, device=device)
        self.var = torch.zeros(channels, dtype=torch.float64, device=device)

    def update(self, mean: Tensor, unbiased_var: Tensor, samples: int, values: int,
               batch_values: int) -> None:
        biased = unbiased_var * ((batch_values - 1) / batch_values)
        counts = torch.tensor([[float(self.count)], [float(values)]], dtype=torch.float64,
                              device=mean.device)
        self.mean, self.var, _ = pool_weighted(counts, torch.stack([self.mean, mean]),
                                               torch.stack([self.var, biased]))
        self.count += values

    def local_state(self) -> Tensor:
        """This process's slot among ``world`` (the others zero): a sum all-reduce gathers."""
        own = torch.cat([self.mean.new_tensor([float(self.count)]), self.mean, self.var])
        slots = own.new_zeros(get_world_size(), own.numel())
        slots[get_rank()] = own
        return slots.flatten()

    @staticmethod
    def finish(state: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        slots = state.view(get_world_size(), -1)
        channels = (slots.shape[1] - 1) // 2
        counts, means, variances = slots.split([1, channels, channels], dim=1)
        mean, var, total = pool_weighted(counts, means, variances)
        total = float(total)
        return mean, var * (total / max(total - 1.0, 1.0)), total


_ESTIMATOR_CLASSES = {'batch_average': BatchAverageEstimator, 'population': PopulationEstimator}


def _sync_group(layer: nn.Module):
    """The process group whose whole batch the layer's training statistics cover (a
    synchronized layer in a distributed run), or None (this process's batch)."""
    if isinstance(layer, SyncNorm):
        return layer._sync_group()
    if isinstance(layer, nn.SyncBatchNorm) and layer.training \
            and _sync_active(layer.process_group):  # (torch.nn.SyncBatchNorm.forward's rule)
        return layer.process_group or dist.group.WORLD
    return None


class _BatchRecorder:
    """Forward hook of one layer: after each training-mode forward (momentum 1), its running
    buffers are that batch's mean and unbiased variance; both estimators take them.

    A synchronized layer's batch is the whole process group's: its variance is unbiased over
    the group's count of values (a collective per call gets it, every process calling the layer
    as the layer itself requires), and a process with an empty input still saw it. Each
    process weighs the batch by its own samples and values, so the sums over processes weigh
    it by the group's."""

    def __init__(self, layer: nn.Module):
        self.layer = layer
        device = layer.running_mean.device
        channels = layer.running_mean.numel()
        self.estimators = {name: cls(channels, device)
                           for name, cls in _ESTIMATOR_CLASSES.items()}
        self.calls = self.samples = 0
        self.one_value_batch = False  # a batch with one value per channel: no batch variance
        self.frozen_calls = 0  # forwards in eval mode (frozen, e.g. by norm_eval=True)

    def __call__(self, module: nn.Module, inputs: tuple, output) -> None:
        x = inputs[0]
        if not module.training:
            self.frozen_calls += 1
            return  # frozen layers (e.g. norm_eval=True) keep their statistics
        samples = x.shape[0]
        values = x.numel() // x.shape[1] if x.shape[1] else 0
        batch_values, group = values, _sync_group(module)
        if group is not None:
            count = torch.tensor([float(values)], dtype=torch.float64,
                                 device=module.running_mean.device)
            dist.all_reduce(count, group=group)
            batch_values = int(count.item())
        if batch_values == 0:
            return
        mean = module.running_mean.detach().double()
        var = module.running_var.detach().double()
        if getattr(module, 'in_unbiased', False) and batch_values > 1:
            # (a layer with the SN authors' variances moves its running variance as their layer
            # does, to the batch's variance with no Bessel correction: corrected here, as the
            # estimators take it)
            var = var * (batch_values / (batch_values - 1))
        if values:
            for estimator in self.estimators.values():
                estimator.update(mean, var, samples, values, batch_values)
        self.calls += 1
        self.samples += samples
        self.one_value_batch |= batch_values <= 1


@contextlib.contextmanager
def _recording(model: nn.Module, layers: Dict[str, nn.Module]):
    """Run ``model`` in training mode with the layers recording (momentum 1), then restore
    everything: momenta, train/eval modes, step counters (the pass is not training), the
    estimates of estimated layers (kept in eval, where they normalize as a rate-0 step would)
    and the running statistics (the recorders hold what the batches gave; the caller writes the
    result, so a pass that fails, or is interrupted, leaves them as they were)."""
    recorders = {name: _BatchRecorder(m) for name, m in layers.items()}
    handles = [m.register_forward_hook(recorders[name]) for name, m in layers.items()]
    saved = {m: (m.momentum, m.training) for m in layers.values()}
    statistics = {m: (m.running_mean.clone(), m.running_var.clone()) for m in layers.values()}
    # (the pass's training forwards clear the layers' stats_ready: restored with them)
    ready = {m: getattr(m, '_stats_ready', False) for m in layers.values()
             if isinstance(m, BatchStatsNorm) and m.stats_ready is not None}
    counters = {m: m.num_batches_tracked.clone() for m in model.modules()
                if isinstance(m, (_BatchNorm, BatchStatsNorm))
                and getattr(m, 'num_batches_tracked', None) is not None}
    estimated = {m: m.training for m in model.modules()
                 if isinstance(m, BatchStatsNorm) and m.estimated}
    was_training = model.training
    try:
        for m in layers.values():
            m.momentum = 1.0
        model.train()
        for m in estimated:
            m.eval()
        yield recorders
    finally:
        for h in handles:
            h.remove()
        for m, (momentum, training) in saved.items():
            m.momentum = momentum
            m.train(training)
        for m, (mean, var) in statistics.items():
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
        for m, flag in ready.items():
            m.mark_stats_ready(flag)
        for m, count in counters.items():
            m.num_batches_tracked.copy_(count)
        model.train(was_training)
        for m, training in estimated.items():
            m.train(training)


def _combine(recorders: List[_BatchRecorder], estimator: str) -> List[tuple]:
    """``(mean, unbiased var, count)`` per recorder from its ``estimator``, all processes
    together: one collective for all of them."""
    if not recorders:
        return []
    states = [r.estimators[estimator].local_state() for r in recorders]
    flat = _all_reduce_sum(torch.cat(states))
    finish = _ESTIMATOR_CLASSES[estimator].finish
    return [finish(part) for part in torch.split(flat, [s.numel() for s in states])]


def _count_processes(flags: List[bool], device) -> List[int]:
    """How many processes set each flag (one collective): every rank decides alike."""
    summed = _all_reduce_sum(torch.tensor([float(f) for f in flags], dtype=torch.float64,
                                          device=device))
    return [int(v) for v in summed.tolist()]


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
            ``num_iters`` (a list or a DataLoader; an iterator that runs out is refused).
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
    with _recording(model, layers) as recorders:
        for index, batch in enumerate(_cycle(batches, num_iters)):
            forward(model, batch)
            if progress is not None:
                progress(index + 1)

    names = {id(r): name for name, r in recorders.items()}
    device = next(iter(layers.values())).running_mean.device
    # Every rank must join the same collectives: agree on which layers saw data on some process
    # (one that saw none adds nothing to their sums: a mask head without RoIs here), and on
    # which saw a batch with one value per channel (no batch variance: the population estimate).
    seen = dict(zip(recorders, _count_processes([r.calls > 0 for r in recorders.values()],
                                                device)))
    used = [recorders[name] for name, count in seen.items() if count]
    single = _count_processes([r.one_value_batch for r in used], device)
    fallback = [r for r, count in zip(used, single) if count and estimator == 'batch_average']
    if fallback:
        print_log(f'recompute_batch_stats: {len(fallback)} layer(s) saw one value per channel '
                  f'in a batch (no batch variance): population estimate instead: '
                  f'{[names[id(r)] for r in fallback][:5]}', logger=logger, level=30)
    stale = []
    for group_estimator, group in ((estimator, [r for r in used if r not in fallback]),
                                   ('population', fallback)):
        for recorder, (mean, var, count) in zip(group, _combine(group, group_estimator)):
            layer = recorder.layer
            layer.running_mean.copy_(mean.to(layer.running_mean.dtype))
            if count is not None and count <= 1:
                stale.append(names[id(recorder)])  # one value in all: no variance to estimate
                continue
            layer.running_var.copy_(var.to(layer.running_var.dtype))
            if isinstance(layer, BatchStatsNorm):
                layer.mark_stats_ready(True)
    if stale:
        print_log(f'recompute_batch_stats: {len(stale)} layer(s) saw a single value per channel '
                  f'in all; their running variance cannot be estimated, is kept, and they are '
                  f'not marked recomputed (use more batches): {stale[:5]}', logger=logger,
                  level=30)
    frozen = [name for name, r in recorders.items() if not seen[name] and r.frozen_calls]
    if frozen:  # (intended: the model's train() keeps them in eval mode)
        print_log(f'recompute_batch_stats: {len(frozen)} layer(s) are frozen (kept in eval mode, '
                  f'e.g. by norm_eval=True) and keep their statistics: '
                  f'{frozen[:5]}{"..." if len(frozen) > 5 else ""}', logger=logger)
    unused = [name for name, r in recorders.items() if not seen[name] and not r.frozen_calls]
    if unused:
        print_log(f'recompute_batch_stats: {len(unused)} layer(s) received no input and keep '
                  f'their statistics: {unused[:5]}{"..." if len(unused) > 5 else ""}',
                  logger=logger, level=30)
    print_log(f'recomputed batch statistics ({estimator}) of {len(used)} layer(s) from '
              f'{num_iters} batch(es)', logger=logger)
    return {name: dict(calls=r.calls, samples=r.samples) for name, r in recorders.items()}


def _cycle(batches: Iterable, num_iters: int):
    """``num_iters`` items, restarting ``batches`` whenever it is exhausted."""
    produced = 0
    while produced < num_iters:
        before = produced
        for batch in itertools.islice(batches, num_iters - produced):
            produced += 1
            yield batch
        if produced == before and produced:
            raise RuntimeError(
                f'recompute_batch_stats: the data source ran out after {produced} of {num_iters} '
                f'batches and cannot start again (an iterator or generator): pass a list or a '
                f'DataLoader, or num_iters <= {produced}')
        if produced == before:
            raise RuntimeError('recompute_batch_stats: the data source produced no batch')


def _mmengine_forward(model: nn.Module, batch) -> None:
    data = model.data_preprocessor(batch, True)
    if isinstance(data, dict):
        model(**data, mode='loss')
    else:
        model(*data, mode='loss')
