# Copyright (c) mmnorm contributors. All rights reserved.
"""Load mmengine checkpoints under torch's safe (``weights_only``) unpickler.

Since torch 2.6, ``torch.load`` defaults to ``weights_only=True``: it refuses any pickled global
that is not explicitly allowed. mmengine 0.10.7 calls ``torch.load`` without that argument, and
its checkpoints contain a few such globals (the message hub's ``HistoryBuffer``, numpy arrays and
scalars of the logged values), so ``load_checkpoint``, ``Runner(resume=True)`` and
``tools/test.py`` fail on the checkpoints mmengine itself wrote.

:func:`allow_mmengine_checkpoint_globals` (run by ``import mmnorm``) allow-lists exactly those
globals, and nothing that can execute code:

- ``mmengine.logging.history_buffer.HistoryBuffer`` (rebuilt from its ``__dict__``);
- numpy's ``ndarray``, ``dtype``, the array/scalar reconstructors and the concrete dtype classes;
- ``builtins.getattr`` is *not* allowed: HistoryBuffer pickles its statistics methods as
  ``getattr(HistoryBuffer, 'mean')``, so that one global name is mapped to a restricted getattr
  that resolves only those registered methods of ``HistoryBuffer`` and refuses everything else.

``weights_only`` is never switched off. A file that needs anything else, e.g. a pickle that would
call ``os.system`` on load, is refused with :class:`UnsafeCheckpointError`, which names the file
and the offending global; a file that is not a checkpoint, or a damaged one, raises
:class:`CheckpointFileError` with torch's own cause (:func:`load_checkpoint_file`).
"""
import os.path as osp
import pickle
from typing import Any, Callable, List, Tuple, Union

import torch

__all__ = [
    'allow_mmengine_checkpoint_globals', 'safe_globals', 'UnsafeCheckpointError',
    'CheckpointFileError', 'load_checkpoint_file', 'load_from_local', 'register_checkpoint_loader',
    'checkpoint_loader_registered'
]


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds Python objects outside the allow-list; it was not loaded."""


class CheckpointFileError(RuntimeError):
    """The file is not a checkpoint, or a damaged one; it was not loaded."""


def _history_buffer_getattr(obj: Any, name: str) -> Any:
    """``getattr`` restricted to the public methods ``HistoryBuffer`` itself defines.

    HistoryBuffer pickles its ``_statistics_methods`` (``min``, ``max``, ``current``, ``mean`` and
    any registered with ``HistoryBuffer.statistics``) as ``getattr(HistoryBuffer, name)``; looking
    up such a method runs nothing.
    """
    from mmengine.logging.history_buffer import HistoryBuffer
    if (obj is HistoryBuffer and isinstance(name, str) and not name.startswith('_')
            and (name in vars(HistoryBuffer) or name in HistoryBuffer._statistics_methods)
            and callable(getattr(HistoryBuffer, name))):
        return getattr(HistoryBuffer, name)
    raise UnsafeCheckpointError(
        f'refusing getattr({obj!r}, {name!r}) while loading a checkpoint: only methods of '
        f'mmengine HistoryBuffer may be looked up')


def _numpy_globals() -> List[Union[Callable, Tuple[Callable, str]]]:
    import numpy as np
    try:  # numpy >= 2
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    found: List[Union[Callable, Tuple[Callable, str]]] = [np.ndarray, np.dtype]
    # Pickles written under numpy 1 name 'numpy.core...', under numpy 2 'numpy._core...'.
    for package in ('numpy.core', 'numpy._core'):
        found.append((multiarray._reconstruct, f'{package}.multiarray._reconstruct'))
        found.append((multiarray.scalar, f'{package}.multiarray.scalar'))
    dtypes = getattr(np, 'dtypes', None)  # numpy >= 1.25: concrete dtype classes
    if dtypes is not None:
        for name in dir(dtypes):
            cls = getattr(dtypes, name)
            if isinstance(cls, type) and issubclass(cls, np.dtype):
                found.append((cls, f'numpy.dtypes.{name}'))
    return found


def safe_globals() -> List[Union[Callable, Tuple[Callable, str]]]:
    """The globals mmengine / mmdet / mmseg / mmpretrain checkpoints need (see module doc)."""
    from mmengine.logging.history_buffer import HistoryBuffer
    return [HistoryBuffer, (_history_buffer_getattr, 'builtins.getattr')] + _numpy_globals()


def allow_mmengine_checkpoint_globals() -> None:
    """Allow-list :func:`safe_globals` for ``torch.load(weights_only=True)`` (idempotent)."""
    add = getattr(torch.serialization, 'add_safe_globals', None)
    if add is not None:  # torch < 2.4 loads with weights_only=False by default anyway
        add(safe_globals())


def _damaged(filename: str, detail: str) -> 'CheckpointFileError':
    return CheckpointFileError(
        f'cannot load {filename!r}: the file is damaged ({detail}). It was probably truncated or '
        f'altered after it was written; use another copy, or an earlier checkpoint of the run')


def _diagnose(filename: str, error: BaseException) -> BaseException:
    """The error to report for a checkpoint that ``torch.load(weights_only=True)`` refused.

    Three causes look alike from torch's message and need different actions: a file that is not
    a checkpoint at all, a damaged one (one corrupt byte in the pickle stream, a truncated
    archive), and an intact one carrying Python objects outside the allow-list. The last is told
    apart by listing the file's globals (``get_unsafe_globals_in_checkpoint``), not by parsing
    the message; legacy (non-zip) files, which that cannot read, by the unpickler's own words.
    """
    with open(filename, 'rb') as f:
        magic = f.read(4)
    detail = next((line.strip() for line in str(error).splitlines()
                   if 'Unsupported' in line or 'GLOBAL' in line), str(error).strip() or
                  type(error).__name__)
    if magic.startswith(b'PK'):  # torch.save's zip archive
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(filename)
        except Exception as scan_error:  # the archive or its pickle stream cannot be read
            return _damaged(filename, str(scan_error).strip().splitlines()[0])
        if not unsafe:  # readable and safe: damaged data, or an unrelated error (map_location)
            return _damaged(filename, detail) if isinstance(error, pickle.UnpicklingError) \
                else error
        detail = 'globals: ' + ', '.join(unsafe)
    elif not magic.startswith(b'\x80'):  # neither a zip archive nor a pickle
        return CheckpointFileError(
            f'cannot load {filename!r}: it is not a checkpoint written by torch.save (neither a '
            f'zip archive nor a pickle; it starts with {magic!r})')
    elif not isinstance(error, pickle.UnpicklingError) or 'GLOBAL' not in str(error):
        return _damaged(filename, detail)
    return UnsafeCheckpointError(
        f'refused to load {filename!r}: it contains Python objects outside the allow-list of '
        f'torch.load(weights_only=True) + mmnorm ({detail}). Loading it could run arbitrary '
        f'code. If you created the file yourself and trust it, inspect it with '
        f'torch.serialization.get_unsafe_globals_in_checkpoint() and allow-list the needed '
        f'classes with torch.serialization.add_safe_globals().')


def load_checkpoint_for_tool(filename: str) -> dict:
    """:func:`load_checkpoint_file` on the CPU for a command-line tool: a file it cannot use (not
    found, not a checkpoint, objects outside the allow-list, no dict) ends the tool with one
    ``error:`` line (``SystemExit``) instead of a traceback."""
    try:
        checkpoint = load_checkpoint_file(filename, map_location='cpu')
    except FileNotFoundError:
        raise SystemExit(f'error: {filename} not found')
    except (CheckpointFileError, UnsafeCheckpointError) as error:
        raise SystemExit(f'error: {error}')
    if not isinstance(checkpoint, dict):
        raise SystemExit(f'error: {filename} does not hold a checkpoint dict')
    return checkpoint


def load_checkpoint_file(filename: str, map_location: Any = None) -> Any:
    """``torch.load(filename, weights_only=True)`` with errors that say what is wrong.

    Raises:
        FileNotFoundError: no such file (the message says how to get the configs' checkpoints).
        CheckpointFileError: not a checkpoint, or a damaged one (torch's own cause is kept).
        UnsafeCheckpointError: an intact checkpoint with objects outside the allow-list (named).
    """
    if osp.isdir(osp.expanduser(filename)):
        raise CheckpointFileError(f'{filename!r} is a directory, not a checkpoint file')
    if not osp.isfile(osp.expanduser(filename)):
        raise FileNotFoundError(
            f'checkpoint {filename!r} not found. Configs that start from ImageNet weights expect '
            f'them under checkpoints/: convert the released models with '
            f'tools/convert_checkpoint.py (configs/README.md, "Pretrained backbones"), or point '
            f'the config elsewhere, e.g. --cfg-options model.backbone.init_cfg.checkpoint=PATH')
    filename = osp.expanduser(filename)
    try:
        return torch.load(filename, map_location=map_location, weights_only=True)
    except Exception as error:  # damaged bytes surface as almost any type; _diagnose decides
        if isinstance(error, (PermissionError, MemoryError)):
            raise
        raise _diagnose(filename, error) from error


def load_from_local(filename: str, map_location: Any = None) -> Any:
    """mmengine's local checkpoint loader with :func:`load_checkpoint_file`'s errors.

    Registered as mmengine's loader for local paths by ``import mmnorm``; loads as mmengine does
    (``torch.load``, ``weights_only=True`` as torch >= 2.6 defaults to).
    """
    return load_checkpoint_file(filename, map_location)


_loader_registered = False


def register_checkpoint_loader() -> None:
    """Make :func:`load_from_local` mmengine's loader for local paths (idempotent).

    Opt-in (``mmnorm.side_effects``): mmnorm's tools call it; ``import mmnorm`` does not, since
    it replaces mmengine's own loader (``force=True``).
    """
    global _loader_registered
    from mmengine.runner.checkpoint import CheckpointLoader
    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local, force=True)
    _loader_registered = True


def checkpoint_loader_registered() -> bool:
    """Whether :func:`register_checkpoint_loader` has run in this process."""
    return _loader_registered
