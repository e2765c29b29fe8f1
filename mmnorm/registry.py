# Copyright (c) mmnorm contributors. All rights reserved.
"""Registration into mmengine's registries, safe to run more than once.

Layers go into mmengine's *root* ``MODELS`` registry, as mmcv's own norms and convs do: mmcv's
``build_norm_layer`` / ``build_conv_layer`` look there, and the mmdet, mmseg and mmpretrain
registries fall back to it, so one registration serves every codebase.

Names that somebody else already owns are never overwritten (no ``force=True`` on foreign names):
that raises a clear error instead. Re-registering *our own* class (the same module and qualified
name, e.g. after ``importlib.reload``) replaces it silently, so re-importing mmnorm is harmless.
"""
from typing import Any, Callable, Optional, Type

try:
    from mmengine.registry import MODELS
except ImportError:  # mmnorm's core without OpenMMLab (tools/gpu_check.py): no registry
    MODELS = None

__all__ = ['register', 'MODELS']


def _same_origin(a: type, b: type) -> bool:
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def register(registry: Optional[Any], name: str) -> Callable[[Type], Type]:
    """Class decorator: register ``cls`` in ``registry`` under ``name`` (idempotent; nothing
    without mmengine, ``registry`` None).

    Raises:
        KeyError: ``name`` is already registered to a class that is not mmnorm's.
    """

    def decorator(cls: Type) -> Type:
        if registry is None:
            return cls
        existing = registry.module_dict.get(name)
        if existing is not None and existing is not cls and not _same_origin(existing, cls):
            raise KeyError(
                f'{name!r} is already registered in the {registry.scope}::{registry.name} '
                f'registry by {existing.__module__}.{existing.__qualname__}; mmnorm will not '
                f'overwrite it')
        registry.register_module(name=name, module=cls, force=existing is not None)
        return cls

    return decorator
