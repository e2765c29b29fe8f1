# Copyright (c) mmnorm contributors. All rights reserved.
"""Batch-average statistics: against a float64 oracle, invariances, guard, 2-process run."""
import os
import tempfile

import pytest
import torch

from tests.conftest import logged
from torch import nn

from mmnorm import BatchChannelNorm, SwitchableNorm, SwitchableNormTied
from mmnorm.engine import find_batch_stats_layers, recompute_batch_stats
from mmnorm.testing.distributed import run_on_gloo


def make_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), SwitchableNorm(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), BatchChannelNorm(8, num_groups=4), nn.ReLU(),
        nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 1), SwitchableNormTied(8, eval_stats='batch_average'),
        BatchChannelNorm(8, num_groups=2, estimate=True),
        SwitchableNorm(8, using_bn=False)).double()
    model[11].set_estimate_rate(0.1)
    return model


def make_batches(num=6, size=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 6, 5, generator=gen, dtype=torch.float64) * 2 + 1
            for _ in range(num)]


def forward(model, batch):
    model(batch)


def capture_inputs(model, batches):
    """Each batch-statistics layer's training-mode input for every batch (plain forward)."""
    layers = find_batch_stats_layers(model)
    seen = {name: [] for name in layers}
    handles = [m.register_forward_pre_hook(lambda m, a, n=name: seen[n].append(a[0].clone()))
               for name, m in layers.items()]
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for h in handles:
        h.remove()
    return seen


def oracle(inputs, estimator):
    """Plain per-batch statistics of the captured inputs, combined as documented."""
    def per_channel(x):
        return x.transpose(0, 1).reshape(x.shape[1], -1)
    if estimator == 'batch_average':
        weights = torch.tensor([float(x.shape[0]) for x in inputs], dtype=torch.float64)
        means = torch.stack([per_channel(x).mean(1) for x in inputs])
        variances = torch.stack([per_channel(x).var(1, unbiased=True) for x in inputs])
        w = (weights / weights.sum()).view(-1, 1)
        return (w * means).sum(0), (w * variances).sum(0)
    values = torch.cat([per_channel(x) for x in inputs], 1)
    return values.mean(1), values.var(1, unbiased=True)


def test_layer_discovery():
    names = set(find_batch_stats_layers(make_model()))
    # SN, BCN, BN, SN_tied; not the estimated BCN (11) nor SN without BN (12)
    assert names == {'1', '4', '7', '10'}


@pytest.mark.parametrize('estimator', ['batch_average', 'population'])
def test_equals_float64_oracle(estimator):
    model = make_model()
    batches = make_batches()
    inputs = capture_inputs(model, batches)
    params = {k: v.clone() for k, v in model.named_parameters()}
    estimates = {k: v.clone() for k, v in model[11].named_buffers()}
    tracked = {k: v.clone() for k, v in model.state_dict().items() if 'num_batches' in k}
    model.eval()
    report = recompute_batch_stats(model, batches, len(batches), forward=forward,
                                   estimator=estimator)
    for name, layer in find_batch_stats_layers(model).items():
        mean, var = oracle(inputs[name], estimator)
        torch.testing.assert_close(layer.running_mean, mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(layer.running_var, var, rtol=1e-10, atol=1e-10)
        assert report[name] == dict(calls=len(batches), samples=4 * len(batches))
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]), f'{name} changed'
    for name, b in model[11].named_buffers():
        assert torch.equal(b, estimates[name]), 'estimated BCN statistics changed'
    for key, value in model.state_dict().items():
        if 'num_batches' in key:
            assert torch.equal(value, tracked[key])
    assert not model.training and model[1].momentum == 0.1
    assert bool(model[10].stats_ready) and bool(model[1].stats_ready)


def test_population_is_independent_of_batching():
    # Only the first norm's input (a conv of the data) does not depend on the batching; deeper
    # inputs do, through the batch statistics used upstream in training mode.
    model = make_model()
    data = torch.cat(make_batches(num=4, size=6))
    split_a = list(data.split(6))
    split_b = list(data.split(4))
    split_c = [data[:3], data[3:12], data[12:]]  # unequal sizes too
    results = []
    for split in (split_a, split_b, split_c):
        recompute_batch_stats(model, split, len(split), forward=forward, estimator='population')
        results.append({k: v.clone() for k, v in model.state_dict().items() if 'running' in k})
    for other in results[1:]:
        for key in ('1.running_mean', '1.running_var'):
            torch.testing.assert_close(other[key], results[0][key], rtol=1e-9, atol=1e-9)
    mean, var = oracle(capture_inputs(make_model(), [data])['1'], 'population')
    torch.testing.assert_close(results[2]['1.running_mean'], mean)
    torch.testing.assert_close(results[2]['1.running_var'], var)


@pytest.mark.parametrize('estimator', ['population', 'batch_average'])
def test_layers_with_the_authors_update_get_the_estimates_of_their_batches(estimator):
    # An in_unbiased layer's momentum-1 step leaves the batch's variance as the SN authors'
    # layer computes it (no Bessel correction): the recorder corrects it as the estimators take
    # it, so both estimates are those of the same batches' Bessel-corrected variances (the
    # population one was 3% low, corrected twice).
    gen = torch.Generator().manual_seed(4)
    batches = [torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64) * (1 + i / 2) + i
               for i in range(4)]
    layer = SwitchableNorm(4, in_unbiased=True, dtype=torch.float64)
    means, variances = [], []
    for x in batches:  # the authors' per-batch BN statistics; the variance Bessel-corrected
        rows = x.flatten(2)  # (18 values per channel)
        mean_in, var_in = rows.mean(-1), rows.var(-1)  # (unbiased, as theirs)
        mean_bn = mean_in.mean(0)
        means.append(mean_bn)
        variances.append(((var_in + mean_in.square()).mean(0) - mean_bn.square()) * 18 / 17)
    recompute_batch_stats(layer, batches, 4, forward=lambda m, b: m(b), estimator=estimator)
    mean = torch.stack(means).mean(0)
    if estimator == 'batch_average':
        var = torch.stack(variances).mean(0)
    else:  # pooled over the 72 values per channel, then corrected
        biased = torch.stack(variances) * 17 / 18 + (torch.stack(means) - mean).square()
        var = biased.mean(0) * 72 / 71
    torch.testing.assert_close(layer.running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_var, var, rtol=1e-12, atol=1e-12)


def test_batch_average_mean_invariant_to_equal_size_splits_and_order():
    model = make_model()
    data = torch.cat(make_batches(num=4, size=4))
    splits = [list(data.split(4)), list(data[torch.randperm(16,
                                        generator=torch.Generator().manual_seed(3))].split(4))]
    reversed_split = list(reversed(splits[0]))
    stats = []
    for split in splits + [reversed_split]:
        recompute_batch_stats(model, split, len(split), forward=forward)
        stats.append({k: v.clone() for k, v in model.state_dict().items() if 'running' in k})
    for key in stats[0]:
        if key == '1.running_mean':  # the first norm's input is the same for any split
            torch.testing.assert_close(stats[1][key], stats[0][key])
        torch.testing.assert_close(stats[2][key], stats[0][key])  # same batches, other order


def test_cycles_a_short_data_source():
    model = make_model()
    batches = make_batches(num=2)
    report = recompute_batch_stats(model, batches, 5, forward=forward)
    assert report['1']['calls'] == 5


def test_an_iterator_shorter_than_num_iters_is_named():
    # A generator cannot start again: the message says so (it said "produced no batch").
    batches = (b for b in make_batches(num=2))
    model = make_model()
    recompute_batch_stats(model, make_batches(num=2), 2, forward=forward)  # marked ready
    assert bool(model[10].stats_ready)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match='ran out after 2 of 3 batches'):
        recompute_batch_stats(model, batches, 3, forward=forward)
    for key, value in model.state_dict().items():  # nothing lost: the statistics as they were
        assert torch.equal(value, before[key]), key


def test_frozen_layers_keep_their_statistics(mmnorm_log):
    model = make_model()
    recompute_batch_stats(model, make_batches(), 2, forward=forward)
    before = model[7].running_mean.clone()

    class Frozen(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def train(self, mode=True):
            super().train(mode)
            self.inner[7].eval()  # like a backbone with norm_eval=True
            return self

    frozen = Frozen(model)
    recompute_batch_stats(frozen, make_batches(seed=5), 3, forward=lambda m, b: m.inner(b))
    assert torch.equal(model[7].running_mean, before)
    # reported as frozen, not as a layer that received no input
    assert len(logged(mmnorm_log, '1 layer(s) are frozen')) == 1
    assert not logged(mmnorm_log, 'received no input')


def test_bad_arguments():
    with pytest.raises(ValueError, match='estimator'):
        recompute_batch_stats(make_model(), make_batches(), 2, forward=forward, estimator='ema')
    with pytest.raises(ValueError, match='num_iters'):
        recompute_batch_stats(make_model(), make_batches(), 0, forward=forward)
    with pytest.raises(RuntimeError, match='no batch'):
        recompute_batch_stats(make_model(), [], 2, forward=forward)


def test_guard_warns_until_statistics_are_recomputed(mmnorm_log):
    layer = SwitchableNorm(4, eval_stats='batch_average')
    layer(torch.randn(4, 4, 3, 3))
    layer.eval()
    layer(torch.randn(2, 4, 3, 3))
    assert len(logged(mmnorm_log, "eval_stats='batch_average'")) == 1
    assert 'not recomputed' in mmnorm_log[0].getMessage()
    model = nn.Sequential(layer)
    recompute_batch_stats(model, [torch.randn(4, 4, 3, 3)], 1, forward=forward)
    model.eval()
    model(torch.randn(2, 4, 3, 3))
    assert len(logged(mmnorm_log, 'not recomputed')) == 1
    model.train()
    model(torch.randn(4, 4, 3, 3))  # a training step makes the recomputed statistics stale
    assert not bool(layer.stats_ready)
    model.eval()
    model(torch.randn(2, 4, 3, 3))
    assert len(logged(mmnorm_log, 'not recomputed')) == 2


def test_moving_mode_layers_do_not_warn(mmnorm_log):
    layer = SwitchableNorm(4).eval()
    layer(torch.randn(2, 4, 3, 3))
    assert not mmnorm_log


def _dist_worker(rank, world, out_dir):
    model = make_model()
    batches = make_batches(num=6)
    recompute_batch_stats(model, batches[rank::world], 3, forward=forward)
    torch.save({k: v for k, v in model.state_dict().items() if 'running' in k},
               os.path.join(out_dir, f'rank{rank}.pth'))


def test_two_processes_end_identical_and_equal_to_one_process():
    with tempfile.TemporaryDirectory() as tmp:
        run_on_gloo(_dist_worker, out_dir=tmp)
        ranks = [torch.load(os.path.join(tmp, f'rank{r}.pth'), weights_only=True)
                 for r in (0, 1)]
    single = make_model()
    recompute_batch_stats(single, make_batches(num=6), 6, forward=forward)
    for key, value in ranks[0].items():
        assert torch.equal(ranks[1][key], value), f'{key} differs between ranks'
        torch.testing.assert_close(value, single.state_dict()[key], rtol=1e-10, atol=1e-10)


def _image_pooling_model():
    """ASPP's image pooling branch: global average pooling, then a 1x1 conv and SN, so that at
    one image per batch each SN channel sees a single value."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 4, 1),
                         SwitchableNorm(4, eval_stats='batch_average')).double()


def test_one_value_per_channel_gets_the_population_estimate():
    model = _image_pooling_model()
    batches = make_batches(num=5, size=1)
    with torch.no_grad():  # the SN input of every batch: (1, 4, 1, 1)
        values = torch.cat([model[:3](b).flatten(1) for b in batches])  # (5, 4)
    stale_var = model[3].running_var.clone()
    recompute_batch_stats(model, batches, 5, forward=forward)
    # Batch variances do not exist here; the pooled (population) estimate over the 5 values.
    torch.testing.assert_close(model[3].running_mean, values.mean(0))
    torch.testing.assert_close(model[3].running_var, values.var(0, unbiased=True))
    assert not torch.equal(model[3].running_var, stale_var)
    assert bool(model[3].stats_ready)


def test_a_single_value_in_all_is_never_marked_fresh(mmnorm_log):
    model = _image_pooling_model()
    model[3].running_var.fill_(7.0)  # the stale training-time value
    recompute_batch_stats(model, make_batches(num=1, size=1), 1, forward=forward)
    assert torch.equal(model[3].running_var, torch.full((4, ), 7.0, dtype=torch.float64))
    assert not bool(model[3].stats_ready)
    model.eval()
    model(make_batches(num=1, size=1)[0])
    assert logged(mmnorm_log, 'not recomputed')


def _sync_cases():
    """Per case: the layer class and each rank's K batches (shared by the workers and the
    oracle). A synchronized layer's batches are the union of the ranks' parts."""
    from mmnorm.layers import SyncSwitchableNorm
    gen = torch.Generator().manual_seed(11)

    def batches(*shapes):  # one shape per rank, 4 batches
        return [[torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1
                 for _ in range(4)] for shape in shapes]

    return {
        # ASPP's image pooling at one image per process: one value per channel and rank, two in
        # the global batch (the local recorder once saw no batch variance at all here)
        'one value per rank': (SyncSwitchableNorm, batches((1, 4, 1, 1), (1, 4, 1, 1))),
        'uneven batches and sizes': (SyncSwitchableNorm, batches((2, 4, 3, 2), (3, 4, 2, 2))),
        'empty on rank 0': (SyncSwitchableNorm, batches((0, 4, 3, 3), (3, 4, 3, 3))),
        # a local layer that got data on one process only (a mask head without RoIs elsewhere)
        'local, data on rank 0 only': (SwitchableNorm, batches((2, 4, 3, 3), (0, 4, 3, 3))),
    }


def _sync_worker(rank, world, out_dir):
    for case, (cls, parts) in _sync_cases().items():
        for estimator in ('batch_average', 'population'):
            model = nn.Sequential(cls(4, eval_stats='batch_average')).double()
            recompute_batch_stats(model, parts[rank], 4, forward=forward, estimator=estimator)
            torch.save([model[0].running_mean, model[0].running_var, model[0].stats_ready],
                       os.path.join(out_dir, f'{case} {estimator} {rank}.pth'))


def _global_oracle(parts, estimator, synchronized):
    """Each batch's values per channel (the union of the ranks' parts where synchronized),
    combined as documented, in plain float64 ops."""
    def per_channel(x):
        return x.transpose(0, 1).reshape(x.shape[1], -1)
    batches = [[part] for part in parts[0] + parts[1]] if not synchronized else \
        [list(pair) for pair in zip(*parts)]
    batches = [(sum(x.shape[0] for x in b), torch.cat([per_channel(x) for x in b], 1))
               for b in batches if sum(x.numel() for x in b)]
    if estimator == 'population':
        values = torch.cat([v for _, v in batches], 1)
        return values.mean(1), values.var(1)
    weights = torch.tensor([float(n) for n, _ in batches], dtype=torch.float64).view(-1, 1)
    weights = weights / weights.sum()
    return ((weights * torch.stack([v.mean(1) for _, v in batches])).sum(0),
            (weights * torch.stack([v.var(1) for _, v in batches])).sum(0))


def test_synchronized_layers_take_the_global_batches_of_two_processes():
    from mmnorm.layers import SyncNorm
    with tempfile.TemporaryDirectory() as tmp:
        run_on_gloo(_sync_worker, out_dir=tmp)
        for case, (cls, parts) in _sync_cases().items():
            for estimator in ('batch_average', 'population'):
                ranks = [torch.load(os.path.join(tmp, f'{case} {estimator} {r}.pth'),
                                    weights_only=True) for r in (0, 1)]
                mean, var = _global_oracle(parts, estimator, issubclass(cls, SyncNorm))
                for got in ranks:
                    torch.testing.assert_close(got[0], mean, msg=f'{case}, {estimator}: mean')
                    torch.testing.assert_close(got[1], var, msg=f'{case}, {estimator}: var')
                    assert bool(got[2]), (case, estimator)
