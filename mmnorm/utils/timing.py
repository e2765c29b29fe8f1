# Copyright (c) mmnorm contributors. All rights reserved.
"""Interleaved timing for the benchmark tools: ratios measured in one run, under the same
machine state."""
import random
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

__all__ = ['time_rounds', 'sample_rounds', 'summarize', 'device_synchronizer']


def device_synchronizer(device) -> Optional[Callable[[], None]]:
    """What waits for ``device``'s queued work (``torch.cuda.synchronize`` on a GPU), or None
    where calls return when their work is done (CPU)."""
    device = torch.device(device)
    if device.type == 'cuda':
        return lambda: torch.cuda.synchronize(device)
    return None


def time_rounds(fns: Dict[str, Callable[[], None]], rounds: int, inner: int, reference: str,
                synchronize: Optional[Callable[[], None]] = None, warmup: int = 1,
                device=None) -> Dict[str, Tuple[float, float]]:
    """Per function: (median time of one call in ms, median of the per-round time ratio to
    ``reference``); :func:`sample_rounds` says how they are taken."""
    return summarize(sample_rounds(fns, rounds, inner, synchronize, warmup, device), reference)


def summarize(samples: Dict[str, List[float]], reference: str
              ) -> Dict[str, Tuple[float, float]]:
    """(median ms, median per-round ratio to ``reference``) of each function's samples."""
    ref = samples[reference]
    return {
        k: (statistics.median(v), statistics.median(t / r for t, r in zip(v, ref)))
        for k, v in samples.items()
    }


def sample_rounds(fns: Dict[str, Callable[[], None]], rounds: int, inner: int,
                  synchronize: Optional[Callable[[], None]] = None, warmup: int = 1,
                  device=None) -> Dict[str, List[float]]:
    """Per function, the time of one call (ms) in each of ``rounds`` rounds of ``inner`` calls.

    Functions run back to back within a round, in a shuffled order, so that a ratio of two
    compares them under the same machine state; the median over rounds (:func:`summarize`)
    discards rounds disturbed by other load (on shared machines the absolute speed can drift by
    several times over minutes; the ratios stay meaningful). ``warmup`` calls of each come first
    (compilation, caches, autotuning). On a CUDA ``device`` the time is the GPU's, between two
    CUDA events recorded in the device's current stream around the calls (read after the
    round); elsewhere the host clock, with ``synchronize`` (see :func:`device_synchronizer`)
    called before each read.
    """
    cuda = device is not None and torch.device(device).type == 'cuda'
    sync = synchronize or (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if cuda:
        torch.cuda.synchronize(device)
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)  # no function always runs right after the same neighbour
        events = {}
        for name in order:
            fn = fns[name]
            if cuda:
                # In the device's own stream (record() alone takes the current device's, which
                # is not ``device`` on a second GPU: it would time an empty stream).
                stream = torch.cuda.current_stream(device)
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record(stream)
                for _ in range(inner):
                    fn()
                end.record(stream)
                events[name] = (start, end)
                continue
            sync()
            begin = time.perf_counter()
            for _ in range(inner):
                fn()
            sync()
            samples[name].append((time.perf_counter() - begin) * 1e3 / inner)
        if cuda:
            torch.cuda.synchronize(device)
            for name, (start, end) in events.items():
                samples[name].append(start.elapsed_time(end) / inner)
    return samples
