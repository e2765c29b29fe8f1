# Copyright (c) mmnorm contributors. All rights reserved.
"""torch.fx symbolic tracing: every mmnorm layer, and the deploy form ``GroupwiseHardNorm``, is
one ``call_module`` node of the traced graph (as ``torch.nn``'s own layers are), and the traced
``GraphModule`` computes and updates exactly what the model it was traced from does, in
training and in eval."""
import copy

import pytest
import torch
from mmcv.cnn import ConvModule
from torch import nn

import mmnorm  # noqa: F401  (registers the layers)
from mmnorm import SwitchableNorm
from mmnorm.layers import WSConv2d

#: (norm_cfg, conv_cfg) of the model's ConvModule: every layer, WSConv in both positions.
CASES = {
    'SN': (dict(type='SN'), None),
    'SN_tied': (dict(type='SN_tied'), None),
    'SN-G2': (dict(type='SN', ratio_groups=2), None),
    'SSN': (dict(type='SSN'), None),
    'BCN+WS': (dict(type='BCN', num_groups=4), dict(type='WSConv')),
    'BCN_est': (dict(type='BCN', num_groups=4, estimate=True), None),
    'SyncSN': (dict(type='SyncSN'), None),
    'GN+WS': (dict(type='GN', num_groups=4), dict(type='WSConv')),
}


def model_of(norm_cfg, conv_cfg) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(ConvModule(3, 8, 3, padding=1, conv_cfg=conv_cfg, norm_cfg=norm_cfg),
                          nn.Conv2d(8, 4, 1))
    for module in model.modules():
        if hasattr(module, 'set_progress'):
            module.set_progress(0.4)
        if getattr(module, 'estimate', False):
            module.set_estimate_rate(0.1)
    return model


def prepared(model: nn.Module) -> nn.Module:
    """``model`` with its ratio parameters moved off their equal initial values (so that a
    wrong ratio would show) in place."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'logits' in name or 'scores' in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return model


@pytest.mark.parametrize('case', list(CASES))
def test_layers_are_leaf_nodes_computing_what_the_model_does(case):
    norm_cfg, conv_cfg = CASES[case]
    eager = prepared(model_of(norm_cfg, conv_cfg))
    traced_from = copy.deepcopy(eager)
    graph = torch.fx.symbolic_trace(traced_from)

    calls = {node.target: type(graph.get_submodule(node.target))
             for node in graph.graph.nodes if node.op == 'call_module'}
    conv_module = eager[0]
    assert calls == {'0.conv': type(conv_module.conv), f'0.{conv_module.norm_name}':
                     type(conv_module.norm), '0.activate': nn.ReLU, '1': nn.Conv2d}
    # The graph calls the layers themselves: no copy, state shared with the traced model.
    assert graph.get_submodule(f'0.{conv_module.norm_name}') is traced_from[0].norm

    gen = torch.Generator().manual_seed(2)
    for _ in range(2):  # training steps: outputs, gradients, then the state they leave
        x = torch.randn(4, 3, 6, 6, generator=gen)
        outs = [m.train()(x) for m in (eager, graph)]
        torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
        for out in outs:
            out.square().sum().backward()
    for (name, a), b in zip(eager.named_parameters(), traced_from.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=name)
    for (name, a), b in zip(eager.named_buffers(), traced_from.buffers()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    x = torch.randn(3, 3, 5, 7, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(graph.eval()(x), eager.eval()(x), rtol=0, atol=0)


def test_torchvision_feature_extraction_returns_the_layers_output():
    from torchvision.models.feature_extraction import create_feature_extractor
    model = prepared(model_of(dict(type='SSN'), dict(type='WSConv'))).eval()
    features = create_feature_extractor(model, return_nodes={'0.conv': 'conv', '0.ssn': 'norm'})
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        out = features(x)
        conv = model[0].conv(x)
        torch.testing.assert_close(out['conv'], conv, rtol=0, atol=0)
        torch.testing.assert_close(out['norm'], model[0].norm(conv), rtol=0, atol=0)


@pytest.mark.parametrize('layer', [lambda: SwitchableNorm(4), lambda: WSConv2d(3, 4, 3)],
                         ids=['SN', 'WSConv'])
def test_a_layer_traced_on_its_own_says_to_trace_its_holder(layer):
    with pytest.raises(TypeError, match='trace a model that contains it'):
        torch.fx.symbolic_trace(layer())
    # Held by a model, it traces.
    graph = torch.fx.symbolic_trace(nn.Sequential(layer()))
    assert [node.op for node in graph.graph.nodes] == ['placeholder', 'call_module', 'output']


def test_groupwise_hard_norm_is_a_leaf_node():
    from mmnorm.convert.groupwise import GroupwiseHardNorm
    gen = torch.Generator().manual_seed(3)
    norm = GroupwiseHardNorm(['IN'] * 2 + ['LN'] * 2 + ['BN'] * 4, ['BN'] * 4 + ['IN'] * 4,
                             weight=torch.randn(8, generator=gen),
                             running_mean=torch.randn(8, generator=gen),
                             running_var=torch.rand(8, generator=gen) + 0.5)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), norm)
    graph = torch.fx.symbolic_trace(model)
    assert [(node.op, node.target) for node in graph.graph.nodes] == [
        ('placeholder', 'input'), ('call_module', '0'), ('call_module', '1'),
        ('output', 'output')]
    x = torch.randn(2, 3, 4, 5, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), model(x), rtol=0, atol=0)


def test_fx_quantization_keeps_the_layer_in_float():
    """FX-mode post-training quantization: the layer stays one float module, fed the dequantized
    output of the quantized convolution before it."""
    import warnings
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    model = prepared(model_of(dict(type='SN'), None)).eval()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():  # (torch.ao's deprecation notices)
        warnings.simplefilter('ignore')
        calibrated = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping(),
                                example_inputs=(x, ))
        calibrated(x)
        quantized = convert_fx(calibrated)
    norm = next(node for node in quantized.graph.nodes if node.target == '0.sn')
    assert norm.op == 'call_module' and type(quantized.get_submodule('0.sn')) is SwitchableNorm
    assert norm.args[0].op == 'call_method' and norm.args[0].target == 'dequantize'
    with torch.no_grad():
        torch.testing.assert_close(quantized(x), model(x), rtol=0, atol=0.2)
