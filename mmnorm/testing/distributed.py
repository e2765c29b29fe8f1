# Copyright (c) mmnorm contributors. All rights reserved.
"""Real multi-process runs for the distributed tests: gloo on the CPU; on GPUs, NCCL when every
rank has a GPU of its own, else gloo (NCCL refuses two ranks on one GPU; gloo moves CUDA tensors
through the host), so two ranks work on a machine with one GPU."""
import os
import tempfile
import traceback
from typing import Callable, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ['backend_and_devices', 'rank_device', 'run_distributed', 'run_on_gloo']


def backend_and_devices(device: str, world: int) -> Tuple[str, list]:
    """The process group backend and each rank's device for ``world`` ranks on ``device``."""
    if torch.device(device).type != 'cuda':
        return 'gloo', ['cpu'] * world
    count = torch.cuda.device_count()
    if count == 0:
        raise RuntimeError('CUDA asked for, but torch sees no GPU')
    devices = [f'cuda:{rank % count}' for rank in range(world)]
    return ('nccl' if count >= world and dist.is_nccl_available() else 'gloo'), devices


def rank_device() -> torch.device:
    """The device of this rank (inside a worker of :func:`run_distributed`)."""
    return torch.device(os.environ.get('MMNORM_TEST_RANK_DEVICE', 'cpu'))


def _entry(rank: int, world: int, init_file: str, out_dir: str, fn: Callable, backend: str,
           devices: list) -> None:
    try:
        os.environ['MMNORM_TEST_RANK_DEVICE'] = devices[rank]
        if devices[rank].startswith('cuda'):
            torch.cuda.set_device(torch.device(devices[rank]))
        dist.init_process_group(backend, init_method=f'file://{init_file}', rank=rank,
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


def run_distributed(fn: Callable, world: int = 2, out_dir: str = None,
                    device: str = 'cpu') -> str:
    """Run ``fn(rank, world, out_dir)`` (a module-level function; :func:`rank_device` is its
    device) in ``world`` processes of one process group (:func:`backend_and_devices`); fail the
    test with the workers' tracebacks if any of them raises. Returns the backend used."""
    backend, devices = backend_and_devices(device, world)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = out_dir or tmp
        try:
            mp.spawn(_entry, args=(world, os.path.join(tmp, 'init'), out_dir, fn, backend,
                                   devices), nprocs=world, join=True)
        except Exception:
            errors = [open(os.path.join(out_dir, f)).read() for f in sorted(os.listdir(out_dir))
                      if f.startswith('error')]
            message = '\n'.join(errors) or 'a worker failed'
            try:
                import pytest
            except ImportError:  # tools/gpu_check.py on a machine without pytest
                raise RuntimeError(message) from None
            pytest.fail(message)
    return backend


def run_on_gloo(fn: Callable, world: int = 2, out_dir: str = None) -> None:
    """:func:`run_distributed` on the CPU (gloo)."""
    run_distributed(fn, world, out_dir, device='cpu')
