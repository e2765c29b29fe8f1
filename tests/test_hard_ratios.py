# Copyright (c) mmnorm contributors. All rights reserved.
"""Hard ratios and the deploy form (folded / native / fused / groupwise layers) equal the hard-ratio
model; grouped layers (ratio_groups) choose, harden and deploy per group."""
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
from mmnorm.convert import BatchNormNd, InstanceNormNd, hard_choices, harden_ratios, to_deploy
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
    # The finetuning started from the hard checkpoint in its work dir: DST was written once, at
    # the end (an interrupted finetuning would have left no un-finetuned DST).
    start = torch.load(tmp_path / 'ft' / 'hard_ratios.pth', weights_only=True)
    assert not start['meta']['hard_ratios']['finetuned']
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
    DeployHook().before_test_epoch(runner)
    log = messages[0]
    assert '?' not in log
    for name, (mean_choice, var_choice) in expected.items():
        assert any(line.split()[:3] == [name, mean_choice, var_choice]
                   for line in log.splitlines()), (name, log)


def test_deploy_hook_deploys_the_ema_copy_or_refuses():
    """EMAHook swaps its averaged copy's tensors back, in order, after the test: DeployHook
    deploys the copy too, and refuses when the two chose differently (their tensors would not
    pair)."""
    from types import SimpleNamespace

    from mmengine.hooks import EMAHook

    from mmnorm.engine import DeployHook

    def model(choice):
        net = nn.Sequential(nn.Conv2d(3, 8, 3), SwitchableNorm(8))
        with torch.no_grad():
            for logits in (net[1].mean_logits, net[1].var_logits):
                logits.copy_(torch.tensor([2.0, -2.0, -2.0]) if choice == 'IN'
                             else torch.tensor([-2.0, -2.0, 2.0]))
        harden_ratios(net)
        return net

    for averaged_choice, fails in (('BN', False), ('IN', True)):
        ema = EMAHook()
        ema.ema_model = SimpleNamespace(module=model(averaged_choice))
        runner = SimpleNamespace(model=model('BN'), logger=SimpleNamespace(info=print),
                                 hooks=[ema], iter=0, epoch=0)
        if fails:
            with pytest.raises(RuntimeError, match='chose other normalizers'):
                DeployHook().before_test_epoch(runner)
        else:
            DeployHook().before_test_epoch(runner)
            assert isinstance(ema.ema_model.module[1], nn.Identity)  # folded as the model's


# Grouped layers (ratio_groups=G): choices per group, the one-pass deploy module, what folds.

#: (μ, σ) choices per group of a (C=16, G=4) layer: four contiguous channels each.
GROUPED = {
    'mixed': (('IN', 'BN', 'LN', 'IN'), ('IN', 'BN', 'LN', 'BN')),  # LN, and μ != σ in group 3
    'in_bn': (('BN', 'IN', 'IN', 'BN'), ('BN', 'IN', 'IN', 'BN')),  # no LN: IBN-Net's split
    'bn': (('BN', ) * 4, ('BN', ) * 4),
    'in': (('IN', ) * 4, ('IN', ) * 4),
    'ln': (('LN', ) * 4, ('LN', ) * 4),
}


def _grouped_layer(cls, pattern, in_unbiased=False, dtype=torch.float64, **kwargs):
    """A (C=16, G=4) layer with trained-looking state whose argmax per group is ``pattern``'s
    (soft ratios: a margin of 2 over noise); returns it and the expected (μ, σ) choices."""
    gen = torch.Generator().manual_seed(3)
    layer = cls(16, ratio_groups=4, **kwargs).to(dtype)
    mean_choice, var_choice = GROUPED[pattern]
    if cls.tied_ratios:
        var_choice = mean_choice
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5, generator=gen)
        layer.bias.normal_(0, 0.3, generator=gen)
        if layer.running_mean is not None:
            layer.running_mean.normal_(0, 0.5, generator=gen)
            layer.running_var.uniform_(0.5, 2.0, generator=gen)
        logits = layer._logits()
        for logit, choice in zip(logits if len(logits) == 2 else logits * 2,
                                 (mean_choice, var_choice)):
            logit.normal_(0, 0.3, generator=gen)
            for group, name in enumerate(choice):
                logit[group, INDEX[name]] += 2.0
    layer.in_unbiased = in_unbiased
    return layer, (mean_choice, var_choice)


def _oracle(x, layer, mean_choice, var_choice, in_unbiased):
    """The hardened grouped layer in eval, from plain torch ops, channel by channel: channel c
    of group c // (C / G) takes its mean from ``mean_choice[group]`` and its variance from
    ``var_choice[group]``; IN over space, LN over the sample (pooled from the corrected IN
    variance with ``in_unbiased``, as the layers compute it), BN the running buffers."""
    n_samples, channels = x.shape[:2]
    per_group = channels // len(mean_choice)
    out = torch.empty_like(x)
    for n in range(n_samples):
        means = torch.stack([x[n, c].mean() for c in range(channels)])
        variances = torch.stack([x[n, c].var(unbiased=in_unbiased) for c in range(channels)])
        ln_mean = x[n].mean()
        ln_var = (variances.mean() + ((means - ln_mean)**2).mean() if in_unbiased
                  else x[n].var(unbiased=False))
        for c in range(channels):
            group = c // per_group
            stats = {'IN': (means[c], variances[c]), 'LN': (ln_mean, ln_var),
                     'BN': (layer.running_mean[c], layer.running_var[c])}
            mu, var = stats[mean_choice[group]][0], stats[var_choice[group]][1]
            out[n, c] = (x[n, c] - mu) / torch.sqrt(var + layer.eps) * layer.weight[c] \
                + layer.bias[c]
    return out


def test_grouped_choices_and_summary():
    from mmnorm.convert import choice_label, summarize
    grouped, expected = _grouped_layer(SwitchableNorm, 'mixed')
    plain = SwitchableNorm(16)
    with torch.no_grad():
        plain.var_logits[2] += 1.0
    model = nn.Sequential(grouped, plain)
    assert hard_choices(model) == {'0': expected, '1': ('IN', 'BN')}
    assert choice_label(('IN', 'IN', 'BN', 'BN')) == 'IN×2,BN×2'
    assert choice_label(('IN', 'BN', 'IN')) == 'IN,BN,IN'
    assert choice_label('BN') == 'BN'
    choices = harden_ratios(model)
    assert choices == {'0': expected, '1': ('IN', 'BN')}
    for ratios in grouped.ratios():  # every group one-hot, at its own argmax
        assert ratios.shape == (4, 3) and set(ratios.flatten().tolist()) == {0.0, 1.0}
    assert hard_choices(model) == choices
    summary = summarize(to_deploy(model.eval()), choices)
    assert summary.splitlines()[1].split() == ['0', 'IN,BN,LN,IN', 'IN,BN,LN,BN', 'groupwise']
    assert summary.splitlines()[2].split() == ['1', 'IN', 'BN', 'fused']
    assert summary.splitlines()[-1].startswith(
        'folded: 0, affine: 0, instance_norm: 0, group_norm: 0, fused: 1, groupwise: 1 --')
    # Without grouped layers the summary is what it was (no groupwise count).
    ungrouped = summarize({'a': 'folded'}, {'a': ('BN', 'BN')})
    assert ungrouped.splitlines()[-1] == ('folded: 1, affine: 0, instance_norm: 0, group_norm: 0,'
                                          ' fused: 0 -- 100% of 1 SN layers folded away')


def _fewest_ops(monkeypatch):
    """Take the ops the layers take on CUDA (the CPU takes simpler passes, see
    FEW_LAUNCHES_NOT_NEEDED)."""
    from mmnorm.functional import row_affine
    monkeypatch.setattr(row_affine, 'FEW_LAUNCHES_NOT_NEEDED', ())


@pytest.mark.parametrize('fewest_ops', [False, True])
@pytest.mark.parametrize('pattern', ['mixed', 'in_bn'])
@pytest.mark.parametrize('norm, in_unbiased, mix', [
    ('SN', False, 'var'), ('SN', True, 'var'), ('SN', False, 'std'), ('SN_tied', False, 'var'),
    ('SSN', False, 'var'), ('SSN', True, 'var'),
])
def test_groupwise_deploy_equals_hardened_layer_and_oracle(norm, in_unbiased, mix, pattern,
                                                          fewest_ops, monkeypatch):
    """Groups that chose differently: one GroupwiseHardNorm, equal to the hardened layer in eval
    and to a per-channel oracle (float64), after a conv that stays as it is; in the CPU's passes
    and in those of CUDA (and of traced graphs)."""
    from mmnorm import SparseSwitchableNorm
    from mmnorm.convert import GroupwiseHardNorm
    if fewest_ops:
        _fewest_ops(monkeypatch)
    cls = {'SN': SwitchableNorm, 'SN_tied': SwitchableNormTied, 'SSN': SparseSwitchableNorm}[norm]
    layer, (mean_choice, var_choice) = _grouped_layer(cls, pattern, in_unbiased, mix=mix)
    conv = nn.Conv2d(8, 16, 3).double()
    model = nn.Sequential(conv, layer)
    harden_ratios(model)
    model.eval()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 8, 7, 9, dtype=torch.float64, generator=gen) * 2 + 0.5
    with torch.no_grad():
        features = conv(x)
        hard = model(x)
        oracle = _oracle(features, layer, mean_choice, var_choice, in_unbiased)
        torch.testing.assert_close(hard, oracle, rtol=1e-10, atol=1e-12)
        plan = to_deploy(model)
        deployed = model(x)
    assert plan == {'1': 'groupwise'}
    assert model[0] is conv and type(model[1]) is GroupwiseHardNorm
    assert model[1].uses_ln == (pattern == 'mixed')
    torch.testing.assert_close(deployed, hard, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(deployed, oracle, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('pattern, in_unbiased, after_conv, action', [
    ('bn', False, True, 'folded'), ('bn', True, True, 'folded'), ('bn', False, False, 'affine'),
    ('in', False, True, 'instance_norm'), ('ln', False, True, 'group_norm'),
    ('in', True, True, 'groupwise'), ('ln', True, False, 'groupwise'),
])
def test_grouped_layer_with_one_choice_deploys_as_ungrouped(pattern, in_unbiased, after_conv,
                                                           action):
    """Every group BN for μ and σ: the whole layer folds into the conv (or a native eval BN);
    all IN / all LN: the native kernels, unless the IN variance is unbiased (then the one-pass
    module, which corrects it as the layer does)."""
    layer, _ = _grouped_layer(SwitchableNorm, pattern, in_unbiased)
    conv = nn.Conv2d(8, 16, 3).double()
    model = nn.Sequential(conv, layer) if after_conv else nn.Sequential(nn.ReLU(), layer)
    harden_ratios(model)
    model.eval()
    x = torch.randn(3, 8, 7, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    if not after_conv:
        x = conv(x).detach()
    with torch.no_grad():
        hard = model(x)
        plan = to_deploy(model)
        deployed = model(x)
    assert plan == {'1': action}
    if action == 'folded':
        assert type(model[0]) is nn.Conv2d and model[0] is not conv
        assert isinstance(model[1], nn.Identity)
    else:
        expected = {'affine': BatchNormNd, 'instance_norm': InstanceNormNd,
                    'group_norm': nn.GroupNorm}.get(action)
        assert expected is None or type(model[1]) is expected
    torch.testing.assert_close(deployed, hard, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('pattern, action', [
    ('bn', 'affine'), ('in', 'instance_norm'), ('ln', 'group_norm')])
@pytest.mark.parametrize('shape', [(16, 16, 5), (2, 16, 3, 4, 2), (3, 16, 2, 1)])
def test_deployed_natives_take_every_input_rank(pattern, action, shape):
    # The layers take (N, C, *): so must what replaces them. BatchNorm2d refused 3-D and 5-D
    # inputs, and InstanceNorm2d read a 3-D input as one unbatched (C, L) image (wrong where
    # N == C, the first shape). The deployed model still traces with torch.fx and scripts.
    layer, _ = _grouped_layer(SwitchableNorm, pattern)
    model = nn.Sequential(nn.ReLU(), layer)
    harden_ratios(model)
    model.eval()
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        hard = model(x)
        assert to_deploy(model) == {'1': action}
        torch.testing.assert_close(model(x), hard, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), hard, rtol=1e-10,
                                   atol=1e-12)
        torch.testing.assert_close(torch.jit.script(model)(x), hard, rtol=1e-10, atol=1e-12)
    assert isinstance(model[1], (nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm))


def test_grouped_bn_choice_without_running_stats_stays_fused():
    """BN in eval without running buffers uses the batch: the layer stays one fused SN layer
    (a plain SN with the same one-hot ratios, per group)."""
    from mmnorm import SparseSwitchableNorm
    layer, _ = _grouped_layer(SparseSwitchableNorm, 'mixed', track_running_stats=False)
    model = nn.Sequential(layer)
    harden_ratios(model)
    model.eval()
    x = torch.randn(3, 16, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        hard = model(x)
        assert to_deploy(model) == {'0': 'fused'}
        assert type(model[0]) is SwitchableNorm
        for ratios, fused in zip(layer.ratios(), model[0].ratios()):
            assert torch.equal(ratios, fused)
        torch.testing.assert_close(model(x), hard, rtol=1e-10, atol=1e-12)


def _groupwise_module(pattern):
    from mmnorm.convert import GroupwiseHardNorm
    layer, _ = _grouped_layer(SwitchableNorm, pattern, dtype=torch.float32)
    harden_ratios(nn.Sequential(layer))
    return layer.eval(), GroupwiseHardNorm.from_layer(layer).eval()


def test_groupwise_exports_traces_and_runs_in_onnx_runtime(tmp_path):
    ort = pytest.importorskip('onnxruntime')
    _, module = _groupwise_module('mixed')
    gen = torch.Generator().manual_seed(7)
    inputs = {n: torch.randn(n, 16, 6, 10, generator=gen) * 3 + 1 for n in (1, 2, 5)}
    with torch.no_grad():
        expected = {n: module(x) for n, x in inputs.items()}
        traced = torch.jit.trace(module, (inputs[2], ))
        exported = torch.export.export(module, (inputs[2], ),
                                       dynamic_shapes=({0: torch.export.Dim('batch')}, ))
    for n, x in inputs.items():
        torch.testing.assert_close(exported.module()(x), expected[n], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(traced(inputs[2]), expected[2], rtol=1e-5, atol=1e-5)
    path = str(tmp_path / 'groupwise.onnx')
    torch.onnx.export(module, (inputs[2], ), path, dynamo=True, opset_version=17,
                      dynamic_shapes=({0: torch.export.Dim('batch')}, ))
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    for n, x in inputs.items():
        (out, ) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), expected[n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('pattern, bound', [('in_bn', 7), ('mixed', 12)])
def test_groupwise_forward_is_a_few_ops(pattern, bound, monkeypatch):
    """As on CUDA: one reduction of the input (var_mean), a few (N, C) ops, one elementwise
    pass (addcmul); LN adds a pooling of the IN moments (a var_mean and a mean on (N, C)) and
    two multiply-adds. The hardened layer takes 14, with two reductions of the input."""
    from mmnorm.analysis.launches import step_ops
    _fewest_ops(monkeypatch)
    layer, module = _groupwise_module(pattern)
    x = torch.randn(2, 16, 14, 14)
    ops = step_ops(module, x, train=False)
    assert sum(ops.values()) <= bound, ops
    assert ops['aten.var_mean.correction'] == (2 if pattern == 'mixed' else 1), ops
    step_ops(layer, x, train=False)  # the hardened layer
    layer_ops = step_ops(layer, x, train=False)
    assert sum(layer_ops.values()) >= sum(ops.values()), (layer_ops, ops)
    assert layer_ops['aten.var_mean.correction'] == 2, layer_ops  # both of the full input


def test_export_tool_on_grouped_layers(tmp_path):
    """tools/export_hard_ratios.py on a checkpoint with ratio_groups=4: every group hardened,
    the choices printed and saved per group, and the deploy form (rebuilt from the config with
    to_deploy) equal to the hard model."""
    from mmnorm.convert import GroupwiseHardNorm
    from mmnorm.utils.model import build_model, load_config
    config = osp.join(ROOT, 'tests', 'data', 'configs', 'tiny_classifier.py')
    options = ['model.backbone.norm_cfg.ratio_groups=4']
    cfg = load_config(config, {'model.backbone.norm_cfg.ratio_groups': 4})
    model = build_model(cfg)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, SwitchableNorm)]
    gen = torch.Generator().manual_seed(8)
    patterns = ['mixed', 'bn', 'in_bn', 'in']
    expected = {}
    with torch.no_grad():
        for i, (name, layer) in enumerate(layers):
            mean_choice, var_choice = GROUPED[patterns[i % len(patterns)]]
            layer.running_mean.normal_(0, 0.2, generator=gen)
            layer.running_var.uniform_(0.5, 2.0, generator=gen)
            for logit, choice in zip(layer._logits(), (mean_choice, var_choice)):
                logit.normal_(0, 0.3, generator=gen)
                for group, normalizer in enumerate(choice):
                    logit[group, INDEX[normalizer]] += 2.0
            expected[name] = (mean_choice, var_choice)
    source = str(tmp_path / 'grouped.pth')
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, source)
    hard, deploy_path = str(tmp_path / 'hard.pth'), str(tmp_path / 'deploy.pth')
    env = dict(__import__('os').environ,
               PYTHONPATH=ROOT + ':' + __import__('os').environ.get('PYTHONPATH', ''))
    result = subprocess.run(
        [sys.executable, osp.join(ROOT, 'tools', 'export_hard_ratios.py'), config, source, hard,
         '--deploy-out', deploy_path, '--cfg-options', *options],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert f'{len(layers)} with ratio groups, one-hot in every group' in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()
            if line.split() and line.split()[0] in expected}
    from mmnorm.convert import choice_label
    for name, (mean_choice, var_choice) in expected.items():
        assert rows[name][:2] == [choice_label(mean_choice), choice_label(var_choice)], name
    checkpoint = torch.load(hard, weights_only=True)
    assert checkpoint['meta']['hard_ratios']['choices'] == {
        name: [list(mean_choice), list(var_choice)]
        for name, (mean_choice, var_choice) in expected.items()}
    for key, value in checkpoint['state_dict'].items():
        if key.endswith('_logits'):  # (G, K), one-hot in every group
            assert value.shape == (4, 3) and (value.softmax(-1).amax(-1) == 1.0).all(), key
    plan = torch.load(deploy_path, weights_only=True)['meta']['deploy_plan']
    assert set(plan.values()) == {'groupwise', 'folded', 'instance_norm'}
    # The deploy form: rebuilt with to_deploy on the hard model, the saved state loaded.
    hard_model = build_model(cfg, hard).eval()
    x = torch.randn(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        reference = hard_model(x, mode='tensor')
        assert to_deploy(hard_model) == plan
        hard_model.load_state_dict(torch.load(deploy_path, weights_only=True)['state_dict'])
        deployed = hard_model(x, mode='tensor')
    assert sum(isinstance(m, GroupwiseHardNorm) for m in hard_model.modules()) == \
        sum(1 for a in plan.values() if a == 'groupwise')
    torch.testing.assert_close(deployed, reference, rtol=1e-5, atol=1e-5)
