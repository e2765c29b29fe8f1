# Copyright (c) mmnorm contributors. All rights reserved.
"""Every config in configs/ loads, builds its model on CPU, and really puts the normalization its
metafile claims into every component it claims (and nothing else there), with the ratio groups it
claims (``Ratio groups``, default 1)."""
import glob
import importlib
import os.path as osp

import pytest
import mmcv.cnn  # noqa: F401  (registers BN, GN, SyncBN, ... in the root registry)
import yaml
from mmengine.config import Config
from mmengine.registry import MODELS as ROOT_MODELS
from mmengine.registry import DefaultScope
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmnorm import WSConv2d
from mmnorm.layers import BatchStatsNorm
from tests.conftest import ROOT

CONFIG_ROOT = osp.join(ROOT, 'configs')
NORM_TYPES = (_BatchNorm, nn.GroupNorm, nn.LayerNorm, BatchStatsNorm)


def _metafile_models():
    models = []
    for path in sorted(glob.glob(osp.join(CONFIG_ROOT, '*', 'metafile.yml'))):
        with open(path) as f:
            models.extend(yaml.safe_load(f)['Models'])
    return models


MODELS = _metafile_models()


def _config_files():
    return sorted(p for p in glob.glob(osp.join(CONFIG_ROOT, '**', '*.py'), recursive=True)
                  if '_base_' not in p.split(osp.sep))


def test_every_config_is_in_a_metafile_and_vice_versa():
    listed = {osp.join(ROOT, m['Config']) for m in MODELS}
    files = set(_config_files())
    assert files - listed == set(), 'configs missing from metafile.yml'
    assert listed - files == set(), 'metafile.yml lists missing configs'


def _build(cfg: Config) -> nn.Module:
    scope = cfg.get('default_scope', 'mmengine')
    registry = importlib.import_module(f'{scope}.registry').MODELS
    with DefaultScope.overwrite_default_scope(scope):
        model = registry.build(cfg.model)
    return getattr(model, 'module', model)  # test-time-augmentation wrappers


def _component(model: nn.Module, path: str) -> nn.Module:
    for name in path.split('.'):
        model = getattr(model, name)
    return model


@pytest.mark.parametrize('entry', MODELS, ids=[m['Name'] for m in MODELS])
def test_config_builds_with_the_claimed_norm_everywhere(entry):
    cfg = Config.fromfile(osp.join(ROOT, entry['Config']))
    assert 'mmnorm' in cfg.custom_imports['imports']
    assert cfg.custom_imports.get('allow_failed_imports') is False
    meta = entry['Metadata']
    norm_cls = ROOT_MODELS.get(meta['Normalization'])
    model = _build(cfg)
    for path in meta['Normalized components']:
        component = _component(model, path)
        norms = [m for m in component.modules() if isinstance(m, NORM_TYPES)]
        assert norms, f'{path} has no normalization layer'
        wrong = {type(m).__name__ for m in norms if type(m) is not norm_cls}
        assert not wrong, f'{path} also holds {wrong}, expected only {norm_cls.__name__}'
        # group-wise ratios exactly where the metafile claims them (1: one vector per layer)
        groups = {getattr(m, 'ratio_groups', 1) for m in norms}
        assert groups == {meta.get('Ratio groups', 1)}, f'{path} has ratio groups {groups}'
        if meta.get('Convolution') == 'WSConv':
            convs = [m for m in component.modules() if isinstance(m, nn.Conv2d)]
            assert any(isinstance(m, WSConv2d) for m in convs), f'{path} has no WSConv'
            if path == 'backbone':
                assert all(isinstance(m, WSConv2d) for m in convs), 'plain conv in backbone'
    # Pretrained backbones point at a local file that the converter writes.
    init_cfg = cfg.model.get('backbone', {}).get('init_cfg') or {}
    if init_cfg.get('type') == 'Pretrained':
        checkpoint = init_cfg['checkpoint']
        assert checkpoint.startswith(('checkpoints/', 'torchvision://')), checkpoint


def test_missing_pretrained_backbone_gives_a_clear_error():
    # The hint comes from mmnorm's checkpoint loader, which its tools install (opt-in): install it
    # here too, so the test does not depend on an earlier test having done it.
    from mmnorm.side_effects import install
    install('checkpoint_loader')
    cfg = Config.fromfile(osp.join(CONFIG_ROOT, 'resnet', 'resnet50_sn_8xb32_in1k.py'))
    cfg.model.backbone.init_cfg = dict(type='Pretrained', prefix='backbone.',
                                       checkpoint='checkpoints/does_not_exist.pth')
    model = _build(cfg)
    with pytest.raises(FileNotFoundError, match='tools/convert_checkpoint.py'):
        model.init_weights()
