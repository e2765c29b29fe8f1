# Copyright (c) mmnorm contributors. All rights reserved.
"""DDP iterations where the batch reaching a norm layer is empty on one rank, or on both (a Mask
R-CNN mask head with no positive RoI): every parameter still takes part in the gradient
reduction (zero gradients), as with torch's own norms, so the next iteration does not fail with
``Expected to have finished reduction in the prior iteration``. Two real gloo processes."""
import copy
import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tests.helpers.layers import LAYERS, make_layer

NAMES = ['SN', 'SN_tied', 'SN_noBN', 'BCN', 'BCN_est']
#: per iteration, the batch size of rank 0 and rank 1.
SIZES = [(0, 3), (2, 2), (0, 0), (3, 0), (1, 2)]


class Head(nn.Module):
    def __init__(self, name):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.norm1 = make_layer(name, seed=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.norm2 = make_layer(name, seed=2)

    def forward(self, x):
        return self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(x)))))


def _run(rank, name):
    torch.manual_seed(0)
    local = Head(name)
    # Buffers stay per rank (they are not what this test is about), so a local copy that starts
    # every step from the DDP model's state is an exact reference.
    ddp = DistributedDataParallel(copy.deepcopy(local), broadcast_buffers=False)
    for step, sizes in enumerate(SIZES):
        gen = torch.Generator().manual_seed(100 * step + rank)
        x = torch.randn(sizes[rank], 8, 4, 4, generator=gen) + 1
        local.load_state_dict(ddp.module.state_dict())
        local.zero_grad()
        ddp(x).square().sum().backward()
        # The reference: this rank's own gradients, summed over ranks and averaged, as DDP does.
        local(x).square().sum().backward()
        for (n, p), (_, p_ref) in zip(ddp.module.named_parameters(), local.named_parameters()):
            assert p.grad is not None and p_ref.grad is not None, n
            expected = p_ref.grad.clone()
            dist.all_reduce(expected)
            torch.testing.assert_close(p.grad, expected / 2, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=n: f'{name} step {step} {n}: {m}')
        with torch.no_grad():
            for p in ddp.module.parameters():
                p -= 0.01 * p.grad
        ddp.zero_grad()


def _worker(rank, world, init_file, result_dir):
    try:
        dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank,
                                world_size=world)
        torch.set_num_threads(1)
        for name in NAMES:
            _run(rank, name)
        dist.barrier()
    except Exception:  # report to the parent; the pytest process shows the traceback
        with open(os.path.join(result_dir, f'error{rank}.txt'), 'w') as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ddp_survives_empty_batches_on_one_and_both_ranks():
    assert set(NAMES) <= set(LAYERS)
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, 'init')
        try:
            mp.spawn(_worker, args=(2, init_file, tmp), nprocs=2, join=True)
        except Exception:
            errors = [open(os.path.join(tmp, f)).read() for f in sorted(os.listdir(tmp))
                      if f.startswith('error')]
            pytest.fail('\n'.join(errors) or 'a worker failed')
