# Copyright (c) mmnorm contributors. All rights reserved.
"""Sparse SN in real mmengine Runners: the radius follows the training progress (also after a
resume), ratios end one-hot and frozen, the authors' optimizer practice (ratio parameters at
lr/10, no weight decay, gradient norm clipped to 1)."""
import pytest
import torch
from mmengine.hooks import Hook
from mmengine.optim import build_optim_wrapper
from mmengine.registry import HOOKS
from torch import nn

import mmnorm
from tests.helpers.toy import ToyModel
from tests.test_engine.test_hooks import _runner

SSN_OPTIM = dict(constructor='NormAwareOptimWrapperConstructor',
                 optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4),
                 paramwise_cfg=dict(ratio_lr_mult=0.1, ratio_decay_mult=0.0,
                                    ratio_clip_grad=dict(max_norm=1.0)))


@HOOKS.register_module(force=True)
class RadiusRecorder(Hook):
    """Records every SSN layer's radius as each training step sees it."""

    priority = 'LOW'  # after SSNRadiusHook (NORMAL) has set it

    def __init__(self):
        self.seen = []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        model = runner.model
        self.seen.append((runner.iter, float(model.norm1.radius), float(model.norm2.radius)))


def _ssn_model():
    return ToyModel(norm1=mmnorm.SparseSwitchableNorm(8), norm2=mmnorm.SparseSwitchableNorm(8))


def test_radius_is_the_training_progress_and_ratios_end_one_hot(tmp_path):
    model = _ssn_model()
    runner = _runner(tmp_path, model, max_iters=8, optim=SSN_OPTIM,
                     custom_hooks=[dict(type='SSNRadiusHook'), dict(type='RadiusRecorder')])
    runner.train()
    recorder = next(h for h in runner.hooks if isinstance(h, RadiusRecorder))
    assert recorder.seen == [(i, i / 8, i / 8) for i in range(8)]
    # The last steps ran at radius 6/8 and 7/8 > sqrt(2/3): every ratio vector is one-hot,
    # fixed, and saved so.
    for layer in (model.norm1, model.norm2):
        assert int(layer.mean_choice) >= 0 and int(layer.var_choice) >= 0
        for ratios in layer.ratios():
            assert sorted(ratios.tolist()) == [0.0, 0.0, 1.0]
    saved = torch.load(tmp_path / 'iter_6.pth', weights_only=True)['state_dict']
    assert float(saved['norm1.radius']) == pytest.approx(5 / 8)  # the radius of the last step


def test_radius_continues_after_resume(tmp_path):
    first = _runner(tmp_path, _ssn_model(), max_iters=3, optim=SSN_OPTIM,
                    custom_hooks=[dict(type='SSNRadiusHook')])
    first.train()
    resumed = _runner(tmp_path, _ssn_model(), max_iters=6, optim=SSN_OPTIM, resume=True,
                      custom_hooks=[dict(type='SSNRadiusHook'), dict(type='RadiusRecorder')],
                      name='resumed')
    resumed.train()
    recorder = next(h for h in resumed.hooks if isinstance(h, RadiusRecorder))
    assert [r[0] for r in recorder.seen] == [3, 4, 5]
    assert [r[1] for r in recorder.seen] == pytest.approx([3 / 6, 4 / 6, 5 / 6])


def test_hook_without_ssn_layers_warns(tmp_path, capsys):
    runner = _runner(tmp_path, ToyModel(), max_iters=1, custom_hooks=[dict(type='SSNRadiusHook')])
    runner.train()
    assert 'no layer that follows the training progress' in capsys.readouterr().out


def test_the_authors_optimizer_practice():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), mmnorm.SparseSwitchableNorm(4), nn.Flatten(),
                          nn.LazyLinear(2))
    model(torch.randn(2, 3, 5, 5))
    wrapper = build_optim_wrapper(model, SSN_OPTIM)
    groups = {id(p): (g['lr'], g['weight_decay']) for g in wrapper.optimizer.param_groups
              for p in g['params']}
    ssn = model[1]
    assert groups[id(ssn.mean_scores)] == pytest.approx((0.01, 0.0))
    assert groups[id(ssn.var_scores)] == pytest.approx((0.01, 0.0))
    assert groups[id(ssn.weight)] == pytest.approx((0.1, 1e-4))
    # Clipping: the ratio parameters' gradient norm is clipped to 1 before the step, the other
    # gradients are not.
    big = {p: torch.full_like(p, 10.0) for p in model.parameters()}
    for p, g in big.items():
        p.grad = g.clone()
    before = {p: p.detach().clone() for p in model.parameters()}
    wrapper.optimizer.step()
    ratio_grads = torch.cat([ssn.mean_scores.grad, ssn.var_scores.grad])
    torch.testing.assert_close(ratio_grads.norm(), torch.tensor(1.0))
    assert torch.equal(model[0].weight.grad, big[model[0].weight])
    step = (before[ssn.mean_scores] - ssn.mean_scores.detach())
    torch.testing.assert_close(step, 0.01 * ssn.mean_scores.grad)  # lr/10, no decay
    with pytest.raises(ValueError, match='ratio_clip_grad'):
        build_optim_wrapper(model, dict(SSN_OPTIM, paramwise_cfg=dict(ratio_clip_grad=1.0)))


def test_ratio_log_and_plots_show_radius_and_sparsity(tmp_path):
    import json
    import os.path as osp
    import sys
    model = _ssn_model()
    runner = _runner(tmp_path, model, max_iters=8, optim=SSN_OPTIM, custom_hooks=[
        dict(type='SSNRadiusHook'), dict(type='SNRatioLoggerHook', interval=4)])
    runner.train()
    records = [json.loads(line) for line in open(tmp_path / 'sn_ratios.jsonl')]
    assert [r['iter'] for r in records] == [0, 4, 8]
    # each record carries the radius the last step used and which vectors are fixed
    assert [r['layers']['norm1']['radius'] for r in records] == pytest.approx([0, 3 / 8, 7 / 8])
    assert records[-1]['layers']['norm1']['fixed'] == [True, True]
    assert records[0]['layers']['norm1']['fixed'] == [False, False]
    hub = runner.message_hub
    assert hub.get_scalar('train/sn/radius').current() == pytest.approx(7 / 8)
    assert hub.get_scalar('train/sn/one_hot').current() == 1.0
    sys.path.insert(0, osp.join(osp.dirname(__file__), '..', '..', 'tools'))
    import plot_ratios
    png = plot_ratios.main([str(tmp_path / 'iter_6.pth'), '--out', str(tmp_path / 'r.png'),
                            '--history', str(tmp_path / 'sn_ratios.jsonl')])
    assert osp.getsize(png) > 10_000 and osp.getsize(tmp_path / 'r_training.png') > 10_000
    # the checkpoint's ratios are read with SSN's own ratio function (SparsestMax, choices)
    layers, _ = plot_ratios.load_ratios(str(tmp_path / 'iter_6.pth'))
    saved = torch.load(tmp_path / 'iter_6.pth', weights_only=True)['state_dict']
    reference = mmnorm.SparseSwitchableNorm(8)
    reference.load_state_dict({k[len('norm1.'):]: v for k, v in saved.items()
                               if k.startswith('norm1.')})
    assert layers['norm1']['mean'] == pytest.approx(reference.ratios()[0].tolist())
