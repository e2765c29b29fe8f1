# Copyright (c) mmnorm contributors. All rights reserved.
"""The OpenMMLab contract: builders, ConvModule, registries, imports, a real detector step."""
import importlib
import subprocess
import sys

import pytest
import torch
from mmcv.cnn import ConvModule, build_conv_layer, build_norm_layer
from mmengine.registry import MODELS

import mmnorm  # noqa: F401  (registers the layers)
from mmnorm import (BatchChannelNorm, SparseSwitchableNorm, SwitchableNorm, SwitchableNormTied,
                    WSConv2d)

NORMS = {'SN': (SwitchableNorm, 'sn'), 'SN_tied': (SwitchableNormTied, 'sn'),
         'BCN': (BatchChannelNorm, 'bcn'), 'SSN': (SparseSwitchableNorm, 'ssn')}
OUR_NAMES = ['SN', 'SN_tied', 'BCN', 'SSN', 'WSConv']


@pytest.mark.parametrize('type_name', list(NORMS))
def test_build_norm_layer_name_and_class(type_name):
    cls, abbr = NORMS[type_name]
    name, layer = build_norm_layer(dict(type=type_name), 64)
    assert name == abbr and type(layer) is cls and layer.num_features == 64
    name, layer = build_norm_layer(dict(type=type_name, eps=1e-3), 64, postfix=2)
    assert name == f'{abbr}2' and layer.eps == 1e-3


def test_build_norm_layer_requires_grad_reaches_every_parameter():
    _, layer = build_norm_layer(dict(type='SN', requires_grad=False), 8)
    assert not any(p.requires_grad for p in layer.parameters())
    assert {n for n, _ in layer.named_parameters()} == {'weight', 'bias', 'mean_logits',
                                                         'var_logits'}


def test_build_norm_layer_passes_options():
    _, layer = build_norm_layer(dict(type='BCN', num_groups=16, estimate=True), 64)
    assert layer.num_groups == 16 and layer.estimate
    _, layer = build_norm_layer(dict(type='SN', using_bn=False, mix='std'), 16)
    assert layer.normalizers == ('IN', 'LN') and layer.mix == 'std'
    with pytest.raises(ValueError, match='does not divide'):
        build_norm_layer(dict(type='BCN', num_groups=32), 48)


def test_build_conv_layer_ws():
    conv = build_conv_layer(dict(type='WSConv'), 3, 8, 3, stride=2, padding=1, dilation=1,
                            groups=1, bias=False)
    assert type(conv) is WSConv2d and conv.stride == (2, 2) and conv.bias is None
    assert conv(torch.randn(1, 3, 8, 8)).shape == (1, 8, 4, 4)


@pytest.mark.parametrize('norm_cfg', [dict(type='SN'), dict(type='SN_tied'),
                                      dict(type='BCN', num_groups=4),
                                      dict(type='BCN', num_groups=4, estimate=True),
                                      dict(type='SSN')])
def test_conv_module_with_ws_conv_and_each_norm(norm_cfg):
    module = ConvModule(3, 8, 3, padding=1, conv_cfg=dict(type='WSConv'), norm_cfg=norm_cfg)
    assert isinstance(module.conv, WSConv2d)
    norm = getattr(module, module.norm_name)
    assert isinstance(norm, NORMS[norm_cfg['type']][0])
    with torch.no_grad():
        norm.weight.fill_(3.0)
    module.init_weights()  # ConvModule sets norm weight 1, bias 0
    assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    if getattr(norm, 'estimate', False):
        norm.set_estimate_rate(0.01)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    module(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_names_resolve_in_every_codebase_scope_and_are_owned_by_mmnorm():
    registries = {}
    for scope in ('mmdet', 'mmseg', 'mmpretrain'):
        utils = importlib.import_module(f'{scope}.utils')
        utils.register_all_modules(init_default_scope=False)
        registries[scope] = importlib.import_module(f'{scope}.registry').MODELS
    expected = {'SN': SwitchableNorm, 'SN_tied': SwitchableNormTied, 'BCN': BatchChannelNorm,
                'SSN': SparseSwitchableNorm, 'WSConv': WSConv2d}
    for name, cls in expected.items():
        assert MODELS.module_dict[name] is cls
        for scope, registry in registries.items():
            assert name not in registry.module_dict, f'{scope} also owns {name}'
            assert registry.get(name) is cls, f'{name} does not resolve from {scope}'


def test_mmcv_names_are_untouched():
    from mmcv.cnn.bricks.conv_ws import ConvWS2d
    assert MODELS.get('ConvWS') is ConvWS2d
    assert MODELS.get('GN') is torch.nn.GroupNorm


def test_registering_a_foreign_name_is_refused():
    from mmnorm.registry import register
    with pytest.raises(KeyError, match='will not overwrite'):
        register(MODELS, 'GN')(type('GroupNormImpostor', (torch.nn.Module, ), {}))


def _run_python(code: str) -> None:
    # A fresh interpreter: reloading modules in the test process would leave two versions of
    # each layer class behind for the other tests.
    subprocess.run([sys.executable, '-c', code], check=True, timeout=120)


def test_reimport_and_reload_raise_nothing():
    _run_python('import importlib, mmnorm, mmnorm.layers.switchable_norm as m; import mmnorm; '
                'importlib.reload(m); importlib.reload(mmnorm); '
                'from mmengine.registry import MODELS; '
                'assert MODELS.get("SN") is mmnorm.layers.switchable_norm.SwitchableNorm')


def test_import_after_register_all_modules():
    _run_python('from mmdet.utils import register_all_modules; register_all_modules(); '
                'import mmnorm; from mmseg.utils import register_all_modules as r; r(False); '
                'from mmengine.registry import MODELS; assert MODELS.get("SN") is not None')


def test_mask_rcnn_with_sn_everywhere_trains_one_step():
    """Mask R-CNN R50-FPN, SN in backbone, FPN, 4conv1fc box head and mask head."""
    from mmengine.hub import get_config
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope
    from mmdet.registry import MODELS as DET_MODELS
    from mmdet.testing import demo_mm_inputs

    init_default_scope('mmdet')
    norm_cfg = dict(type='SN')
    cfg = get_config('mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py')
    model_cfg = cfg.model
    model_cfg.backbone.update(norm_cfg=norm_cfg, norm_eval=False, frozen_stages=-1,
                              init_cfg=None)
    model_cfg.neck.norm_cfg = norm_cfg
    model_cfg.roi_head.bbox_head = dict(
        type='Shared4Conv1FCBBoxHead', conv_out_channels=256, norm_cfg=norm_cfg,
        in_channels=256, fc_out_channels=1024, roi_feat_size=7, num_classes=3,
        bbox_coder=model_cfg.roi_head.bbox_head.bbox_coder, reg_class_agnostic=False,
        loss_cls=model_cfg.roi_head.bbox_head.loss_cls,
        loss_bbox=model_cfg.roi_head.bbox_head.loss_bbox)
    model_cfg.roi_head.mask_head.update(norm_cfg=norm_cfg, num_classes=3)
    model_cfg.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=100)
    model_cfg.train_cfg.rcnn.sampler.num = 64
    model = DET_MODELS.build(model_cfg)
    sn_layers = {name.split('.')[0] for name, m in model.named_modules()
                 if isinstance(m, SwitchableNorm)}
    assert sn_layers == {'backbone', 'neck', 'roi_head'}
    assert any(isinstance(m, SwitchableNorm) for m in model.roi_head.bbox_head.modules())
    assert any(isinstance(m, SwitchableNorm) for m in model.roi_head.mask_head.modules())

    torch.manual_seed(0)
    data = demo_mm_inputs(batch_size=2, image_shapes=[(3, 128, 160), (3, 128, 160)],
                          num_items=[3, 2], num_classes=3, with_mask=True)
    optim_wrapper = build_optim_wrapper(model, dict(optimizer=dict(type='SGD', lr=0.01,
                                                                  momentum=0.9)))
    before = model.backbone.layer1[0].sn1.mean_logits.detach().clone()
    model.train()
    losses = model.train_step(data, optim_wrapper)
    assert {'loss_rpn_cls', 'loss_cls', 'loss_bbox', 'loss_mask'} <= set(losses)
    assert all(torch.isfinite(v).all() for v in losses.values())
    assert not torch.equal(model.backbone.layer1[0].sn1.mean_logits, before)
