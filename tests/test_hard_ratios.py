# Copyright (c) mmnorm contributors. All rights reserved.
"""Hard ratios and the deploy form (folded / native / fused layers) equal the hard-ratio model."""
import importlib
import os.path as osp
import subprocess
import sys

import pytest
import torch
from mmcv.cnn import ConvModule
from mmengine.registry import DefaultScope
from torch import nn

import mmnorm  # noqa: F401  (registers the layers)
from mmnorm import SwitchableNorm, SwitchableNormTied
from mmnorm.convert import hard_choices, harden_ratios, to_deploy
from tests.conftest import ROOT

PATTERN = [('BN', 'BN'), ('IN', 'IN'), ('LN', 'LN'), ('IN', 'BN'), ('BN', 'BN')]
INDEX = {'IN': 0, 'LN': 1, 'BN': 2}


def _set_choices(model, in_unbiased=False):
    """Give every SN layer trained-looking parameters and the choices of PATTERN, cyclically."""
    gen = torch.Generator().manual_seed(0)
    expected = {}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, SwitchableNorm)]
    with torch.no_grad():
        for i, (name, layer) in enumerate(layers):
            mean_choice, var_choice = PATTERN[i % len(PATTERN)]
            if isinstance(layer, SwitchableNormTied):
                var_choice = mean_choice
            layer.weight.uniform_(0.5, 1.5, generator=gen)
            layer.bias.normal_(0, 0.1, generator=gen)
            layer.running_mean.normal_(0, 0.2, generator=gen)
            layer.running_var.uniform_(0.5, 2.0, generator=gen)
            layer.in_unbiased = in_unbiased
            logits = layer._logits()
            for logit, choice in zip(logits if len(logits) == 2 else logits * 2,
                                     (mean_choice, var_choice)):
                logit.normal_(0, 0.3, generator=gen)
                logit[INDEX[choice]] += 2.0  # the argmax, but the softmax is still soft
            expected[name] = (mean_choice, var_choice)
    return expected


def _resnet50(conv_cfg=None, norm='SN'):
    registry = importlib.import_module('mmpretrain.registry').MODELS
    importlib.import_module('mmpretrain.models')
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        return registry.build(dict(
            type='ImageClassifier',
            backbone=dict(type='ResNet', depth=50, norm_cfg=dict(type=norm), conv_cfg=conv_cfg),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(type='LinearClsHead', num_classes=10, in_channels=2048)))


@pytest.mark.parametrize('conv_cfg, norm, in_unbiased', [
    (None, 'SN', False), (dict(type='WSConv'), 'SN', False), (None, 'SN_tied', False),
    (None, 'SN', True), (None, 'SSN', False), (dict(type='WSConv'), 'SSN', True),
])
def test_deploy_form_equals_hard_ratio_model(conv_cfg, norm, in_unbiased):
    model = _resnet50(conv_cfg, norm)
    expected = _set_choices(model, in_unbiased)
    assert hard_choices(model) == expected
    harden_ratios(model)
    for layer in model.modules():
        if isinstance(layer, SwitchableNorm):
            for ratios in layer.ratios():
                assert set(ratios.tolist()) == {0.0, 1.0}
            assert not any(p.requires_grad for p in layer._logits())
    model.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hard = model(x, mode='tensor')
    plan = to_deploy(model)
    with torch.no_grad():
        deployed = model(x, mode='tensor')
    relative = ((deployed - hard).abs().max() / hard.abs().max()).item()
    assert relative <= 1e-4, relative
    # The plan follows the choices: BN/BN folds into the preceding conv (ResNet's conv{k} ->
    # sn{k}, the stem, Sequential shortcuts); IN/IN, LN/LN become native kernels (not with the
    # authors' unbiased IN variance); mixed choices stay fused.
    for name, (mean_choice, var_choice) in expected.items():
        action = plan[name]
        if mean_choice != var_choice:
            assert action == 'fused'
        elif mean_choice == 'BN':
            assert action == 'folded', name
        else:
            native = 'instance_norm' if mean_choice == 'IN' else 'group_norm'
            assert action == ('fused' if in_unbiased else native), name
    remaining = [m for m in model.modules() if isinstance(m, SwitchableNorm)]
    assert len(remaining) == sum(1 for a in plan.values() if a == 'fused')
    # fused layers are plain SN with one-hot ratios (not SSN recomputing SparsestMax)
    assert all(type(m) is SwitchableNorm for m in remaining)
    if conv_cfg:  # a folded WS conv is a plain conv with the standardized, scaled weight
        assert type(model.backbone.conv1) is nn.Conv2d


def test_conv_modules_fold_and_pre_norm_order_does_not():
    gen = torch.Generator().manual_seed(2)
    post = ConvModule(4, 8, 3, padding=1, norm_cfg=dict(type='SN'))
    pre = ConvModule(8, 8, 3, padding=1, norm_cfg=dict(type='SN'), order=('norm', 'conv', 'act'))
    model = nn.Sequential(post, pre).eval()
    for layer in (post.sn, pre.sn):
        with torch.no_grad():
            layer.mean_logits.copy_(torch.tensor([0.0, 0.0, 3.0]))
            layer.var_logits.copy_(torch.tensor([0.0, 0.0, 3.0]))
            layer.running_var.uniform_(0.5, 2, generator=gen)
    harden_ratios(model)
    x = torch.randn(2, 4, 6, 6, generator=gen)
    with torch.no_grad():
        hard = model(x)
    plan = to_deploy(model)
    assert plan == {'0.sn': 'folded', '1.sn': 'affine'}
    with torch.no_grad():
        torch.testing.assert_close(model(x), hard, rtol=1e-5, atol=1e-5)


def test_to_deploy_needs_eval_mode():
    with pytest.raises(RuntimeError, match='eval'):
        to_deploy(nn.Sequential(SwitchableNorm(4)))


def test_export_tool_and_deploy_test(tmp_path):
    """tools/export_hard_ratios.py on a trained checkpoint, then tools/test.py [--deploy]."""
    import json

    from tests.helpers.images import make_class_folders
    config = osp.join(ROOT, 'tests', 'data', 'configs', 'tiny_classifier.py')
    data = make_class_folders(str(tmp_path / 'data'))
    options = [f'{s}_dataloader.dataset.data_root={data}' for s in ('train', 'val', 'test')]
    env = dict(__import__('os').environ,
               PYTHONPATH=ROOT + ':' + __import__('os').environ.get('PYTHONPATH', ''))

    def tool(*args):
        result = subprocess.run([sys.executable, osp.join(ROOT, 'tools', args[0]), *args[1:]],
                                capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout

    tool('train.py', config, '--work-dir', str(tmp_path / 'w'), '--cfg-options', *options)
    source = tmp_path / 'w' / 'iter_4.pth'
    source_bytes = source.read_bytes()
    hard = str(tmp_path / 'hard.pth')
    out = tool('export_hard_ratios.py', config, str(tmp_path / 'w' / 'iter_4.pth'), hard,
               '--finetune', '--work-dir', str(tmp_path / 'ft'), '--deploy-out',
               str(tmp_path / 'deploy.pth'), '--cfg-options', *options, 'train_cfg.max_iters=2')
    assert 'SN layers folded away' in out
    checkpoint = torch.load(hard, weights_only=True)
    assert checkpoint['meta']['hard_ratios']['finetuned']
    logits = [v for k, v in checkpoint['state_dict'].items() if k.endswith('_logits')]
    assert logits and all(sorted(v.softmax(0).tolist())[-1] == 1.0 for v in logits)
    deploy = torch.load(tmp_path / 'deploy.pth', weights_only=True)
    assert set(deploy['meta']['deploy_plan'].values()) <= {'folded', 'affine', 'instance_norm',
                                                            'group_norm', 'fused'}
    metrics = []
    for extra in ([], ['--deploy']):
        path = str(tmp_path / f'm{len(metrics)}.json')
        tool('test.py', config, hard, '--work-dir', str(tmp_path / 't'), '--metrics-out', path,
             '--cfg-options', *options, *extra)
        metrics.append(json.load(open(path))['accuracy/top1'])
    assert metrics[0] == metrics[1]  # the deploy form predicts what the hard model predicts
    # The source checkpoint is only read, and the output says where it came from.
    assert source.read_bytes() == source_bytes
    assert checkpoint['meta']['hard_ratios']['source_checkpoint'] == str(source)


def test_deploy_hook_logs_each_layers_choices():
    """DeployHook's log names every layer's (mu, sigma) choice (it printed '?' for all)."""
    from types import SimpleNamespace

    from mmnorm.engine import DeployHook
    model = nn.Sequential(nn.Conv2d(3, 8, 3), SwitchableNorm(8), nn.Conv2d(8, 8, 1),
                          SwitchableNorm(8))
    expected = _set_choices(model)
    harden_ratios(model)
    messages = []
    runner = SimpleNamespace(model=model, logger=SimpleNamespace(info=messages.append))
    DeployHook().before_test(runner)
    log = messages[0]
    assert '?' not in log
    for name, (mean_choice, var_choice) in expected.items():
        assert any(line.split()[:3] == [name, mean_choice, var_choice]
                   for line in log.splitlines()), (name, log)
