# Copyright (c) mmnorm contributors. All rights reserved.
"""Fail on any host-device synchronization, on every device.

On CUDA, ``torch.cuda.set_sync_debug_mode('error')`` makes the synchronizing operations raise.
On the CPU nothing synchronizes, so the same operations are caught where Python calls them: a
``TorchFunctionMode`` that raises on the tensor methods that read a value back to the host
(``bool()``, ``item()``, ``tolist()``, ...) or make an output of data-dependent size
(``nonzero``, ``masked_select``, ``unique``), the ones that wait for a GPU. Functions that read
a tensor only when it lives on the CPU, by design, are allowed (:data:`CPU_ONLY_READERS`).
"""
import contextlib
import sys

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ['SYNCING', 'CPU_ONLY_READERS', 'HostSyncError', 'no_host_sync']

#: What waits for the device on a GPU: reading a value, or sizing an output by the data.
SYNCING = {
    Tensor.__bool__, Tensor.item, Tensor.tolist, Tensor.__int__, Tensor.__float__,
    Tensor.__index__, Tensor.nonzero, torch.nonzero, Tensor.masked_select, torch.masked_select,
    torch.unique, Tensor.unique, Tensor.numpy, torch.any, Tensor.any, torch.all, Tensor.all,
}


#: (module, function) that read a value only from CPU tensors (no sync on a GPU): the argument
#: checks of the functional forms, which skip accelerator tensors.
CPU_ONLY_READERS = {('mmnorm.functional.switchable', 'check_unit_interval')}


class HostSyncError(RuntimeError):
    """A host-device synchronization inside :func:`no_host_sync`."""


class _ForbidHostReads(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        caller = sys._getframe(1)
        if func in SYNCING and (caller.f_globals.get('__name__'),
                                caller.f_code.co_name) not in CPU_ONLY_READERS:
            raise HostSyncError(f'{getattr(func, "__qualname__", func)} reads a tensor on the '
                                'host: a host-device sync on a GPU')
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_sync(device):
    """Raise on any host-device synchronization inside (see the module doc)."""
    device = torch.device(device)
    with contextlib.ExitStack() as stack:
        if device.type == 'cuda':
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode('error')
            stack.callback(torch.cuda.set_sync_debug_mode, previous)
        stack.enter_context(_ForbidHostReads())
        yield
