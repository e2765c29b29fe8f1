# Copyright (c) mmnorm contributors. All rights reserved.
"""mmengine's AmpOptimWrapper, usable on CPU (bfloat16 autocast)."""
from typing import Union

import torch
from mmengine.device import (is_cuda_available, is_mlu_available, is_musa_available,
                             is_npu_available)
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS

__all__ = ['CPUAmpOptimWrapper']


def _accelerator_available() -> bool:
    return (is_cuda_available() or is_npu_available() or is_mlu_available()
            or is_musa_available())


@OPTIM_WRAPPERS.register_module()
class CPUAmpOptimWrapper(AmpOptimWrapper):
    """:class:`~mmengine.optim.AmpOptimWrapper` that also runs without an accelerator.

    mmengine's wrapper refuses to start on a CPU-only machine, although its autocast context
    supports CPU. With an accelerator this class *is* ``AmpOptimWrapper``. Without one it trains
    under ``torch.autocast('cpu', dtype=torch.bfloat16)``; bfloat16 has float32's exponent range,
    so there is no loss scaling (the scaler is disabled and checkpoints carry no scaler state).
    ``tools/train.py --amp`` picks it on machines without CUDA.

    Args:
        loss_scale: as ``AmpOptimWrapper`` (ignored on CPU).
        dtype (str | torch.dtype): autocast dtype. Defaults to ``'bfloat16'``; on CPU only
            bfloat16 is accepted (float16 would need loss scaling, which CPU autocast lacks).
        **kwargs: ``OptimWrapper`` arguments (``optimizer``, ``clip_grad``, ...).
    """

    def __init__(self, loss_scale: Union[str, float, dict] = 'dynamic',
                 dtype: Union[str, torch.dtype] = 'bfloat16', **kwargs):
        if _accelerator_available():
            super().__init__(loss_scale=loss_scale, dtype=dtype, **kwargs)
            return
        OptimWrapper.__init__(self, **kwargs)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        if dtype is not torch.bfloat16:
            raise ValueError(f'on CPU, AMP trains in bfloat16; got dtype={dtype}')
        self.cast_dtype = dtype
        self._scale_update_param = None
        self.loss_scaler = torch.amp.GradScaler('cpu', enabled=False)

    def load_state_dict(self, state_dict: dict) -> None:
        if not self.loss_scaler.is_enabled():
            state_dict = dict(state_dict)
            state_dict.pop('loss_scaler', None)
        super().load_state_dict(state_dict)
