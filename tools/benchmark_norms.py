# Copyright (c) mmnorm contributors. All rights reserved.
"""Speed and memory of mmnorm's layers against native PyTorch layers, as ratios from one run.

For every shape (the seeds' typical feature maps), each layer's forward+backward time, eval
(inference) time and saved-activation memory are measured in the same process, interleaved
round by round (so machine noise hits all layers alike), and reported as ratios to native
GroupNorm (and, for WSConv, to ``nn.Conv2d``). Saved-activation memory is what autograd keeps for
backward (unique storages, via ``saved_tensors_hooks``), as a multiple of the input size. Ratios are medians of per-round ratios (see ``time_rounds``).

    python tools/benchmark_norms.py                  # all shapes, default rounds
    python tools/benchmark_norms.py --rounds 5 --shapes 8,64,56,56 512,256,7,7
    python tools/benchmark_norms.py --json out.json  # also write the raw numbers
"""
import argparse
import json
import random
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

from mmnorm import BatchChannelNorm, SwitchableNorm, SwitchableNormTied, WSConv2d

DEFAULT_SHAPES = ['8,64,56,56', '8,256,28,28', '2,256,100,152', '512,256,7,7']


def norm_layers(channels: int) -> Dict[str, nn.Module]:
    groups = 32 if channels % 32 == 0 else 1
    return {
        'BN': nn.BatchNorm2d(channels),
        'GN': nn.GroupNorm(groups, channels),
        'IN': nn.InstanceNorm2d(channels, affine=True),
        'SN': SwitchableNorm(channels),
        'SN_tied': SwitchableNormTied(channels),
        'BCN': BatchChannelNorm(channels, num_groups=groups),
        'BCN_est': _estimated_bcn(channels, groups),
    }


def _estimated_bcn(channels: int, groups: int) -> BatchChannelNorm:
    layer = BatchChannelNorm(channels, num_groups=groups, estimate=True)
    layer.set_estimate_rate(0.01)
    return layer


def conv_layers(channels: int) -> Dict[str, nn.Module]:
    return {
        'Conv2d': nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        'WSConv': WSConv2d(channels, channels, 3, padding=1, bias=False),
    }


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the unique storages autograd saves for backward in one training forward."""
    storages = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        return t

    layer.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    # Parameters are not activations.
    for p in layer.parameters():
        storages.pop(p.untyped_storage().data_ptr(), None)
    return sum(storages.values())


def time_rounds(fns: Dict[str, Callable[[], None]], rounds: int, inner: int,
                reference: str) -> Dict[str, Tuple[float, float]]:
    """Per layer: (median time in ms, median of the per-round time ratio to ``reference``).

    Layers run back to back within a round, in a shuffled order, so a ratio compares them under
    the same machine state; the median over rounds discards rounds disturbed by other load. (On shared machines the
    absolute speed can drift by several times over minutes; the ratios stay meaningful.)
    """
    for fn in fns.values():  # warm-up
        fn()
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)  # no layer always runs right after the same neighbour
        for name in order:
            fn = fns[name]
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - start) * 1e3 / inner)
    ref = samples[reference]
    return {
        k: (statistics.median(v), statistics.median(t / r for t, r in zip(v, ref)))
        for k, v in samples.items()
    }


def train_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def step():
        layer.train()
        x.grad = None
        layer(x).backward(grad)
    return step


def eval_step(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step():
        layer.eval()
        with torch.no_grad():
            layer(x)
    return step


def measure(layers: Dict[str, nn.Module], shape: Tuple[int, ...], rounds: int, inner: int,
            reference: str) -> Dict[str, Dict[str, float]]:
    torch.manual_seed(0)
    x = torch.randn(*shape).requires_grad_()
    out_shape = layers[reference](x).shape
    grad = torch.randn(out_shape)
    train = time_rounds({k: train_step(m, x, grad) for k, m in layers.items()}, rounds, inner,
                        reference)
    infer = time_rounds({k: eval_step(m, x) for k, m in layers.items()}, rounds, inner,
                        reference)
    input_bytes = x.numel() * x.element_size()
    return {
        name: {
            'train_ms': train[name][0],
            'train_ratio': train[name][1],
            'eval_ms': infer[name][0],
            'eval_ratio': infer[name][1],
            'saved_x_input': saved_bytes(layer, x) / input_bytes,
        }
        for name, layer in layers.items()
    }


def print_table(title: str, results: Dict[str, Dict[str, float]], reference: str) -> None:
    print(f'\n{title}')
    print(f'{"layer":<9} {"fwd+bwd ms":>10} {"x " + reference:>9} {"eval ms":>9} '
          f'{"x " + reference:>9} {"saved/input":>11}')
    for name, r in results.items():
        print(f'{name:<9} {r["train_ms"]:>10.2f} {r["train_ratio"]:>9.2f} '
              f'{r["eval_ms"]:>9.2f} {r["eval_ratio"]:>9.2f} {r["saved_x_input"]:>11.2f}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--shapes', nargs='+', default=DEFAULT_SHAPES,
                        help='N,C,H,W shapes (default: the seeds\' typical shapes)')
    parser.add_argument('--rounds', type=int, default=21, help='timing rounds (median taken)')
    parser.add_argument('--inner', type=int, default=2, help='calls per round')
    parser.add_argument('--no-conv', action='store_true', help='skip the WSConv comparison')
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads')
    parser.add_argument('--json', help='write all numbers to this JSON file')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads; '
          f'{args.rounds} rounds x {args.inner} calls, median')
    report = {}
    for text in args.shapes:
        shape = tuple(int(v) for v in text.split(','))
        results = measure(norm_layers(shape[1]), shape, args.rounds, args.inner, 'GN')
        print_table(f'norms, input {shape}', results, 'GN')
        report[f'norm {text}'] = results
        if not args.no_conv:
            conv = measure(conv_layers(shape[1]), shape, max(3, args.rounds // 2), 1, 'Conv2d')
            print_table(f'3x3 conv {shape[1]}->{shape[1]}, input {shape}', conv, 'Conv2d')
            report[f'conv {text}'] = conv
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(report, f, indent=2)
        print(f'\nwrote {args.json}')


if __name__ == '__main__':
    main()
