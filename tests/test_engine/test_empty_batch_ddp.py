# Copyright (c) mmnorm contributors. All rights reserved.
"""DDP iterations where the batch reaching a norm layer is empty on one rank, or on both (a Mask
R-CNN mask head with no positive RoI): every parameter still takes part in the gradient
reduction (zero gradients), as with torch's own norms, so the next iteration does not fail with
``Expected to have finished reduction in the prior iteration``; also with the ratio layers'
ratios computed once per forward of the model (``mmnorm.batched_ratios``). Two real gloo
processes."""
import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mmnorm import batched_ratios
from mmnorm.testing.distributed import run_on_gloo
from mmnorm.testing.layers import LAYERS, make_layer

NAMES = ['SN', 'SN_tied', 'SN_noBN', 'BCN', 'BCN_est']
#: ... and under batched_ratios.
BATCHED = ['SN_g4', 'SSN', 'SSN_g8']
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


def _run(rank, name, batched=False):
    torch.manual_seed(0)
    local = Head(name)
    # Buffers stay per rank (they are not what this test is about), so a local copy that starts
    # every step from the DDP model's state is an exact reference.
    ddp = DistributedDataParallel(copy.deepcopy(local), broadcast_buffers=False)
    if batched:  # on the module DDP wraps, as BatchedRatiosHook does
        batched_ratios(ddp.module)
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


def _worker(rank, world, out_dir):
    for name in NAMES:
        _run(rank, name)
    for name in BATCHED:
        _run(rank, name, batched=True)


def test_ddp_survives_empty_batches_on_one_and_both_ranks():
    assert set(NAMES + BATCHED) <= set(LAYERS)
    run_on_gloo(_worker)
