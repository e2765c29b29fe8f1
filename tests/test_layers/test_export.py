# Copyright (c) mmnorm contributors. All rights reserved.
"""Every layer, trained for a few steps, exports with ``torch.export`` and to ONNX with a dynamic
batch dimension, and ONNX Runtime reproduces the eager output; so does an mmpretrain ResNet-50
classifier with SN everywhere."""
import copy
import warnings

import pytest
import torch
from torch import nn

from mmnorm.testing.layers import LAYERS, batches, make_layer, train_steps

ort = pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')

BATCH = torch.export.Dim('batch', min=1, max=64)


def _relative_error(actual, expected) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-12))


def _onnx_session(model: nn.Module, example: torch.Tensor, path) -> 'ort.InferenceSession':
    program = torch.onnx.export(model, (example, ), dynamo=True,
                                dynamic_shapes=({0: BATCH}, ), verbose=False)
    program.save(str(path))
    return ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])


class Block(nn.Module):
    """conv -> norm -> relu: the norm as it sits in a network."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(3, norm.num_features, 3, padding=1)
        self.norm = norm

    def forward(self, x):
        return torch.relu(self.norm(self.conv(x)))


@pytest.mark.parametrize('name', list(LAYERS))
def test_torch_export_with_dynamic_batch(name):
    layer = train_steps(make_layer(name)).eval()
    program = torch.export.export(layer, (batches(1, shape=(3, 8, 5, 6))[0], ),
                                  dynamic_shapes=({0: BATCH}, ))
    for n, x in zip((1, 3, 5), batches(3, seed=7)):
        x = x[:n] if n <= x.shape[0] else torch.cat([x, x])[:n]
        torch.testing.assert_close(program.module()(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', list(LAYERS))
def test_onnx_runtime_reproduces_the_layer(name, tmp_path):
    torch.manual_seed(0)
    block = Block(train_steps(make_layer(name))).eval()
    example = torch.randn(2, 3, 5, 6)
    session = _onnx_session(block, example, tmp_path / f'{name}.onnx')
    for n in (1, 3, 5):
        x = torch.randn(n, 3, 5, 6) * 2 + 1
        expected = block(x)
        (actual, ) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        assert _relative_error(torch.from_numpy(actual), expected) <= 1e-4, (name, n)


def test_onnx_runtime_reproduces_resnet50_sn_classifier(tmp_path):
    import mmpretrain.models  # noqa: F401  (registers the model types)
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS

    import mmnorm  # noqa: F401
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = MODELS.build(dict(
            type='ImageClassifier',
            backbone=dict(type='ResNet', depth=50, norm_cfg=dict(type='SN')),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(type='LinearClsHead', num_classes=10, in_channels=2048)))
    # A few training steps, so every SN layer has running statistics and moved ratios.
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):
        logits = model(torch.randn(2, 3, 64, 64), mode='tensor')
        optimizer.zero_grad()
        logits.square().mean().backward()
        optimizer.step()
    model.eval()
    session = _onnx_session(model, torch.randn(2, 3, 64, 64), tmp_path / 'r50_sn.onnx')
    for n in (1, 3):
        x = torch.randn(n, 3, 64, 64)
        with torch.no_grad():
            expected = model(x, mode='tensor')
        (actual, ) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        assert _relative_error(torch.from_numpy(actual), expected) <= 1e-4, n


@pytest.mark.parametrize('cls, kwargs', [('SyncSwitchableNorm', {}),
                                         ('SyncSwitchableNormTied', {}),
                                         ('SyncBatchChannelNorm', dict(num_groups=4))])
def test_synchronized_layers_export_in_eval(cls, kwargs, tmp_path):
    import mmnorm
    torch.manual_seed(0)
    layer = train_steps(getattr(mmnorm, cls)(8, **kwargs)).eval()
    block = Block(layer).eval()
    session = _onnx_session(block, torch.randn(2, 3, 5, 6), tmp_path / f'{cls}.onnx')
    for n in (1, 3):
        x = torch.randn(n, 3, 5, 6)
        (actual, ) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        assert _relative_error(torch.from_numpy(actual), block(x)) <= 1e-4, (cls, n)


@pytest.mark.parametrize('name', list(LAYERS))
def test_legacy_onnx_exporter_and_jit_trace(name, tmp_path):
    # The TorchScript-based routes (torch.onnx.export(dynamo=False), which mmdeploy takes, and
    # torch.jit.trace): the same plain form, dynamic batch and spatial sizes in ONNX Runtime,
    # and no TracerWarning from mmnorm (its shape checks are quiet there, as nn.GroupNorm's).
    layer = train_steps(make_layer(name)).eval()
    example = batches(1, shape=(3, 8, 5, 6), seed=3)[0]
    path = str(tmp_path / f'{name}.onnx')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        traced = torch.jit.trace(layer, (example, ))
        torch.onnx.export(layer, (example, ), path, dynamo=False, opset_version=17,
                          input_names=['x'], dynamic_axes={'x': {0: 'n', 2: 'h', 3: 'w'}})
    ours = [f'{w.filename}:{w.lineno}: {w.message}' for w in caught
            if issubclass(w.category, torch.jit.TracerWarning) and 'mmnorm' in w.filename]
    assert not ours, ours
    torch.testing.assert_close(traced(example), layer(example), rtol=1e-5, atol=1e-5)
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    for shape in ((3, 8, 5, 6), (1, 8, 7, 4), (5, 8, 2, 9)):
        x = batches(1, shape=shape, seed=4)[0]
        (actual, ) = session.run(None, {'x': x.numpy()})
        assert _relative_error(torch.from_numpy(actual), layer(x)) <= 1e-5, (name, shape)


@pytest.mark.parametrize('name', list(LAYERS))
def test_jit_trace_of_a_block_passes_its_own_check(name):
    # torch.jit.trace traces a model again under no_grad and compares the graphs
    # (check_trace=True, its default): a layer fed by the parameters' output (which requires
    # grad while tracing, not while checking) must trace the same graph both times.
    torch.manual_seed(0)
    block = Block(train_steps(make_layer(name))).eval()
    x = torch.randn(2, 3, 5, 6)
    traced = torch.jit.trace(block, (x, ))
    torch.testing.assert_close(traced(x), block(x), rtol=1e-5, atol=1e-5)


def _unbiased_layers():
    """The layers with the SN authors' IN variance (converted checkpoints turn it on): SN, SSN
    and the deploy form of a group-wise hard layer."""
    from mmnorm import SparseSwitchableNorm, SwitchableNorm
    from mmnorm.convert.groupwise import GroupwiseHardNorm
    gen = torch.Generator().manual_seed(5)
    sn = SwitchableNorm(8, in_unbiased=True)
    ssn = SparseSwitchableNorm(8, in_unbiased=True)
    ssn.set_progress(0.3)
    for layer in (sn, ssn):
        with torch.no_grad():
            for name, param in layer.named_parameters():
                param.copy_(torch.randn(param.shape, generator=gen))
        train_steps(layer)
    hard = GroupwiseHardNorm(['IN'] * 4 + ['LN'] * 4, ['IN'] * 2 + ['LN'] * 2 + ['BN'] * 4,
                             weight=torch.randn(8, generator=gen),
                             running_mean=torch.randn(8, generator=gen),
                             running_var=torch.rand(8, generator=gen) + 0.5, in_unbiased=True)
    return {'SN': sn.eval(), 'SSN': ssn.eval(), 'GroupwiseHardNorm': hard.eval()}


@pytest.mark.parametrize('name', ['SN', 'SSN', 'GroupwiseHardNorm'])
def test_bessel_correction_follows_the_size_a_trace_is_run_at(name):
    # L / (L - 1), and 1 for L = 1: a Python factor (or test of L > 1) was a constant of the
    # example's size, so a graph traced at 6x6 gave NaN on 1x1 maps, and one traced at 1x1
    # dropped the correction at every other size (0.04 off).
    layer = _unbiased_layers()[name]
    gen = torch.Generator().manual_seed(6)
    sizes = [(1, 1), (6, 6), (3, 5)]
    inputs = [torch.randn(2, 8, *size, generator=gen) for size in sizes]
    dims = {2: torch.export.Dim('h', min=1), 3: torch.export.Dim('w', min=1)}
    with warnings.catch_warnings():
        warnings.simplefilter('error', torch.jit.TracerWarning)  # (no size baked in)
        traced = [torch.jit.trace(layer, (x, ), check_trace=False) for x in inputs[:2]]
    exported = torch.export.export(layer, (inputs[1], ), dynamic_shapes=(dims, )).module()
    for x in inputs:
        with torch.no_grad():
            expected = layer(x)
            for graph in traced + [exported]:
                torch.testing.assert_close(graph(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name', ['SN', 'SSN', 'GroupwiseHardNorm'])
def test_float64_bessel_correction_keeps_its_precision_in_legacy_onnx(name, tmp_path):
    # TorchScript's ONNX exporter typed a 0-dim factor as float32: a float64 model exported
    # with dynamo=False was 4e-8 off (a float32 rounding of 30/29) at every size but 1x1.
    layer = _unbiased_layers()[name].double()
    gen = torch.Generator().manual_seed(7)
    path = str(tmp_path / f'{name}.onnx')
    example = torch.randn(2, 8, 5, 6, generator=gen, dtype=torch.float64)
    torch.onnx.export(layer, (example, ), path, dynamo=False, opset_version=17,
                      input_names=['x'], dynamic_axes={'x': {0: 'n', 2: 'h', 3: 'w'}})
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    for size in ((5, 6), (3, 4), (1, 1)):
        x = torch.randn(3, 8, *size, generator=gen, dtype=torch.float64)
        (actual, ) = session.run(None, {'x': x.numpy()})
        with torch.no_grad():
            expected = layer(x)
        torch.testing.assert_close(torch.from_numpy(actual), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('name', ['SN', 'SSN', 'GroupwiseHardNorm'])
def test_bessel_correction_of_an_empty_batch(name):
    # (a factor shaped by the batch, (0,), did not broadcast against (0, C) variances)
    layer = _unbiased_layers()[name]
    modes = (True, False) if name != 'GroupwiseHardNorm' else (False, )
    for training in modes:
        layer.train(training)
        for shape in ((0, 8, 5, 5), (0, 8), (0, 8, 1, 1)):
            assert layer(torch.randn(shape)).shape == shape, (training, shape)


@pytest.mark.parametrize('name', ['SN', 'SN_tied', 'SSN'])
def test_layer_without_running_statistics_exports_as_the_root(name):
    # (torch.export's non-strict tracing paired the root's buffers with the graph's inputs
    # counting the None ones: IndexError when one came before a tensor)
    from mmnorm import SparseSwitchableNorm, SwitchableNorm, SwitchableNormTied
    cls = {'SN': SwitchableNorm, 'SN_tied': SwitchableNormTied, 'SSN': SparseSwitchableNorm}
    layer = cls[name](8, track_running_stats=False)
    layer.set_progress(0.3)
    x = batches(1, shape=(3, 8, 5, 6), seed=8)[0]
    for mode in (layer.eval, layer.train):
        mode()
        program = torch.export.export(layer, (x, )).module()
        torch.testing.assert_close(program(x), layer(x), rtol=1e-5, atol=1e-5)


def test_estimated_bcn_exports_its_training_step():
    # (the rate's range check read the value: no value under torch.export)
    layer = make_layer('BCN_est').train()
    twin = copy.deepcopy(layer)
    x = batches(1, shape=(3, 8, 5, 6), seed=9)[0]
    program = torch.export.export(layer, (x, )).module()
    torch.testing.assert_close(program(x), twin(x), rtol=1e-5, atol=1e-5)


def test_ws_conv_traces_without_tracer_warnings():
    from mmnorm import WSConv2d
    conv = WSConv2d(3, 8, 3).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        traced = torch.jit.trace(conv, (torch.randn(1, 3, 8, 8), ))
    ours = [str(w.message) for w in caught
            if issubclass(w.category, torch.jit.TracerWarning) and 'mmnorm' in w.filename]
    assert not ours, ours
    x = torch.randn(2, 3, 5, 7)
    torch.testing.assert_close(traced(x), conv(x), rtol=1e-6, atol=1e-6)


class _Float16Runtime(torch.utils._python_dispatch.TorchDispatchMode):
    """Every floating-point result rounded to float16, each op computed in float32: a runtime
    that keeps the graph's tensors in float16 (TensorRT's fp16 mode, a converted model)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        return torch.utils._pytree.tree_map(
            lambda t: t.half().to(t.dtype) if isinstance(t, torch.Tensor)
            and t.dtype == torch.float32 and not func._schema.is_mutable else t, out)


@pytest.mark.parametrize('name', list(LAYERS))
def test_exported_form_keeps_float16_intermediates_finite(name, monkeypatch):
    # The form exporters trace (the plain form), evaluated with float16 tensors between its ops:
    # its variance was the squared norm of the centered rows, L times the variance (65504 is
    # float16's largest: a std of 10 on 56 x 56 maps gave inf there and 95% errors).
    import mmnorm.functional.moments as core
    layer = train_steps(make_layer(name)).eval()
    x = torch.randn(2, 8, 56, 56, generator=torch.Generator().manual_seed(2)) * 10 + 3
    monkeypatch.setattr(core, 'is_tracing', lambda: True)
    with torch.no_grad():
        expected = layer(x)
        with _Float16Runtime():
            actual = layer(x)
    assert torch.isfinite(actual).all()
    assert _relative_error(actual, expected) < 1e-2


@pytest.mark.parametrize('name', ['SN', 'BCN', 'SSN'])
def test_half_model_export_reduces_in_float32(name, tmp_path):
    # Statistics in float32 for float16 inputs, in the exported graph too: the first mean was a
    # float16 ReduceMean (then cast), whose sum overflows on a float16 runtime.
    import onnx
    layer = train_steps(make_layer(name)).eval().half()
    path = tmp_path / 'half.onnx'
    torch.onnx.export(layer, (torch.randn(2, 8, 5, 6).half(), ), dynamo=True,
                      verbose=False).save(str(path))
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*model.graph.value_info, *model.graph.input, *model.graph.output)}
    reductions = [n for n in model.graph.node if n.op_type.startswith('Reduce')]
    assert reductions
    for node in reductions:
        assert types[node.input[0]] == onnx.TensorProto.FLOAT, (node.name, node.op_type)


@pytest.mark.parametrize('name', ['SN', 'BCN', 'SSN'])
def test_export_at_opset_17(name, tmp_path):
    # TensorRT 8.5 / 8.6 parse opsets up to 17; the exporter wrote 18 for every mmnorm layer when
    # asked for 17 (its own down-conversion fails on them), with a log line only.
    import onnx

    from mmnorm.deploy import export_onnx, graph_opset
    layer = train_steps(make_layer(name)).eval()
    path = str(tmp_path / 'layer.onnx')
    export_onnx(layer, torch.randn(2, 8, 5, 6), path, dynamic_batch=True, opset=17)
    assert graph_opset(onnx.load(path)) == 17
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    x = torch.randn(3, 8, 5, 6) * 2 + 1
    actual = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert _relative_error(actual, layer(x).detach()) < 1e-5
    with pytest.raises(ValueError, match='cannot be converted to opset 13'):
        export_onnx(layer, torch.randn(2, 8, 5, 6), str(tmp_path / 'old.onnx'), opset=13)
