# Copyright (c) mmnorm contributors. All rights reserved.
"""Deployment: ONNX export of classifiers, segmentors and detector backbones with mmnorm layers
(:mod:`.onnx`), real test inputs for them (:mod:`.data`). The hard-ratio deploy form of SN
layers is :func:`mmnorm.convert.to_deploy`."""
from .data import fit_to, preprocessed_batches, real_inputs, synthetic_batch, test_dataloader
from .onnx import (KINDS, TensorForward, compare, export_dynamic_shapes, export_onnx, graph_opset,
                   model_kind, ort_session, run_session, to_opset)

__all__ = [
    'KINDS', 'TensorForward', 'compare', 'export_dynamic_shapes', 'export_onnx', 'graph_opset',
    'to_opset', 'model_kind',
    'ort_session', 'run_session', 'fit_to', 'preprocessed_batches', 'real_inputs',
    'synthetic_batch', 'test_dataloader'
]
