# Copyright (c) mmnorm contributors. All rights reserved.
"""Run a callback when a module has been imported (now, if it already is).

mmnorm integrates with mmdet, mmseg and mmpretrain (registering a DeepLabV2 head, making
backbones' ``norm_eval`` freeze SN/BCN statistics), but importing their model packages costs
seconds; ``import mmnorm`` should not pay that, nor fix an import order. So the integration for a
codebase runs right after its ``<codebase>.models`` package finishes importing, whichever way it
is imported (registry lazy import, ``register_all_modules()``, a direct import).
"""
import importlib.abc
import sys
import threading
from typing import Callable, Dict, List

__all__ = ['when_imported', 'pending']

_callbacks: Dict[str, List[Callable]] = {}
_lock = threading.RLock()


class _CallbackLoader(importlib.abc.Loader):
    """Delegates to the real loader, then runs the callbacks registered for the module."""

    def __init__(self, loader, name: str):
        self.loader = loader
        self.name = name

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        # The module keeps its real loader (resources, reloads, introspection).
        module.__loader__ = self.loader
        if getattr(module, '__spec__', None) is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        _run_callbacks(self.name, module)


class _PostImportFinder(importlib.abc.MetaPathFinder):

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _callbacks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, 'find_spec'):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, 'exec_module'):
            spec.loader = _CallbackLoader(spec.loader, fullname)
        return spec


_finder = _PostImportFinder()


def _run_callbacks(name: str, module) -> None:
    with _lock:
        callbacks = _callbacks.pop(name, [])
        if not _callbacks and _finder in sys.meta_path:
            sys.meta_path.remove(_finder)  # nothing waits any more
    for callback in callbacks:
        callback(module)


def pending() -> List[str]:
    """The modules whose callbacks still wait for their import."""
    with _lock:
        return sorted(_callbacks)


def when_imported(name: str, callback: Callable) -> None:
    """Call ``callback(module)`` once ``name`` is imported; at once if it already is."""
    with _lock:
        module = sys.modules.get(name)
        if module is None:
            _callbacks.setdefault(name, []).append(callback)
            if _finder not in sys.meta_path:
                sys.meta_path.insert(0, _finder)
            return
    callback(module)
