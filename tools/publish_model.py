# Copyright (c) mmnorm contributors. All rights reserved.
"""Publish a trained checkpoint: keep the weights and their meta, drop the training state, and
put the first 8 hex digits of the file's SHA-256 in its name (the OpenMMLab model-zoo convention).

    python tools/publish_model.py work_dirs/exp/iter_90000.pth resnet50_ssn_8xb32_in1k.pth
    # -> resnet50_ssn_8xb32_in1k-1a2b3c4d.pth

What mmdet's ``tools/model_converters/publish_model.py`` does, for the checkpoints mmengine
writes under torch >= 2.6: the source is loaded with ``weights_only=True`` (mmengine's own globals
allow-listed, anything else refused), only ``state_dict`` and ``meta`` are kept (``--keep`` adds
more, e.g. ``message_hub``), and the result is written atomically; an existing output is replaced
only with ``--overwrite``. The final name ends in ``-<sha256[:8]>.pth``; the full hash is printed.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.join(osp.dirname(osp.abspath(__file__)), '..'))

import mmnorm  # noqa: E402,F401  (safe checkpoint loading)
from mmnorm.utils import (OutputError, atomic_write, check_output, check_writable,  # noqa: E402
                          sha256_file, torch_save)
from mmnorm.utils.checkpoint import load_checkpoint_for_tool  # noqa: E402

KEPT = ('state_dict', 'meta')


def published_name(out: str, sha256: str) -> str:
    """``out`` with ``-<sha256[:8]>`` before its extension (``.pth`` when it has none)."""
    stem, ext = osp.splitext(out)
    return f'{stem}-{sha256[:8]}{ext or ".pth"}'


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('in_file', help='checkpoint written by training')
    parser.add_argument('out_file', help='name of the published file (the hash is added)')
    parser.add_argument('--keep', nargs='*', default=[],
                        help='top-level entries to keep besides state_dict and meta')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing output')
    args = parser.parse_args(argv)
    try:  # (the published name is known only once written: its folder is checked now)
        check_writable(args.out_file)
    except OutputError as error:
        raise SystemExit(f'error: {error}')
    checkpoint = load_checkpoint_for_tool(args.in_file)
    if 'state_dict' not in checkpoint:  # a bare state dict
        checkpoint = {'state_dict': checkpoint}
    missing = [key for key in args.keep if key not in checkpoint]
    if missing:
        raise SystemExit(f'error: --keep {missing}: not in the checkpoint (it has '
                         f'{sorted(checkpoint)})')
    kept = {key: checkpoint[key] for key in (*KEPT, *args.keep) if key in checkpoint}
    dropped = sorted(set(checkpoint) - set(kept))

    def save_and_name(tmp: str) -> str:
        torch_save(kept, tmp)  # (the same bytes for the same checkpoint: a reproducible name)
        return published_name(args.out_file, sha256_file(tmp))

    def refuse_existing(name: str) -> str:
        check_output(name, [args.in_file], args.overwrite)
        return name

    try:
        # The name depends on the bytes: written beside the output, hashed, checked, renamed.
        final = atomic_write(args.out_file, save_and_name, final_path=refuse_existing)
    except OutputError as error:
        raise SystemExit(f'error: {error}')
    digest = sha256_file(final)
    print(f'kept {sorted(kept)}; dropped {dropped}')
    print(f'wrote {final} (sha256 {digest})')
    return final


if __name__ == '__main__':
    main()
