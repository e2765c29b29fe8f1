# Copyright (c) mmnorm contributors. All rights reserved.
"""tools/convert_checkpoint.py on checkpoints built in the authors' layouts from the published
architecture; the converted model against an independent forward written here."""
import hashlib
import os.path as osp
import sys

import pytest
import torch
import torch.nn.functional as F

import mmnorm  # noqa: F401
from mmnorm.testing import oracles
from tests.conftest import ROOT

sys.path.insert(0, osp.join(ROOT, 'tools'))
import convert_checkpoint  # noqa: E402

LAYOUTS = {  # depth: (block, blocks per stage)
    18: ('basic', (2, 2, 2, 2)),
    50: ('bottleneck', (3, 4, 6, 3)),
}


def _norm_state(gen, prefix, channels, fmt, ratios=3, groups=4, bn_prefix='pbn'):
    def rand(*shape, scale=1.0, positive=False):
        t = torch.randn(*shape, generator=gen) * scale
        return t.abs() + 0.5 if positive else t

    if fmt == 'sn':
        state = {f'{prefix}.weight': rand(1, channels, 1, 1, positive=True),
                 f'{prefix}.bias': rand(1, channels, 1, 1, scale=0.1),
                 f'{prefix}.mean_weight': rand(ratios), f'{prefix}.var_weight': rand(ratios)}
        if ratios == 3:  # the authors' layer has running buffers only with BN in Omega
            state.update({f'{prefix}.running_mean': rand(1, channels, 1, scale=0.1),
                          f'{prefix}.running_var': rand(1, channels, 1, positive=True)})
        return state
    bn = f'{prefix}.{bn_prefix}'
    return {f'{bn}.weight': rand(channels, positive=True), f'{bn}.bias': rand(channels, scale=0.1),
            f'{bn}.running_mean': rand(channels, scale=0.1),
            f'{bn}.running_var': rand(channels, positive=True),
            f'{bn}.num_batches_tracked': torch.tensor(100),
            f'{prefix}.weight': rand(1, groups, 1, positive=True),
            f'{prefix}.bias': rand(1, groups, 1, scale=0.1)}


def make_source(fmt, depth=18, ratios=3, bn_prefix='pbn', num_classes=10, seed=0,
                module_prefix=True):
    """A released-style state dict: torchvision ResNet keys, the format's norm layers."""
    gen = torch.Generator().manual_seed(seed)
    block, blocks = LAYOUTS[depth]
    tag = 'sn' if fmt == 'sn' else 'bn'
    expansion = 4 if block == 'bottleneck' else 1
    state = {}

    def conv(name, cout, cin, k):
        std = (2 / (cin * k * k)) ** 0.5
        state[f'{name}.weight'] = torch.randn(cout, cin, k, k, generator=gen) * std

    def norm(name, channels):
        state.update(_norm_state(gen, name, channels, fmt, ratios, bn_prefix=bn_prefix))

    conv('conv1', 64, 3, 7)
    norm(f'{tag}1', 64)
    inplanes = 64
    for stage, count in enumerate(blocks, start=1):
        planes = 64 * 2 ** (stage - 1)
        for index in range(count):
            name = f'layer{stage}.{index}'
            if block == 'bottleneck':
                conv(f'{name}.conv1', planes, inplanes, 1)
                norm(f'{name}.{tag}1', planes)
                conv(f'{name}.conv2', planes, planes, 3)
                norm(f'{name}.{tag}2', planes)
                conv(f'{name}.conv3', planes * 4, planes, 1)
                norm(f'{name}.{tag}3', planes * 4)
            else:
                conv(f'{name}.conv1', planes, inplanes, 3)
                norm(f'{name}.{tag}1', planes)
                conv(f'{name}.conv2', planes, planes, 3)
                norm(f'{name}.{tag}2', planes)
            if index == 0 and (stage > 1 or inplanes != planes * expansion):
                conv(f'{name}.downsample.0', planes * expansion, inplanes, 1)
                norm(f'{name}.downsample.1', planes * expansion)
            inplanes = planes * expansion
    state['fc.weight'] = torch.randn(num_classes, inplanes, generator=gen) * 0.01
    state['fc.bias'] = torch.zeros(num_classes)
    if module_prefix:
        state = {f'module.{k}': v for k, v in state.items()}
    return state


def independent_forward(state, fmt, depth, x):
    """The source network (eval), composed from the test oracles (mmnorm/testing/oracles.py)."""
    state = {k.replace('module.', '', 1): v.double() for k, v in state.items()}
    block, blocks = LAYOUTS[depth]
    tag = 'sn' if fmt == 'sn' else 'bn'

    def conv(name, h, stride=1, padding=0):
        w = state[f'{name}.weight']
        return F.conv2d(h, oracles.standardize(w) if fmt == 'bcn' else w, None, stride, padding)

    def norm(name, h):
        if fmt == 'sn':
            return oracles.sn(h, state[f'{name}.mean_weight'], state[f'{name}.var_weight'],
                              state[f'{name}.weight'].flatten(), state[f'{name}.bias'].flatten(),
                              bn_stats=(state[f'{name}.running_mean'].flatten(),
                                        state[f'{name}.running_var'].flatten())
                              if f'{name}.running_mean' in state else None,
                              in_unbiased=True)
        bn = [k for k in state if k.startswith(f'{name}.') and k.endswith('running_mean')][0]
        bn = bn[:-len('.running_mean')]
        return oracles.bcn(h, state[f'{name}.weight'].numel(), state[f'{name}.weight'].flatten(),
                           state[f'{name}.bias'].flatten(), state[f'{bn}.weight'],
                           state[f'{bn}.bias'],
                           bn_stats=(state[f'{bn}.running_mean'], state[f'{bn}.running_var']))

    h = F.max_pool2d(F.relu(norm(f'{tag}1', conv('conv1', x.double(), 2, 3))), 3, 2, 1)
    for stage, count in enumerate(blocks, start=1):
        for index in range(count):
            name = f'layer{stage}.{index}'
            stride = 2 if stage > 1 and index == 0 else 1
            if block == 'bottleneck':
                out = F.relu(norm(f'{name}.{tag}1', conv(f'{name}.conv1', h)))
                out = F.relu(norm(f'{name}.{tag}2', conv(f'{name}.conv2', out, stride, 1)))
                out = norm(f'{name}.{tag}3', conv(f'{name}.conv3', out))
            else:
                out = F.relu(norm(f'{name}.{tag}1', conv(f'{name}.conv1', h, stride, 1)))
                out = norm(f'{name}.{tag}2', conv(f'{name}.conv2', out, 1, 1))
            if f'{name}.downsample.0.weight' in state:
                h = norm(f'{name}.downsample.1', conv(f'{name}.downsample.0', h, stride))
            h = F.relu(out + h)
    return F.linear(h.mean((2, 3)), state['fc.weight'], state['fc.bias'])


def _convert(tmp_path, source, fmt, *extra):
    src = str(tmp_path / 'src.pth')
    dst = str(tmp_path / 'dst.pth')
    torch.save(source, src)
    result = convert_checkpoint.main([src, dst, '--format', fmt, *extra])
    return dst, result


def _converted_logits(dst, x):
    checkpoint = torch.load(dst, weights_only=True)
    model = convert_checkpoint.build_target(_spec_from(checkpoint))
    model.load_state_dict(checkpoint['state_dict'])
    model.eval()
    with torch.no_grad():
        return model(x, mode='tensor')


def _spec_from(checkpoint):
    from mmnorm.convert import ResNetSpec
    arch = checkpoint['meta']['architecture']
    block, blocks = LAYOUTS[arch['depth']]
    norm = arch['norm_cfg']
    return ResNetSpec(arch['depth'], block, blocks, arch['num_classes'],
                      'sn' if norm['type'] == 'SN' else 'bcn',
                      num_ratios=3 if norm.get('using_bn', True) else 2,
                      num_groups=norm.get('num_groups', 32))


@pytest.mark.parametrize('fmt, depth, variant', [
    ('sn', 18, 3), ('sn', 18, 2), ('sn', 50, 3), ('bcn', 18, 'pbn'), ('bcn', 18, 'bn'),
])
def test_round_trip_matches_independent_forward(tmp_path, fmt, depth, variant):
    kwargs = dict(ratios=variant) if fmt == 'sn' else dict(bn_prefix=variant)
    source = make_source(fmt, depth, **kwargs)
    dst, result = _convert(tmp_path, source, fmt, '--verify', '--verify-size', '64')
    assert result['report'] == [] and result['relative_difference'] < 1e-5
    checkpoint = torch.load(dst, weights_only=True)
    assert checkpoint['meta']['format'] == fmt
    assert checkpoint['meta']['converted_from'] == str(tmp_path / 'src.pth')
    expected = hashlib.sha256((tmp_path / 'src.pth').read_bytes()).hexdigest()
    assert checkpoint['meta']['source_sha256'] == expected
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    logits = _converted_logits(dst, x).double()
    expected = independent_forward(source, fmt, depth, x)
    relative = ((logits - expected).abs().max() / expected.abs().max()).item()
    assert relative <= 1e-4, relative
    if fmt == 'sn':
        assert bool(checkpoint['state_dict']['backbone.layer1.0.sn1.in_var_unbiased'])
        assert checkpoint['state_dict']['backbone.sn1.mean_logits'].numel() == variant


def test_missing_key_is_named_and_nothing_written(tmp_path, capsys):
    source = make_source('sn', 18)
    del source['module.layer2.1.sn2.var_weight']
    with pytest.raises(SystemExit, match='nothing written'):
        _convert(tmp_path, source, 'sn')
    out = capsys.readouterr().out
    assert "missing source key 'layer2.1.sn2.var_weight'" in out
    assert not (tmp_path / 'dst.pth').exists()
    _, result = _convert(tmp_path, source, 'sn', '--allow-partial')  # asked for: written
    assert torch.load(tmp_path / 'dst.pth', weights_only=True)['meta']['partial']
    assert any('var_logits' in line for line in result['report'])


def test_wrong_shape_is_named(tmp_path, capsys):
    source = make_source('bcn', 18, bn_prefix='bn')
    source['module.layer3.0.bn1.bn.weight'] = torch.ones(257)  # layer3 has 256 channels
    with pytest.raises(SystemExit, match='nothing written'):
        _convert(tmp_path, source, 'bcn')
    out = capsys.readouterr().out
    assert 'layer3.0.bn1.bn.bias' in out or 'layer3.0.bn1.bn.weight' in out
    assert 'shape mismatch backbone.layer3.0.bcn1.bn_weight: (257,) vs model (256,)' in out


def test_wrong_format_and_unsafe_source(tmp_path):
    with pytest.raises(SystemExit, match='not an SN ResNet'):
        _convert(tmp_path, make_source('bcn', 18), 'sn')

    class Evil:
        def __reduce__(self):
            return print, ('pwned', )
    torch.save({'state_dict': {'fc.weight': torch.ones(1)}, 'x': Evil()}, tmp_path / 'evil.pth')
    with pytest.raises(SystemExit, match='weights_only=True'):
        convert_checkpoint.main([str(tmp_path / 'evil.pth'), str(tmp_path / 'o.pth'),
                                 '--format', 'sn'])


@pytest.mark.parametrize('config', [
    'configs/mask_rcnn/mask-rcnn_r50_fpn_sn_2x_coco.py',
    'configs/deeplabv2/deeplabv2_r50-d8_sn_8xb1-260k_cityscapes-713x713.py',
])
def test_backbone_loads_into_detection_and_segmentation_configs(tmp_path, config):
    import importlib

    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    from mmengine.runner.checkpoint import _load_checkpoint_with_prefix
    dst, _ = _convert(tmp_path, make_source('sn', 50, module_prefix=False), 'sn')
    cfg = Config.fromfile(osp.join(ROOT, config))
    cfg.model.backbone.init_cfg.checkpoint = dst
    scope = cfg.default_scope
    with DefaultScope.overwrite_default_scope(scope):
        model = importlib.import_module(f'{scope}.registry').MODELS.build(cfg.model)
    backbone_state = _load_checkpoint_with_prefix('backbone.', dst)
    result = model.backbone.load_state_dict(backbone_state, strict=True)  # no missing keys
    assert not result.missing_keys and not result.unexpected_keys
    model.init_weights()  # the config's own init_cfg path
    torch.testing.assert_close(model.backbone.layer3[2].sn2.var_logits,
                               backbone_state['layer3.2.sn2.var_logits'])
    assert model.backbone.sn1.in_unbiased
