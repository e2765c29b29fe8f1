# Copyright (c) mmnorm contributors. All rights reserved.
"""ONNX export of OpenMMLab models with mmnorm layers, and ONNX Runtime inference.

What is exported is the tensor part of each codebase's model, the part mmdeploy's rewriters start
from, with pre- and post-processing left to the caller (``tools/deploy/test_onnx.py`` runs the
config's own):

- an mmpretrain classifier: image batch -> class logits (``mode='tensor'``);
- an mmseg segmentor: image batch -> segmentation logits at the input's size (the decode head's
  output resized as the segmentor's whole-image inference resizes it);
- an mmdet detector: image batch -> its backbone + neck features (the FPN levels).

The layers export through ``torch.onnx.export(dynamo=True)``: under tracing they run their plain
form (:mod:`mmnorm.functional.moments`), public ops only.
"""
import functools
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.files import atomic_write

__all__ = ['KINDS', 'model_kind', 'TensorForward', 'export_dynamic_shapes', 'export_onnx',
           'graph_opset', 'to_opset', 'ort_session', 'run_session', 'compare']

#: What :func:`model_kind` can return.
KINDS = ('classifier', 'segmentor', 'detector')


def model_kind(model: nn.Module) -> str:
    """``'classifier'``, ``'segmentor'`` or ``'detector'`` for a built OpenMMLab model."""
    if hasattr(model, 'decode_head'):
        return 'segmentor'
    if hasattr(model, 'backbone') and type(model).__module__.startswith('mmdet.'):
        return 'detector'
    if hasattr(model, 'backbone') and hasattr(model, 'head'):
        return 'classifier'
    raise ValueError(f'cannot export {type(model).__name__}: expected an mmpretrain classifier, '
                     f'an mmseg segmentor or an mmdet detector')


class TensorForward(nn.Module):
    """The tensor-to-tensor part of ``model`` that is exported (see the module doc)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()
        self.kind = model_kind(model)
        if self.kind == 'segmentor':
            mode = (getattr(model, 'test_cfg', None) or {}).get('mode', 'whole')
            if mode != 'whole':
                raise ValueError(
                    f"the segmentor's test_cfg.mode is {mode!r}; only whole-image inference is "
                    f"exported (pass --cfg-options model.test_cfg.mode=whole)")

    @functools.cached_property
    def output_names(self) -> List[str]:
        """Names of the outputs (a detector's levels are counted with one small forward,
        once)."""
        if self.kind == 'classifier':
            return ['logits']
        if self.kind == 'segmentor':
            return ['seg_logits']
        return [f'feat{i}' for i in range(self._num_features())]

    def _num_features(self) -> int:
        with torch.no_grad():
            return len(self.model.extract_feat(torch.zeros(1, 3, 64, 64)))

    def forward(self, inputs: Tensor):
        if self.kind == 'classifier':
            return self.model(inputs, mode='tensor')
        features = self.model.extract_feat(inputs)
        if self.kind == 'detector':
            return tuple(features)
        logits = self.model.decode_head(features)
        return F.interpolate(logits, size=inputs.shape[2:], mode='bilinear',
                             align_corners=self.model.align_corners)


#: The largest size a symbolic dimension of an export may take (torch.export needs a bound).
MAX_DIM = 8192


def export_dynamic_shapes(dynamic_batch: bool = False, dynamic_size: bool = False):
    """torch.export's ``dynamic_shapes`` for the image batch ``(N, 3, H, W)``: named symbolic
    ``batch`` and/or ``height`` / ``width`` dimensions (their names appear in the ONNX file)."""
    dims = {}
    if dynamic_batch:
        dims[0] = torch.export.Dim('batch', min=1, max=MAX_DIM)
    if dynamic_size:
        dims[2] = torch.export.Dim('height', min=1, max=MAX_DIM)
        dims[3] = torch.export.Dim('width', min=1, max=MAX_DIM)
    return (dims, ) if dims else None


def export_onnx(module: nn.Module, example: Tensor, path: str, dynamic_batch: bool = False,
                output_names: Optional[Sequence[str]] = None, opset: int = 18,
                dynamic_size: bool = False) -> None:
    """Export ``module(example)`` to ``path`` (one self-contained file, written atomically).

    ``dynamic_batch``: the batch dimension is symbolic; ``dynamic_size``: height and width are.
    A symbolic dimension needs an example size of 2 or more (torch.export specializes size-1
    dimensions); the rest of the shape is the example's.
    """
    dynamic_shapes = export_dynamic_shapes(dynamic_batch, dynamic_size)
    for axis in (dynamic_shapes or ({}, ))[0]:
        if example.shape[axis] < 2:
            raise ValueError(f'export an example of size >= 2 in dimension {axis} to make it '
                             f'symbolic (got {tuple(example.shape)})')
    module.eval()
    with torch.no_grad():
        program = torch.onnx.export(module, (example, ), dynamo=True, input_names=['inputs'],
                                    output_names=list(output_names or []) or None,
                                    dynamic_shapes=dynamic_shapes,
                                    opset_version=max(opset, EXPORTER_OPSET), verbose=False)
    model = to_opset(program.model_proto, opset)  # (below 18: converted here, see to_opset)
    import onnx
    atomic_write(path, lambda tmp: onnx.save_model(model, tmp))


#: The lowest opset ``torch.onnx.export(dynamo=True)`` writes (lower ones it converts down
#: itself, which fails for mmnorm's layers: :func:`to_opset` converts instead).
EXPORTER_OPSET = 18


def graph_opset(model) -> int:
    """The version of the default ONNX domain a model imports."""
    return next(entry.version for entry in model.opset_import if entry.domain in ('', 'ai.onnx'))


def to_opset(model, opset: int):
    """``model`` converted to ``opset`` and checked, or ``ValueError`` with the reason.

    ``torch.onnx.export(dynamo=True)`` writes opset 18 for anything lower (its implementations
    start there) and converts down itself, keeping 18, with a log line only, where that fails:
    for every mmnorm layer it did ("No initializer or constant input to node found", on the
    graph it converts before writing its initializers), so ``opset_version=17`` gave an opset
    18 file, which TensorRT 8.5 / 8.6 (parsers up to opset 17) refuse. The written graph
    converts with ONNX's version converter, which leaves opset 18's ``noop_with_empty_axes`` on
    the Reduce ops it gives attribute axes, where only ReduceSum has it (at its default 0,
    every axes given: removed here).
    """
    if graph_opset(model) == opset:
        return model
    import onnx
    from onnx import version_converter
    try:
        converted = version_converter.convert_version(model, opset)
        for node in converted.graph.node:
            if node.op_type.startswith('Reduce') and node.op_type != 'ReduceSum':
                kept = [a for a in node.attribute if a.name != 'noop_with_empty_axes'
                        or onnx.helper.get_attribute_value(a) != 0]
                del node.attribute[:]
                node.attribute.extend(kept)
        onnx.checker.check_model(converted)
    except Exception as error:  # (the converter raises RuntimeError or onnx's own errors)
        raise ValueError(f'an ONNX graph of opset {graph_opset(model)} cannot be converted to '
                         f'opset {opset}: {error}') from None
    return converted


def ort_session(path: str, threads: Optional[int] = None):
    """An ONNX Runtime CPU session for ``path``."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def run_session(session, inputs: Tensor) -> List[Tensor]:
    """Run ``session`` on one image batch; its outputs as tensors."""
    feed = {session.get_inputs()[0].name: inputs.detach().cpu().numpy().astype(np.float32)}
    return [torch.from_numpy(out) for out in session.run(None, feed)]


def compare(actual: Sequence[Tensor], expected: Sequence[Tensor]
            ) -> Tuple[float, float, Dict[int, float]]:
    """``(largest |difference|, largest relative difference, per-output relative)``; relative
    to each output's largest magnitude."""
    per_output = {}
    worst_abs = 0.0
    for index, (a, e) in enumerate(zip(actual, expected)):
        diff = (a.double() - e.double()).abs().max().item()
        worst_abs = max(worst_abs, diff)
        per_output[index] = diff / max(e.abs().max().item(), 1e-12)
    return worst_abs, max(per_output.values()), per_output
