# Copyright (c) mmnorm contributors. All rights reserved.
"""norm_eval freezes SN/BCN statistics in the codebases' ResNets; the optimizer constructor puts
every parameter in the group the docs say; AMP (bf16 on CPU) trains without NaN."""
import importlib
import logging

import pytest
import torch
from mmengine.optim import build_optim_wrapper
from mmengine.registry import MODELS as ROOT_MODELS
from mmengine.registry import DefaultScope
from torch import nn

import mmnorm
from mmnorm import BatchChannelNorm, SwitchableNorm
from mmnorm.layers import BatchStatsNorm

BACKBONES = {
    'mmdet': dict(type='ResNet', depth=18),
    'mmseg': dict(type='ResNetV1c', depth=18),
    'mmpretrain': dict(type='ResNetV1d', depth=18),
}


def _build_backbone(scope, norm_cfg, **kwargs):
    registry = importlib.import_module(f'{scope}.registry').MODELS
    importlib.import_module(f'{scope}.models')  # triggers mmnorm's integration
    cfg = dict(BACKBONES[scope], base_channels=8, stem_channels=8, norm_cfg=norm_cfg,
               **kwargs)
    with DefaultScope.overwrite_default_scope(scope):  # independent of other tests' scope
        return registry.build(cfg)


def _stats(model):
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))}


@pytest.mark.parametrize('scope', list(BACKBONES))
@pytest.mark.parametrize('norm_cfg', [dict(type='SN'), dict(type='BCN', num_groups=4)])
def test_norm_eval_keeps_buffers_unchanged_through_training_steps(scope, norm_cfg):
    model = _build_backbone(scope, norm_cfg, norm_eval=True, frozen_stages=1)
    norms = [m for m in model.modules() if isinstance(m, BatchStatsNorm)]
    assert norms
    before = _stats(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        model.train()
        assert all(not m.training for m in norms)
        out = model(torch.randn(2, 3, 32, 32))
        loss = sum(o.float().mean() for o in (out if isinstance(out, (tuple, list)) else [out]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = _stats(model)
    for key, value in before.items():
        assert torch.equal(after[key], value), f'{key} changed under norm_eval'
    # Frozen stage 1 (and the stem) stay frozen: no gradient, eval mode.
    assert not any(p.requires_grad for p in model.layer1.parameters())
    assert not model.layer1.training


@pytest.mark.parametrize('scope', list(BACKBONES))
def test_without_norm_eval_buffers_move(scope):
    model = _build_backbone(scope, dict(type='SN'), norm_eval=False)
    before = _stats(model)
    model.train()
    model(torch.randn(2, 3, 32, 32))
    assert any(not torch.equal(_stats(model)[k], v) for k, v in before.items())


@pytest.mark.parametrize('scope', list(BACKBONES))
def test_wrapped_train_returns_the_module(scope):
    # nn.Module's contract (`model.eval()` chains); some backbones' own train() returns None.
    model = _build_backbone(scope, dict(type='SN'), norm_eval=True)
    assert model.eval() is model and model.train() is model


def test_respect_norm_eval_decorator_for_custom_backbones():
    @mmnorm.integration.respect_norm_eval
    class Backbone(nn.Module):
        def __init__(self, norm_eval):
            super().__init__()
            self.norm_eval = norm_eval
            self.norm = SwitchableNorm(4)

        def train(self, mode=True):
            return super().train(mode)

    assert not Backbone(True).train().norm.training
    assert Backbone(False).train().norm.training


@pytest.mark.parametrize('inherits', ['nn.Module', 'a parent of its own'])
def test_respect_norm_eval_decorator_on_a_class_that_inherits_train(inherits):
    # The decorator did nothing where the class had no train of its own.
    class Parent(nn.Module):
        def __init__(self, norm_eval):
            super().__init__()
            self.norm_eval = norm_eval
            self.norm = SwitchableNorm(4)

        if inherits != 'nn.Module':
            def train(self, mode=True):
                return super().train(mode)

    Backbone = mmnorm.integration.respect_norm_eval(type('Backbone', (Parent, ), {}))
    assert not Backbone(True).train().norm.training
    assert Backbone(False).train().norm.training
    assert Parent(True).train().norm.training  # the parent is left as it was
    assert mmnorm.integration.respect_norm_eval(Backbone).train is Backbone.train  # once


class Net(nn.Module):

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.sn = SwitchableNorm(4)
        self.tied = mmnorm.SwitchableNormTied(4)
        self.bcn = BatchChannelNorm(4, num_groups=2)
        self.fc = nn.Linear(4, 2)


def _groups(paramwise_cfg=None, weight_decay=1e-4):
    model = Net()
    cfg = dict(constructor='NormAwareOptimWrapperConstructor',
               optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=weight_decay))
    if paramwise_cfg is not None:
        cfg['paramwise_cfg'] = paramwise_cfg
    wrapper = build_optim_wrapper(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    table = {}
    for group in wrapper.optimizer.param_groups:
        for p in group['params']:
            table[names[id(p)]] = (group['lr'], group['weight_decay'])
    assert len(table) == len(list(model.parameters()))
    return table


def test_constructor_default_decays_everything():
    # The SN ImageNet protocol: weight decay on all parameters including gamma, beta, ratios.
    table = _groups()
    assert set(table.values()) == {(0.1, 1e-4)}


def test_constructor_groups_as_documented():
    table = _groups(dict(norm_decay_mult=0.0, ratio_decay_mult=0.0, ratio_lr_mult=2.0,
                         bias_decay_mult=0.5))
    expected = {
        'conv.weight': (0.1, 1e-4), 'conv.bias': (0.1, 0.5e-4),
        'bn.weight': (0.1, 0.0), 'bn.bias': (0.1, 0.0),
        'sn.weight': (0.1, 0.0), 'sn.bias': (0.1, 0.0),
        'sn.mean_logits': (0.2, 0.0), 'sn.var_logits': (0.2, 0.0),
        'tied.weight': (0.1, 0.0), 'tied.bias': (0.1, 0.0), 'tied.logits': (0.2, 0.0),
        'bcn.bn_weight': (0.1, 0.0), 'bcn.bn_bias': (0.1, 0.0),
        'bcn.weight': (0.1, 0.0), 'bcn.bias': (0.1, 0.0),
        'fc.weight': (0.1, 1e-4), 'fc.bias': (0.1, 0.5e-4),
    }
    for name, value in expected.items():
        assert table[name] == pytest.approx(value), name


def test_constructor_without_ratio_rules_uses_flat_and_custom_keys_win():
    table = _groups(dict(flat_decay_mult=0.0, custom_keys={'sn.mean_logits': dict(
        lr_mult=0.1, decay_mult=3.0)}))
    assert table['sn.mean_logits'] == pytest.approx((0.01, 3e-4))
    assert table['sn.var_logits'] == pytest.approx((0.1, 0.0))  # 1-d: flat_decay_mult
    assert table['sn.weight'] == pytest.approx((0.1, 0.0))
    assert table['conv.weight'] == pytest.approx((0.1, 1e-4))


def test_mmengine_default_constructor_misses_mmnorm_layers():
    # Why this constructor exists: the default does not see SN/BCN as norms.
    model = Net()
    wrapper = build_optim_wrapper(model, dict(
        optimizer=dict(type='SGD', lr=0.1, weight_decay=1e-4),
        paramwise_cfg=dict(norm_decay_mult=0.0)))
    decay = {id(p): g['weight_decay'] for g in wrapper.optimizer.param_groups
             for p in g['params']}
    assert decay[id(model.bn.weight)] == 0.0 and decay[id(model.sn.weight)] == 1e-4


def test_ratio_decay_needs_weight_decay():
    with pytest.raises(ValueError, match='weight_decay'):
        _groups(dict(ratio_decay_mult=0.0), weight_decay=None)


@pytest.mark.parametrize('norm1, conv', [('SN', 'WSConv'), ('SN_tied', 'Conv'),
                                         ('BCN', 'WSConv')])
def test_amp_bfloat16_training_is_finite(norm1, conv, tmp_path):
    from mmengine.runner import Runner
    from tests.helpers.toy import ToyModel, loader
    norm = ROOT_MODELS.build(dict(type=norm1, num_features=8, **(
        dict(num_groups=4) if norm1 == 'BCN' else {})))
    model = ToyModel(norm1=norm, norm2=SwitchableNorm(8))
    if conv == 'Conv':
        model.conv1 = nn.Conv2d(3, 8, 3, padding=1)
    runner = Runner(
        model=model, work_dir=str(tmp_path), train_dataloader=loader(),
        train_cfg=dict(by_epoch=False, max_iters=6),
        # mmengine's AmpOptimWrapper refuses CPU-only machines; this is its CPU-capable subclass
        optim_wrapper=dict(type='CPUAmpOptimWrapper', dtype='bfloat16',
                           optimizer=dict(type='SGD', lr=0.1, momentum=0.9)),
        default_hooks=dict(checkpoint=None, logger=dict(type='LoggerHook', interval=1)),
        experiment_name=f'amp_{norm1}_{conv}')
    seen = []
    hook = model.norm1.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    runner.train()
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}  # really under bf16 autocast
    loss = runner.message_hub.get_scalar('train/loss')
    assert all(torch.isfinite(torch.tensor(v)) for v in loss.data[0])
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    for name, b in model.named_buffers():
        assert torch.isfinite(b.float()).all(), name


@pytest.mark.parametrize('paramwise_cfg, match', [
    (dict(ratio_lr_mul=0.5), r"unknown paramwise_cfg key\(s\) \['ratio_lr_mul'\]"),
    (dict(ratio_decay=0.0), r"unknown paramwise_cfg key\(s\) \['ratio_decay'\]"),
    (dict(ratio_lr_mult='0.1'), 'ratio_lr_mult must be a number >= 0'),
    (dict(ratio_decay_mult=-1.0), 'ratio_decay_mult must be a number >= 0'),
])
def test_constructor_refuses_misspelt_or_bad_ratio_rules(paramwise_cfg, match):
    # (mmengine ignores keys it does not know: ratio_lr_mul trained the ratios at the base LR)
    with pytest.raises(ValueError, match=match):
        _groups(paramwise_cfg)


@pytest.mark.parametrize('constructor, paramwise_cfg, norm1, missed', [
    # RTMDet's and YOLOX's optim_wrapper: bias_decay_mult reaches β, nothing reaches γ
    (None, dict(norm_decay_mult=0.0, bias_decay_mult=0.0), 'SN', ['weight']),
    (None, dict(norm_decay_mult=0.0), 'SN', ['weight', 'bias']),
    (None, dict(norm_decay_mult=0.0), 'BCN_est', ['bn_weight', 'bn_bias', 'weight', 'bias']),
    ('NormAwareOptimWrapperConstructor', dict(norm_decay_mult=0.0), 'SN', []),
    (None, dict(norm_decay_mult=0.0, custom_keys={'norm1.': dict(decay_mult=0.0)}), 'SN', []),
    (None, dict(bias_decay_mult=0.0), 'SN', []),  # nothing asked of norm layers
    (None, dict(norm_decay_mult=0.0), 'BN', []),  # no mmnorm layer
    (None, dict(norm_decay_mult=0.0), 'SN, no weight decay', []),  # nothing to miss
])
def test_norm_decay_that_misses_mmnorm_layers_is_reported(constructor, paramwise_cfg, norm1,
                                                          missed, tmp_path):
    """An upstream config's ``paramwise_cfg=dict(norm_decay_mult=0)`` under mmengine's default
    constructor does not reach mmnorm's layers (the test above): the run's log says so, once,
    naming the parameters the optimizer gives the base weight decay, on the layers' first
    training step; where mmnorm's constructor or another rule reached them, nothing is said."""
    from mmnorm.layers import base
    from tests.test_engine.test_hooks import _runner
    from tests.helpers.toy import ToyModel
    layer = {'SN': lambda: SwitchableNorm(8), 'BN': lambda: nn.BatchNorm2d(8),
             'BCN_est': lambda: BatchChannelNorm(8, num_groups=2, estimate=True)}[
                 norm1.split(',')[0]]()
    weight_decay = 0.0 if 'no weight decay' in norm1 else 1e-4
    optim = dict(optimizer=dict(type='SGD', lr=0.1, weight_decay=weight_decay),
                 paramwise_cfg=paramwise_cfg)
    if constructor:
        optim['constructor'] = constructor
    model = ToyModel(norm1=layer, norm2=nn.BatchNorm2d(8))
    hooks = [dict(type='EstimateRateHook')] if norm1 == 'BCN_est' else []
    runner = _runner(tmp_path, model, max_iters=2, optim=optim, custom_hooks=hooks,
                     cfg=dict(optim_wrapper=optim))
    base._LOGGED.clear()
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    runner.logger.addHandler(handler)
    try:
        runner.train()
    finally:
        runner.logger.removeHandler(handler)
    messages = [r.getMessage() for r in records if 'norm_decay_mult=0.0' in r.getMessage()]
    assert len(messages) == int(bool(missed))
    if missed:
        assert f'their {", ".join(missed)} trained with the base weight decay' in messages[0]
        assert "constructor='NormAwareOptimWrapperConstructor'" in messages[0]
    # What the message says is what the optimizer holds.
    decay = {id(p): g['weight_decay'] for g in runner.optim_wrapper.optimizer.param_groups
             for p in g['params']}
    for name, param in layer.named_parameters():
        if 'norm_decay_mult' in paramwise_cfg and name not in getattr(layer, 'ratio_params', ()):
            assert (decay[id(param)] == weight_decay != 0) == (name in missed), name
