# Copyright (c) mmnorm contributors. All rights reserved.
"""FLOPs of mmnorm's layers in mmengine's analysis (``FlopAnalyzer``,
``get_model_complexity_info``: what the ``get_flops`` tools of mmdet, mmseg and mmpretrain use).

mmengine traces a model with ``torch.jit`` and counts each traced op with a handler; it has
handlers for the native norms and convolutions, none for the plain tensor ops mmnorm's layers run
when traced (their public-op form), so SN, BCN and WSConv's standardization counted as free (a
ResNet-18 at 224² counted SN 1.814 G below BN's 1.819 G). :func:`install` wraps
``FlopAnalyzer.__init__``: an analyzer of a model that contains mmnorm layers also counts the
arithmetic ops traced *inside those layers* (classes with ``flops_from_traced_ops = True``),
under the convention of mmengine's own element-wise handlers:

- element-wise ops (``sub``, ``mul``, ``add``, ``div``, ``square``, ``rsqrt``, ``sqrt``,
  ``where``, comparisons): one FLOP per output element; ``addcmul`` two;
- reductions (``mean``, ``sum``, ``amax``, ``amin``): one per input element; ``linalg_vector_norm``
  (a sum of squares) two; ``var_mean`` four (sum; subtract, square, accumulate);
- ``softmax``: three per element (exp, sum, divide).

So a layer counts what it computes: its moments, the mixture of statistics, the normalization
and the affine map (an SN layer about six FLOPs per input element, the ratio softmax and the
``(N, C)`` mixing a few per channel), and a ``WSConv`` counts as mmengine's convolution plus the
standardization of its weight. The same ops anywhere else in the model count as mmengine counts
them, and an analyzer of a model without mmnorm layers is left exactly as mmengine builds it.
Applied when ``mmengine.analysis`` is imported (idempotent).
"""
import sys
from typing import Callable, Dict, Set

from torch import nn

__all__ = ['OP_FLOPS', 'install', 'uninstall', 'mmnorm_scopes', 'scoped_handles']

#: Traced op -> (FLOPs per input element, FLOPs per output element).
OP_FLOPS: Dict[str, tuple] = {
    **{f'aten::{op}': (1, 0) for op in ('mean', 'sum', 'amax', 'amin')},
    'aten::linalg_vector_norm': (2, 0),
    'aten::var_mean': (4, 0),
    **{f'aten::{op}': (0, 1) for op in ('sub', 'mul', 'add', 'div', 'square', 'rsqrt', 'sqrt',
                                        'neg', 'reciprocal', 'where', 'le', 'lt', '__or__',
                                        'lerp', 'sub_', 'mul_', 'add_', 'div_', 'lerp_')},
    'aten::addcmul': (0, 2),
    'aten::softmax': (0, 3),
    **{f'aten::{op}': (0, 0) for op in ('expand_as', 'view_as')},  # views: no arithmetic
}

#: Module and class whose ``__init__`` :func:`install` wraps.
TARGET = ('mmengine.analysis.complexity_analysis', 'FlopAnalyzer')


def mmnorm_scopes(model: nn.Module, aliases: Dict) -> Set[str]:
    """The analyzer's scope names of the modules whose FLOPs are their traced ops."""
    return {aliases[module] for module in model.modules()
            if getattr(type(module), 'flops_from_traced_ops', False) and module in aliases}


def scoped_handles(scopes: Set[str]) -> Dict[str, Callable]:
    """mmengine op handles counting :data:`OP_FLOPS` for ops traced inside ``scopes`` (the
    innermost module of the op's scope), 0 elsewhere."""
    from mmengine.analysis.jit_handles import elementwise_flop_counter

    def scoped(count: Callable) -> Callable:

        def handle(inputs, outputs):
            node = outputs[0].node()
            return count(inputs, outputs) if node.scopeName().split('/')[-1] in scopes else 0

        return handle

    return {op: scoped(elementwise_flop_counter(*scales)) for op, scales in OP_FLOPS.items()}


def _counting_mmnorm_layers(original_init):

    def __init__(self, model, inputs):
        original_init(self, model, inputs)
        scopes = mmnorm_scopes(model, self._aliases)
        if scopes:
            self.set_op_handle(**scoped_handles(scopes))

    __init__.__doc__ = original_init.__doc__
    __init__.__mmnorm_wraps__ = original_init
    return __init__


def install(module=None) -> None:
    """Wrap ``FlopAnalyzer.__init__`` if mmengine's analysis is imported (idempotent; ``module``
    is the module just imported when called as a post-import callback)."""
    target = sys.modules.get(TARGET[0])
    if target is None:
        return
    analyzer = getattr(target, TARGET[1])
    if not hasattr(analyzer.__init__, '__mmnorm_wraps__'):
        analyzer.__init__ = _counting_mmnorm_layers(analyzer.__init__)


def uninstall() -> None:
    """Restore mmengine's ``FlopAnalyzer.__init__`` (for tests)."""
    target = sys.modules.get(TARGET[0])
    if target is None:
        return
    analyzer = getattr(target, TARGET[1])
    if hasattr(analyzer.__init__, '__mmnorm_wraps__'):
        analyzer.__init__ = analyzer.__init__.__mmnorm_wraps__
