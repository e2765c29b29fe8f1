# Copyright (c) mmnorm contributors. All rights reserved.
"""torch.fx symbolic tracing: each mmnorm layer is one node of the traced graph.

``torch.fx.symbolic_trace`` (and the tracers built on it: torchvision's
``create_feature_extractor``, FX-mode quantization) runs a model's ``forward`` on ``Proxy``
objects, which have no values, shapes or dtypes. It records ``torch.nn``'s own layers as leaf
``call_module`` nodes and traces into every other module. An mmnorm layer's forward checks its
input and keeps bookkeeping (running statistics, SSN's choices, the batch-average guard), which
a Proxy cannot answer: traced into, it failed with "expected a Tensor, got Proxy".
:func:`fx_leaf` makes it a leaf the same way: its forward, given a Proxy, records one
``call_module`` node, and the traced ``GraphModule`` calls the layer itself at run time (every
mode, every form, the layer's state shared with the model it was traced from, as for
``torch.nn`` layers).
"""
import functools
from typing import Callable

import torch.fx

__all__ = ['fx_leaf']


def fx_leaf(forward: Callable) -> Callable:
    """Decorate a layer's ``forward(self, input, ...)``: under torch.fx symbolic tracing
    (``input`` a ``torch.fx.Proxy``) the call is recorded as one ``call_module`` node of the
    layer; otherwise ``forward`` runs as it is (one ``isinstance`` more per call)."""

    @functools.wraps(forward)
    def traced_or_run(self, input, *args, **kwargs):
        if not isinstance(input, torch.fx.Proxy):
            return forward(self, input, *args, **kwargs)
        tracer = input.tracer
        path = tracer.path_of_module(self)
        if not path:  # a graph cannot call its own root as a submodule
            raise TypeError(
                f'torch.fx: {type(self).__name__} is traced as one call_module node of the '
                'module that holds it, as torch.nn layers are; symbolically trace a model that '
                f'contains it (e.g. nn.Sequential({type(self).__name__}(...))), not the layer '
                'itself, or use torch.jit.trace / torch.export for the layer alone')
        return tracer.create_proxy('call_module', path, (input, *args), kwargs)

    return traced_or_run
