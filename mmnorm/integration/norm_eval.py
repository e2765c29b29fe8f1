# Copyright (c) mmnorm contributors. All rights reserved.
"""``norm_eval=True`` freezes SN/BCN statistics exactly as it freezes ``_BatchNorm``'s.

The ResNets of mmdet, mmseg and mmpretrain (and other backbones with ``norm_eval``) end their
``train()`` with ``for m in self.modules(): if isinstance(m, _BatchNorm): m.eval()``; mmnorm's
layers are deliberately *not* ``_BatchNorm`` subclasses (tools that rewrite or fold BN layers
would silently break them), so they would keep updating their statistics. :func:`respect_norm_eval`
wraps such a ``train()``: after it runs, if ``mode`` is True and ``self.norm_eval`` is set, every
mmnorm layer inside is put in eval mode too (their BN statistics stay frozen; IN/LN/group
statistics are per sample anyway; parameters still get gradients unless ``requires_grad=False``).
"""
import functools
import inspect
from typing import Type

from mmengine.registry import Registry
from torch import nn

from ..layers import BatchStatsNorm

__all__ = ['respect_norm_eval', 'respect_norm_eval_in_registry']

_MARK = '_mmnorm_respects_norm_eval'


def respect_norm_eval(cls: Type[nn.Module]) -> Type[nn.Module]:
    """Wrap ``cls.train`` so that ``norm_eval`` also freezes mmnorm layers (idempotent).

    Use it as a class decorator for backbones of your own that have ``norm_eval``. A class
    that inherits its ``train`` (``nn.Module``'s, or an undecorated parent's) gets the wrapped
    one as its own.
    """
    original = cls.__dict__.get('train', cls.train)
    if getattr(original, _MARK, False):
        return cls

    @functools.wraps(original)
    def train(self, mode: bool = True):
        original(self, mode)
        if mode and getattr(self, 'norm_eval', False):
            for module in self.modules():
                if isinstance(module, BatchStatsNorm):
                    module.eval()
        # nn.Module.train returns self (so `model.eval()` chains); several backbones' overrides
        # return None, which this wrapper corrects.
        return self

    setattr(train, _MARK, True)
    cls.train = train
    return cls


def _takes_norm_eval(cls: type) -> bool:
    try:
        return 'norm_eval' in inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False


def respect_norm_eval_in_registry(registry: Registry) -> int:
    """Apply :func:`respect_norm_eval` to every registered class that takes ``norm_eval`` and
    defines (or inherits from such a class) its own ``train``. Returns the number wrapped."""
    count = 0
    for cls in list(registry.module_dict.values()):
        if not (inspect.isclass(cls) and issubclass(cls, nn.Module) and _takes_norm_eval(cls)):
            continue
        for klass in cls.__mro__:
            if klass is nn.Module:
                break
            if 'train' in klass.__dict__ and not getattr(klass.__dict__['train'], _MARK, False):
                respect_norm_eval(klass)
                count += 1
    return count
