# Copyright (c) mmnorm contributors. All rights reserved.
"""Count what one step of a normalization layer dispatches: on a GPU every non-view ATen op is
at least one kernel launch, and at the feature-map sizes of detection heads and late backbone
stages launches, not arithmetic, bound a normalization layer.

:func:`count_ops` counts the non-view ops a call dispatches (a ``TorchDispatchMode`` sees each
one, including those autograd runs in the backward); allocations without a kernel (``empty``)
are not counted. :func:`step_ops` counts one training step (forward + backward, gradients
cleared first) or one eval forward of a layer. ``tools/analysis/count_launches.py`` prints the
table for every mmnorm layer next to ``nn.BatchNorm2d`` and ``nn.GroupNorm``.
"""
import collections
from typing import Callable, Counter

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ['count_ops', 'step_ops']

#: Ops that allocate without launching a kernel.
_NO_KERNEL = ('empty', 'empty_like', 'empty_strided', 'new_empty', 'new_empty_strided')


class _OpCounter(TorchDispatchMode):

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.__name__.split('.')[0] not in _NO_KERNEL:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object]) -> Counter[str]:
    """The non-view ATen ops ``fn()`` dispatches, by name."""
    with _OpCounter() as counter:
        fn()
    return counter.ops


def step_ops(layer: nn.Module, x: Tensor, train: bool = True) -> Counter[str]:
    """The ops of one training step (``layer(x).backward(dy)``, input and parameters requiring
    grad, gradients cleared before) or, with ``train=False``, of one eval forward under
    ``torch.no_grad()``. The layer is left in the mode of the step."""
    layer.train(train)
    if not train:
        def forward():
            with torch.no_grad():
                layer(x)
        return count_ops(forward)
    for p in layer.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_()
    dy = torch.randn_like(x)
    return count_ops(lambda: layer(x).backward(dy))
