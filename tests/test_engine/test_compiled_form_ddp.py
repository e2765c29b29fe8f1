# Copyright (c) mmnorm contributors. All rights reserved.
"""'auto' under DDP: two real gloo processes whose data make their layers' call counts differ
(rank 1 calls the head's norm three times per iteration, rank 0 once and once more on an empty
batch) switch to the compiled form at the same iteration, the one CompiledFormHook chose from
the iteration number; each iteration, every call of either rank ran the same form."""
import json
import os
import os.path as osp
import tempfile
import traceback
import types

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

ITERS = 5
SWITCH_AT = 2  # CompiledFormHook(compile_after_iters=SWITCH_AT)


class Net(nn.Module):

    def __init__(self):
        super().__init__()
        from mmnorm import SwitchableNorm
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.norm = SwitchableNorm(4)

    def forward(self, batches):
        return sum(self.norm(self.conv(x)).square().mean() for x in batches)


def _batches(rank: int, step: int):
    """Rank 0: one batch and an empty one (a head without positive RoI); rank 1: three."""
    gen = torch.Generator().manual_seed(10 * step + rank)
    if rank == 0:
        return [torch.randn(2, 4, 5, 5, generator=gen), torch.randn(0, 4, 5, 5)]
    return [torch.randn(3, 4, 5, 5, generator=gen) for _ in range(3)]


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    try:
        dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank,
                                world_size=world)
        import mmnorm.functional.compiled as core
        from mmnorm.engine import CompiledFormHook
        from mmengine.logging import MMLogger
        torch.manual_seed(0)
        model = DistributedDataParallel(Net())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        hook = CompiledFormHook(mode='auto', compile_after_iters=SWITCH_AT)
        runner = types.SimpleNamespace(iter=0, logger=MMLogger.get_current_instance())
        hook.before_run(runner)
        calls = []
        model.module.norm.register_forward_pre_hook(
            lambda module, args: calls.append(args[0].numel() > 0))
        forms = []
        for step in range(ITERS):
            runner.iter = step
            hook.before_train_iter(runner, step)
            calls.clear()
            before = core.COMPILED.compiled_calls
            loss = model(_batches(rank, step))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            compiled, served = core.COMPILED.compiled_calls - before, sum(calls)
            # The form of this iteration's calls the compiled form serves (N > 0).
            forms.append('compiled' if compiled == served else
                         'eager' if compiled == 0 else f'mixed ({compiled} of {served})')
        with open(osp.join(out_dir, f'rank{rank}.json'), 'w') as f:
            json.dump(dict(forms=forms, failed=core.COMPILED.failed), f)
        dist.destroy_process_group()
    except BaseException:
        with open(osp.join(out_dir, f'rank{rank}.error'), 'w') as f:
            f.write(traceback.format_exc())
        raise


def test_auto_switches_every_rank_at_the_same_iteration(tmp_path):
    init_file = osp.join(tempfile.mkdtemp(), 'init')
    env = os.environ.pop('MMNORM_COMPILE', None)  # the config decides ('auto')
    try:
        mp.spawn(_worker, args=(2, init_file, str(tmp_path)), nprocs=2, join=True)
    except Exception:
        errors = [open(osp.join(tmp_path, name)).read() for name in sorted(os.listdir(tmp_path))
                  if name.endswith('.error')]
        raise AssertionError('\n'.join(errors) or 'a rank failed')
    finally:
        if env is not None:
            os.environ['MMNORM_COMPILE'] = env
    ranks = [json.load(open(osp.join(tmp_path, f'rank{r}.json'))) for r in (0, 1)]
    assert [r['failed'] for r in ranks] == [None, None]
    expected = ['eager'] * SWITCH_AT + ['compiled'] * (ITERS - SWITCH_AT)
    assert ranks[0]['forms'] == ranks[1]['forms'] == expected, [r['forms'] for r in ranks]
