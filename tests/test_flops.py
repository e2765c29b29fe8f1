# Copyright (c) mmnorm contributors. All rights reserved.
"""FLOPs of mmnorm's layers in mmengine's analysis (mmnorm.integration.mmengine_flops) and
tools/analysis/get_flops.py.

The hand count of a normalizer is what its equation costs per input element with two-pass
moments: the mean (1 add), the centered values (1 subtract), the second moment of the centered
values with the correction of their mean (2 for a sum of squares, 1 for a sum), and the affine
map ``a * (x - mu) + b`` (a multiply-add: 2), 7 in all; the ``(N, C)`` work of the ratios and the
mixture is left out of the hand count and covered by the margin. Convolutions, the linear layer
and the pooling are counted by mmengine's own handlers on the BN model.
"""
import os.path as osp
import sys

import pytest
import torch
from mmengine.analysis import FlopAnalyzer
from torch import nn

from mmnorm import WSConv2d
from mmnorm.integration import mmengine_flops
from mmnorm.layers import BatchStatsNorm
from tests.conftest import ROOT

#: Hand count per input element of one normalizer (see the module docstring).
FLOPS_PER_ELEMENT = 7
#: Margin of the counted normalizer FLOPs around the hand count.
MARGIN = 0.02
SIZE = 224  # as in the README's table; on smaller maps the per-channel work weighs more


def _resnet18(norm_cfg):
    from mmpretrain.models import ResNet
    torch.manual_seed(0)
    return nn.Sequential(ResNet(18, norm_cfg=norm_cfg)).eval()


def _total(model, x):
    analyzer = FlopAnalyzer(model, (x, ))
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    return analyzer


def _norm_elements(model, x):
    """The number of input elements of every mmnorm normalizer in one forward."""
    counts = []
    handles = [m.register_forward_hook(lambda m, i, o: counts.append(i[0].numel()))
               for m in model.modules() if isinstance(m, BatchStatsNorm)]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return sum(counts)


@pytest.fixture(scope='module')
def counts():
    x = torch.randn(1, 3, SIZE, SIZE)
    bn = _total(_resnet18(dict(type='BN')), x)
    ops = bn.by_operator()
    convs = ops['conv'] + ops['linear'] + ops.get('adaptive_avg_pool2d', 0)
    result = {'convs': convs, 'BN': bn.total(), 'x': x}
    for name, cfg in [('GN', dict(type='GN', num_groups=32)), ('SN', dict(type='SN')),
                      ('SSN', dict(type='SSN')), ('BCN', dict(type='BCN', num_groups=32))]:
        model = _resnet18(cfg)
        result[name] = _total(model, x).total()
        result[name + '_elements'] = _norm_elements(model, x)
    return result


@pytest.mark.parametrize('name', ['SN', 'SSN', 'BCN'])
def test_normalizers_count_within_the_margin_of_the_hand_count(counts, name):
    hand = FLOPS_PER_ELEMENT * counts[name + '_elements']
    assert hand > 0
    counted = counts[name] - counts['convs']
    assert abs(counted - hand) <= MARGIN * hand, (name, counted, hand)


def test_sn_resnet_counts_above_the_gn_and_bn_models(counts):
    assert counts['SN'] > counts['GN'] > counts['BN']
    assert counts['BCN'] > counts['GN'] and counts['SSN'] > counts['GN']


def test_wsconv_counts_the_convolution_and_the_standardization():
    conv = WSConv2d(16, 32, 3, padding=1)
    x = torch.randn(2, 16, 8, 8)
    convolution = 2 * 32 * 8 * 8 * 16 * 9  # one multiply-add per weight and output position
    # per weight element: mean and variance (4), subtract the mean (1), scale (1)
    standardization = 6 * conv.weight.numel()
    counted = _total(conv, x).total()
    assert counted - convolution == pytest.approx(standardization, rel=0.02)


class _MixedModel(nn.Module):
    """An SN layer and arithmetic of its own outside any mmnorm layer."""

    def __init__(self):
        super().__init__()
        from mmnorm import SwitchableNorm
        self.norm = SwitchableNorm(8).eval()

    def forward(self, x):
        return self.norm(x) * 2 + 1


def test_ops_outside_mmnorm_layers_and_models_without_them_are_left_to_mmengine():
    x = torch.randn(2, 8, 4, 4)
    by_module = _total(_MixedModel(), x).by_module()
    assert by_module['norm'] > 0 and by_module[''] == by_module['norm']  # '* 2 + 1' counts 0
    plain = _total(nn.Sequential(nn.BatchNorm2d(8)).eval(), x)
    assert 'aten::mul' not in plain._op_handles  # exactly as mmengine builds it


def test_without_the_handlers_the_layers_count_as_free(counts):
    """Break check: mmengine alone counts an SN ResNet below the GN model."""
    mmengine_flops.uninstall()
    try:
        alone = _total(_resnet18(dict(type='SN')), counts['x']).total()
    finally:
        mmengine_flops.install()
    assert alone < counts['GN'] and alone == counts['convs']


@pytest.fixture(scope='module')
def get_flops():
    sys.path.insert(0, osp.join(ROOT, 'tools', 'analysis'))
    import get_flops
    return get_flops


def test_get_flops_tool_on_the_detection_demo(get_flops, capsys):
    config = osp.join(ROOT, 'configs', 'demo', 'mask-rcnn_r18-tiny_fpn_sn_demo.py')
    result = get_flops.main([config, '--shape', '96', '128'])
    printed = capsys.readouterr().out
    assert 'Input shape: (96, 128)' in printed and '| model ' in printed
    assert result['mmnorm_layers'] > 0 and 0 < result['mmnorm_flops'] < result['flops']
    assert f'mmnorm layers ({result["mmnorm_layers"]}):' in printed


def test_get_flops_tool_with_shape_on_a_one_channel_model(get_flops, capsys):
    # (--shape's random images had 3 channels, which the digits configs' convs refused)
    config = osp.join(ROOT, 'configs', 'analysis', 'resnet18-s3-w32_sn_1xb32_digits.py')
    result = get_flops.main([config, '--shape', '8', '8'])
    assert 'Input shape: (8, 8)' in capsys.readouterr().out
    assert 0 < result['mmnorm_flops'] < result['flops']


def test_get_flops_tool_on_test_images(get_flops, tmp_path, capsys):
    from tests.helpers.tiny_data import make_shapes
    root = make_shapes(str(tmp_path / 'shapes'), num_train=1, num_val=2)
    config = osp.join(ROOT, 'configs', 'demo', 'deeplabv2_r18-tiny-d8_sn_demo.py')
    result = get_flops.main([config, '--num-images', '2', '--cfg-options',
                             f'test_dataloader.dataset.data_root={root}',
                             'test_dataloader.num_workers=0',
                             'test_dataloader.persistent_workers=False'])
    assert 'Compute type: test images after the data preprocessor (2)' in capsys.readouterr().out
    assert result['shape'] == (128, 128) and result['mmnorm_flops'] > 0
    with pytest.raises(SystemExit, match='--shape H W'):
        get_flops.main([config, '--cfg-options', 'test_dataloader.dataset.data_root=/nonexistent',
                        'test_dataloader.num_workers=0',
                        'test_dataloader.persistent_workers=False'])
