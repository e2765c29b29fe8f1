# Copyright (c) mmnorm contributors. All rights reserved.
"""The normalizer contract (mmnorm.layers.base, mmnorm.functional.moments.CoefficientFn): a new
normalizer written only against it is found by every tool; Sync conversion builds new modules;
the name maps come from the registry; batch statistics are a named tuple with a tensor count."""
import warnings
from typing import Optional

import pytest
import torch
from mmengine.optim import build_optim_wrapper
from mmengine.registry import MODELS
from torch import Tensor, nn

import mmnorm  # noqa: F401  (registers the layers)
from mmnorm.analysis import select_layers
from mmnorm.engine import find_batch_stats_layers, recompute_batch_stats
from mmnorm.functional import (BatchStats, Coefficients, batch_statistics, normalize_rows,
                               update_running_stats)
from mmnorm.functional import use_compiled
from mmnorm.layers import (BatchChannelNorm, BatchStatsNorm, SwitchableNorm, SwitchableNormTied,
                           SyncBatchChannelNorm, SyncNorm, SyncSwitchableNorm,
                           SyncSwitchableNormTied, convert_sync_norm, revert_sync_norm)
from mmnorm.registry import register
from mmnorm.utils import model_ratios, state_dict_ratios, sync_norm_types


# A normalizer written only against the contract: subtract the batch mean, divide by the running
# scale of the batch spread (any coefficient-based norm would do).
def _centering_coefficients(mean: Tensor, var: Tensor, weight: Optional[Tensor],
                            bn_mean: Optional[Tensor], bn_var: Optional[Tensor], *,
                            batch: bool, eps: float, process_group, length: int):
    aux = {}
    if batch:
        stats = batch_statistics(mean, var, length, process_group)
        bn_mean, bn_var = stats.mean, stats.var
        aux = stats.as_aux()
    scale = torch.rsqrt(bn_var + eps) * weight
    return scale.expand_as(mean), scale * (mean - bn_mean), aux


class CenteringNorm(BatchStatsNorm):
    _abbr_ = 'cn'

    def __init__(self, num_features, **kwargs):
        super().__init__(num_features, **kwargs)
        self.weight = nn.Parameter(torch.ones(num_features))

    def forward(self, x):
        running_mean, running_var, use_batch, momentum = self._batch_stats_state(x)
        batch = use_batch
        out, aux = normalize_rows(
            x, Coefficients(_centering_coefficients, dict(batch=batch, eps=self.eps),
                            self._sync_group() if batch else None),
            (self.weight, None if batch else running_mean, None if batch else running_var))
        if batch and running_mean is not None:
            update_running_stats(running_mean, running_var, BatchStats.from_aux(aux), momentum)
        return out


class SyncCenteringNorm(SyncNorm, CenteringNorm):
    pass


@pytest.fixture
def registered_centering_norm():
    register(MODELS, 'TestCenteringNorm')(CenteringNorm)
    register(MODELS, 'TestSyncCenteringNorm')(SyncCenteringNorm)
    try:
        yield
    finally:
        MODELS.module_dict.pop('TestCenteringNorm')
        MODELS.module_dict.pop('TestSyncCenteringNorm')


def test_a_new_normalizer_is_found_by_every_tool(registered_centering_norm):
    assert sync_norm_types()['TestCenteringNorm'] == 'TestSyncCenteringNorm'
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), CenteringNorm(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                          SwitchableNorm(4)).double()
    batches = [torch.randn(3, 3, 6, 6, dtype=torch.float64) for _ in range(4)]
    # batch statistics: found, recomputed against a plain oracle
    assert set(find_batch_stats_layers(model)) == {'1', '4'}
    recompute_batch_stats(model, batches, 4, forward=lambda m, b: m(b), estimator='population')
    with torch.no_grad():
        values = torch.cat([model[0](b) for b in batches]).transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(model[1].running_mean, values.mean(1))
    torch.testing.assert_close(model[1].running_var, values.var(1))
    # StatDiff measures it; the optimizer treats its weight as a norm's
    assert '1' in select_layers(model)
    wrapper = build_optim_wrapper(model, dict(
        optimizer=dict(type='SGD', lr=0.1, weight_decay=1e-4),
        constructor='NormAwareOptimWrapperConstructor', paramwise_cfg=dict(norm_decay_mult=0.)))
    decay = {id(p): g['weight_decay'] for g in wrapper.optimizer.param_groups
             for p in g['params']}
    assert decay[id(model[1].weight)] == 0.0 and decay[id(model[0].weight)] == 1e-4
    # Sync conversion, both ways; the ratio tools see SN only
    synced = convert_sync_norm(model)
    assert type(synced[1]) is SyncCenteringNorm and type(synced[4]) is SyncSwitchableNorm
    assert type(revert_sync_norm(synced)[1]) is CenteringNorm
    assert list(model_ratios(model)) == ['4']


def test_sync_conversion_builds_new_layers_that_take_over_the_tensors():
    model = nn.Sequential(nn.Sequential(SwitchableNorm(4, momentum=0.2, mix='std')),
                          SwitchableNormTied(4, using_bn=False),
                          BatchChannelNorm(4, num_groups=2, estimate=True), nn.BatchNorm2d(4))
    model[2].eval()
    old = [model[0][0], model[1], model[2]]
    tensors = [dict(m.named_parameters(recurse=False), **dict(m.named_buffers(recurse=False)))
               for m in old]
    synced = convert_sync_norm(model, process_group='group')
    new = [synced[0][0], synced[1], synced[2]]
    for layer, before, state, cls in zip(new, old, tensors, (
            SyncSwitchableNorm, SyncSwitchableNormTied, SyncBatchChannelNorm)):
        assert type(layer) is cls and layer is not before
        assert layer._modules is not before._modules  # not the old object's internals
        assert layer.config() == before.config() and layer.process_group == 'group'
        assert layer.training == before.training
        for name, tensor in dict(layer.named_parameters(recurse=False),
                                 **dict(layer.named_buffers(recurse=False))).items():
            assert tensor is state[name], name  # the same tensors: an optimizer keeps them
    assert type(synced[3]) is nn.BatchNorm2d
    assert convert_sync_norm(synced, process_group='other')[1].process_group == 'other'
    local = revert_sync_norm(synced)
    assert [type(m) for m in (local[0][0], local[1], local[2])] == [
        SwitchableNorm, SwitchableNormTied, BatchChannelNorm]
    assert not hasattr(local[1], 'process_group') or local[1].process_group is None
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(local(x), model(x))


def test_sync_twins_and_names_come_from_the_classes():
    assert SwitchableNorm.sync_class() is SyncSwitchableNorm
    assert SwitchableNormTied.sync_class() is SyncSwitchableNormTied  # its own, not its parent's
    assert BatchChannelNorm.sync_class() is SyncBatchChannelNorm
    assert SyncSwitchableNorm.local_class is SwitchableNorm
    assert SyncSwitchableNorm.sync_class() is None
    assert sync_norm_types() == {'SN': 'SyncSN', 'SN_tied': 'SyncSN_tied', 'BCN': 'SyncBCN',
                                 'SSN': 'SyncSSN'}
    with pytest.raises(TypeError, match='SyncX'):
        type('Lonely', (SyncNorm, nn.Module), {})


def test_state_dict_ratios_use_each_layers_own_ratio_function():
    model = nn.Sequential(SwitchableNorm(4), SwitchableNormTied(4, using_bn=False), nn.Linear(2, 3))
    with torch.no_grad():
        model[0].mean_logits.copy_(torch.tensor([0.5, -1.0, 2.0]))
        model[0].var_logits.copy_(torch.tensor([1.0, 0.0, -1.0]))
        model[1].logits.copy_(torch.tensor([0.3, -0.3]))
    state = dict(model.state_dict(), **{'head.logits': torch.zeros(3)})  # not a normalizer
    found = state_dict_ratios(state)
    assert list(found) == ['0', '1']
    assert found == model_ratios(model)
    expected = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64).softmax(0)
    torch.testing.assert_close(torch.tensor(found['0']['mean'], dtype=torch.float64), expected)
    assert found['1']['tied'] and found['1']['mean'] == found['1']['var']


def test_a_coefficient_function_that_is_not_module_level_runs_eagerly_and_says_so():
    def local_coefficients(mean, var, *, process_group, length):
        return torch.rsqrt(var + 1e-5), torch.zeros_like(mean), {}

    x = torch.randn(2, 3, 4, 4)
    use_compiled(True)
    try:
        with pytest.warns(UserWarning, match='not a module-level function'):
            out, aux = normalize_rows(x, Coefficients(local_coefficients), ())
    finally:
        use_compiled(False)
    reference = torch.nn.functional.instance_norm(x, eps=1e-5)
    torch.testing.assert_close(out, reference)
    assert aux == {}


def test_batch_stats_count_is_a_tensor_and_updates_follow_it():
    mean = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    var = torch.tensor([[0.5, 1.0], [1.5, 2.0]])
    stats = batch_statistics(mean, var, length=4)
    assert isinstance(stats, BatchStats) and stats.count.dim() == 0 and int(stats.count) == 8
    torch.testing.assert_close(stats.mean, torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(stats.var, torch.tensor([2.0, 5.5]))  # E[var] + Var[mean]
    assert BatchStats.from_aux(stats.as_aux()) == stats
    running_mean, running_var = torch.zeros(2), torch.ones(2)
    update_running_stats(running_mean, running_var, stats, 0.5)
    torch.testing.assert_close(running_mean, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(running_var, 0.5 + 0.5 * stats.var * 8 / 7)
    for count, moved in ((0, (False, False)), (1, (True, False))):
        before = running_mean.clone(), running_var.clone()
        update_running_stats(running_mean, running_var,
                             BatchStats(torch.full((2, ), 9.0), torch.zeros(2),
                                        torch.tensor(float(count))), 1.0)
        assert (not torch.equal(running_mean, before[0])) == moved[0]
        assert (not torch.equal(running_var, before[1])) == moved[1]
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        empty = batch_statistics(torch.zeros(0, 2), torch.zeros(0, 2), length=4)
    assert int(empty.count) == 0 and torch.equal(empty.mean, torch.zeros(2))
