# Copyright (c) mmnorm contributors. All rights reserved.
"""Training under ``torch.compile`` and under activation checkpointing computes what eager,
plain training computes: outputs, input and parameter gradients, running buffers (estimated BCN:
estimates moved once per step)."""
import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmnorm.functional import row_affine
from mmnorm.testing.layers import LAYERS, batches, make_layer

#: Compiled graphs reorder float reductions: compare in float64, where that is ~1e-15.
TOL = dict(rtol=1e-10, atol=1e-10)


class Block(nn.Module):
    """conv -> norm -> relu -> conv -> norm, as in a residual branch."""

    def __init__(self, make_norm):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.norm1 = make_norm(1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.norm2 = make_norm(2)

    def forward(self, x):
        return self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(x)))))


def _block(name: str, dtype=torch.float64) -> Block:
    torch.manual_seed(0)
    return Block(lambda seed: make_layer(name, seed=seed)).to(dtype)


def _step(model: nn.Module, x: torch.Tensor, grad: torch.Tensor, forward=None):
    """One training step's forward and backward; returns output, input grad, param grads."""
    x = x.clone().requires_grad_()
    y = (model if forward is None else forward)(x)
    y.backward(grad)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


#: Activation checkpointing: outputs and buffers are bit-exact (the forward is deterministic; a
#: second update of the statistics would show here); gradients differ by the float32 rounding
#: of oneDNN's convolution backward, which is not bit-reproducible even for torch's own norms.
EXACT, FLOAT32_GRADS = dict(rtol=0, atol=0), 1e-5


def _assert_close_to_scale(actual, expected, rel=1e-5, msg='', floor=0.0):
    """``max|actual - expected| <= rel * max(max|expected|, floor)``: float32 rounding of sums
    is relative to the size of the summands, not of each (possibly tiny) result."""
    error = float((actual - expected).abs().max())
    assert error <= rel * max(float(expected.abs().max()), floor), f'{msg}: {error}'


def _assert_same(reference: nn.Module, other: nn.Module, ref_step, other_step, tol,
                 grad_tol=None, grad_floor=0.0):
    (y0, gx0, gp0), (y1, gx1, gp1) = ref_step, other_step
    torch.testing.assert_close(y1, y0, **tol, msg=lambda m: f'output: {m}')
    if grad_tol is None:
        torch.testing.assert_close(gx1, gx0, **tol, msg=lambda m: f'input grad: {m}')
        for n in gp0:
            torch.testing.assert_close(gp1[n], gp0[n], **tol, msg=lambda m, n=n: f'{n}: {m}')
    else:
        _assert_close_to_scale(gx1, gx0, grad_tol, msg='input grad', floor=grad_floor)
        for n in gp0:
            _assert_close_to_scale(gp1[n], gp0[n], grad_tol, msg=n, floor=grad_floor)
    for (n, b0), (_, b1) in zip(reference.named_buffers(), other.named_buffers()):
        torch.testing.assert_close(b1, b0, **tol, msg=lambda m, n=n: f'buffer {n}: {m}')


#: A layer name with this suffix is traced with the op structure a GPU gets (compiled BCN is
#: ATen's batch then group normalization there, the plain form on the CPU).
ON_GPU = '@gpu-structure'


def _structure(name: str, monkeypatch) -> str:
    """The layer's name; with :data:`ON_GPU`, the GPU's op structure set for the test."""
    if name.endswith(ON_GPU):
        monkeypatch.setattr(row_affine, 'FEW_LAUNCHES_NOT_NEEDED', ())
        return name[:-len(ON_GPU)]
    return name


@pytest.mark.parametrize('name', list(LAYERS) + ['BCN' + ON_GPU, 'BCN_est' + ON_GPU])
def test_compiled_training_step_equals_eager(name, monkeypatch):
    name = _structure(name, monkeypatch)
    eager = _block(name)
    compiled_model = copy.deepcopy(eager)
    # aot_eager runs Dynamo and AOTAutograd (functionalization of the buffer updates, the
    # joint graph) without inductor's C++ code generation, which takes minutes on a small CPU.
    # One graph, except around estimated BCN's update (a deliberate graph break).
    compiled = torch.compile(compiled_model, backend='aot_eager',
                             fullgraph=name != 'BCN_est')
    inputs = batches(3, shape=(4, 8, 5, 6), dtype=torch.float64)
    for x, grad in zip(inputs, batches(3, shape=(4, 8, 5, 6), seed=9, dtype=torch.float64)):
        _assert_same(eager, compiled_model, _step(eager, x, grad),
                     _step(compiled_model, x, grad, forward=compiled), TOL)


@pytest.mark.parametrize('name', ['BCN', 'BCN' + ON_GPU, 'BCN_est', 'BCN_est' + ON_GPU, 'SN',
                                  'SSN_g8'])
def test_inductor_training_step_equals_eager(name, monkeypatch):
    """Inductor's generated kernels (float32, the dtype users train in): BCN, in both of its
    compiled forms; estimated BCN, the layer whose compiled graph once normalized with the
    estimates from before the update; SN and group-wise SSN, whose light form (hand-written
    backward) Inductor compiles. Gradients to float32 rounding relative to their scale (at
    least 1): a ratio parameter's gradient sums many products with cancellation (group-wise
    SSN's differ from a float64 step by up to 5e-5 of their largest entry, eager and compiled
    alike), and a convolution bias before a norm gets only rounding errors."""
    name = _structure(name, monkeypatch)
    eager = _block(name, dtype=torch.float32)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, dynamic=False)
    for x, grad in zip(batches(2, shape=(4, 8, 5, 6)), batches(2, shape=(4, 8, 5, 6), seed=9)):
        _assert_same(eager, compiled_model, _step(eager, x, grad),
                     _step(compiled_model, x, grad, forward=compiled), dict(rtol=1e-4, atol=1e-4),
                     grad_tol=2e-4, grad_floor=1.0)


#: The layers whose light eager form (hand-written backward, :mod:`mmnorm.functional.row_affine`)
#: ``torch.compile`` traces (``mix='std'`` has no light kernel); BCN's light form is traced as
#: ``F.batch_norm`` then ``F.group_norm`` (with a GPU's op structure); every exporter traces the
#: plain form.
LIGHT_UNDER_COMPILE = [name for name in LAYERS if not name.startswith('BCN') and name != 'SN_std']


def _dynamo_graphs(module: nn.Module, x: torch.Tensor, export: bool = False):
    """The graphs ``torch.compile`` (or ``torch.export``) captures of one training step."""
    if export:
        return [torch.export.export(module, (x, )).graph_module]
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(module, backend=backend)
    compiled(x.clone().requires_grad_()).sum().backward()
    return graphs


def _calls(graph_module, name: str) -> bool:
    return any(node.op == 'call_function' and name in str(node.target)
               for node in graph_module.graph.nodes)


@pytest.mark.parametrize('name', LIGHT_UNDER_COMPILE + [
    'BCN', 'BCN_est', 'BCN' + ON_GPU, 'BCN_est' + ON_GPU])
def test_compile_traces_the_light_form_and_export_the_plain_one(name, monkeypatch):
    """``torch.compile`` of a model (mmengine's ``compile=True``) traces the light form: the SN
    family's autograd Function, and with a GPU's op structure BCN's two ATen norms, which
    Inductor turns into fewer kernels than the plain form's autograd graph (on the CPU, BCN's
    plain form, whose kernels run faster there); ``torch.export`` (and the ONNX exporter built
    on it) keeps plain ATen ops."""
    gpu_structure = name.endswith(ON_GPU)
    name = _structure(name, monkeypatch)
    layer = make_layer(name, seed=0)
    x = torch.randn(4, 8, 5, 6)
    graphs = _dynamo_graphs(layer, x)
    light = 'group_norm' if name.startswith('BCN') else 'autograd_function_apply'
    # One graph (estimated BCN: two, around its update).
    assert len(graphs) == (2 if name == 'BCN_est' else 1)
    assert _calls(graphs[-1], light) == (gpu_structure or not name.startswith('BCN'))
    exported, = _dynamo_graphs(layer.eval(), x, export=True)
    assert not _calls(exported, light)


@pytest.mark.parametrize('name', ['SN', 'SSN_g8'])
def test_compiled_with_dynamic_shapes_equals_eager(name):
    """One graph with symbolic sizes serves batches of other shapes (mmdet's multi-scale
    training): every step equals eager training."""
    eager = _block(name)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend='aot_eager', dynamic=True, fullgraph=True)
    for shape in ((4, 8, 5, 6), (3, 8, 7, 2), (2, 8, 9, 4)):
        x, = batches(1, shape=shape, dtype=torch.float64)
        grad, = batches(1, shape=shape, seed=9, dtype=torch.float64)
        _assert_same(eager, compiled_model, _step(eager, x, grad),
                     _step(compiled_model, x, grad, forward=compiled), TOL)


@pytest.mark.parametrize('reentrant', [False, True])
@pytest.mark.parametrize('name', list(LAYERS))
def test_activation_checkpointing_equals_plain(name, reentrant):
    plain = _block(name, dtype=torch.float32)
    checkpointed = copy.deepcopy(plain)

    def forward(x):
        return checkpoint(checkpointed, x, use_reentrant=reentrant)

    for x, grad in zip(batches(3, shape=(2, 8, 4, 4)), batches(3, shape=(2, 8, 4, 4), seed=9)):
        _assert_same(plain, checkpointed, _step(plain, x, grad),
                     _step(checkpointed, x, grad, forward=forward), EXACT, FLOAT32_GRADS)
    if name == 'BCN_est':  # the estimates moved exactly three times, as in plain training
        assert int(checkpointed.norm1.num_batches_tracked) == 3


def test_resnet_with_cp_equals_plain_for_estimated_bcn_ws():
    """mmpretrain's ResNet ``with_cp=True`` (reentrant checkpoints of every block), BCN
    micro-batch form with WS convs, batch 1: the setting where double updates showed."""
    import mmpretrain.models  # noqa: F401  (registers the model types)
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS

    import mmnorm  # noqa: F401

    def build(with_cp):
        torch.manual_seed(0)
        with DefaultScope.overwrite_default_scope('mmpretrain'):
            model = MODELS.build(dict(
                type='ResNet', depth=18, base_channels=16, with_cp=with_cp,
                conv_cfg=dict(type='WSConv'),
                norm_cfg=dict(type='BCN', num_groups=4, estimate=True)))
        for m in model.modules():
            if hasattr(m, 'set_estimate_rate'):
                m.set_estimate_rate(0.02)
        return model.train()

    plain, checkpointed = build(False), build(True)
    for x in batches(2, shape=(1, 3, 32, 32)):
        outputs = []
        for model in (plain, checkpointed):
            x_in = x.clone().requires_grad_()
            out = model(x_in)[-1]
            out.square().mean().backward()
            outputs.append((out.detach(), x_in.grad))
        torch.testing.assert_close(outputs[1][0], outputs[0][0], **EXACT)
        _assert_close_to_scale(outputs[1][1], outputs[0][1], FLOAT32_GRADS, msg='input grad')
    for (n, p0), (_, p1) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        _assert_close_to_scale(p1.grad, p0.grad, FLOAT32_GRADS, msg=n)
    for (n, b0), (_, b1) in zip(plain.named_buffers(), checkpointed.named_buffers()):
        torch.testing.assert_close(b1, b0, **EXACT, msg=n)
