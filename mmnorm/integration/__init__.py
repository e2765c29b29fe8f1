# Copyright (c) mmnorm contributors. All rights reserved.
"""Integration with mmcv, mmdet, mmseg and mmpretrain, applied when the module concerned is
imported (see :mod:`.post_import`): backbones' ``norm_eval`` freezes SN/BCN statistics
(:mod:`.norm_eval`), mmseg gets ``DeepLabV2Head``, mmpretrain ``ResNetV1SSN`` (the SSN authors'
stem), mmcv's and mmengine's conv + BN folding
(``fuse_conv_bn``, ``efficient_conv_bn_eval``) folds ``WSConv`` from its standardized weight
(:mod:`.mmcv_fusion`), and mmengine's FLOP analysis counts mmnorm's layers
(:mod:`.mmengine_flops`)."""
import importlib
import importlib.util

from . import mmcv_fusion, mmengine_flops
from .norm_eval import respect_norm_eval, respect_norm_eval_in_registry
from .post_import import when_imported

__all__ = ['integrations_installed', 'mmcv_fusion', 'mmengine_flops', 'respect_norm_eval',
           'respect_norm_eval_in_registry', 'when_imported', 'install_integrations']


def _norm_eval_only(scope: str):

    def setup(module) -> None:
        respect_norm_eval_in_registry(importlib.import_module(f'{scope}.registry').MODELS)

    return setup


def _setup_mmseg(module) -> None:
    from .mmseg import setup
    setup()


def _setup_mmpretrain(module) -> None:
    from .mmpretrain import setup
    setup()


_installed = False


def integrations_installed() -> bool:
    """Whether :func:`install_integrations` has run (its callbacks run when their modules are
    imported; :func:`mmnorm.integration.post_import.pending` lists those still waiting)."""
    return _installed


def install_integrations() -> None:
    """Arrange the per-codebase setup for every installed codebase (idempotent: a second call
    changes nothing)."""
    global _installed
    if _installed:
        return
    _installed = True
    setups = {'mmdet': _norm_eval_only('mmdet'), 'mmseg': _setup_mmseg,
              'mmpretrain': _setup_mmpretrain}
    for scope, setup in setups.items():
        if importlib.util.find_spec(scope) is not None:
            when_imported(f'{scope}.models', setup)
    for module_name, _ in mmcv_fusion.TARGETS:  # (mmcv's and mmengine's)
        if importlib.util.find_spec(module_name.partition('.')[0]) is not None:
            when_imported(module_name, mmcv_fusion.install)
    when_imported(mmengine_flops.TARGET[0], mmengine_flops.install)
