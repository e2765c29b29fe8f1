# Copyright (c) mmnorm contributors. All rights reserved.
"""Speed and memory of mmnorm's layers against native PyTorch layers, as ratios from one run.

For every shape (the seeds' typical feature maps), each layer's forward+backward time, eval
(inference) time and saved-activation memory are measured in the same process, interleaved
round by round (so machine noise hits all layers alike), and reported as ratios to native
GroupNorm (and, for WSConv, to ``nn.Conv2d``). Saved-activation memory is what autograd keeps for
backward (unique storages, via ``saved_tensors_hooks``), as a multiple of the input size. Ratios
are medians of per-round ratios (see ``time_rounds``). The whole-model row times one training
iteration of the demo Mask R-CNN with SN, BCN+WS and BN against the same model with GN, on the
same generated batches.

``python tools/benchmark_norms.py`` measures mmnorm's layers in their default eager form (the
light form where it serves); ``MMNORM_COMPILE=1`` measures the opt-in compiled form, compiled
at the first (untimed, warm-up) call.

    python tools/benchmark_norms.py                  # all shapes, default rounds
    python tools/benchmark_norms.py --rounds 5 --shapes 8,64,56,56 512,256,7,7
    python tools/benchmark_norms.py --json out.json  # also write the raw numbers
    python tools/benchmark_norms.py --deploy         # + ResNet-50 soft / hard / deploy SN
    python tools/benchmark_norms.py --onnx --no-model --shapes   # ResNet-50s in ONNX Runtime only
    python tools/benchmark_norms.py --no-model       # layers only (no Mask R-CNN row)
    python tools/benchmark_norms.py --batched --no-model --shapes  # mmnorm.batched_ratios only

``--batched`` times a deep stack of small blocks (1x1 conv, then SN or SSN) whose layers compute
their own ratios against the same stack under :func:`mmnorm.batched_ratios` (one ratio
computation per forward for all layers): small maps, where the ops' count (on a GPU, the kernel
launches) rather than the arithmetic bounds a step.
"""
import argparse
import contextlib
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from mmnorm import (BatchChannelNorm, SparseSwitchableNorm, SwitchableNorm, SwitchableNormTied,
                    WSConv2d)
from mmnorm.layers import has_ratios
from mmnorm.utils.files import prepare_output_file, write_json
from mmnorm.utils.timing import sample_rounds, summarize, time_rounds

DEFAULT_SHAPES = ['8,64,56,56', '8,256,28,28', '2,256,100,152', '512,256,7,7']


def norm_layers(channels: int) -> Dict[str, nn.Module]:
    groups = 32 if channels % 32 == 0 else 1
    return {
        'BN': nn.BatchNorm2d(channels),
        'GN': nn.GroupNorm(groups, channels),
        'IN': nn.InstanceNorm2d(channels, affine=True),
        'SN': SwitchableNorm(channels),
        'SN_tied': SwitchableNormTied(channels),
        'SSN': _ssn(channels),
        'BCN': BatchChannelNorm(channels, num_groups=groups),
        'BCN_est': _estimated_bcn(channels, groups),
    }


def _ssn(channels: int) -> SparseSwitchableNorm:
    layer = SparseSwitchableNorm(channels)
    layer.set_progress(0.5)  # mid-training: SparsestMax pushes to the sphere
    return layer


def _estimated_bcn(channels: int, groups: int) -> BatchChannelNorm:
    layer = BatchChannelNorm(channels, num_groups=groups, estimate=True)
    layer.set_estimate_rate(0.01)
    return layer


def conv_layers(channels: int) -> Dict[str, nn.Module]:
    return {
        'Conv2d': nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        'WSConv': WSConv2d(channels, channels, 3, padding=1, bias=False),
    }


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the unique storages autograd saves for backward in one training forward."""
    storages = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
            # Detached: a node that saves its own output would otherwise hold itself through
            # the output's grad_fn, a cycle the garbage collector cannot see (it leaked the
            # graph of every call); the storage is the same. No backward follows.
            return t.detach()
        return t

    layer.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    # Parameters are not activations.
    for p in layer.parameters():
        storages.pop(p.untyped_storage().data_ptr(), None)
    return sum(storages.values())


def peak_bytes(step: Callable[[], None], device) -> Optional[int]:
    """Peak CUDA memory one training step allocates above what was allocated before it (None
    off CUDA)."""
    if torch.device(device).type != 'cuda':
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


#: Input variants of the tables: (autocast dtype or None, memory format).
VARIANTS = {
    'fp32': (None, torch.contiguous_format),
    'fp16': (torch.float16, torch.contiguous_format),
    'bf16': (torch.bfloat16, torch.contiguous_format),
    'channels_last': (None, torch.channels_last),
}


def _autocast(device, dtype):
    return (torch.autocast(torch.device(device).type, dtype=dtype) if dtype is not None
            else contextlib.nullcontext())


def train_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor,
               autocast_dtype=None) -> Callable[[], None]:
    def step():
        layer.train()
        x.grad = None
        with _autocast(x.device, autocast_dtype):
            y = layer(x)
        y.backward(grad.to(y.dtype))
    return step


def eval_step(layer: nn.Module, x: torch.Tensor, autocast_dtype=None) -> Callable[[], None]:
    def step():
        layer.eval()
        with torch.no_grad(), _autocast(x.device, autocast_dtype):
            layer(x)
    return step


def measure(layers: Dict[str, nn.Module], shape: Tuple[int, ...], rounds: int, inner: int,
            reference: str, device='cpu', variant: str = 'fp32'
            ) -> Dict[str, Dict[str, float]]:
    """Forward+backward and eval time of each layer on ``device`` for one input ``variant``
    (:data:`VARIANTS`), as ratios to ``reference`` (and to ``BN`` where there is one), saved
    activations and (on CUDA) the peak memory of a training step, as multiples of the input."""
    autocast_dtype, memory_format = VARIANTS[variant]
    layers = {k: m.to(device=device, memory_format=memory_format) for k, m in layers.items()}
    torch.manual_seed(0)
    x = torch.randn(*shape).to(device).contiguous(memory_format=memory_format)
    x.requires_grad_()
    with _autocast(device, autocast_dtype):
        out_shape = layers[reference](x).shape
    grad = torch.randn(out_shape).to(device)
    train_fns = {k: train_step(m, x, grad, autocast_dtype) for k, m in layers.items()}
    train = sample_rounds(train_fns, rounds, inner, device=device)
    infer = sample_rounds({k: eval_step(m, x, autocast_dtype) for k, m in layers.items()},
                          rounds, inner, device=device)
    input_bytes = x.numel() * x.element_size()
    results = {}
    for ref in [reference] + (['BN'] if 'BN' in layers and reference != 'BN' else []):
        suffix = '' if ref == reference else '_x_bn'
        for kind, samples in (('train', train), ('eval', infer)):
            for name, (ms, ratio) in summarize(samples, ref).items():
                results.setdefault(name, {})[f'{kind}_ms'] = ms
                results[name][f'{kind}_ratio{suffix}'] = ratio
    for name, layer in layers.items():
        with _autocast(device, autocast_dtype):
            results[name]['saved_x_input'] = saved_bytes(layer, x) / input_bytes
        peak = peak_bytes(train_fns[name], device)
        if peak is not None:
            results[name]['peak_x_input'] = peak / input_bytes
    return results


def print_table(title: str, results: Dict[str, Dict[str, float]], reference: str) -> None:
    print(f'\n{title}')
    bn = all('train_ratio_x_bn' in r for r in results.values())
    peak = all('peak_x_input' in r for r in results.values())
    print(f'{"layer":<9} {"fwd+bwd ms":>10} {"x " + reference:>9}'
          + (f' {"x BN":>6}' if bn else '') + f' {"eval ms":>9} {"x " + reference:>9}'
          + (f' {"x BN":>6}' if bn else '') + f' {"saved/input":>11}'
          + (f' {"peak/input":>10}' if peak else ''))
    for name, r in results.items():
        print(f'{name:<9} {r["train_ms"]:>10.3f} {r["train_ratio"]:>9.2f}'
              + (f' {r["train_ratio_x_bn"]:>6.2f}' if bn else '')
              + f' {r["eval_ms"]:>9.3f} {r["eval_ratio"]:>9.2f}'
              + (f' {r["eval_ratio_x_bn"]:>6.2f}' if bn else '')
              + f' {r["saved_x_input"]:>11.2f}'
              + (f' {r["peak_x_input"]:>10.2f}' if peak else ''))


def _resnet50(norm: str, conv_cfg=None):
    import importlib

    from mmengine.registry import DefaultScope
    registry = importlib.import_module('mmpretrain.registry').MODELS
    importlib.import_module('mmpretrain.models')
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        return registry.build(dict(type='ResNet', depth=50, norm_cfg=dict(type=norm),
                                   conv_cfg=conv_cfg)).eval()


def _choose(model: nn.Module, pattern) -> None:
    """Set every SN-like layer's running statistics and one-hot ratios (its ratio parameters'
    argmax, then hardened: SN's logits, SSN's fixed choices), cycling through pattern."""
    from mmnorm.convert import harden_ratios
    index = {'IN': 0, 'LN': 1, 'BN': 2}
    layers = [m for m in model.modules() if has_ratios(m)]
    with torch.no_grad():
        for i, layer in enumerate(layers):
            mean_choice, var_choice = pattern[i % len(pattern)]
            layer.running_var.uniform_(0.5, 2.0)
            mean_params = getattr(layer, layer.ratio_params[0])
            var_params = getattr(layer, layer.ratio_params[-1])
            mean_params.zero_()[index[mean_choice]] = 1.0
            var_params.zero_()[index[var_choice]] = 1.0
    harden_ratios(model)


#: (PyTorch / ONNX row, norm type, pattern of (mu, sigma) choices) of the hardened models:
#: every layer on BN (everything folds), and a mix with half of the layers on BN for both, as
#: the SN study (Table 4, item 8) reports for Sparse SN.
DEPLOY_CASES = [
    ('SN', 'all BN', [('BN', 'BN')]),
    ('SN', 'mix', [('BN', 'BN'), ('IN', 'IN'), ('BN', 'BN'), ('LN', 'LN'), ('BN', 'BN'),
                   ('IN', 'BN')]),
    ('SSN', 'mix', [('BN', 'BN'), ('IN', 'IN'), ('BN', 'BN'), ('LN', 'LN'), ('BN', 'BN'),
                    ('IN', 'BN')]),
]


def deploy_models() -> Tuple[Dict[str, nn.Module], Dict[str, Dict[str, str]]]:
    """ResNet-50s: BN with BN folded into the convs, soft SN, and hard SN / trained (one-hot)
    SSN with their deploy forms, for all layers choosing BN and for a realistic mix; and the
    deploy plans."""
    from mmcv.cnn import fuse_conv_bn

    from mmnorm.convert import to_deploy
    torch.manual_seed(0)
    models = {'BN (folded)': fuse_conv_bn(_resnet50('BN')), 'SN soft': _resnet50('SN')}
    plans = {}
    for norm, name, pattern in DEPLOY_CASES:
        hard = _resnet50(norm)
        _choose(hard, pattern)
        models[f'{norm} hard ({name})'] = hard
        deployed = _resnet50(norm)
        deployed.load_state_dict(hard.state_dict())
        plans[f'{norm} {name}'] = to_deploy(deployed)
        models[f'{norm} deploy ({name})'] = deployed
    for name, plan in plans.items():
        counts = {a: sum(1 for v in plan.values() if v == a) for a in set(plan.values())}
        print(f'deploy plan ({name}): {counts} of {len(plan)} layers')
    return models, plans


def measure_deploy(shape: Tuple[int, ...], rounds: int) -> Dict[str, Dict[str, float]]:
    """Inference of the :func:`deploy_models` in PyTorch, against BN folded."""
    models, _ = deploy_models()
    x = torch.randn(*shape)
    timings = time_rounds({k: eval_step(m, x) for k, m in models.items()}, rounds, 1,
                          'BN (folded)')
    return {k: {'eval_ms': t, 'eval_ratio': r} for k, (t, r) in timings.items()}


class _Classifier(nn.Module):
    """ResNet-50 backbone + global pooling + 1000-way fc: the exported classifier."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(2048, 1000)

    def forward(self, x):
        return self.fc(self.backbone(x)[-1].mean((2, 3)))


def measure_onnx(shape: Tuple[int, ...], rounds: int) -> Dict[str, Dict[str, float]]:
    """The :func:`deploy_models` as ResNet-50 classifiers exported to ONNX: file size and ONNX
    Runtime (CPU) latency, against the BN ResNet-50 with BN folded into the convs."""
    import os
    import tempfile

    from mmnorm.deploy import export_onnx, ort_session
    models, _ = deploy_models()
    x = torch.randn(*shape)
    feed = x.numpy()
    sizes, sessions = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, backbone in models.items():
            path = os.path.join(tmp, f'{len(sizes)}.onnx')
            export_onnx(_Classifier(backbone).eval(), x, path)
            sizes[name] = os.path.getsize(path) / 2**20
            sessions[name] = ort_session(path)
    fns = {name: (lambda s=session: s.run(None, {s.get_inputs()[0].name: feed}))
           for name, session in sessions.items()}
    timings = time_rounds(fns, rounds, 1, 'BN (folded)')
    return {k: {'size_mb': sizes[k], 'size_ratio': sizes[k] / sizes['BN (folded)'],
                'ort_ms': t, 'ort_ratio': r} for k, (t, r) in timings.items()}


#: The demo Mask R-CNN with each normalizer (backbone, FPN, box and mask heads).
DEMO_CONFIGS = {
    'GN': 'configs/demo/mask-rcnn_r18-tiny_fpn_gn_demo.py',
    'SN': 'configs/demo/mask-rcnn_r18-tiny_fpn_sn_demo.py',
    'BCN+WS': 'configs/demo/mask-rcnn_r18-tiny_fpn_bcn-ws_demo.py',
    'BN': 'configs/demo/mask-rcnn_r18-tiny_fpn_bn_demo.py',
}


def measure_demo_model(rounds: int, num_batches: int = 4) -> Dict[str, Dict[str, float]]:
    """One training iteration (forward, losses, backward, SGD step) of the demo Mask R-CNN with
    each normalizer, on the same generated batches of 2 images, as a ratio to GN."""
    import os.path as osp
    import tempfile

    from mmengine.config import Config
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import init_default_scope

    from mmnorm.demo import generate_demo_data
    from mmnorm.utils.model import build_model
    init_default_scope('mmdet')
    from mmdet.registry import DATASETS
    root = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))))
    steps = {}
    # (the generated images are loaded into the batches, then their folder is removed)
    with tempfile.TemporaryDirectory(prefix='mmnorm_bench_') as data_root:
        generate_demo_data(data_root, num_train=2 * num_batches, num_val=1, seed=0)
        for name, config in DEMO_CONFIGS.items():
            cfg = Config.fromfile(osp.join(root, config))
            dataset_cfg = cfg.train_dataloader.dataset
            dataset_cfg.data_root = data_root + '/'
            torch.manual_seed(0)
            dataset = DATASETS.build(dataset_cfg)
            batches = [pseudo_collate([dataset[2 * i], dataset[2 * i + 1]])
                       for i in range(num_batches)]
            model = build_model(cfg).train()
            for m in model.modules():  # BCN's micro-batch form: EstimateRateHook's rate
                if getattr(m, 'estimate', False):
                    m.set_estimate_rate(0.01)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            steps[name] = _detector_step(model, optimizer, batches)
    timings = time_rounds(steps, rounds, num_batches, 'GN')
    return {k: {'train_ms': t, 'train_ratio': r} for k, (t, r) in timings.items()}


def measure_batched(blocks: int, shape: Tuple[int, ...], rounds: int, inner: int
                    ) -> Dict[str, Dict[str, float]]:
    """Per kind (SN, SSN): a stack of ``blocks`` (1x1 conv, layer) blocks under
    :func:`mmnorm.batched_ratios` against the same stack computing each layer's ratios itself,
    training step and eval forward, as ratios (batched / own)."""
    import copy
    from mmnorm import batched_ratios
    x = torch.randn(*shape)
    results = {}
    for kind, make in (('SN', lambda c: SwitchableNorm(c)), ('SSN', _ssn)):
        own = nn.Sequential(*[m for _ in range(blocks)
                              for m in (nn.Conv2d(shape[1], shape[1], 1, bias=False),
                                        make(shape[1]))])
        batched = copy.deepcopy(own)
        batched_ratios(batched)

        def train(model):
            return lambda: model(x).sum().backward()

        def evaluate(model):
            def forward():
                with torch.no_grad():
                    model(x)
            return forward
        row = {}
        for mode, step in (('train', train), ('eval', evaluate)):
            for model in (own, batched):
                model.train(mode == 'train')
            timings = time_rounds({'own': step(own), 'batched': step(batched)}, rounds, inner,
                                  'own')
            row[f'{mode}_own_ms'] = timings['own'][0]
            row[f'{mode}_ratio'] = timings['batched'][1]
        results[kind] = row
    return results


def _detector_step(model: nn.Module, optimizer, batches) -> Callable[[], None]:
    state = {'i': 0}

    def step():
        batch = batches[state['i'] % len(batches)]
        state['i'] += 1
        data = model.data_preprocessor(batch, True)
        losses = model(**data, mode='loss')
        loss = sum(v if isinstance(v, torch.Tensor) else sum(v) for k, v in losses.items()
                   if 'loss' in k)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--shapes', nargs='*', default=DEFAULT_SHAPES,
                        help='N,C,H,W shapes (default: the seeds\' typical shapes; none: skip '
                        'the layer tables)')
    parser.add_argument('--rounds', type=int, default=21, help='timing rounds (median taken)')
    parser.add_argument('--inner', type=int, default=2, help='calls per round')
    parser.add_argument('--no-conv', action='store_true', help='skip the WSConv comparison')
    parser.add_argument('--deploy', action='store_true',
                        help='also time ResNet-50 inference: soft / hard / deploy SN vs BN')
    parser.add_argument('--deploy-shape', default='4,3,224,224', help='N,C,H,W of that run')
    parser.add_argument('--onnx', action='store_true',
                        help='also export those ResNet-50s to ONNX: size and ONNX Runtime '
                        'latency against the BN-folded one (input --onnx-shape)')
    parser.add_argument('--onnx-shape', default='1,3,224,224', help='N,C,H,W of that run')
    parser.add_argument('--no-model', action='store_true',
                        help='skip the whole-model row (demo Mask R-CNN training iteration)')
    parser.add_argument('--model-rounds', type=int, default=7,
                        help='timing rounds of the whole-model row')
    parser.add_argument('--device', default='cpu',
                        help='cpu or cuda[:i]: the layer tables on that device (CUDA: GPU time '
                        'from CUDA events after warm-up, peak memory per step)')
    parser.add_argument('--variants', nargs='+', choices=list(VARIANTS), default=None,
                        help='input variants of the layer tables: fp32, fp16 / bf16 (autocast), '
                        'channels_last (default: fp32 on the CPU, all of them on CUDA)')
    parser.add_argument('--batched', action='store_true',
                        help='also time a deep stack of small SN / SSN blocks under '
                        'mmnorm.batched_ratios against its layers computing their own ratios')
    parser.add_argument('--batched-shape', default='2,16,8,8',
                        help='N,C,H,W of that run (50 blocks)')
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads')
    parser.add_argument('--json', help='write all numbers to this JSON file')
    args = parser.parse_args()
    _check_arguments(parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    from mmnorm.functional import compile_mode, compiled_enabled, use_compiled
    if compile_mode() == 'auto':
        use_compiled(True)  # the steady state: compiled from the (untimed) warm-up calls on
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads; '
          f'{args.rounds} rounds x {args.inner} calls, median; mmnorm layers '
          f'{"compiled" if compiled_enabled() else "in their eager form (the default)"}')
    report = {}
    device = torch.device(args.device)
    variants = args.variants or (list(VARIANTS) if device.type == 'cuda' else ['fp32'])
    if device.type == 'cuda':
        print(f'device {torch.cuda.get_device_name(device)}: GPU times (CUDA events)')
    for text in args.shapes:
        shape = _shape(text)
        for variant in variants:
            key = text if variant == 'fp32' else f'{text} {variant}'
            results = measure(norm_layers(shape[1]), shape, args.rounds, args.inner, 'GN',
                              device, variant)
            print_table(f'norms, input {shape} {variant} on {device}', results, 'GN')
            report[f'norm {key}'] = results
            if not args.no_conv:
                conv = measure(conv_layers(shape[1]), shape, max(3, args.rounds // 2), 1,
                               'Conv2d', device, variant)
                print_table(f'3x3 conv {shape[1]}->{shape[1]}, input {shape} {variant} on '
                            f'{device}', conv, 'Conv2d')
                report[f'conv {key}'] = conv
    if not args.no_model:
        results = measure_demo_model(args.model_rounds)
        print('\nDemo Mask R-CNN (R-18 FPN, 2 images of 128x128), one training iteration')
        print(f'{"norm":<9} {"ms":>9} {"x GN":>7}')
        for name, r in results.items():
            print(f'{name:<9} {r["train_ms"]:>9.1f} {r["train_ratio"]:>7.2f}')
        report['model'] = results
    if args.batched:
        shape = _shape(args.batched_shape)
        results = measure_batched(50, shape, args.rounds, args.inner)
        print(f'\n50 blocks (1x1 conv, layer), input {shape}: batched_ratios / own ratios')
        print(f'{"layer":<6} {"train ms":>9} {"x own":>7} {"eval ms":>9} {"x own":>7}')
        for name, r in results.items():
            print(f'{name:<6} {r["train_own_ms"]:>9.1f} {r["train_ratio"]:>7.2f} '
                  f'{r["eval_own_ms"]:>9.1f} {r["eval_ratio"]:>7.2f}')
        report['batched'] = results
    if args.deploy:
        shape = _shape(args.deploy_shape)
        results = measure_deploy(shape, max(5, args.rounds // 3))
        print(f'\nResNet-50 inference (eval), input {shape}')
        print(f'{"model":<22} {"ms":>9} {"x BN folded":>12}')
        for name, r in results.items():
            print(f'{name:<22} {r["eval_ms"]:>9.1f} {r["eval_ratio"]:>12.2f}')
        report['deploy'] = results
    if args.onnx:
        shape = _shape(args.onnx_shape)
        results = measure_onnx(shape, max(5, args.rounds // 2))
        print(f'\nResNet-50 classifier in ONNX Runtime (CPU), input {shape}')
        print(f'{"model":<22} {"MiB":>7} {"x BN":>6} {"ms":>9} {"x BN folded":>12}')
        for name, r in results.items():
            print(f'{name:<22} {r["size_mb"]:>7.1f} {r["size_ratio"]:>6.2f} '
                  f'{r["ort_ms"]:>9.1f} {r["ort_ratio"]:>12.2f}')
        report['onnx'] = results
    if args.json:
        write_json(args.json, report, indent=2)
        print(f'\nwrote {args.json}')


def _shape(text: str) -> Tuple[int, ...]:
    """``'N,C,H,W'`` as a tuple of four positive ints, or ValueError."""
    shape = tuple(int(v) for v in text.split(','))
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(text)
    return shape


def _check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse what would fail after minutes of timing, as ``parser.error`` (one line, exit
    2): shapes that are not N,C,H,W, fewer than one round or call, a device torch does not
    have, a --json path that cannot be written."""
    for option in ('rounds', 'inner', 'model_rounds'):
        if getattr(args, option) < 1:
            parser.error(f'--{option.replace("_", "-")} must be >= 1')
    for option in ('shapes', 'deploy_shape', 'onnx_shape', 'batched_shape'):
        value = getattr(args, option)
        for text in value if isinstance(value, list) else [value]:
            try:
                _shape(text)
            except ValueError:
                parser.error(f'--{option.replace("_", "-")}: {text!r} is not N,C,H,W (four '
                             'positive integers separated by commas, e.g. 8,64,56,56)')
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f'--device: {error}')
    if device.type == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda, but torch sees no CUDA device')
    if args.json:
        try:
            prepare_output_file(args.json)
        except OSError as error:
            parser.error(f'--json: {error}')


if __name__ == '__main__':
    main()
