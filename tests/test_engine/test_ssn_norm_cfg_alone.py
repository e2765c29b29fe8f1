# Copyright (c) mmnorm contributors. All rights reserved.
"""``norm_cfg=dict(type='SSN')`` alone in an upstream mmdet config (issue 27, item 6): a Runner
training SSN layers without ``SSNRadiusHook`` or ``NormAwareOptimWrapperConstructor`` stops at
the first step with an error naming exactly what to add; with the lines it names the run trains
with the radius following the progress and the SSN authors' ratio rules (the constructor's
defaults for SSN); a plain PyTorch loop (also after such a Runner in the same process) only warns.
"""
import argparse
import logging
import os.path as osp
import re

import mmdet
import pytest
import torch
from mmengine.config import Config, DictAction
from mmengine.hooks import Hook
from mmengine.logging import MessageHub, MMLogger
from mmengine.optim import build_optim_wrapper
from mmengine.runner import Runner
from torch import nn

import mmnorm
from mmnorm.layers.base import runner_training
from tests.conftest import ROOT, logged
from tests.helpers.tiny_data import make_shapes, mmdet_zoo_options
from tests.helpers.toy import ToyModel
from tests.test_engine.test_hooks import _runner

#: Faster R-CNN R50-FPN as mmdet ships it (its backbone keeps norm_eval=True and frozen_stages=1:
#: the SSN layers of stages 2-4 train their ratio parameters in eval mode, those of the stem and
#: stage 1 are frozen).
UPSTREAM = osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs', 'faster_rcnn',
                    'faster-rcnn_r50_fpn_1x_coco.py')
HOOK = 'SSNRadiusHook'
CONSTRUCTOR = 'NormAwareOptimWrapperConstructor'


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    return make_shapes(str(tmp_path_factory.mktemp('shapes')), num_train=4, num_val=2)


def _upstream_with_ssn(root, work_dir, extra=None) -> Config:
    """The upstream config, edited in ``norm_cfg`` only (the backbone's, to SSN); the data
    replaced by the generated shapes (64 px, 4 images: 2 iterations), no pretrained weights, no
    checkpoint written. ``extra``: config lines to add (a dict merged in)."""
    cfg = Config.fromfile(UPSTREAM)
    options = [o for o in mmdet_zoo_options(root, scale=64) if 'mask_head' not in o]
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    cfg.merge_from_dict(parser.parse_args(['--cfg-options', *options]).cfg_options)
    cfg.merge_from_dict({'model.backbone.norm_cfg': dict(type='SSN')})  # the one edit
    cfg.merge_from_dict(dict(extra or {}))
    cfg.default_hooks.checkpoint = None
    cfg.train_cfg.val_begin = 2  # no validation after the one epoch
    cfg.work_dir = str(work_dir)
    cfg.experiment_name = f'ssn_alone_{osp.basename(str(work_dir))}'
    return cfg


class _Snapshot(Hook):
    """The weights as the first iteration finds them (after the runner's weight init)."""

    priority = 'LOWEST'

    def before_train(self, runner):
        self.weights = {k: v.detach().clone() for k, v in runner.model.state_dict().items()}


def _refusal(cfg) -> tuple:
    runner = Runner.from_cfg(cfg)
    snapshot = _Snapshot()
    runner.register_hook(snapshot)
    with pytest.raises(RuntimeError) as error:
        runner.train()
    return str(error.value), runner, snapshot


def _config_lines(message: str) -> dict:
    """The config lines the error names, as a config would read them."""
    lines = re.findall(r'^    (\w+ = .*)$', message, re.MULTILINE)
    namespace = {}
    exec('\n'.join(lines), {'dict': dict}, namespace)
    return namespace


def _ssn_layers(model):
    return [m for m in model.modules() if isinstance(m, mmnorm.SparseSwitchableNorm)]


def test_neither_hook_nor_constructor_refused_before_any_step(shapes, tmp_path):
    message, runner, snapshot = _refusal(_upstream_with_ssn(shapes, tmp_path))
    assert HOOK in message and CONSTRUCTOR in message
    assert set(_config_lines(message)) == {'custom_hooks', 'optim_wrapper'}
    # The user guide quotes it (line breaks aside).
    with open(osp.join(ROOT, 'docs', 'user_guides', 'swap_normalizers.md')) as f:
        assert ' '.join(message.split()) in ' '.join(f.read().split())
    # Stopped at iteration 0, before the optimizer did anything: every weight and buffer (running
    # statistics included) is as the first iteration found it.
    assert runner.iter == 0 and not runner.optim_wrapper.optimizer.state
    for key, value in runner.model.state_dict().items():
        assert torch.equal(value, snapshot.weights[key]), key


@pytest.mark.parametrize('present, absent', [(HOOK, CONSTRUCTOR), (CONSTRUCTOR, HOOK)])
def test_only_what_is_missing_is_named(present, absent, shapes, tmp_path):
    extra = (dict(custom_hooks=[dict(type=HOOK)]) if present == HOOK
             else dict(optim_wrapper=dict(constructor=CONSTRUCTOR)))
    message, runner, _ = _refusal(_upstream_with_ssn(shapes, tmp_path, extra))
    assert absent in message and present not in message
    assert runner.iter == 0 and not runner.optim_wrapper.optimizer.state


def test_the_named_lines_make_it_train(shapes, tmp_path):
    message, _, _ = _refusal(_upstream_with_ssn(shapes, tmp_path / 'refused'))
    cfg = _upstream_with_ssn(shapes, tmp_path / 'trained', extra=_config_lines(message))
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert runner.iter == 2
    layers = _ssn_layers(runner.model)
    trained = [m for m in layers if m.mean_scores.requires_grad]  # stages 2-4
    assert trained and len(trained) < len(layers)  # the stem and stage 1 are frozen
    # The radius followed the progress: 1/2 at the second (last) iteration.
    assert all(float(m.radius) == 0.5 for m in layers)
    # The ratio parameters train at a tenth of the learning rate, without weight decay, their
    # gradient norm clipped (a step pre-hook of the optimizer).
    optimizer = runner.optim_wrapper.optimizer
    group_of = {id(p): g for g in optimizer.param_groups for p in g['params']}
    conv = group_of[id(runner.model.backbone.layer2[0].conv1.weight)]
    for layer in trained:
        for scores in (layer.mean_scores, layer.var_scores):
            group = group_of[id(scores)]
            assert group['initial_lr'] == pytest.approx(0.1 * conv['initial_lr'])
            assert group['lr'] == pytest.approx(0.1 * conv['lr'])
            assert group['weight_decay'] == 0.0 and conv['weight_decay'] == 1e-4
    assert len(optimizer._optimizer_step_pre_hooks) == 1
    assert any(not torch.equal(m.mean_scores, torch.ones(3)) for m in trained)  # (warm-up lr)


def test_plain_pytorch_after_a_runner_only_warns(tmp_path):
    # A Runner that stopped with the refusal leaves its message hub current, still saying
    # loop_stage 'train' (mmengine pops it in after_train, which never ran).
    stopped = _runner(tmp_path, ToyModel(norm1=mmnorm.SparseSwitchableNorm(8)), max_iters=2)
    with pytest.raises(RuntimeError, match=HOOK):
        stopped.train()
    hub = MessageHub.get_current_instance()
    assert hub is stopped.message_hub and hub.get_info('loop_stage') == 'train'
    assert not runner_training()
    records = []  # what reaches the run's log (the logger the runner made current)
    handler = logging.Handler()
    handler.emit = records.append
    MMLogger.get_current_instance().addHandler(handler)
    # ...and a plain loop trains SSN layers (in training mode and, with gradients, in eval mode),
    # warning once that nothing sets the radius.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), mmnorm.SparseSwitchableNorm(4),
                          mmnorm.SparseSwitchableNorm(4).eval())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(2, 3, 6, 6)).square().mean().backward()
        optimizer.step()
    MMLogger.get_current_instance().removeHandler(handler)
    assert len(logged(records, 'nothing sets its SparsestMax radius')) == 1


def test_grouped_and_sync_ssn_too(tmp_path):
    def model():
        return ToyModel(norm1=mmnorm.SparseSwitchableNorm(8, ratio_groups=4),
                        norm2=mmnorm.SyncSparseSwitchableNorm(8))

    stopped = _runner(tmp_path / 'stopped', model(), max_iters=2, name='stopped')
    with pytest.raises(RuntimeError) as error:
        stopped.train()
    assert HOOK in str(error.value) and CONSTRUCTOR in str(error.value)
    trained = model()
    runner = _runner(tmp_path / 'trained', trained, max_iters=2, name='trained',
                     custom_hooks=[dict(type=HOOK)],
                     optim=dict(constructor=CONSTRUCTOR, optimizer=dict(
                         type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4)))
    runner.train()
    group_of = {id(p): g for g in runner.optim_wrapper.optimizer.param_groups
                for p in g['params']}
    for layer in (trained.norm1, trained.norm2):
        assert float(layer.radius) == 0.5
        assert (group_of[id(layer.mean_scores)]['lr'], group_of[id(layer.var_scores)][
            'weight_decay']) == pytest.approx((0.01, 0.0))
    assert trained.norm1.mean_scores.shape == (4, 3)


def test_frozen_ratios_need_neither(tmp_path):
    # Hard ratios (frozen ratio parameters, fixed choices): nothing about the ratios trains.
    model = ToyModel(norm1=mmnorm.SparseSwitchableNorm(8))
    model.norm1.harden_ratios_()
    runner = _runner(tmp_path, model, max_iters=2)
    runner.train()
    assert runner.iter == 2


def _net():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), mmnorm.SwitchableNorm(4),
                          mmnorm.SparseSwitchableNorm(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 5, 5))
    return model


def _build(model, paramwise_cfg=None):
    cfg = dict(constructor=CONSTRUCTOR,
               optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4))
    if paramwise_cfg is not None:
        cfg['paramwise_cfg'] = paramwise_cfg
    wrapper = build_optim_wrapper(model, cfg)
    group_of = {id(p): (g['lr'], g['weight_decay']) for g in wrapper.optimizer.param_groups
                for p in g['params']}
    return wrapper, group_of


def _clipped(model, wrapper) -> dict:
    """Which ratio gradients the optimizer's step clipped (all gradients set to 10)."""
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    wrapper.optimizer.step()
    return {name: not torch.equal(p.grad, torch.full_like(p, 10.0))
            for name, p in model.named_parameters()}


@pytest.mark.parametrize('paramwise_cfg', [None, dict(norm_decay_mult=0.0)])
def test_constructor_gives_ssn_the_authors_rules_by_default(paramwise_cfg):
    model = _net()
    wrapper, groups = _build(model, paramwise_cfg)
    sn, ssn = model[1], model[2]
    for scores in (ssn.mean_scores, ssn.var_scores):
        assert groups[id(scores)] == pytest.approx((0.01, 0.0))
    for logits in (sn.mean_logits, sn.var_logits):  # SN: the generic rules
        assert groups[id(logits)] == pytest.approx((0.1, 1e-4))
    decay = 0.0 if paramwise_cfg else 1e-4
    assert groups[id(ssn.weight)] == pytest.approx((0.1, decay))
    assert groups[id(model[0].weight)] == pytest.approx((0.1, 1e-4))
    assert ssn._ratio_rules_applied and not hasattr(sn, '_ratio_rules_applied')
    # Clipped together to norm 1: SSN's ratio parameters only.
    clipped = _clipped(model, wrapper)
    assert {name for name, was in clipped.items() if was} == {'2.mean_scores', '2.var_scores'}
    torch.testing.assert_close(torch.cat([ssn.mean_scores.grad, ssn.var_scores.grad]).norm(),
                               torch.tensor(1.0))


def test_explicit_ratio_settings_win():
    model = _net()
    wrapper, groups = _build(model, dict(ratio_lr_mult=0.5, ratio_decay_mult=2.0,
                                         ratio_clip_grad=None))
    sn, ssn = model[1], model[2]
    for param in (ssn.mean_scores, ssn.var_scores, sn.mean_logits, sn.var_logits):
        assert groups[id(param)] == pytest.approx((0.05, 2e-4))
    assert not any(_clipped(model, wrapper).values())
    # An explicit clip covers every ratio parameter, SN's too; the unset ones keep SSN's
    # defaults; custom_keys win over both.
    model = _net()
    wrapper, groups = _build(model, dict(ratio_clip_grad=dict(max_norm=1.0), custom_keys={
        '2.var_scores': dict(lr_mult=2.0, decay_mult=1.0)}))
    sn, ssn = model[1], model[2]
    assert groups[id(ssn.mean_scores)] == pytest.approx((0.01, 0.0))
    assert groups[id(ssn.var_scores)] == pytest.approx((0.2, 1e-4))
    assert groups[id(sn.mean_logits)] == pytest.approx((0.1, 1e-4))
    clipped = _clipped(model, wrapper)
    assert {name for name, was in clipped.items() if was} == {
        '1.mean_logits', '1.var_logits', '2.mean_scores', '2.var_scores'}
