# Copyright (c) mmnorm contributors. All rights reserved.
"""SyncSN / SyncSN_tied / SyncBCN / SyncSSN (with and without ratio groups) on shards (2 real
gloo processes) equal SN / SN_tied / BCN / SSN on the concatenated batch: outputs, input
gradients, summed parameter gradients, running buffers."""
import warnings

import torch
import torch.distributed as dist

from mmnorm.layers import (BatchChannelNorm, SparseSwitchableNorm, SwitchableNorm,
                           SwitchableNormTied, SyncBatchChannelNorm, SyncSparseSwitchableNorm,
                           SyncSwitchableNorm, SyncSwitchableNormTied, convert_sync_norm,
                           revert_sync_norm)
from mmnorm.testing.distributed import rank_device, run_distributed

PAIRS = {
    'SN': (SwitchableNorm, SyncSwitchableNorm, {}),
    'SN_std': (SwitchableNorm, SyncSwitchableNorm, dict(mix='std')),
    'SN_tied': (SwitchableNormTied, SyncSwitchableNormTied, {}),
    'BCN': (BatchChannelNorm, SyncBatchChannelNorm, dict(num_groups=4)),
    'SSN': (SparseSwitchableNorm, SyncSparseSwitchableNorm, {}),
    'SN_g4': (SwitchableNorm, SyncSwitchableNorm, dict(ratio_groups=4)),
    'SSN_g8': (SparseSwitchableNorm, SyncSparseSwitchableNorm, dict(ratio_groups=8)),
}
TOL = dict(rtol=1e-5, atol=1e-5)


def _layer(cls, kwargs, dtype):
    torch.manual_seed(123)
    layer = cls(8, momentum=0.3, **kwargs).to(dtype)
    with torch.no_grad():  # the same values in every dtype (normal_ draws differ by dtype)
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, dtype=torch.float64))
    if layer.follows_progress:
        layer.set_progress(0.3)
    return layer


def _check_case(rank, world, name, sizes, dtype):
    local_cls, sync_cls, kwargs = PAIRS[name]
    gen = torch.Generator().manual_seed(7)
    full = torch.randn(sum(sizes), 8, 5, 4, generator=gen, dtype=torch.float64) * 2 + 1
    grad = torch.randn(full.shape, generator=gen, dtype=torch.float64)
    start = sum(sizes[:rank])
    shard = slice(start, start + sizes[rank])

    reference = _layer(local_cls, kwargs, torch.float64)
    x_full = full.clone().requires_grad_()
    y_full = reference(x_full)
    y_full.backward(grad)

    # The synchronized layer on this rank's device; the reference on the CPU in float64.
    device = rank_device()
    sync = _layer(sync_cls, kwargs, dtype).to(device)
    x = full[shard].to(device, dtype).requires_grad_()
    y = sync(x)
    y.backward(grad[shard].to(device, dtype))
    tol = TOL if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(y.cpu().double(), y_full[shard].detach(), **tol)
    torch.testing.assert_close(x.grad.cpu().double(), x_full.grad[shard], **tol)
    for (pname, p), (_, p_ref) in zip(sync.named_parameters(), reference.named_parameters()):
        g = p.grad.clone()
        dist.all_reduce(g)  # DDP would average: the sum is the full-batch gradient
        torch.testing.assert_close(g.cpu().double(), p_ref.grad, **tol,
                                   msg=lambda m: f'{pname}: {m}')
    torch.testing.assert_close(sync.running_mean.cpu().double(), reference.running_mean, **tol)
    torch.testing.assert_close(sync.running_var.cpu().double(), reference.running_var, **tol)
    # Eval: no communication, running statistics, same as the local layer.
    sync.eval(), reference.eval()
    torch.testing.assert_close(sync(full[shard].to(device, dtype)).cpu().double(),
                               reference(full[shard]).detach(), **tol)


def _worker(rank, world, out_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        for name in PAIRS:
            for sizes in ([3, 3], [2, 5]):
                for dtype in (torch.float64, torch.float32):
                    _check_case(rank, world, name, sizes, dtype)
        # An empty shard still joins the collectives and adds nothing.
        _check_case(rank, world, 'SN', [0, 4], torch.float64)
        _check_case(rank, world, 'BCN', [4, 0], torch.float64)
    # No deprecated collective (torch.distributed.nn.functional.all_reduce warned every step).
    deprecated = [str(w.message) for w in caught
                  if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not deprecated, deprecated
    # Converted local layers synchronize too, with their options (ratio groups included).
    model = convert_sync_norm(torch.nn.Sequential(SwitchableNorm(8, ratio_groups=2).double()))
    assert isinstance(model[0], SyncSwitchableNorm) and model[0].ratio_groups == 2
    assert type(revert_sync_norm(model)[0]) is SwitchableNorm


def test_sync_layers_on_shards_equal_local_layers_on_full_batch(device):
    """Two ranks on each available device (on one GPU: gloo, mmnorm/testing/distributed.py)."""
    run_distributed(_worker, device=device.type)


def test_sync_layers_without_process_group_equal_local():
    assert not dist.is_initialized()
    for name, (local_cls, sync_cls, kwargs) in PAIRS.items():
        local, sync = _layer(local_cls, kwargs, torch.float64), _layer(sync_cls, kwargs,
                                                                      torch.float64)
        x = torch.randn(4, 8, 3, 3, dtype=torch.float64)
        torch.testing.assert_close(sync(x), local(x), rtol=0, atol=0, msg=name)
        assert sync._sync_group() is None
