# Copyright (c) mmnorm contributors. All rights reserved.
"""mmnorm: Switchable Normalization and Batch-Channel Normalization for OpenMMLab.

``import mmnorm`` (or ``custom_imports=dict(imports=['mmnorm'], allow_failed_imports=False)`` in
a config) registers the layers, hooks, optimizer-wrapper constructor and the digits dataset, and
makes the changes outside mmnorm that such a config needs: all of them are listed, with why, in
:mod:`mmnorm.side_effects` (and in docs/user_guides/swap_normalizers.md, "What import mmnorm
changes").
"""
from . import functional, layers
from .layers import (BatchChannelNorm, SparseSwitchableNorm, SwitchableNorm, SwitchableNormTied,
                     SyncBatchChannelNorm, SyncSparseSwitchableNorm, SyncSwitchableNorm,
                     SyncSwitchableNormTied, WSConv2d, batched_ratios, convert_sync_norm,
                     frozen_ratios, revert_sync_norm)
from .version import __version__, version_info

try:
    import mmengine  # noqa: F401
except ImportError:
    # The core alone (functional forms and layers, e.g. tools/gpu_check.py on a machine with
    # torch only): nothing to register in, nothing changed outside mmnorm.
    WITH_OPENMMLAB = False
else:
    WITH_OPENMMLAB = True
    from . import analysis, datasets, engine, integration, side_effects, utils
    side_effects.install(*side_effects.ON_IMPORT)

__all__ = [
    '__version__', 'version_info', 'functional', 'layers', 'engine', 'integration', 'utils',
    'side_effects', 'analysis', 'datasets',
    'SwitchableNorm', 'SwitchableNormTied', 'SparseSwitchableNorm', 'BatchChannelNorm',
    'WSConv2d', 'SyncSwitchableNorm', 'SyncSwitchableNormTied', 'SyncSparseSwitchableNorm',
    'SyncBatchChannelNorm', 'convert_sync_norm', 'revert_sync_norm', 'frozen_ratios',
    'batched_ratios', 'WITH_OPENMMLAB'
]
if not WITH_OPENMMLAB:  # the OpenMMLab parts were not imported
    __all__ = [name for name in __all__ if name in globals()]
