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
import os
import os.path as osp
import tempfile
from typing import Any, Callable, Iterable, Optional

__all__ = ['OutputExistsError', 'check_output', 'atomic_write', 'save_checkpoint', 'sha256_file']


class OutputExistsError(FileExistsError):
    """The output exists (or is one of the inputs) and ``overwrite`` was not given."""


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
    """
    if overwrite:
        return
    for source in inputs:
        if source is not None and _same_file(path, source):
            raise OutputExistsError(
                f'{path} is also an input of this command ({source}); writing it would replace '
                f'the source. Choose another output, or pass {flag} to replace it anyway')
    if osp.lexists(path):
        raise OutputExistsError(f'{path} exists; pass {flag} to replace it')


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


def save_checkpoint(checkpoint: Any, path: str) -> None:
    """``torch.save(checkpoint, path)`` through :func:`atomic_write`."""
    import torch
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def sha256_file(path: str) -> str:
    """The SHA-256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()
