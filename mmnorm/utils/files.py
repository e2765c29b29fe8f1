# Copyright (c) mmnorm contributors. All rights reserved.
"""How mmnorm's tools write a checkpoint or a model file: the one helper they all share.

Two rules, so that no run loses a file:

- :func:`check_output` refuses an output path that already exists, and says so specially when it
  is one of the tool's own inputs (``tools/export_hard_ratios.py CONFIG a.pth a.pth`` would
  otherwise replace the soft-ratio checkpoint and its optimizer state), unless the user passed
  ``--overwrite``. Tools call it before any expensive work.
- :func:`atomic_write` writes to a temporary file beside the output and renames it over the
  output only when the writer has finished, so an interrupted or failed run leaves the old file
  (or none) and never a partial one; the source files are only read.
"""
import hashlib
import json
import os
import os.path as osp
import tempfile
from typing import Any, Callable, Iterable, Optional

__all__ = ['OutputError', 'OutputExistsError', 'OutputIsDirectoryError',
           'OutputNotWritableError', 'check_output', 'check_writable', 'prepare_output_file',
           'atomic_write', 'save_checkpoint', 'torch_save', 'write_json', 'sha256_file']


class OutputError(OSError):
    """An output path the tool refuses before its work (the tools report it in one line)."""


class OutputExistsError(OutputError, FileExistsError):
    """The output exists (or is one of the inputs) and ``overwrite`` was not given."""


class OutputIsDirectoryError(OutputExistsError, IsADirectoryError):
    """The output path is a directory (with or without ``overwrite``): the tools that report
    an existing output in one line report this one too."""


class OutputNotWritableError(OutputError, PermissionError):
    """The output cannot be written: its folder (or the nearest existing one above it) is
    read-only, or a file stands where a folder is needed."""


def _same_file(a: str, b: str) -> bool:
    if osp.exists(a) and osp.exists(b):
        return osp.samefile(a, b)
    return osp.realpath(a) == osp.realpath(b)


def check_output(path: str, inputs: Iterable[Optional[str]] = (), overwrite: bool = False,
                 flag: str = '--overwrite') -> None:
    """Refuse to write ``path`` over an existing file or over one of ``inputs``.

    Args:
        path: the output the tool is about to write.
        inputs: the files the tool reads (``None`` entries are ignored).
        overwrite: the user asked to replace existing files (``flag``).
        flag: the option to name in the message.

    Raises:
        OutputExistsError: naming the file and the option that allows it.
        OutputNotWritableError: the output's folder cannot take a new file (checked by
            creating one there), so that the run fails now, not after its work.
    """
    _refuse_directory(path)
    check_writable(path)
    if overwrite:
        return
    for source in inputs:
        if source is not None and _same_file(path, source):
            raise OutputExistsError(
                f'{path} is also an input of this command ({source}); writing it would replace '
                f'the source. Choose another output, or pass {flag} to replace it anyway')
    if osp.lexists(path):
        raise OutputExistsError(f'{path} exists; pass {flag} to replace it')


def check_writable(path: str) -> None:
    """Raise :class:`OutputNotWritableError` unless a file can be created where ``path`` will be
    written: in its folder, or, where that folder does not exist yet (the writers create it),
    in the nearest existing folder above it. Tried by creating (and removing) an empty file
    there: permission bits do not tell (a root process, read-only mounts, ACLs)."""
    if not path:
        raise OutputNotWritableError('the output path is empty')
    folder = osp.dirname(osp.abspath(path))
    while not osp.lexists(folder):
        folder = osp.dirname(folder)
    if not osp.isdir(folder):
        what = 'a broken link' if osp.islink(folder) else 'a file'
        raise OutputNotWritableError(f'cannot write {path}: {folder} is {what}, not a folder')
    try:
        handle, probe = tempfile.mkstemp(prefix='.mmnorm-write-check.', dir=folder)
    except OSError as error:
        raise OutputNotWritableError(
            f'cannot write {path}: {error.strerror or error} in {folder}') from None
    os.close(handle)
    os.remove(probe)


def _refuse_directory(path: str) -> None:
    if osp.isdir(path):
        raise OutputIsDirectoryError(f'{path} is a directory; give the path of the file to '
                                     'write')


def prepare_output_file(path: str) -> None:
    """Before a long run whose result goes to ``path`` at its end (metrics of an evaluation):
    refuse a directory and create the parent directory now, so that a wrong path fails at the
    start, not after the work."""
    _refuse_directory(path)
    check_writable(path)
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable[[str], Any],
                 final_path: Optional[Callable[[Any], str]] = None) -> Any:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it to ``path``.

    The parent directory is created if needed. On any failure the temporary file is removed and
    ``path`` is left as it was. Returns what ``write`` returns. ``final_path``: for a name known
    only once the file is written (e.g. one with its hash), ``final_path(write's result)`` gives
    the path to rename to instead of ``path`` (and may raise to refuse it); that path is
    returned.
    """
    _refuse_directory(path)
    directory = osp.dirname(osp.abspath(path))
    os.makedirs(directory, exist_ok=True)
    base, ext = osp.splitext(osp.basename(path))
    handle, tmp = tempfile.mkstemp(prefix=f'.{base}.', suffix=f'.tmp{ext}', dir=directory)
    os.close(handle)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a plain open would not
        result = write(tmp)
        with open(tmp, 'rb') as f:  # on disk before the rename makes it visible
            os.fsync(f.fileno())
        if final_path is not None:
            result = path = final_path(result)
        os.replace(tmp, path)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)
    return result


def torch_save(obj: Any, path: str) -> None:
    """``torch.save(obj)`` to ``path`` through a file object: given a path, ``torch.save``
    names the archive's folder after the file, which for :func:`atomic_write`'s random
    temporary name made the same checkpoint differ in its bytes from one save to the next (a
    published model's hash could not be reproduced)."""
    import torch
    with open(path, 'wb') as f:
        torch.save(obj, f)


def save_checkpoint(checkpoint: Any, path: str) -> None:
    """:func:`torch_save` of ``checkpoint`` through :func:`atomic_write`."""
    atomic_write(path, lambda tmp: torch_save(checkpoint, tmp))


def write_json(path: str, obj: Any, **dump_options) -> None:
    """``json.dump(obj)`` to ``path`` through :func:`atomic_write` (the parent directory
    created, never a partial file); ``dump_options`` go to ``json.dump``."""

    def write(tmp: str) -> None:
        with open(tmp, 'w') as f:
            json.dump(obj, f, **dump_options)

    atomic_write(path, write)


def sha256_file(path: str) -> str:
    """The SHA-256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()
