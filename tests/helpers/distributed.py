# Copyright (c) mmnorm contributors. All rights reserved.
"""Real multi-process gloo runs on the CPU, for the distributed tests."""
import os
import tempfile
import traceback
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, init_file: str, out_dir: str, fn: Callable) -> None:
    try:
        dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank,
                                world_size=world)
        torch.set_num_threads(1)
        fn(rank, world, out_dir)
        dist.barrier()
    except Exception:  # report to the parent; the pytest process shows the traceback
        with open(os.path.join(out_dir, f'error{rank}.txt'), 'w') as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_gloo(fn: Callable, world: int = 2, out_dir: str = None) -> None:
    """Run ``fn(rank, world, out_dir)`` (a module-level function) in ``world`` processes of one
    gloo process group; fail the test with the workers' tracebacks if any of them raises."""
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = out_dir or tmp
        try:
            mp.spawn(_entry, args=(world, os.path.join(tmp, 'init'), out_dir, fn), nprocs=world,
                     join=True)
        except Exception:
            errors = [open(os.path.join(out_dir, f)).read() for f in sorted(os.listdir(out_dir))
                      if f.startswith('error')]
            pytest.fail('\n'.join(errors) or 'a worker failed')
