# Copyright (c) mmnorm contributors. All rights reserved.
"""The registered hooks inside real mmengine Runners."""
import json
import logging
import os.path as osp
import os
import warnings

import pytest
import torch
from torch import nn
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import Runner

import mmnorm
from mmnorm import BatchChannelNorm
from mmnorm.engine import BatchAverageStatsHook, EstimateRateHook, recompute_batch_stats
from tests.helpers.toy import ToyData, ToyModel, loader


def _runner(work_dir, model, max_iters=6, custom_hooks=(), optim=None, scheduler=None,
            val=False, resume=False, load_from=None, name='run', checkpoint=None, cfg=None):
    torch.manual_seed(0)
    kwargs = {} if cfg is None else dict(cfg=cfg)
    if val:
        kwargs.update(val_dataloader=loader(size=8), val_cfg=dict(),
                      val_evaluator=dict(type='ToyAccuracy'))
    return Runner(
        model=model, work_dir=str(work_dir), train_dataloader=loader(),
        train_cfg=dict(by_epoch=False, max_iters=max_iters, val_interval=3),
        optim_wrapper=optim or dict(optimizer=dict(type='SGD', lr=0.1, momentum=0.9)),
        param_scheduler=scheduler,
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=3, by_epoch=False,
                                           **(checkpoint or {})),
                           logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=list(custom_hooks), randomness=dict(seed=0), resume=resume,
        load_from=load_from, experiment_name=f'{name}_{osp.basename(str(work_dir))}', **kwargs)


class TestBatchAverageStatsHook:

    def test_recomputes_before_val_and_last_checkpoint(self, tmp_path):
        model = ToyModel(norm1=mmnorm.SwitchableNorm(8, eval_stats='batch_average'))
        runner = _runner(tmp_path, model, custom_hooks=[
            dict(type='BatchAverageStatsHook', num_iters=3)], val=True)
        with warnings.catch_warnings():
            warnings.filterwarnings('error', message='.*not recomputed.*')
            runner.train()  # validation at iter 3 and 6 must not warn
        assert bool(model.norm1.stats_ready)
        # The final checkpoint holds the batch average of the final weights.
        saved = torch.load(tmp_path / 'iter_6.pth', weights_only=True)['state_dict']
        reference = ToyModel(norm1=mmnorm.SwitchableNorm(8, eval_stats='batch_average'))
        reference.load_state_dict(saved)
        hook = next(h for h in runner.hooks if isinstance(h, BatchAverageStatsHook))
        recompute_batch_stats(reference, hook._train_dataloader(runner), 3)  # same batches
        for key in ('norm1.running_mean', 'norm1.running_var', 'norm2.running_var'):
            torch.testing.assert_close(saved[key], reference.state_dict()[key])
        # Not the moving average the training left behind.
        moving = _runner(tmp_path / 'moving', ToyModel(), name='moving')
        moving.train()
        assert not torch.allclose(moving.model.norm1.running_var, saved['norm1.running_var'])

    @pytest.mark.parametrize('checkpoint_by_epoch', [True, False])
    def test_epoch_loop_last_checkpoint_holds_the_batch_average(self, tmp_path,
                                                                 checkpoint_by_epoch):
        # An epoch loop whose CheckpointHook counts iterations saves the last checkpoint after
        # the last iteration, before the epoch ends: the statistics must be there by then.
        torch.manual_seed(0)
        model = ToyModel(norm1=mmnorm.SwitchableNorm(8, eval_stats='batch_average'))
        runner = Runner(
            model=model, work_dir=str(tmp_path), train_dataloader=loader(size=22),
            train_cfg=dict(by_epoch=True, max_epochs=2),
            optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1, momentum=0.9)),
            default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=4,
                                               by_epoch=checkpoint_by_epoch)),
            custom_hooks=[dict(type='BatchAverageStatsHook', num_iters=3)],
            randomness=dict(seed=0), experiment_name=f'epochs_{checkpoint_by_epoch}')
        hook = next(h for h in runner.hooks if isinstance(h, BatchAverageStatsHook))
        calls, recompute = [], hook._recompute
        hook._recompute = lambda runner, models, when, iters: (
            calls.append(when), recompute(runner, models, when, iters))
        runner.train()
        assert calls == ['before the last checkpoint']  # once, not again at the epoch's end
        final = 'epoch_2.pth' if checkpoint_by_epoch else 'iter_12.pth'  # 6 batches per epoch
        saved = torch.load(tmp_path / final, weights_only=True)['state_dict']
        assert bool(saved['norm1.stats_ready'])
        for key in ('norm1.running_mean', 'norm1.running_var', 'norm2.running_var'):
            torch.testing.assert_close(saved[key], model.state_dict()[key])

    def test_training_continues_after_mid_training_validation(self, tmp_path):
        # An infinite sampler shares one index generator between iterators: the hook must not
        # iterate (and abandon) the training loader, or the training data would stop.
        model = ToyModel(norm1=mmnorm.SwitchableNorm(8, eval_stats='batch_average'))
        runner = _runner(tmp_path, model, max_iters=9,
                         custom_hooks=[dict(type='BatchAverageStatsHook', num_iters=2)],
                         val=True)
        runner._train_dataloader['sampler'] = dict(type='InfiniteSampler', shuffle=True)
        runner.train()  # validation after 3 and 6 iterations, then training goes on
        assert runner.iter == 9

    def test_skips_when_nothing_trained_since(self, tmp_path):
        hook = BatchAverageStatsHook(num_iters=2)
        runner = _runner(tmp_path, ToyModel(), max_iters=3, custom_hooks=[hook], val=True)
        runner.train()  # last iteration (3) computed, then validation at 3 skipped
        assert dict(hook._computed_at) == {runner.model: 3}  # iterations done when it last ran
        before = runner.model.norm1.running_mean.clone()
        hook.before_val_epoch(runner)
        assert torch.equal(runner.model.norm1.running_mean, before)

    def test_before_test_builds_the_train_dataloader(self, tmp_path):
        model = ToyModel(norm1=mmnorm.SwitchableNorm(8, eval_stats='batch_average'))
        # As from a full config: train pieces present, but only test() is run.
        runner = Runner(model=model, work_dir=str(tmp_path), train_dataloader=loader(),
                        train_cfg=dict(by_epoch=False, max_iters=1),
                        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
                        test_dataloader=loader(size=8), test_cfg=dict(),
                        test_evaluator=dict(type='ToyAccuracy'),
                        custom_hooks=[dict(type='BatchAverageStatsHook', num_iters=2)],
                        experiment_name='test_only')
        with warnings.catch_warnings():
            warnings.filterwarnings('error', message='.*not recomputed.*')
            metrics = runner.test()
        assert 'accuracy' in metrics and bool(model.norm1.stats_ready)

    @pytest.mark.parametrize('update_buffers', [False, True])
    def test_with_ema_the_averaged_weights_get_their_own_statistics(self, tmp_path,
                                                                    update_buffers):
        # mmengine's EMAHook (RTMDet's, YOLOX's configs) swaps the averaged weights in at the
        # start of a validation epoch and saves them as every checkpoint. The statistics were
        # recomputed before that swap, for the other weights (0.4-1.5 off on a toy model), or
        # swapped out again (update_buffers=True); the checkpoints held the EMA of them.
        def toy():
            return ToyModel(norm1=mmnorm.SwitchableNorm(8, eval_stats='batch_average'))

        validated = []  # (iteration, the model's state) at each validation's first batch

        class Probe(Hook):
            priority = 'LOWEST'  # what validation evaluates with, after every other hook

            def before_val_epoch(self, runner):
                validated.append((runner.iter, {k: v.clone() for k, v in
                                                runner.model.state_dict().items()}))

        ema = dict(type='EMAHook', ema_type='ExponentialMovingAverage', momentum=0.3,
                   update_buffers=update_buffers, priority=49)  # (as RTMDet's config)
        runner = _runner(tmp_path, toy(), custom_hooks=[
            dict(type='BatchAverageStatsHook', num_iters=3), ema, Probe()], val=True,
            checkpoint=dict(save_best='accuracy', rule='less'))  # (saved after validation)
        runner.train()
        final = torch.load(tmp_path / 'iter_6.pth', weights_only=True)['state_dict']
        best = list(tmp_path.glob('best_accuracy_iter_*.pth'))
        assert len(best) == 1
        best_state = torch.load(best[0], weights_only=True)['state_dict']
        runner.val()  # again (EMAHook rebuilds its copy from the model: 6's statistics are not its)
        hook = next(h for h in runner.hooks if isinstance(h, BatchAverageStatsHook))

        def batch_average(state):
            reference = toy()
            reference.load_state_dict(state)
            recompute_batch_stats(reference, hook._train_dataloader(runner), 3)  # same batches
            return reference.state_dict()

        keys = ('norm1.running_mean', 'norm1.running_var', 'norm2.running_var')
        assert [i for i, _ in validated] == [3, 6, 6]
        for _, state in validated:  # each validation: the averaged weights, their statistics
            expected = batch_average(state)
            for key in keys:
                torch.testing.assert_close(state[key], expected[key])
        assert torch.equal(validated[1][1]['conv2.weight'], final['conv2.weight'])
        assert not torch.allclose(final['conv2.weight'], runner.model.conv2.weight)
        # The checkpoints hold the averaged weights: the final one their batch average, and the
        # best one (saved after its validation) the statistics that validation used.
        iteration = int(best[0].stem.rsplit('_', 1)[1])
        seen = next(state for i, state in validated if i == iteration)
        expected = batch_average(final)
        for key in keys:
            torch.testing.assert_close(final[key], expected[key])
            torch.testing.assert_close(best_state[key], seen[key])
        assert bool(final['norm1.stats_ready']) and bool(best_state['norm1.stats_ready'])

    def test_warns_about_an_ema_hook_that_would_swap_after_it(self, tmp_path):
        from mmengine.logging import MMLogger
        records = []
        runner = _runner(tmp_path, ToyModel(), max_iters=1, custom_hooks=[
            dict(type='BatchAverageStatsHook', num_iters=1),
            dict(type='EMAHook', priority='LOW')])
        handler = logging.Handler()
        handler.emit = records.append
        MMLogger.get_current_instance().addHandler(handler)
        try:
            runner.train()
        finally:
            MMLogger.get_current_instance().removeHandler(handler)
        assert any('runs at priority 70' in r.getMessage() for r in records)

    @pytest.mark.parametrize('with_ema', [False, True])
    def test_deploy_form_folds_the_recomputed_statistics(self, tmp_path, with_ema):
        # tools/test.py --deploy adds DeployHook. It folded the layers before this hook
        # recomputed their statistics (the stale ones of the checkpoint were folded: 0.2 off),
        # and before EMAHook's swap, which then paired the EMA copy's tensors with the
        # deployed model's and crashed.
        from mmnorm.convert.hard_ratios import harden_ratios
        torch.manual_seed(0)
        model = ToyModel(norm1=mmnorm.SwitchableNorm(8, eval_stats='batch_average'))
        with torch.no_grad():  # BN for mu and sigma: the deploy form folds it into conv1
            for logits in (model.norm1.mean_logits, model.norm1.var_logits):
                logits.copy_(torch.tensor([-2.0, -2.0, 2.0]))
        harden_ratios(model)
        path = tmp_path / 'stale.pth'  # moving statistics nowhere near the batch average
        torch.save(dict(state_dict=model.state_dict(), meta={}), path)
        x = torch.stack([ToyData()[i]['inputs'] for i in range(6)])
        outputs = {}

        class Probe(Hook):
            priority = 'LOWEST'  # the model the test evaluates, after every other hook

            def __init__(self, key):
                self.key = key

            def before_test_epoch(self, runner):
                with torch.no_grad():
                    outputs[self.key] = runner.model.eval()(x, None)

        def test(key, hooks):
            runner = Runner(
                model=ToyModel(norm1=mmnorm.SwitchableNorm(8, eval_stats='batch_average')),
                work_dir=str(tmp_path / key), train_dataloader=loader(),
                train_cfg=dict(by_epoch=False, max_iters=1),
                optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
                test_dataloader=loader(size=8), test_cfg=dict(),
                test_evaluator=dict(type='ToyAccuracy'), load_from=str(path),
                custom_hooks=[dict(type='BatchAverageStatsHook', num_iters=3)] + hooks
                + [Probe(key)], randomness=dict(seed=0), experiment_name=key)
            runner.test()
            return runner

        # (begin_iter: EMAHook swaps its copy in and out before it begins averaging too)
        ema = [dict(type='EMAHook', momentum=0.3, update_buffers=True, priority=49,
                    begin_iter=100)]
        test('plain', [])
        deployed = test('deploy', [dict(type='DeployHook')] + (ema if with_ema else []))
        assert isinstance(deployed.model.norm1, nn.Identity)  # folded, and after the test
        torch.testing.assert_close(outputs['deploy'], outputs['plain'], rtol=1e-5, atol=1e-5)

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match='estimator'):
            BatchAverageStatsHook(estimator='ema')
        with pytest.raises(ValueError, match='num_iters'):
            BatchAverageStatsHook(num_iters=0)
        with pytest.raises(ValueError, match='log_interval must be >= 1'):
            BatchAverageStatsHook(log_interval=0)  # (a ZeroDivisionError after training)


@HOOKS.register_module(force=True)
class RecordRateHook(Hook):
    """Records (layer rate, group lr) during every iteration, after EstimateRateHook ran."""

    priority = 'LOW'

    def __init__(self):
        self.records = []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        model = runner.model
        groups = {id(p): g for g in runner.optim_wrapper.optimizer.param_groups
                  for p in g['params']}
        self.records.append([
            (float(m.estimate_rate), groups[id(m.bn_weight)]['lr'])
            for m in (model.norm1, model.norm2)])


class TestEstimateRateHook:

    def _model(self):
        return ToyModel(norm1=BatchChannelNorm(8, num_groups=4, estimate=True),
                        norm2=BatchChannelNorm(8, num_groups=2, estimate=True))

    def _optim(self):
        return dict(optimizer=dict(type='SGD', lr=0.1, momentum=0.9),
                    paramwise_cfg=dict(custom_keys={'norm2': dict(lr_mult=0.5)}))

    def _scheduler(self):
        return [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=4),
                dict(type='MultiStepLR', milestones=[5], by_epoch=False, gamma=0.1)]

    def test_rate_follows_lr_with_warmup_and_lr_mult(self, tmp_path):
        recorder = RecordRateHook()
        runner = _runner(tmp_path, self._model(), max_iters=6,
                         custom_hooks=[dict(type='EstimateRateHook'), recorder],
                         optim=self._optim(), scheduler=self._scheduler())
        runner.train()
        assert len(recorder.records) == 6
        lrs = []
        for rates in recorder.records:
            for rate, lr in rates:
                assert rate == pytest.approx(lr, rel=1e-6)
            lrs.append(rates[0][1])
            assert rates[1][1] == pytest.approx(0.5 * rates[0][1])  # lr_mult reaches the rate
        assert lrs[0] == pytest.approx(0.01) and lrs[4] == pytest.approx(0.1)  # warm-up
        assert lrs[5] == pytest.approx(0.01)  # step decay

    def test_rate_correct_after_resume(self, tmp_path):
        first = _runner(tmp_path, self._model(), max_iters=3,
                        custom_hooks=[dict(type='EstimateRateHook')], optim=self._optim(),
                        scheduler=self._scheduler(), name='first')
        first.train()
        ckpt = torch.load(tmp_path / 'iter_3.pth', weights_only=True)
        ckpt['state_dict']['norm1.estimate_rate'].fill_(123.0)  # a stale value must not leak
        torch.save(ckpt, tmp_path / 'stale.pth')
        recorder = RecordRateHook()
        resumed = _runner(tmp_path, self._model(), max_iters=6,
                          custom_hooks=[dict(type='EstimateRateHook'), recorder],
                          optim=self._optim(), scheduler=self._scheduler(), resume=True,
                          load_from=str(tmp_path / 'stale.pth'), name='resumed')
        resumed.train()
        assert len(recorder.records) == 3
        restored_lr = ckpt['optimizer']['param_groups'][0]['lr']
        assert recorder.records[0][0] == pytest.approx((restored_lr, restored_lr))
        for rates in recorder.records:
            for rate, lr in rates:
                assert rate == pytest.approx(lr, rel=1e-6)

    def test_without_hook_layer_warns(self, tmp_path):
        runner = _runner(tmp_path, self._model(), max_iters=1)
        runner.train()
        with open(os.path.join(runner.log_dir, f'{runner.timestamp}.log')) as f:
            assert f.read().count('estimate_rate == 0') == 1  # in the run's log, once

    def test_bad_scale(self):
        with pytest.raises(ValueError):
            EstimateRateHook(scale=0)

    def test_rate_above_one_is_refused_naming_the_group(self, tmp_path):
        optim = dict(optimizer=dict(type='SGD', lr=0.1),
                     paramwise_cfg=dict(custom_keys={'norm2': dict(lr_mult=20.0)}))
        runner = _runner(tmp_path, self._model(), max_iters=1, optim=optim,
                         custom_hooks=[dict(type='EstimateRateHook')])
        with pytest.raises(ValueError, match=r'EstimateRateHook: layer norm2 \(its param group '
                           r'\d+ of optimizer 0\) has lr 2\.0 x scale 1\.0 = 2\.0, outside'):
            runner.train()


class TestRatioLogging:

    @staticmethod
    def _train(tmp_path, model, max_iters, interval):
        """Train ``model`` with the ratio logger; the runner and the records it wrote."""
        runner = _runner(tmp_path, model, max_iters=max_iters,
                         custom_hooks=[dict(type='SNRatioLoggerHook', interval=interval)],
                         optim=dict(optimizer=dict(type='SGD', lr=0.5)))
        runner.train()
        with open(tmp_path / 'sn_ratios.jsonl') as f:
            return runner, [json.loads(line) for line in f]

    def test_json_log_message_hub_and_plots(self, tmp_path):
        model = ToyModel(norm2=mmnorm.SwitchableNormTied(8))
        runner, records = self._train(tmp_path, model, max_iters=4, interval=2)
        assert [r['iter'] for r in records] == [0, 2, 4]
        assert set(records[0]['layers']) == {'norm1', 'norm2'}
        assert records[0]['layers']['norm1']['mean'] == pytest.approx([1 / 3] * 3)
        assert records[-1]['layers']['norm1']['mean'] != pytest.approx([1 / 3] * 3)
        assert records[-1]['layers']['norm2']['tied']
        final = records[-1]['layers']['norm1']
        expected = [r.tolist() for r in model.norm1.ratios()]
        assert final['mean'] == pytest.approx(expected[0]) and final['var'] == pytest.approx(
            expected[1])
        assert runner.message_hub.get_scalar('train/sn/mean_BN').current() == pytest.approx(
            (final['mean'][2] + records[-1]['layers']['norm2']['mean'][2]) / 2)

        import sys
        sys.path.insert(0, osp.join(osp.dirname(__file__), '..', '..', 'tools'))
        import plot_ratios
        png = plot_ratios.main([str(tmp_path / 'iter_3.pth'), '--out', str(tmp_path / 'a.png')])
        assert osp.getsize(png) > 10_000
        png = plot_ratios.main([str(tmp_path / 'sn_ratios.jsonl'), '--iter', '2', '--out',
                                str(tmp_path / 'b.png')])
        assert osp.getsize(png) > 10_000
        with pytest.raises(SystemExit, match='no record at iteration 7'):
            plot_ratios.main([str(tmp_path / 'sn_ratios.jsonl'), '--iter', '7'])
        # The format follows the extension (it was always PNG).
        pdf = plot_ratios.main([str(tmp_path / 'iter_3.pth'), '--out', str(tmp_path / 'c.pdf')])
        assert open(pdf, 'rb').read(5) == b'%PDF-'
        assert open(png, 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
        # Inputs that are not a checkpoint or a ratio log: one error line, nothing written.
        (tmp_path / 'text.pth').write_text('not a checkpoint')
        (tmp_path / 'bad.jsonl').write_text('{"iter": 1, "layers": {}}\nnot json\n')
        (tmp_path / 'nolayers.jsonl').write_text('{"iter": 1}\n')
        (tmp_path / 'bytes.jsonl').write_bytes(b'\xff\xfe{"iter": 1}\n')
        torch.save([1, 2], tmp_path / 'list.pth')
        before = sorted(os.listdir(tmp_path))
        path = {name: str(tmp_path / name) for name in (
            'missing.pth', 'missing.jsonl', 'text.pth', 'list.pth', 'bad.jsonl',
            'nolayers.jsonl', 'iter_3.pth', 'bytes.jsonl')}
        for argv, match in (
                ([path['missing.pth']], 'missing.pth not found'),
                ([path['missing.jsonl']], 'cannot read'),
                ([path['text.pth']], 'error: '),
                ([path['list.pth']], 'does not hold a checkpoint dict'),
                ([path['bad.jsonl']], 'line 2 is not JSON'),
                ([path['nolayers.jsonl']], 'record 1 has no "iter" and "layers"'),
                ([path['iter_3.pth'], '--iter', '2'], '--iter picks a record of a ratio log'),
                ([path['bytes.jsonl']], 'line 1 is not text'),
                ([path['iter_3.pth'], '--out', str(tmp_path / 'r.v1')],
                 'matplotlib writes no .v1 files'),
                ([path['iter_3.pth'], '--history', path['missing.jsonl']], 'cannot read')):
            with pytest.raises(SystemExit, match=match):
                plot_ratios.main(argv)
        assert sorted(os.listdir(tmp_path)) == before


    def test_grouped_layers_logged_and_drawn_as_a_heat_map(self, tmp_path):
        """SN with 4 groups and SN_tied with a group per channel: the JSON lines hold every
        group's ratios, the scalars count each layer once (its groups' mean), and
        plot_ratios.py draws the checkpoint as a heat map (rows = layers, columns = groups)."""
        model = ToyModel(norm1=mmnorm.SwitchableNorm(8, ratio_groups=4),
                         norm2=mmnorm.SwitchableNormTied(8, ratio_groups=8))
        runner, records = self._train(tmp_path, model, max_iters=3, interval=3)
        assert [r['iter'] for r in records] == [0, 3]
        final = records[-1]['layers']
        assert final['norm1']['groups'] == 4 and final['norm2']['groups'] == 8
        mean = torch.softmax(model.norm1.mean_logits.detach(), -1)
        var = torch.softmax(model.norm1.var_logits.detach(), -1)
        torch.testing.assert_close(torch.tensor(final['norm1']['mean']), mean)
        torch.testing.assert_close(torch.tensor(final['norm1']['var']), var)
        assert final['norm1']['mean'] != final['norm1']['var']  # trained apart
        tied = torch.softmax(model.norm2.logits.detach(), -1)
        hub = runner.message_hub
        for index, z in enumerate(('IN', 'LN', 'BN')):
            expected = (float(mean[:, index].mean()) + float(tied[:, index].mean())) / 2
            assert hub.get_scalar(f'train/sn/mean_{z}').current() == pytest.approx(expected,
                                                                                  rel=1e-5)
        # the share of grouped layers whose groups choose more than one normalizer
        split = [len(set(mean.argmax(-1).tolist())) > 1 or len(set(var.argmax(-1).tolist())) > 1,
                 len(set(tied.argmax(-1).tolist())) > 1]
        assert hub.get_scalar('train/sn/split').current() == pytest.approx(sum(split) / 2)

        import sys
        import matplotlib.image
        sys.path.insert(0, osp.join(osp.dirname(__file__), '..', '..', 'tools'))
        import plot_ratios
        out = tmp_path / 'heat.png'
        assert plot_ratios.main([str(tmp_path / 'iter_3.pth'), '--out', str(out)]) == str(out)
        fig = plot_ratios.plot(plot_ratios.load_ratios(str(tmp_path / 'iter_3.pth'))[0],
                               str(tmp_path / 'again.png'), 'grouped')
        # a panel per normalizer and the argmax, for μ and for σ, and the colour bar
        assert len(fig.axes) == 2 * (3 + 1) + 1
        panel = fig.axes[0]
        assert panel.get_ylim() == (2, 0)  # two layers, the first on top
        assert [t.get_text() for t in panel.get_yticklabels()] == ['norm1 [G=4]',
                                                                   'norm2 [G=8]']
        assert len(panel.collections) == 2  # a row of cells per layer
        assert panel.collections[0].get_array().size == 4  # norm1: 4 groups
        assert panel.collections[1].get_array().size == 8  # norm2: 8 groups
        image = matplotlib.image.imread(str(out))
        width, height = fig.get_size_inches() * 110  # save_figure's dpi
        assert image.shape[:2] == (round(height), round(width))
        # the ratio log draws the same
        png = plot_ratios.main([str(tmp_path / 'sn_ratios.jsonl'), '--out',
                                str(tmp_path / 'log.png')])
        assert osp.getsize(png) > 10_000


class TestCompiledFormHook:
    """The form chosen in a config; MMNORM_COMPILE, when set, overrides it; 'auto' switches at a
    training iteration and never inside an evaluation."""

    @pytest.mark.parametrize('env, expected', [(None, 'always'), ('0', 'never'), ('', 'always')])
    def test_config_mode_and_environment_override(self, tmp_path, monkeypatch, env, expected):
        from mmnorm.functional import compile_mode
        if env is None:
            monkeypatch.delenv('MMNORM_COMPILE', raising=False)
        else:
            monkeypatch.setenv('MMNORM_COMPILE', env)
        before = compile_mode()
        model = ToyModel(norm1=mmnorm.SwitchableNorm(8))
        runner = _runner(tmp_path, model, max_iters=1,
                         custom_hooks=[dict(type='CompiledFormHook', mode='always')])
        assert compile_mode() == before  # nothing changes before the run
        runner.train()
        assert compile_mode() == expected
        log = open(osp.join(runner.log_dir, f'{runner.timestamp}.log')).read()
        assert f"mode '{expected}'" in log
        assert ('overrides the config' in log) == bool(env)

    def test_auto_switches_at_an_iteration_and_never_inside_an_evaluation(self, tmp_path,
                                                                          monkeypatch):
        """'auto' with compile_after_iters=4 and validation after iterations 3 and 6: iterations
        0-3 and the first validation run the eager forms, iterations 4-5 and the second
        validation compiled; each validation loop in one form from its first batch to its
        last; a run that only evaluates never compiles."""
        import mmnorm.functional.compiled as core
        monkeypatch.delenv('MMNORM_COMPILE', raising=False)
        train, val = [], []

        class Record(Hook):
            priority = 'LOWEST'

            def before_train_iter(self, runner, batch_idx, data_batch=None):
                self.ran = core.COMPILED.compiled_calls

            def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
                train.append(core.COMPILED.compiled_calls > self.ran)

            def before_val_epoch(self, runner):
                val.append([])

            def before_val_iter(self, runner, batch_idx, data_batch=None):
                self.ran = core.COMPILED.compiled_calls

            def after_val_iter(self, runner, batch_idx, data_batch=None, outputs=None):
                val[-1].append(core.COMPILED.compiled_calls > self.ran)

        hooks = [dict(type='CompiledFormHook', mode='auto', compile_after_iters=4), Record()]
        runner = _runner(tmp_path, ToyModel(norm1=mmnorm.SwitchableNorm(8)), max_iters=6,
                         custom_hooks=hooks, val=True)
        runner.train()
        assert train == [False] * 4 + [True] * 2
        assert val == [[False] * 2, [True] * 2]
        assert core.COMPILED.failed is None
        log = open(osp.join(runner.log_dir, f'{runner.timestamp}.log')).read()
        assert 'compiled from training iteration 4 on' in log
        assert 'mmnorm layers run compiled from training iteration 4 on' in log
        # An evaluation alone: 'auto' stays in the eager forms.
        evaluation = _runner(tmp_path / 'val', ToyModel(norm1=mmnorm.SwitchableNorm(8)),
                             custom_hooks=hooks[:1], val=True)
        ran = core.COMPILED.compiled_calls
        evaluation.val()
        assert core.compile_mode() == 'auto' and core.COMPILED.compiled_calls == ran
        assert not core.compiled_enabled()

    def test_bad_mode_fails_when_built(self):
        with pytest.raises(ValueError, match='expected one of'):
            HOOKS.build(dict(type='CompiledFormHook', mode='sometimes'))


class TestBatchedRatiosHook:

    def test_one_ratio_computation_per_forward_and_the_same_training(self, tmp_path,
                                                                     monkeypatch):
        """Two SSN layers trained with validations: with the hook each forward computes their
        ratios in one SparsestMax of all their rows and no layer computes its own; the weights,
        running statistics and fixed choices at the end are exactly those of the run without
        it; the hooks come off at the end of the run."""
        from mmnorm.functional import sparse_switchable
        rows = []
        fast = sparse_switchable.fast_sparsestmax

        def counting(scores, *args):
            rows.append(scores.numel() // scores.shape[-1])
            return fast(scores, *args)
        monkeypatch.setattr(sparse_switchable, 'fast_sparsestmax', counting)
        optim = dict(optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4),
                     constructor='NormAwareOptimWrapperConstructor',
                     paramwise_cfg=dict(ratio_lr_mult=0.1, ratio_decay_mult=0.,
                                        ratio_clip_grad=dict(max_norm=1.0)))
        states = {}
        for with_hook in (False, True):
            torch.manual_seed(0)
            model = ToyModel(norm1=mmnorm.SparseSwitchableNorm(8),
                             norm2=mmnorm.SparseSwitchableNorm(8, ratio_groups=2))
            hooks = [dict(type='SSNRadiusHook')] + (
                [dict(type='BatchedRatiosHook')] if with_hook else [])
            rows.clear()
            runner = _runner(tmp_path / str(with_hook), model, max_iters=6, custom_hooks=hooks,
                             val=True, optim=optim)
            runner.train()
            # 6 training iterations and 2 validations of 2 batches: 10 forwards, each
            # computing the rows of both layers (2 and 2 x 2) at once, or each layer its own;
            # but by the second validation (radius 1) every choice is fixed: .eval() computes
            # each layer's one-hot ratios once and its 2 forwards compute none.
            assert rows == ([6] * 8 if with_hook else [2, 4] * 8) + [2, 4]
            assert all(bool((buffer >= 0).all()) for name, buffer in model.named_buffers()
                       if name.endswith('_choice'))
            assert not model._forward_pre_hooks and not model._forward_hooks
            states[with_hook] = model.state_dict()
        assert int(states[True]['norm1.mean_choice']) >= 0  # a choice was fixed (radius 1)
        for key, value in states[False].items():
            assert torch.equal(states[True][key], value), key


class TestFrozenRatiosHook:

    @staticmethod
    def _counted(layer):
        """Count the calls of ``layer``'s ratio function (per forward, or once per scope)."""
        calls = []
        ratio_fn = type(layer).ratio_fn

        def counting(*inputs):
            calls.append(1)
            return ratio_fn(*inputs)
        layer.ratio_fn = counting
        return calls

    @pytest.mark.parametrize('with_hook', [True, False])
    def test_once_per_validation_and_test_epoch(self, tmp_path, with_hook):
        """Validation after iterations 3 and 6 (2 batches each) and a test run: with the hook
        each epoch computes the ratios once, without it once per batch; training iterations
        always compute them, and no scope is left open."""
        layer = mmnorm.SparseSwitchableNorm(8)
        calls = self._counted(layer)
        per_epoch = []

        class Record(Hook):
            priority = 'LOWEST'

            def before_val_epoch(self, runner):
                self.start = len(calls)

            def after_val_epoch(self, runner, metrics=None):
                per_epoch.append(len(calls) - self.start)

            before_test_epoch = before_val_epoch
            after_test_epoch = after_val_epoch

            def before_train_iter(self, runner, batch_idx, data_batch=None):
                self.start_iter = len(calls)
                assert layer._frozen_ratios is None

            def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
                assert len(calls) - self.start_iter == 1

        hooks = [dict(type='SSNRadiusHook'), Record()]
        if with_hook:
            hooks.insert(0, dict(type='FrozenRatiosHook'))
        optim = dict(optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4),
                     constructor='NormAwareOptimWrapperConstructor',
                     paramwise_cfg=dict(ratio_lr_mult=0.1, ratio_decay_mult=0.,
                                        ratio_clip_grad=dict(max_norm=1.0)))
        runner = _runner(tmp_path, ToyModel(norm1=layer), max_iters=6, custom_hooks=hooks,
                         val=True, optim=optim)
        runner.train()
        tester = Runner(model=runner.model, work_dir=str(tmp_path / 'test'),
                        test_dataloader=loader(size=8), test_cfg=dict(),
                        test_evaluator=dict(type='ToyAccuracy'), custom_hooks=hooks,
                        experiment_name=f'test_{with_hook}')
        tester.test()
        # By the second validation (radius 1) the layer is trained, every choice fixed:
        # entering eval computes its one-hot ratios once, its forwards none, with or without
        # the scope, and the test epoch (eval mode already, nothing changed) none at all.
        assert bool((layer.mean_choice >= 0).all() and (layer.var_choice >= 0).all())
        assert per_epoch == ([1, 1, 0] if with_hook else [2, 1, 0])
        assert layer._frozen_ratios is None

    def test_a_scope_an_error_left_open_closes_before_training(self):
        """A validation that raised skips after_val_epoch: the next training iteration (or the
        end of the run) closes the scope, so training-time evals see new parameters."""
        from types import SimpleNamespace

        from mmnorm.engine import FrozenRatiosHook
        runner = SimpleNamespace(model=ToyModel(norm1=mmnorm.SparseSwitchableNorm(8)))
        for close in ('before_train_iter', 'after_run'):
            hook = FrozenRatiosHook()
            hook.before_val_epoch(runner)
            assert runner.model.norm1._frozen_ratios == {}
            getattr(hook, close)(runner, *((0, ) if close == 'before_train_iter' else ()))
            assert runner.model.norm1._frozen_ratios is None
