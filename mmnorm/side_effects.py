# Copyright (c) mmnorm contributors. All rights reserved.
"""Everything ``import mmnorm`` changes outside mmnorm, in one place.

**On import**: what a plain ``custom_imports=dict(imports=['mmnorm'])`` config needs. Each is
idempotent and can be installed on its own with :func:`install`; :func:`installed` reports which
are in effect.

1. ``registries``: the layers (``SN``, ``SN_tied``, ``BCN``, ``WSConv`` and the Sync versions),
   the hooks, the optimizer-wrapper constructor and ``DigitsDataset`` (:mod:`mmnorm.datasets`;
   scikit-learn is imported only when it loads) are registered in mmengine's *root* registries,
   where mmcv's builders and every codebase find them. A name somebody else owns is never
   overwritten (:mod:`mmnorm.registry`). Done by importing mmnorm's modules.
2. ``checkpoint_globals``: ``torch.serialization.add_safe_globals`` allow-lists exactly the
   globals mmengine's own checkpoints contain (``HistoryBuffer``, numpy arrays and scalars; a
   restricted ``getattr``), so ``resume`` / ``load_from`` work under torch >= 2.6's
   ``weights_only=True`` (:mod:`mmnorm.utils.checkpoint`). Nothing that can run code is allowed.
3. ``codebase_integrations``: a post-import hook (one ``sys.meta_path`` finder, which removes
   itself once nothing waits; :mod:`mmnorm.integration.post_import`) that runs, right after each
   module is imported (at once if it already is):

   - ``mmdet.models`` / ``mmseg.models`` / ``mmpretrain.models``: the ``train()`` of every
     registered class that takes ``norm_eval`` is wrapped so that ``norm_eval=True`` also freezes
     mmnorm layers, as it freezes ``_BatchNorm`` (:mod:`mmnorm.integration.norm_eval`; without
     it their statistics would keep updating);
   - ``mmseg.models``: registers ``DeepLabV2Head`` (the DeepLabv2 configs use it);
   - ``mmpretrain.models``: registers ``ResNetV1SSN`` (mmpretrain's ResNet with the Sparse SN
     authors' stem pooling: their converted models and the SSN ImageNet configs use it);
   - ``mmcv.cnn.utils.fuse_conv_bn`` / ``mmcv.cnn.bricks.conv_module`` /
     ``mmengine.model.efficient_conv_bn_eval``: ``fuse_conv_bn``, ``ConvModule``'s and
     mmengine's ``efficient_conv_bn_eval`` fold a BN into a ``WSConv`` from its standardized
     weight (mmengine's runs ``WSConv`` then BN in training; other convolutions go to the
     original code unchanged; :mod:`mmnorm.integration.mmcv_fusion`). mmengine's module is
     imported by ``mmengine.model``, so this one applies as mmnorm is imported.
   - ``mmengine.analysis.complexity_analysis``: ``FlopAnalyzer.__init__`` is wrapped so that an
     analyzer of a model with mmnorm layers also counts the arithmetic ops traced inside those
     layers (an analyzer of any other model is built exactly as mmengine builds it;
     :mod:`mmnorm.integration.mmengine_flops`).

**Opt-in** (not needed by configs; mmnorm's tools install it, ``install('checkpoint_loader')``
does it elsewhere):

4. ``checkpoint_loader``: mmengine's loader for local paths is replaced (``register_scheme(...,
   force=True)``) by :func:`mmnorm.utils.checkpoint.load_from_local`, which loads exactly as
   mmengine's does but tells a damaged file, a non-checkpoint and an unsafe pickle apart.
"""
import importlib
from typing import Dict

import torch

__all__ = ['ON_IMPORT', 'OPT_IN', 'install', 'installed']

#: Installed by ``import mmnorm`` (``registries`` is the import itself).
ON_IMPORT = ('registries', 'checkpoint_globals', 'codebase_integrations')
#: Installed only when asked for.
OPT_IN = ('checkpoint_loader', )


def _install_checkpoint_globals() -> None:
    from .utils.checkpoint import allow_mmengine_checkpoint_globals
    allow_mmengine_checkpoint_globals()


def _install_codebase_integrations() -> None:
    from .integration import install_integrations
    install_integrations()


def _install_checkpoint_loader() -> None:
    from .utils.checkpoint import register_checkpoint_loader
    register_checkpoint_loader()


_INSTALLERS = {
    'registries': lambda: importlib.import_module('mmnorm'),
    'checkpoint_globals': _install_checkpoint_globals,
    'codebase_integrations': _install_codebase_integrations,
    'checkpoint_loader': _install_checkpoint_loader,
}


def install(*names: str) -> None:
    """Install the named effects (default: :data:`ON_IMPORT`); each is idempotent."""
    for name in names or ON_IMPORT:
        if name not in _INSTALLERS:
            raise ValueError(f'unknown effect {name!r}; choose from {ON_IMPORT + OPT_IN}')
        _INSTALLERS[name]()


def installed() -> Dict[str, bool]:
    """Which effects are in effect now (for tests and for the curious)."""
    from mmengine.registry import MODELS

    from . import integration
    from .utils import checkpoint
    safe = {g[0] if isinstance(g, tuple) else g for g in torch.serialization.get_safe_globals()}
    wanted = {g[0] if isinstance(g, tuple) else g for g in checkpoint.safe_globals()}
    return {
        'registries': MODELS.get('SN') is not None,
        'checkpoint_globals': wanted <= safe,
        'codebase_integrations': integration.integrations_installed(),
        'checkpoint_loader': checkpoint.checkpoint_loader_registered(),
    }
