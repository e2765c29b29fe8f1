# Copyright (c) mmnorm contributors. All rights reserved.
"""tools/convert_checkpoint.py on checkpoints saved by networks laid out as the authors' released
code lays them out (tests/helpers/authors.py, authors_ssn.py): SN with BN in Omega, the
micro-batch SN without BN (no running buffers at all), Sparse SN (some ratio vectors fixed, the
others SparsestMax at the saved radius), and BCN + WS. The converted mmpretrain model must give
the logits of the source network, run in float64 as its authors run it."""
import os.path as osp
import sys

import pytest
import torch

import mmnorm  # noqa: F401
from tests.conftest import ROOT
from tests.helpers.authors import authors_checkpoint, trained_authors_model
from tests.helpers.authors_ssn import AuthorsSSN, trained_authors_ssn

sys.path.insert(0, osp.join(ROOT, 'tools'))
import convert_checkpoint  # noqa: E402

KINDS = {'sn': ('sn', True), 'sn-nobn': ('sn', False), 'ssn': ('ssn', True),
         'bcn': ('bcn', True)}


def _save_source(tmp_path, kind):
    fmt, using_bn = KINDS[kind]
    if fmt == 'ssn':
        model, optimizer = trained_authors_ssn()
    else:
        model, optimizer = trained_authors_model(fmt, using_bn=using_bn)
    src = tmp_path / f'{kind}.pth.tar'
    torch.save(authors_checkpoint(model, optimizer), src)
    return model, str(src)


def _convert(src, dst, fmt, *extra):
    return convert_checkpoint.main([src, str(dst), '--format', fmt, *extra])


def _converted_model(dst):
    checkpoint = torch.load(dst, weights_only=True)
    arch = checkpoint['meta']['architecture']
    from mmnorm.convert import ResNetSpec
    norm = arch['norm_cfg']
    spec = ResNetSpec(arch['depth'], 'basic', (2, 2, 2, 2), arch['num_classes'],
                      norm['type'].lower(),
                      num_ratios=3 if norm.get('using_bn', True) else 2,
                      num_groups=norm.get('num_groups', 32),
                      source_momentum=checkpoint['meta']['source_momentum'])
    model = convert_checkpoint.build_target(spec)
    model.load_state_dict(checkpoint['state_dict'], strict=True)
    return model, checkpoint


@pytest.mark.parametrize('kind', list(KINDS))
def test_converted_logits_equal_the_authors_network(tmp_path, kind):
    source_model, src = _save_source(tmp_path, kind)
    fmt = KINDS[kind][0]
    if kind == 'sn-nobn':
        assert not any('running' in k for k in torch.load(src)['state_dict'])
    result = _convert(src, tmp_path / 'out.pth', fmt, '--verify', '--verify-size', '64')
    assert result['report'] == [] and result['relative_difference'] < 1e-5
    model, checkpoint = _converted_model(tmp_path / 'out.pth')
    model.double().eval()
    source_model.double().eval()
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = source_model(x)
        actual = model(x, mode='tensor')
    relative = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert relative <= 1e-9, relative
    if fmt == 'sn':
        assert checkpoint['meta']['architecture']['norm_cfg']['using_bn'] == (kind == 'sn')
    if fmt == 'ssn':  # the radius and the fixed vectors, layer by layer
        assert checkpoint['meta']['architecture']['type'] == 'ResNetV1SSN'
        fixed = 0
        for name, layer in source_model.named_modules():
            if isinstance(layer, AuthorsSSN):
                converted = model.backbone.get_submodule(name.replace('sn', 'ssn'))
                assert float(converted.radius) == float(layer.radius)
                for kind in ('mean', 'var'):
                    choice = int(getattr(converted, f'{kind}_choice'))
                    if int(getattr(layer, f'{kind}_fixed')):
                        fixed += 1
                        assert choice == int(getattr(layer, f'{kind}_weight').argmax())
                    else:
                        assert choice == -1
        assert 0 < fixed < 40  # both kinds were converted


def test_estimated_bcn_layout_converts_to_estimate_mode(tmp_path):
    """The BCN authors' micro-batch layer (BCNorm(estimate=True): its batch norm ``bn``, an
    EstBN with an ``estbn_moving_speed`` buffer) converts to BCN(estimate=True) with that rate;
    it was refused (unused keys) or, with --allow-partial, became a BCN without estimates."""
    source_model, src = _save_source(tmp_path, 'bcn')
    checkpoint = torch.load(src, weights_only=True)
    state, rates = {}, {}
    for key, value in checkpoint['state_dict'].items():  # 'module.x.bn1.pbn.y' -> 'x.bn1.bn.y'
        key = key.replace('module.', '', 1).replace('.pbn.', '.bn.')
        state[key] = value
        if key.endswith('.bn.running_mean'):
            norm = key[:-len('.bn.running_mean')]
            rates[norm] = 0.01 * (len(rates) + 1)
            state[f'{norm}.bn.estbn_moving_speed'] = torch.tensor([rates[norm]])
    checkpoint['state_dict'] = state
    torch.save(checkpoint, src)
    result = _convert(src, tmp_path / 'out.pth', 'bcn', '--verify', '--verify-size', '64')
    assert result['report'] == [] and result['relative_difference'] < 1e-5
    converted = torch.load(tmp_path / 'out.pth', weights_only=True)
    arch = converted['meta']['architecture']
    groups = state['bn1.weight'].numel()
    assert arch['norm_cfg'] == dict(type='BCN', num_groups=groups, estimate=True)
    from mmnorm.convert import ResNetSpec
    model = convert_checkpoint.build_target(ResNetSpec(
        arch['depth'], 'basic', (2, 2, 2, 2), arch['num_classes'], 'bcn', num_groups=groups,
        estimate=True))
    model.load_state_dict(converted['state_dict'], strict=True)
    layers = {name: m for name, m in model.backbone.named_modules()
              if isinstance(m, mmnorm.BatchChannelNorm)}
    assert len(layers) == len(rates) == 20 and all(m.estimate for m in layers.values())
    for norm, rate in rates.items():  # 'layer1.0.bn1' -> 'layer1.0.bcn1'; downsample.1 kept
        head, _, last = norm.rpartition('.')
        name = (head + '.' if head else '') + last.replace('bn', 'bcn')
        assert float(layers[name].estimate_rate) == pytest.approx(rate), name


def test_momentum_convention_is_carried_over(tmp_path):
    """The authors keep 0.9 of the old running value; the converted layers (PyTorch convention,
    momentum 0.1) must move their running means exactly as the authors' layers do."""
    source_model, src = _save_source(tmp_path, 'sn')
    _convert(src, tmp_path / 'out.pth', 'sn')
    model, checkpoint = _converted_model(tmp_path / 'out.pth')
    assert checkpoint['meta']['architecture']['norm_cfg']['momentum'] == pytest.approx(0.1)
    assert checkpoint['meta']['source_momentum'] == 0.9
    model.double().train()
    source_model.double().train()
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    model(x, mode='tensor')
    source_model(x)
    for name in ('sn1', 'layer2.0.sn2', 'layer4.1.sn2'):
        expected = source_model.get_submodule(name).running_mean.flatten()
        actual = model.backbone.get_submodule(name).running_mean
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('kind', ['sn', 'sn-nobn'])
def test_missing_key_is_named(tmp_path, kind, capsys):
    _, src = _save_source(tmp_path, kind)
    checkpoint = torch.load(src)
    del checkpoint['state_dict']['module.layer3.1.sn1.var_weight']
    if kind == 'sn':
        del checkpoint['state_dict']['module.layer2.0.downsample.1.running_var']
    torch.save(checkpoint, src)
    with pytest.raises(SystemExit, match='nothing written'):
        _convert(src, tmp_path / 'out.pth', 'sn')
    out = capsys.readouterr().out
    assert "missing source key 'layer3.1.sn1.var_weight'" in out
    if kind == 'sn':
        assert "missing source key 'layer2.0.downsample.1.running_var'" in out
    else:  # no running buffers are asked for in a model without BN
        assert 'running_mean' not in out and 'running_var' not in out
    assert not (tmp_path / 'out.pth').exists()


@pytest.mark.parametrize('kind', ['sn', 'sn-nobn'])
def test_wrong_shape_is_named(tmp_path, kind, capsys):
    _, src = _save_source(tmp_path, kind)
    checkpoint = torch.load(src)
    state = checkpoint['state_dict']
    if kind == 'sn':  # a running mean of 129 channels in a 128-channel layer
        state['module.layer2.1.sn1.running_mean'] = torch.zeros(1, 129, 1)
        expected = "'layer2.1.sn1.running_mean' has shape (1, 129, 1) (129 values), expected 128"
    else:  # three ratio logits (IN, LN, BN) in a model whose layers have two
        state['module.layer2.1.sn1.mean_weight'] = torch.zeros(3)
        expected = "'layer2.1.sn1.mean_weight' has shape (3,) (3 values), expected 2"
    torch.save(checkpoint, src)
    with pytest.raises(SystemExit, match='nothing written'):
        _convert(src, tmp_path / 'out.pth', 'sn')
    assert expected in capsys.readouterr().out
    assert not (tmp_path / 'out.pth').exists()


def test_ssn_momentum_and_wrong_format(tmp_path, capsys):
    """The Sparse SN authors keep 0.997 of the old running value (momentum 0.003 here, moving
    the running means as theirs do); an SSN checkpoint is refused as --format sn and the other
    way round, saying which format to use."""
    source_model, src = _save_source(tmp_path, 'ssn')
    _convert(src, tmp_path / 'out.pth', 'ssn')
    model, checkpoint = _converted_model(tmp_path / 'out.pth')
    assert checkpoint['meta']['architecture']['norm_cfg']['momentum'] == pytest.approx(0.003)
    assert checkpoint['meta']['source_momentum'] == 0.997
    model.double().train()
    source_model.double().train()
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    model(x, mode='tensor')
    source_model(x)
    for name in ('sn1', 'layer2.0.sn2', 'layer4.1.sn2'):
        expected = source_model.get_submodule(name).running_mean.flatten()
        actual = model.backbone.get_submodule(name.replace('sn', 'ssn')).running_mean
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(SystemExit, match='use --format ssn'):
        _convert(src, tmp_path / 'other.pth', 'sn')
    _, sn_src = _save_source(tmp_path, 'sn')
    with pytest.raises(SystemExit, match='not a Sparse SN ResNet'):
        _convert(sn_src, tmp_path / 'other.pth', 'ssn')


def test_ssn_missing_key_and_wrong_shape_are_named(tmp_path, capsys):
    _, src = _save_source(tmp_path, 'ssn')
    checkpoint = torch.load(src)
    state = checkpoint['state_dict']
    del state['module.layer3.1.sn1.var_weight']
    del state['module.layer1.0.sn2.radius']
    state['module.layer2.1.sn1.mean_fixed'] = torch.zeros(2, dtype=torch.long)
    torch.save(checkpoint, src)
    with pytest.raises(SystemExit, match='nothing written'):
        _convert(src, tmp_path / 'out.pth', 'ssn')
    out = capsys.readouterr().out
    assert "missing source key 'layer3.1.sn1.var_weight'" in out
    assert "missing source key 'layer1.0.sn2.radius'" in out
    assert "'layer2.1.sn1.mean_fixed' has shape (2,) (2 values), expected 1" in out
    assert not (tmp_path / 'out.pth').exists()
