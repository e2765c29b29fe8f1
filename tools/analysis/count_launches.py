# Copyright (c) mmnorm contributors. All rights reserved.
"""The kernel launches of one step of each normalization layer: non-view ATen ops dispatched
by one training step (forward + backward) and one eval forward in the eager form (with the
ops as on CUDA, and as on the CPU, which takes simpler passes; as on CUDA, Sparse SN's ratios
come from its one Triton kernel, run here by Triton's interpreter), and with
``--compiled`` the kernels Inductor generates for the compiled form (forward + backward), next
to ``nn.BatchNorm2d`` and ``nn.GroupNorm``. The eval forward is counted twice: as every
forward computes it, and inside :func:`mmnorm.frozen_ratios` (``FrozenRatiosHook``'s
validation and test epochs), where the SN family's ratios are computed once per epoch. The
rows "SSN, trained" count an SSN layer whose every choice is fixed (the end of training, and
every trained checkpoint): in eval it takes its one-hot ratios without computing them. The
last column counts a model of such layers under :func:`mmnorm.batched_ratios`
(``BatchedRatiosHook``): each layer's own ops, plus the ops of the one ratio computation that
every forward of the model runs for all its layers (train step / eval forward).

    python tools/analysis/count_launches.py                   # (8, 64, 28, 28), eager form
    python tools/analysis/count_launches.py --compiled        # + Inductor's kernel count
    python tools/analysis/count_launches.py --shape 2 256 50 68 --ops SN   # op names too
"""
import argparse
import copy
import math
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from mmnorm import (BatchChannelNorm, SparseSwitchableNorm,  # noqa: E402
                    SwitchableNorm, SwitchableNormTied, batched_ratios, frozen_ratios)
from mmnorm.analysis.launches import step_ops  # noqa: E402
from mmnorm.layers import has_ratios  # noqa: E402
from mmnorm.functional import compiled as compiled_form  # noqa: E402
from mmnorm.functional import row_affine  # noqa: E402
from mmnorm.functional import sparsestmax_kernel  # noqa: E402


def layers(channels: int) -> dict:
    """Every layer of the table, built for ``channels`` channels, in train mode."""
    groups = math.gcd(16, channels)  # group-wise ratios: 16 groups where C allows
    ssn, ssn_groups = SparseSwitchableNorm(channels), SparseSwitchableNorm(channels,
                                                                           ratio_groups=groups)
    for layer in (ssn, ssn_groups):
        layer.set_progress(0.3)  # between sparsemax and one-hot, as in training
    est = BatchChannelNorm(channels, num_groups=min(32, channels), estimate=True)
    est.set_estimate_rate(0.01)
    return {
        'BN': nn.BatchNorm2d(channels), 'GN': nn.GroupNorm(min(32, channels), channels),
        'SN': SwitchableNorm(channels), 'SN_tied': SwitchableNormTied(channels), 'SSN': ssn,
        'SSN, trained': trained(ssn),
        f'SN-G{groups}': SwitchableNorm(channels, ratio_groups=groups),
        f'SSN-G{groups}': ssn_groups, f'SSN-G{groups}, trained': trained(ssn_groups),
        'BCN': BatchChannelNorm(channels, num_groups=min(32, channels)), 'BCN_est': est,
    }


def trained(ssn: SparseSwitchableNorm) -> SparseSwitchableNorm:
    """A copy of ``ssn`` at the end of training: distinct scores, radius 1 and one training
    forward, after which every choice is fixed (the layer is one plain normalizer), then the
    check of its choices that loading it (a finetuning run) or evaluating it makes."""
    layer = copy.deepcopy(ssn)
    with torch.no_grad():
        for scores in (layer.mean_scores, layer.var_scores):
            scores.copy_(torch.rand(scores.shape, generator=torch.Generator().manual_seed(0)))
        layer.set_progress(1.0)
        layer.train()(torch.randn(2, layer.num_features, 4, 4))
    assert bool((layer.mean_choice >= 0).all() and (layer.var_choice >= 0).all())
    layer.load_state_dict(layer.state_dict())
    return layer


def batched_ops(layer: nn.Module, x: torch.Tensor) -> str:
    """``'L + S / l + s'``: the ops of each layer (``L``) and of the shared ratio computation
    (``S``, once per forward) in a training step of a model of copies of ``layer`` under
    :func:`batched_ratios`, and the same for an eval forward (``l``, ``s``); from models of
    one and two layers (``L = two - one``, ``S = one - L``)."""
    counts = {}
    for size in (1, 2):
        model = nn.Sequential(*[copy.deepcopy(layer) for _ in range(size)])
        model.load_state_dict(model.state_dict())  # (a copy keeps no check: as after a load)
        batched_ratios(model)
        for train in (True, False):
            step_ops(model, x, train)  # the first may set up state; count the second
            counts[size, train] = sum(step_ops(model, x, train).values())
    parts = []
    for train in (True, False):
        per_layer = counts[2, train] - counts[1, train]
        parts.append(f'{per_layer} + {counts[1, train] - per_layer}')
    return ' / '.join(parts)


def inductor_kernels(layer: nn.Module, x: torch.Tensor) -> str:
    """Kernels Inductor generates for one training step of ``layer`` compiled on its own (as
    mmengine's ``compile=True`` compiles a model), as ``'N'``, or ``'N (B graph breaks)'`` when
    the layer does not compile into one graph (the parts between breaks run in eager ops, whose
    launches are not counted)."""
    from torch._dynamo.utils import counters
    from torch._inductor import metrics
    torch._dynamo.reset()
    counters.clear()
    metrics.reset()
    compiled = torch.compile(layer, dynamic=False)
    layer.train()
    xg = x.clone().requires_grad_()
    compiled(xg).backward(torch.randn_like(x))
    breaks = sum(counters['graph_break'].values())
    count = str(metrics.generated_kernel_count)
    return count if not breaks else f'{count} ({breaks} graph break{"s" * (breaks > 1)})'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--shape', type=int, nargs='+', default=[8, 64, 28, 28],
                        help='input shape N C H W (default: 8 64 28 28)')
    parser.add_argument('--compiled', action='store_true',
                        help="also count Inductor's generated kernels (compiles each layer)")
    parser.add_argument('--ops', nargs='*', default=[],
                        help='print the op names of these layers')
    args = parser.parse_args(argv)
    if len(args.shape) != 4 or min(args.shape) < 1:
        parser.error(f'--shape takes N C H W (four positive integers), got {args.shape}')
    try:
        known = list(layers(args.shape[1]))
    except ValueError as error:  # (channels GN's and BCN's min(32, C) groups do not divide)
        parser.error(f'--shape: {error}')
    unknown = [name for name in args.ops if name not in known]
    if unknown:
        parser.error(f'--ops: unknown layer(s) {unknown}; the table has {known}')
    compiled_form.use_compiled(False)  # the eager form, whatever MMNORM_COMPILE says
    x = torch.randn(*args.shape)
    header = ('| layer | eager train step | eager eval forward | eval forward, frozen ratios '
              '| train step, CPU passes | eval forward, CPU passes '
              '| batched ratios: per layer + per forward, train / eval |') + (
        ' compiled kernels (train step) |' if args.compiled else '')
    print(f'Non-view ATen ops dispatched, input {tuple(args.shape)}, torch {torch.__version__}')
    if sparsestmax_kernel.triton is None:
        print('(Triton is not installed: Sparse SN is counted with the public ops a GPU without '
              'Triton runs)')
    print()
    print(header)
    print('|' + '---|' * (header.count('|') - 1))
    for name, layer in layers(args.shape[1]).items():
        counts = []
        # As on CUDA (fewest ops), then as on the CPU (simpler passes, more of them).
        for slow in ((), ('cpu', )):
            row_affine.FEW_LAUNCHES_NOT_NEEDED = slow
            # As on CUDA: the SparsestMax kernel (on the CPU, through Triton's interpreter).
            kernel = sparsestmax_kernel.kernel_devices(*(('cuda', 'cpu') if not slow else
                                                         ('cuda', )))
            with kernel:
                counts += _layer_counts(layer, x, slow)
        row_affine.FEW_LAUNCHES_NOT_NEEDED = ()  # as on CUDA
        with sparsestmax_kernel.kernel_devices('cuda', 'cpu'):
            counts.append(batched_ops(layer, x) if has_ratios(layer) else '')
        row = '| ' + ' | '.join([name] + [str(c) for c in counts]) + ' |'
        if args.compiled:  # traced with the op structure a GPU gets
            row += f' {inductor_kernels(layer, x)} |'
        print(row)
        if name in args.ops:
            with sparsestmax_kernel.kernel_devices('cuda', 'cpu'):
                train, evaluation = step_ops(layer, x), step_ops(layer, x, train=False)
            print(f'<!-- {name} train: {dict(train)} -->')
            print(f'<!-- {name} eval: {dict(evaluation)} -->')
    return 0


def _layer_counts(layer: nn.Module, x: torch.Tensor, slow) -> list:
    """Train step and eval forward (and, as on CUDA, the eval forward in a frozen_ratios
    scope) of one layer."""
    step_ops(layer, x)  # the first step may set up state; count the second
    train = step_ops(layer, x)
    step_ops(layer, x, train=False)  # (the first computes what eval forwards reuse)
    evaluation = step_ops(layer, x, train=False)
    counts = [sum(train.values()), sum(evaluation.values())]
    if not slow:  # in a validation / test epoch with FrozenRatiosHook
        with frozen_ratios(layer):
            step_ops(layer, x, train=False)  # (the first computes the ratios)
            counts.append(sum(step_ops(layer, x, train=False).values()))
    return counts


if __name__ == '__main__':
    sys.exit(main())
