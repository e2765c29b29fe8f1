# Copyright (c) mmnorm contributors. All rights reserved.
"""Interleaved timing for the benchmark tools: ratios measured in one run, under the same
machine state."""
import random
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

__all__ = ['time_rounds', 'device_synchronizer']


def device_synchronizer(device) -> Optional[Callable[[], None]]:
    """What waits for ``device``'s queued work (``torch.cuda.synchronize`` on a GPU), or None
    where calls return when their work is done (CPU)."""
    device = torch.device(device)
    if device.type == 'cuda':
        return lambda: torch.cuda.synchronize(device)
    return None


def time_rounds(fns: Dict[str, Callable[[], None]], rounds: int, inner: int, reference: str,
                synchronize: Optional[Callable[[], None]] = None,
                warmup: int = 1) -> Dict[str, Tuple[float, float]]:
    """Per function: (median time of one call in ms, median of the per-round time ratio to
    ``reference``).

    Functions run back to back within a round, in a shuffled order, so a ratio compares them
    under the same machine state; the median over rounds discards rounds disturbed by other load
    (on shared machines the absolute speed can drift by several times over minutes; the ratios
    stay meaningful). ``warmup`` calls of each come first (compilation, caches, autotuning).
    ``synchronize`` (see :func:`device_synchronizer`) is called before each clock read, so that
    queued device work is counted where it belongs.
    """
    sync = synchronize or (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)  # no function always runs right after the same neighbour
        for name in order:
            fn = fns[name]
            sync()
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            sync()
            samples[name].append((time.perf_counter() - start) * 1e3 / inner)
    ref = samples[reference]
    return {
        k: (statistics.median(v), statistics.median(t / r for t, r in zip(v, ref)))
        for k, v in samples.items()
    }
