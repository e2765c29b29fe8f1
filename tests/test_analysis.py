# Copyright (c) mmnorm contributors. All rights reserved.
"""The analysis tools: StatDiff (BCN Eq. (8)) against a float64 oracle, the StatDiffHook in a real
Runner, the digits dataset, and 2-iteration runs of tools/analysis/*.py on the digits config."""
import csv
import json
import math
import os
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
import torch
from mmengine.config import Config
from torch import nn

from mmnorm import (BatchChannelNorm, SparseSwitchableNorm, SwitchableNorm,
                    SwitchableNormTied)
from mmnorm.analysis import RunningChannelStats, norm_groups, select_layers, statdiff
from mmnorm.analysis.study import (norm_spec, replace_norms, scale_batch_size, set_length)
from mmnorm.datasets import DigitsDataset, load_digits_split
from mmnorm.engine import StatDiffHook
from mmnorm.utils import (choice_shares, group_choices, group_mean, layer_divergence,
                          model_ratios, one_hot_share, ratio_vectors, record_groups,
                          state_dict_ratios, symmetric_kl)
from tests.conftest import ROOT
from tests.test_engine.test_hooks import _runner
from tests.helpers.toy import ToyModel

DIGITS_CONFIG = osp.join(ROOT, 'configs', 'analysis', 'resnet18-s3-w32_sn_1xb32_digits.py')


def oracle_statdiff(means, variances, num_groups, eps=0.0):
    """Eq. (8) written out with Python floats, one group at a time."""
    size = len(means) // num_groups
    out = []
    for g in range(num_groups):
        mu = [float(v) for v in means[g * size:(g + 1) * size]]
        sd = [math.sqrt(float(v) + eps) for v in variances[g * size:(g + 1) * size]]
        e_mu = sum(mu) / size
        e_mu2 = sum(m * m for m in mu) / size
        out.append(math.sqrt(max(e_mu2 - e_mu * e_mu, 0.0)) / (sum(sd) / size))
    return torch.tensor(out, dtype=torch.float64)


def channel_stats(x: torch.Tensor):
    """Per-channel mean and unbiased variance of (N, C, *) in float64."""
    rows = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    return rows.mean(1), rows.var(1, unbiased=True)


class TestStatDiff:

    def test_hand_computed_group(self):
        # channel means 0 and 2 (their std is 1), standard deviations 1 and 3 (mean 2): 1 / 2
        value = statdiff(torch.tensor([0., 2.]), torch.tensor([1., 9.]), 1)
        assert value.dtype == torch.float64
        assert value.tolist() == [0.5]
        # identical channels (what BN outputs) have StatDiff 0; a group of one channel too
        assert statdiff(torch.full((4, ), 3.), torch.full((4, ), 2.), 1).tolist() == [0.0]
        assert statdiff(torch.randn(4), torch.rand(4) + 1, 4).tolist() == [0.0] * 4

    @pytest.mark.parametrize('groups,eps', [(1, 0.0), (2, 0.0), (4, 1e-3), (12, 1e-5)])
    def test_against_oracle(self, groups, eps):
        gen = torch.Generator().manual_seed(groups)
        means = torch.randn(24, generator=gen, dtype=torch.float64) * 3
        variances = torch.rand(24, generator=gen, dtype=torch.float64) * 4 + 0.1
        torch.testing.assert_close(statdiff(means, variances, groups, eps),
                                   oracle_statdiff(means, variances, groups, eps),
                                   rtol=1e-12, atol=1e-12)
        # float32 statistics are computed in float64
        torch.testing.assert_close(statdiff(means.float(), variances.float(), groups, eps),
                                   oracle_statdiff(means.float(), variances.float(), groups, eps),
                                   rtol=1e-12, atol=1e-12)

    def test_bad_input(self):
        with pytest.raises(ValueError, match='must divide'):
            statdiff(torch.zeros(6), torch.ones(6), 4)
        with pytest.raises(ValueError, match=r'\(C,\)'):
            statdiff(torch.zeros(6), torch.ones(5), 1)
        with pytest.raises(ValueError, match='eps'):
            statdiff(torch.zeros(6), torch.ones(6), 1, eps=-1)

    def test_groups_of_each_norm(self):
        assert norm_groups(nn.GroupNorm(4, 16), 16) == 4
        assert norm_groups(BatchChannelNorm(16, num_groups=2), 16) == 2
        assert norm_groups(nn.InstanceNorm2d(16), 16) == 16
        assert norm_groups(nn.BatchNorm2d(64), 64, 32) == 32
        assert norm_groups(SwitchableNorm(48), 48, 32) == 16  # gcd when 32 does not divide 48
        with pytest.raises(TypeError, match="num_groups=1"):
            norm_groups(nn.LayerNorm(8), 8)

    def test_statdiff_moments_precision_and_empty_batches(self):
        from mmnorm.analysis import statdiff_moments
        x = torch.randn(3, 4, 5, 2, dtype=torch.float64) * 3 + 1
        mean, var, count = statdiff_moments(None, x)
        rows = x.transpose(0, 1).reshape(4, -1)
        assert count == 30 and mean.dtype == torch.float64
        torch.testing.assert_close(mean, rows.mean(1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(var, rows.var(1, unbiased=False), rtol=1e-12, atol=1e-12)
        # half precision: statistics in float32, not in bfloat16
        half_mean, half_var, _ = statdiff_moments(None, x.bfloat16())
        exact = x.bfloat16().double().transpose(0, 1).reshape(4, -1)
        torch.testing.assert_close(half_mean, exact.mean(1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(half_var, exact.var(1, unbiased=False), rtol=1e-5, atol=1e-5)
        # an empty batch measures nothing and leaves the running statistics alone
        stats = RunningChannelStats()
        stats.update(mean, var, count)
        before = stats.mean.clone(), stats.var.clone()
        stats.update(*statdiff_moments(None, torch.zeros(0, 4, 5, 2)))
        assert torch.equal(stats.mean, before[0]) and torch.equal(stats.var, before[1])

    def test_running_statistics_follow_bn_convention(self):
        gen = torch.Generator().manual_seed(0)
        batches = [torch.randn(5, 3, 2, generator=gen, dtype=torch.float64) * (i + 1)
                   for i in range(3)]
        stats = RunningChannelStats(momentum=0.25)
        mean = var = None
        for x in batches:
            rows = x.transpose(0, 1).reshape(3, -1)
            batch_mean, batch_var = rows.mean(1), rows.var(1, unbiased=True)
            if mean is None:  # the first batch sets them
                mean, var = batch_mean, batch_var
            else:
                mean = 0.75 * mean + 0.25 * batch_mean
                var = 0.75 * var + 0.25 * batch_var
            stats.update(rows.mean(1), rows.var(1, unbiased=False), rows.shape[1])
        torch.testing.assert_close(stats.mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(stats.var, var, rtol=1e-12, atol=1e-12)
        # one value per channel: the mean moves, the variance (undefined) stays
        before = stats.var.clone()
        stats.update(torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 1)
        assert torch.equal(stats.var, before)
        with pytest.raises(ValueError, match='momentum'):
            RunningChannelStats(0.0)

    def test_select_layers(self):
        model = ToyModel(norm1=nn.GroupNorm(2, 8))
        assert list(select_layers(model)) == ['norm1', 'norm2']
        assert list(select_layers(model, ['conv*'])) == ['conv1', 'conv2']
        with pytest.raises(ValueError, match="no module named 'norm3'.*similar"):
            select_layers(model, ['norm3'])
        with pytest.raises(ValueError, match='no normalization layer'):
            select_layers(nn.Sequential(nn.Conv2d(1, 1, 1)))


def _capture(module, store):
    """Record the input of every gradient-enabled (training-step) forward, and BCN's affine."""

    def hook(mod, args, output):
        if torch.is_grad_enabled() and mod.training:
            extra = {}
            if isinstance(mod, BatchChannelNorm):
                extra = dict(w=mod.bn_weight.detach().double().clone(),
                             b=mod.bn_bias.detach().double().clone())
            store.append((args[0].detach().double().clone(), output.detach().double().clone(),
                          extra))

    return module.register_forward_hook(hook)


class TestStatDiffHook:

    def test_records_eq8_of_the_last_batch_in_a_runner(self, tmp_path):
        """momentum=1: the running statistics are the last training batch's, so every record
        equals Eq. (8) of the inputs captured independently (GN input; BCN's batch-norm output
        computed here in float64). The batch-average recomputation at the end must not count."""
        torch.manual_seed(1)
        bcn = BatchChannelNorm(8, num_groups=2)
        with torch.no_grad():  # a BN affine far from (1, 0), so the BCN mapping matters
            bcn.bn_weight.uniform_(0.5, 2.0)
            bcn.bn_bias.normal_(0, 1)
        model = ToyModel(norm1=nn.GroupNorm(2, 8), norm2=bcn)
        seen = {'norm1': [], 'norm2': [], 'conv2': []}
        for name, store in seen.items():
            _capture(getattr(model, name), store)
        eps = 1e-3
        hook = StatDiffHook(interval=2, momentum=1.0, eps=eps, layers=['norm*', 'conv2'],
                            num_groups=4)
        runner = _runner(tmp_path, model, max_iters=6, name='statdiff', custom_hooks=[
            hook, dict(type='BatchAverageStatsHook', num_iters=3)])
        runner.train()

        x, _, _ = seen['norm1'][-1]
        gn = oracle_statdiff(*channel_stats(x), 2, eps)
        x, _, affine = seen['norm2'][-1]
        rows = x.transpose(0, 1).reshape(8, -1)
        mean, var = rows.mean(1), rows.var(1, unbiased=False)
        y = ((x - mean[:, None, None]) / (var[:, None, None] + bcn.eps).sqrt()
             * affine['w'][:, None, None] + affine['b'][:, None, None])
        bcn_expected = oracle_statdiff(*channel_stats(y), 2, eps)
        _, conv_out, _ = seen['conv2'][-1]
        conv_expected = oracle_statdiff(*channel_stats(conv_out), 4, eps)

        records = [json.loads(line) for line in open(tmp_path / 'statdiff.jsonl')]
        assert [r['iter'] for r in records] == [2, 4, 6]
        last = records[-1]['layers']
        # the hook computes the moments of float32 activations in float32
        for name, expected in (('norm1', gn), ('norm2', bcn_expected), ('conv2', conv_expected)):
            torch.testing.assert_close(torch.tensor(last[name]['groups'], dtype=torch.float64),
                                       expected, rtol=1e-5, atol=1e-7)
        assert last['norm2']['num_groups'] == 2 and last['conv2']['num_groups'] == 4
        everything = torch.cat([gn, bcn_expected, conv_expected])
        assert records[-1]['mean'] == pytest.approx(float(everything.mean()), rel=1e-5)
        assert records[-1]['std'] == pytest.approx(float(everything.std(unbiased=False)),
                                                   rel=1e-5)
        # the recomputation's forwards (after the last record) left the statistics alone
        torch.testing.assert_close(hook.values()['norm1'], gn, rtol=1e-5, atol=1e-7)
        hub = runner.message_hub.get_scalar('train/statdiff/mean')
        assert hub.current() == pytest.approx(records[-1]['mean'])
        assert records[-1]['mean'] > 0.01  # not trivially zero: the oracle could fail

    def test_default_layers_and_bad_configs(self, tmp_path):
        hook = StatDiffHook(interval=3)
        runner = _runner(tmp_path, ToyModel(), max_iters=3, custom_hooks=[hook], name='sd2')
        runner.train()
        assert set(hook.stats) == {'norm1', 'norm2'}  # SN and BN inputs
        assert hook.groups == {'norm1': 8, 'norm2': 8}  # gcd(8, 32)
        for kwargs, match in ((dict(interval=0), 'interval'), (dict(num_groups=0), 'num_groups'),
                              (dict(momentum=2.0), 'momentum'), (dict(eps=-1.0), 'eps')):
            with pytest.raises(ValueError, match=match):
                StatDiffHook(**kwargs)
        runner = _runner(tmp_path / 'b', ToyModel(), max_iters=1, name='sd3',
                         custom_hooks=[StatDiffHook(layers=['head2'])])
        with pytest.raises(ValueError, match="no module named 'head2'"):
            runner.train()

    def test_epoch_loop_records_every_epoch(self, tmp_path):
        from mmengine.runner import Runner
        from tests.helpers.toy import loader
        hook = StatDiffHook(interval=4)  # 6 iterations per epoch: records at 4, 6 | 8, 12
        runner = Runner(
            model=ToyModel(norm1=nn.GroupNorm(2, 8)), work_dir=str(tmp_path),
            train_dataloader=loader(), train_cfg=dict(by_epoch=True, max_epochs=2),
            optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)), custom_hooks=[hook],
            default_hooks=dict(checkpoint=None), experiment_name='statdiff_epochs')
        runner.train()
        records = [json.loads(line) for line in open(tmp_path / 'statdiff.jsonl')]
        marks = [(r['iter'], r['epoch'], r['end_of_epoch']) for r in records]
        assert marks == [(4, 0, False), (6, 1, True), (8, 1, False), (12, 1, False),
                         (12, 2, True)]
        assert records[-1]['mean'] == records[-2]['mean']  # no step between them

    def test_registered(self):
        from mmengine.registry import HOOKS
        assert isinstance(HOOKS.build(dict(type='StatDiffHook', interval=5)), StatDiffHook)


class TestDigits:

    def test_splits(self):
        from sklearn.datasets import load_digits
        digits = load_digits()
        train_x, train_y = load_digits_split('train')
        test_x, test_y = load_digits_split('test')
        assert train_x.shape == (1437, 8, 8) and test_x.shape == (360, 8, 8)
        assert train_y.shape == (1437, ) and test_y.shape == (360, )
        assert train_x.dtype == np.uint8 and train_y.dtype == np.int64
        assert set(train_y.tolist()) == set(range(10)) == set(test_y.tolist())
        # every fifth sample is a test sample; values 0-16 scaled to 0-255
        np.testing.assert_array_equal(test_y, digits.target[::5])
        np.testing.assert_array_equal(test_x, np.rint(digits.images[::5] * 255 / 16))
        mask = np.ones(len(digits.target), bool)
        mask[::5] = False
        np.testing.assert_array_equal(train_y, digits.target[mask])
        assert train_x.max() == 255 and train_x.min() == 0

    def test_deterministic(self):
        first, second = load_digits_split('train'), load_digits_split('train')
        np.testing.assert_array_equal(first[0], second[0])
        np.testing.assert_array_equal(first[1], second[1])

    def test_builds_as_an_mmpretrain_dataset(self):
        from mmengine.registry import DefaultScope
        from mmpretrain.registry import DATASETS
        with DefaultScope.overwrite_default_scope('mmpretrain'):
            dataset = DATASETS.build(dict(type='DigitsDataset', split='test',
                                          pipeline=[dict(type='PackInputs')]))
        assert isinstance(dataset, DigitsDataset) and len(dataset) == 360
        assert dataset.metainfo['classes'] == tuple('0123456789')
        item = dataset[3]
        images, labels = load_digits_split('test')
        assert item['inputs'].shape == (1, 8, 8)
        assert torch.equal(item['inputs'][0], torch.from_numpy(images[3]))
        assert item['data_samples'].gt_label.tolist() == [int(labels[3])]

    def test_bad_split(self):
        with pytest.raises(ValueError, match='split'):
            DigitsDataset(split='val')
        with pytest.raises(ValueError, match='split'):
            load_digits_split('validation')


class TestStudyPlumbing:

    def test_norm_specs(self):
        assert norm_spec('GN+WS', 8) == (dict(type='GN', num_groups=8), True)
        assert norm_spec('LN', 8) == (dict(type='GN', num_groups=1), False)
        assert norm_spec('BCN+WS', 4) == (dict(type='BCN', num_groups=4), True)
        for bad in ('XN', 'GN+ws', 'GN+WS+WS'):
            with pytest.raises(ValueError, match='unknown normalizer'):
                norm_spec(bad, 8)

    def test_config_edits(self):
        cfg = Config.fromfile(DIGITS_CONFIG)
        assert scale_batch_size(cfg, 8) == pytest.approx(0.1 * 8 / 32)
        assert cfg.train_dataloader.batch_size == 8
        set_length(cfg, epochs=4)
        assert cfg.train_cfg.max_epochs == 4 and cfg.param_scheduler.T_max == 4
        assert replace_norms(cfg, dict(type='GN', num_groups=8), ws=True) == 1
        assert cfg.model.backbone.norm_cfg.type == 'GN'
        assert cfg.model.backbone.conv_cfg == dict(type='WSConv')
        for epochs in (0, -1):  # (0 ran the config's whole schedule)
            with pytest.raises(ValueError, match='--epochs must be >= 1'):
                set_length(cfg, epochs=epochs)
        assert set_length(cfg) == '4 epoch(s)'  # none given: the config's
        set_length(cfg, iters=2)
        assert cfg.train_cfg == dict(by_epoch=False, max_iters=2, val_interval=3)


def _grouped_model():
    """SN with 4 groups, SN_tied with a group per channel, SSN with 4 groups (one μ group and
    one σ group fixed), plain SN: random ratio parameters."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(SwitchableNorm(8, ratio_groups=4), SwitchableNormTied(8, ratio_groups=8),
                          SparseSwitchableNorm(8, ratio_groups=4), SwitchableNorm(8))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if 'logits' in name or 'scores' in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 2)
        model[2].set_progress(0.3)
        model[2].mean_choice[1] = 2  # the second group's μ fixed at BN
        model[2].var_choice[3] = 0  # the fourth group's σ fixed at IN
    return model


class TestGroupedRatioRecords:
    """Records of layers with ratio groups: ``groups`` and one vector per group; the records of
    layers without groups unchanged."""

    def test_record_shape_and_values(self):
        model = _grouped_model()
        layers = model_ratios(model)
        assert list(layers) == ['0', '1', '2', '3']
        sn, tied, ssn, plain = layers.values()
        # SN, 4 groups: the softmax of each group's logits, by hand
        assert list(sn) == ['normalizers', 'groups', 'mean', 'var', 'tied']
        assert sn['groups'] == 4 and sn['normalizers'] == ['IN', 'LN', 'BN'] and not sn['tied']
        for kind, logits in (('mean', model[0].mean_logits), ('var', model[0].var_logits)):
            assert len(sn[kind]) == 4 and all(len(v) == 3 for v in sn[kind])
            torch.testing.assert_close(torch.tensor(sn[kind]),
                                       torch.softmax(logits.detach(), -1))
        # SN_tied, a group per channel: one softmax for both
        assert tied['groups'] == 8 and tied['tied'] and tied['mean'] == tied['var']
        torch.testing.assert_close(torch.tensor(tied['mean']),
                                   torch.softmax(model[1].logits.detach(), -1))
        # SSN: the fixed groups one-hot at their choice, the others SparsestMax; fixed per group
        assert ssn['groups'] == 4 and ssn['radius'] == pytest.approx(0.3)
        assert ssn['fixed'] == [[False, True, False, False], [False, False, False, True]]
        assert ssn['mean'][1] == [0.0, 0.0, 1.0] and ssn['var'][3] == [1.0, 0.0, 0.0]
        mean, var = model[2].ratios()
        assert ssn['mean'] == mean.tolist() and ssn['var'] == var.tolist()
        # a layer without groups: today's record, flat vectors, no 'groups'
        assert list(plain) == ['normalizers', 'mean', 'var', 'tied']
        torch.testing.assert_close(torch.tensor(plain['mean']),
                                   torch.softmax(model[3].mean_logits.detach(), -1))

    def test_state_dict_ratios_read_grouped_layers(self):
        model = _grouped_model()
        found = state_dict_ratios(model.state_dict())
        expected = model_ratios(model)
        assert list(found) == list(expected)
        for name, record in found.items():
            details = {k: v for k, v in expected[name].items() if k not in ('radius', 'fixed')}
            assert record == details
        assert found['0']['groups'] == 4 and 'groups' not in found['3']

    def test_readers(self):
        layers = model_ratios(_grouped_model())
        sn, tied, ssn, plain = layers.values()
        assert [record_groups(r) for r in layers.values()] == [4, 8, 4, 1]
        assert ratio_vectors(sn, 'mean') == sn['mean'] and ratio_vectors(plain, 'var') == [
            plain['var']]
        by_hand = torch.tensor(sn['var']).mean(0)
        assert group_mean(sn, 'var') == pytest.approx(by_hand.tolist())
        assert group_mean(plain, 'mean') == plain['mean']
        assert layer_divergence(sn) == pytest.approx(
            sum(symmetric_kl(p, q) for p, q in zip(sn['mean'], sn['var'])) / 4)
        assert layer_divergence(plain) == symmetric_kl(plain['mean'], plain['var'])
        assert layer_divergence(tied) == pytest.approx(0.0, abs=1e-9)
        names = ['IN', 'LN', 'BN']
        assert group_choices(sn, 'mean') == [names[int(torch.tensor(v).argmax())]
                                             for v in sn['mean']]
        assert group_choices(plain, 'mean') == [names[int(torch.tensor(plain['mean']).argmax())]]
        shares = choice_shares(ssn, 'mean')
        assert set(shares) == set(names) and sum(shares.values()) == pytest.approx(1.0)
        assert shares['BN'] >= 0.25  # the fixed group
        # one-hot vectors: the two fixed SSN groups (SparsestMax at radius 0.3 of random scores
        # may make more), counted over every group's μ and σ vectors
        vectors = [v for r in layers.values() for kind in ('mean', 'var') for v in r[kind]
                   if 'groups' in r] + [plain['mean'], plain['var']]
        assert len(vectors) == 2 * (4 + 8 + 4 + 1)
        one_hot = sum(sum(x > 0 for x in v) == 1 for v in vectors)
        assert one_hot >= 2 and one_hot_share(layers) == pytest.approx(one_hot / len(vectors))


def _tool(name, *args, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT + ':' + os.environ.get('PYTHONPATH', ''))
    return subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'analysis', name), *args],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def _check(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _is_png(path):
    with open(path, 'rb') as f:
        return f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_ratio_study_smoke(tmp_path):
    out = tmp_path / 'ratio'
    stdout = _check(_tool('ratio_study.py', '--batch-sizes', '2', '4', '--iters', '2',
                          '--out', str(out)))
    assert 'BN ratio and accuracy per batch size' in stdout and 'shallow' in stdout
    rows = list(csv.DictReader(open(out / 'ratio_study.csv')))
    assert len(rows) == 2 * 15  # two batch sizes, 15 SN layers
    assert {r['batch_size'] for r in rows} == {'2', '4'}
    assert {r['lr'] for r in rows} == {f'{0.1 * 2 / 32:g}', f'{0.1 * 4 / 32:g}'}
    for r in rows:
        assert sum(float(r[f'mean_{n}']) for n in ('IN', 'LN', 'BN')) == pytest.approx(1, 1e-5)
        assert r['hard_mean'] in ('IN', 'LN', 'BN')
    results = json.load(open(out / 'results.json'))
    assert set(results) == {'bs2', 'bs4'}
    assert set(results['bs2']['accuracy']) == {'soft', 'hard, no finetune', 'soft, finetuned',
                                               'hard, finetuned'}
    assert _is_png(out / 'ratio_study.png')
    assert '| depth | layer |' in open(out / 'ratio_study.md').read()
    # the finetuned hard model really has one-hot ratios
    hard_ckpt = open(out / 'runs' / 'bs2_hard_ft' / 'last_checkpoint').read().strip()
    state = torch.load(hard_ckpt, map_location='cpu', weights_only=False)['state_dict']
    ratios = state['backbone.sn1.mean_logits'].softmax(0)
    assert sorted(ratios.tolist()) == [0.0, 0.0, 1.0]
    # results are not overwritten by accident
    again = _tool('ratio_study.py', '--batch-sizes', '2', '--iters', '1', '--out', str(out))
    assert again.returncode != 0 and '--overwrite' in again.stderr
    # a model without SN is refused before any training
    no_sn = _tool('ratio_study.py', '--iters', '1', '--out', str(tmp_path / 'bn'),
                  '--cfg-options', 'model.backbone.norm_cfg.type=BN')
    assert no_sn.returncode != 0 and 'has no layer with ratios' in no_sn.stderr
    assert not (tmp_path / 'bn').exists()


def test_ratio_study_shows_sparsity_and_radius_of_sparse_sn(tmp_path, repo_root):
    out = tmp_path / 'ssn'
    config = os.path.join(repo_root, 'configs', 'analysis', 'resnet18-s3-w32_ssn_1xb32_digits.py')
    stdout = _check(_tool('ratio_study.py', config, '--batch-sizes', '2', '--iters', '4',
                          '--finetune-epochs', '1', '--out', str(out),
                          '--cfg-options', 'custom_hooks.1.interval=1'))
    assert '| one-hot ratios | radius |' in stdout
    history = list(csv.DictReader(open(out / 'ratio_study_training.csv')))
    # the ratio logger's records: before training (iteration 0) and after each of the 4 steps,
    # whose radius was the progress before them (0, 1/4, 2/4, 3/4)
    assert [int(r['iter']) for r in history] == [0, 1, 2, 3, 4]
    assert [float(r['radius']) for r in history] == pytest.approx([0, 0, 0.25, 0.5, 0.75])
    assert all(0 <= float(r['one_hot_share']) <= 1 for r in history)
    assert _is_png(out / 'ratio_study_training.png')
    results = json.load(open(out / 'results.json'))['bs2']
    assert results['radius'] == pytest.approx(0.75)


def test_ratio_study_with_ratio_groups(tmp_path):
    """--ratio-groups 4 on the SN digits config: what the groups chose in every output."""
    out = tmp_path / 'grouped'
    # a batch average of 2 batches (not 50) before each test: a shorter run
    stdout = _check(_tool('ratio_study.py', '--batch-sizes', '2', '--iters', '2',
                          '--finetune-epochs', '1', '--ratio-groups', '4', '--out', str(out),
                          '--cfg-options', 'custom_hooks.0.num_iters=2'))
    assert 'What the groups chose' in stdout and '| 0 | backbone.sn1 | 4 |' in stdout
    rows = list(csv.DictReader(open(out / 'ratio_study.csv')))
    assert len(rows) == 15 and {r['groups'] for r in rows} == {'4'}
    results = json.load(open(out / 'results.json'))['bs2']
    for r in rows:
        record = results['layers'][r['layer']]
        assert record['groups'] == 4 and len(record['mean']) == 4
        # the layer's ratios are its groups' mean; the shares those of its groups' argmax
        for kind in ('mean', 'var'):
            assert [float(r[f'{kind}_{z}']) for z in ('IN', 'LN', 'BN')] == pytest.approx(
                np.mean(record[kind], axis=0).tolist(), abs=1e-6)
            chosen = r[f'hard_{kind}'].split()
            assert chosen == group_choices(record, kind)
            assert [float(r[f'{kind}_share_{z}']) for z in ('IN', 'LN', 'BN')] == pytest.approx(
                [chosen.count(z) / 4 for z in ('IN', 'LN', 'BN')])
        assert [list(c) for c in results['choices'][r['layer']]] == [
            group_choices(record, 'mean'), group_choices(record, 'var')]
    groups = list(csv.DictReader(open(out / 'ratio_study_groups.csv')))
    assert len(groups) == 15 * 4
    assert [float(groups[1][f'var_{z}']) for z in ('IN', 'LN', 'BN')] == pytest.approx(
        results['layers']['backbone.sn1']['var'][1], abs=1e-6)
    assert _is_png(out / 'ratio_study_groups_bs2.png') and _is_png(out / 'ratio_study.png')
    assert 'What the groups chose' in open(out / 'ratio_study.md').read()
    # every group of the hard finetuned model is one-hot
    hard_ckpt = open(out / 'runs' / 'bs2_hard_ft' / 'last_checkpoint').read().strip()
    state = torch.load(hard_ckpt, map_location='cpu', weights_only=False)['state_dict']
    ratios = state['backbone.sn1.mean_logits'].softmax(-1)
    assert ratios.shape == (4, 3) and ((ratios == 0) | (ratios == 1)).all()
    # a number of groups that does not divide a layer's channels ends with one line
    bad = _tool('ratio_study.py', '--iters', '1', '--ratio-groups', '5', '--out',
                str(tmp_path / 'bad'))
    assert bad.returncode != 0 and 'Traceback' not in bad.stderr
    assert 'cannot build its model' in bad.stderr + bad.stdout


def test_statdiff_study_smoke(tmp_path):
    out = tmp_path / 'statdiff'
    stdout = _check(_tool('statdiff_study.py', '--norms', 'GN', 'BCN+WS', '--iters', '2',
                          '--out', str(out)))
    assert 'StatDiff at the end of training (groups: 8)' in stdout
    rows = list(csv.DictReader(open(out / 'statdiff_study.csv')))
    assert [r['norm'] for r in rows] == ['GN', 'BCN+WS']
    records = [json.loads(line) for line in open(out / 'runs' / 'GN' / 'statdiff.jsonl')]
    assert float(rows[0]['statdiff_mean']) == pytest.approx(records[-1]['mean'], rel=1e-5)
    assert len(records[-1]['layers']) == 15 and records[-1]['mean'] > 0
    assert _is_png(out / 'statdiff_study.png')
    bad = _tool('statdiff_study.py', '--norms', 'XN', '--out', str(tmp_path / 'x'))
    assert bad.returncode == 2 and 'unknown normalizer' in bad.stderr
    missing = _tool('statdiff_study.py', str(tmp_path / 'no.py'), '--out', str(tmp_path / 'y'))
    assert missing.returncode == 1 and 'does not exist' in missing.stderr
    assert 'Traceback' not in missing.stderr


def test_study_output_never_mixes_two_studies(tmp_path):
    """A folder holding an unfinished study (its results.json, written after every run) is
    refused like a finished one (its report): a plain rerun replaced hours of runs. With
    --overwrite the earlier results and runs are removed first; other files are left alone."""
    from mmnorm.analysis.study import StudyOutput
    root = tmp_path / 'study'
    (root / 'runs' / 'sn').mkdir(parents=True)
    (root / 'results.json').write_text('{"sn": {}}')
    (root / 'notes.txt').write_text('mine')
    with pytest.raises(FileExistsError, match='unfinished study.*--overwrite'):
        StudyOutput(str(root), 'ratio_study.md', overwrite=False)
    (root / 'ratio_study.md').write_text('# report')
    with pytest.raises(FileExistsError, match='results of a study'):
        StudyOutput(str(root), 'ratio_study.md', overwrite=False)
    out = StudyOutput(str(root), 'ratio_study.md', overwrite=True)
    assert sorted(p.name for p in root.iterdir()) == ['notes.txt']
    out.save('bn', {'top1': 0.5})
    assert json.loads((root / 'results.json').read_text()) == {'bn': {'top1': 0.5}}
    StudyOutput(str(tmp_path / 'fresh'), 'ratio_study.md', overwrite=False)  # nothing held
    with pytest.raises(OSError, match='notes.txt is a file, not a folder'):  # before any run
        StudyOutput(str(root / 'notes.txt' / 'study'), 'ratio_study.md', overwrite=False)
