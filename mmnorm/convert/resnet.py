# Copyright (c) mmnorm contributors. All rights reserved.
"""Convert the papers' released ImageNet ResNets into mmpretrain ``ImageClassifier`` state dicts.

Source layouts (what the authors' code saves; reimplemented from the description, no code of
theirs is used):

``sn`` (SN authors, ResNet v1): an optional ``module.`` prefix; stem ``conv1`` / ``sn1``; blocks
``layer{i}.{j}.conv{k}`` / ``layer{i}.{j}.sn{k}``; shortcut ``layer{i}.{j}.downsample.0`` (conv)
/ ``.downsample.1`` (SN); classifier ``fc``. Each SN holds ``weight`` and ``bias`` shaped
``(1, C, 1, 1)`` and ratio logits ``mean_weight`` / ``var_weight``: 3 entries (IN, LN, BN), or
2 (IN, LN) for the micro-batch models trained with ``using_bn=False``. Only layers with BN in Ω
hold ``running_mean`` / ``running_var`` (shaped ``(1, C, 1)``): the authors' ``SwitchNorm2d``
registers them only then. Their running statistics follow the authors' momentum convention
(``running = m * running + (1 - m) * batch``, ``m = 0.9`` in their ``SwitchNorm2d``), which is
``momentum = 1 - m`` in PyTorch's convention: the converted ``norm_cfg`` carries it, so that
finetuning keeps updating them at the same rate. Their values are copied as they are: the
authors evaluate with them directly (moving average, or the batch average their ``sn_helper``
leaves in the same buffers). Layers without BN get the buffers' initial values (0 and 1, never
used with ``using_bn=False``) so that the result loads strictly into mmnorm's ``sn-nobn``
configs. Their IN variance is unbiased: the converted layers get ``in_unbiased=True`` (saved as
each layer's ``in_var_unbiased`` buffer).

``ssn`` (Sparse SN authors, switchablenorms/Sparse_SwitchNorm, ResNet v1): the ``sn`` layout, each
norm holding ratio parameters ``mean_weight`` / ``var_weight`` (3 entries; SparsestMax is applied
to them, they are not logits; a fixed vector holds its one-hot ratios), ``running_mean`` /
``running_var`` ``(1, C, 1)`` kept with momentum 0.997 in their convention, the SparsestMax
``radius`` ``(1,)`` and ``mean_fixed`` / ``var_fixed`` ``(1,)`` (1 once the ratios are one-hot and
frozen). Converted to ``SSN`` layers with the same radius, ``mean_choice`` / ``var_choice`` set to
the fixed vector's one-hot index (-1 while free), ``in_unbiased=True`` and ``momentum = 1 -
0.997``; their stem max pooling has no padding and rounds up, so the target backbone is
``ResNetV1SSN`` (:mod:`mmnorm.integration.mmpretrain.resnet_v1_ssn`).

``bcn`` (BCN authors, torchvision naming, WS convs): ``conv1``, ``bn1``, ``layer{i}.{j}.conv{k}``,
``layer{i}.{j}.bn{k}``, ``downsample.0`` / ``.1``, ``fc``. Each norm holds a batch norm
submodule (``pbn.`` or ``bn.``: ``weight``, ``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``) and the per-group ``weight`` / ``bias`` shaped ``(1, G, 1)``. Their
micro-batch layers (``BCNorm(estimate=True)``, whose ``bn.`` is an ``EstBN``) also hold
``estbn_moving_speed`` ``(1,)``, the rate of the estimates: converted to
``BCN(estimate=True)`` with that ``estimate_rate``.

Target: mmpretrain's ``ResNet`` (``style='pytorch'``) with ``norm_cfg=dict(type='SN')`` (norm
names ``sn{k}``) or ``dict(type='BCN', num_groups=G)`` and ``conv_cfg=dict(type='WSConv')``
(names ``bcn{k}``), or ``ResNetV1SSN`` with ``dict(type='SSN')`` (names ``ssn{k}``), a
``GlobalAveragePooling`` neck and a ``LinearClsHead``; keys prefixed
``backbone.`` / ``head.``, so the backbone also loads into mmdet / mmseg ResNets through
``init_cfg=dict(type='Pretrained', prefix='backbone.', checkpoint=...)``.
"""
import re
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

__all__ = ['FORMATS', 'SN_SOURCE_MOMENTUM', 'SOURCE_MOMENTUM', 'ResNetSpec', 'ConversionError',
           'strip_prefix', 'resnet_spec', 'convert_state_dict', 'classifier_config',
           'check_against']

FORMATS = ('sn', 'ssn', 'bcn')
#: The SN authors' ``SwitchNorm2d`` default momentum (their convention: the share of the old
#: running value kept).
SN_SOURCE_MOMENTUM = 0.9
#: The default source momentum of each format with running statistics in that convention (the
#: Sparse SN authors' ``SSN2d`` keeps 0.997).
SOURCE_MOMENTUM = {'sn': SN_SOURCE_MOMENTUM, 'ssn': 0.997}
_DEPTHS = {
    ('bottleneck', (3, 4, 6, 3)): 50,
    ('bottleneck', (3, 4, 23, 3)): 101,
    ('bottleneck', (3, 8, 36, 3)): 152,
    ('basic', (2, 2, 2, 2)): 18,
    ('basic', (3, 4, 6, 3)): 34,
}


class ConversionError(ValueError):
    """The source does not fit the expected layout (the message names the offending keys)."""


class ResNetSpec:
    """What a source state dict holds: depth, blocks, classes, and the norm's details."""

    def __init__(self, depth: int, block: str, blocks: Tuple[int, ...], num_classes: int,
                 fmt: str, num_ratios: int = 3, num_groups: int = 32, bn_prefix: str = 'bn',
                 style: str = 'pytorch', source_momentum: float = SN_SOURCE_MOMENTUM,
                 estimate: bool = False):
        self.depth, self.block, self.blocks, self.style = depth, block, blocks, style
        self.estimate = estimate  # bcn: the authors' EstBN (estimated batch statistics)
        self.num_classes, self.fmt = num_classes, fmt
        self.num_ratios, self.num_groups, self.bn_prefix = num_ratios, num_groups, bn_prefix
        self.source_momentum = source_momentum

    @property
    def norm_cfg(self) -> dict:
        if self.fmt in ('sn', 'ssn'):
            cfg = dict(type=self.fmt.upper(), using_bn=self.num_ratios == 3, in_unbiased=True)
            if cfg['using_bn']:  # the authors keep m of the old value; PyTorch's is 1 - m
                cfg['momentum'] = round(1.0 - self.source_momentum, 12)
            return cfg
        if self.estimate:
            return dict(type='BCN', num_groups=self.num_groups, estimate=True)
        return dict(type='BCN', num_groups=self.num_groups)

    @property
    def backbone_type(self) -> str:
        """mmpretrain's ``ResNet``, or ``ResNetV1SSN`` with the SSN authors' stem pooling."""
        return 'ResNetV1SSN' if self.fmt == 'ssn' else 'ResNet'

    @property
    def conv_cfg(self) -> Optional[dict]:
        return dict(type='WSConv') if self.fmt == 'bcn' else None

    @property
    def in_channels(self) -> int:
        return 2048 if self.block == 'bottleneck' else 512

    def as_dict(self) -> dict:
        return dict(type=self.backbone_type, depth=self.depth, style=self.style,
                    norm_cfg=self.norm_cfg, conv_cfg=self.conv_cfg, num_classes=self.num_classes)


def strip_prefix(state_dict: Mapping[str, Tensor], prefix: str = 'module.') -> Dict[str, Tensor]:
    """Remove a DataParallel-style prefix when every key has it."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return OrderedDict((k[len(prefix):], v) for k, v in state_dict.items())
    return OrderedDict(state_dict)


def resnet_spec(state_dict: Mapping[str, Tensor], fmt: str, style: str = 'pytorch',
                source_momentum: float = SN_SOURCE_MOMENTUM) -> ResNetSpec:
    """Read the architecture off the source keys. ``style``: where a stage's stride sits in a
    bottleneck, on the 3x3 conv (``'pytorch'``, torchvision) or the first 1x1 (``'caffe'``).
    ``source_momentum``: the SN source's momentum in the authors' convention."""
    if not 0.0 <= source_momentum <= 1.0:
        raise ConversionError(f'source momentum must be in [0, 1] (the authors\' convention: '
                              f'the share of the old value kept), got {source_momentum!r}')
    if style not in ('pytorch', 'caffe'):
        raise ConversionError(f"style must be 'pytorch' or 'caffe', got {style!r}")
    if fmt not in FORMATS:
        raise ConversionError(f'format must be one of {FORMATS}, got {fmt!r}')
    blocks = []
    for stage in range(1, 5):
        indices = {int(m.group(1)) for k in state_dict
                   for m in [re.match(rf'layer{stage}\.(\d+)\.conv1\.weight$', k)] if m}
        if not indices:
            raise ConversionError(f'no layer{stage}.*.conv1.weight in the source: not a ResNet')
        blocks.append(max(indices) + 1)
    block = 'bottleneck' if 'layer1.0.conv3.weight' in state_dict else 'basic'
    depth = _DEPTHS.get((block, tuple(blocks)))
    if depth is None:
        raise ConversionError(f'unknown ResNet: {block} blocks {blocks}')
    if 'fc.weight' not in state_dict:
        raise ConversionError('the source has no classifier fc.weight')
    num_classes = state_dict['fc.weight'].shape[0]
    spec = ResNetSpec(depth, block, tuple(blocks), num_classes, fmt, style=style,
                      source_momentum=source_momentum)
    if fmt in ('sn', 'ssn'):
        if 'sn1.mean_weight' not in state_dict:
            raise ConversionError(f'no sn1.mean_weight: not an {fmt.upper()} ResNet (try '
                                  f'--format bcn)')
        sparse = 'sn1.radius' in state_dict
        if sparse != (fmt == 'ssn'):
            raise ConversionError(
                'sn1.radius found: a Sparse SN ResNet, use --format ssn' if sparse else
                'no sn1.radius: not a Sparse SN ResNet (an SN one? use --format sn)')
        spec.num_ratios = state_dict['sn1.mean_weight'].numel()
        if spec.num_ratios not in (2, 3):
            raise ConversionError(f'sn1.mean_weight has {spec.num_ratios} entries; expected 3 '
                                  f'(IN, LN, BN) or 2 (IN, LN)')
    else:
        for prefix in ('pbn', 'bn'):
            if f'bn1.{prefix}.weight' in state_dict:
                spec.bn_prefix = prefix
                break
        else:
            raise ConversionError('no bn1.pbn.weight or bn1.bn.weight: not a BCN ResNet '
                                  '(try --format sn)')
        if 'bn1.weight' not in state_dict:
            raise ConversionError('no per-group bn1.weight in the source')
        spec.num_groups = state_dict['bn1.weight'].numel()
        spec.estimate = f'bn1.{spec.bn_prefix}.estbn_moving_speed' in state_dict
    return spec


def _norm_names(spec: ResNetSpec) -> List[Tuple[str, str]]:
    """(source norm prefix, target norm prefix) for every norm layer of the network."""
    src, dst = {'sn': ('sn', 'sn'), 'ssn': ('sn', 'ssn'), 'bcn': ('bn', 'bcn')}[spec.fmt]
    names = [(f'{src}1', f'backbone.{dst}1')]
    convs = 3 if spec.block == 'bottleneck' else 2
    for stage, count in enumerate(spec.blocks, start=1):
        for index in range(count):
            block = f'layer{stage}.{index}'
            names += [(f'{block}.{src}{k}', f'backbone.{block}.{dst}{k}')
                      for k in range(1, convs + 1)]
    return names


class _Reader:
    """Reads source tensors by key, recording what is used and every problem found."""

    def __init__(self, source: Dict[str, Tensor]):
        self.source = source
        self.used: set = set()
        self.problems: List[str] = []

    def take(self, key: str) -> Optional[Tensor]:
        if key not in self.source:
            self.problems.append(f'missing source key {key!r}')
            return None
        self.used.add(key)
        return self.source[key]

    def flat(self, key: str, size: Optional[int] = None) -> Optional[Tensor]:
        tensor = self.take(key)
        if tensor is None:
            return None
        if size is not None and tensor.numel() != size:
            self.problems.append(f'{key!r} has shape {tuple(tensor.shape)} ({tensor.numel()} '
                                 f'values), expected {size} values')
            return None
        return tensor.reshape(-1).clone()


def _put(out: Dict[str, object], key: str, value: Optional[object]) -> None:
    if value is not None:
        out[key] = value


def _choice(reader: _Reader, src: str, ratios: Optional[Tensor], kind: str) -> Optional[Tensor]:
    """``mean_choice`` / ``var_choice`` of a converted SSN layer: the index of a fixed vector's
    one-hot ratios (which the authors store in the parameter), or -1 while free."""
    fixed = reader.flat(f'{src}.{kind}_fixed', 1)
    if fixed is None or ratios is None:
        return None
    if not int(fixed):
        return torch.tensor(-1)
    if sorted(ratios.tolist()) != [0.0] * (ratios.numel() - 1) + [1.0]:
        reader.problems.append(f'{src}.{kind}_weight is fixed but not one-hot '
                               f'({ratios.tolist()}): the source uses it as its ratios')
        return None
    return ratios.argmax()


def _convert_norm(reader: _Reader, src: str, dst: str, spec: ResNetSpec) -> Dict[str, object]:
    out: Dict[str, object] = OrderedDict()
    if spec.fmt == 'ssn':
        weight = reader.flat(f'{src}.weight')
        channels = weight.numel() if weight is not None else None
        _put(out, f'{dst}.weight', weight)
        _put(out, f'{dst}.bias', reader.flat(f'{src}.bias', channels))
        for kind in ('mean', 'var'):
            scores = reader.flat(f'{src}.{kind}_weight', spec.num_ratios)
            _put(out, f'{dst}.{kind}_scores', scores)
            _put(out, f'{dst}.{kind}_choice', _choice(reader, src, scores, kind))
        for name in ('running_mean', 'running_var'):
            _put(out, f'{dst}.{name}', reader.flat(f'{src}.{name}', channels))
        radius = reader.flat(f'{src}.radius', 1)
        _put(out, f'{dst}.radius', None if radius is None else radius.reshape(()))
        out[f'{dst}.in_var_unbiased'] = torch.tensor(True)  # the authors' unbiased IN variance
        return out
    if spec.fmt == 'sn':
        weight = reader.flat(f'{src}.weight')
        channels = weight.numel() if weight is not None else None
        _put(out, f'{dst}.weight', weight)
        _put(out, f'{dst}.bias', reader.flat(f'{src}.bias', channels))
        _put(out, f'{dst}.mean_logits', reader.flat(f'{src}.mean_weight', spec.num_ratios))
        _put(out, f'{dst}.var_logits', reader.flat(f'{src}.var_weight', spec.num_ratios))
        if spec.num_ratios == 3:
            for name in ('running_mean', 'running_var'):
                _put(out, f'{dst}.{name}', reader.flat(f'{src}.{name}', channels))
        elif channels is not None:  # no BN branch, no buffers in the source (see module doc)
            out[f'{dst}.running_mean'] = torch.zeros(channels, dtype=weight.dtype)
            out[f'{dst}.running_var'] = torch.ones(channels, dtype=weight.dtype)
        out[f'{dst}.in_var_unbiased'] = torch.tensor(True)  # the authors' unbiased IN variance
        return out
    bn = f'{src}.{spec.bn_prefix}'
    weight = reader.flat(f'{bn}.weight')
    channels = weight.numel() if weight is not None else None
    _put(out, f'{dst}.bn_weight', weight)
    _put(out, f'{dst}.bn_bias', reader.flat(f'{bn}.bias', channels))
    for name in ('running_mean', 'running_var'):
        _put(out, f'{dst}.{name}', reader.flat(f'{bn}.{name}', channels))
    if f'{bn}.num_batches_tracked' in reader.source:
        out[f'{dst}.num_batches_tracked'] = reader.take(f'{bn}.num_batches_tracked').clone()
    if spec.estimate:  # EstBN's rate, (1,) there, a 0-dim buffer here
        rate = reader.flat(f'{bn}.estbn_moving_speed', 1)
        _put(out, f'{dst}.estimate_rate', None if rate is None else rate.reshape(()))
    _put(out, f'{dst}.weight', reader.flat(f'{src}.weight', spec.num_groups))
    _put(out, f'{dst}.bias', reader.flat(f'{src}.bias', spec.num_groups))
    return out


def convert_state_dict(source: Mapping[str, Tensor], fmt: str, style: str = 'pytorch',
                       source_momentum: Optional[float] = None
                       ) -> Tuple[Dict[str, object], ResNetSpec, List[str], List[str]]:
    """Map a source state dict to mmpretrain keys.

    Returns:
        ``(converted, spec, problems, unused_source_keys)``: ``problems`` names every missing
        source key and every tensor with the wrong number of values (their targets are left
        out of ``converted``). Raises :class:`ConversionError` when the source is not a ResNet
        of the format at all.
    """
    source = strip_prefix(source)
    if source_momentum is None:
        source_momentum = SOURCE_MOMENTUM.get(fmt, SN_SOURCE_MOMENTUM)
    spec = resnet_spec(source, fmt, style, source_momentum)
    reader = _Reader(source)
    out: Dict[str, object] = OrderedDict()

    def copy(src: str, dst: str) -> None:
        tensor = reader.take(src)
        if tensor is not None:
            out[dst] = tensor.clone()

    copy('conv1.weight', 'backbone.conv1.weight')
    convs = 3 if spec.block == 'bottleneck' else 2
    shortcuts = []
    for stage, count in enumerate(spec.blocks, start=1):
        for index in range(count):
            block = f'layer{stage}.{index}'
            for k in range(1, convs + 1):
                copy(f'{block}.conv{k}.weight', f'backbone.{block}.conv{k}.weight')
            # (a projection the source lacks shows up as a missing key of the target model)
            if f'{block}.downsample.0.weight' in source:
                copy(f'{block}.downsample.0.weight', f'backbone.{block}.downsample.0.weight')
                shortcuts.append(f'{block}.downsample.1')
    for src, dst in _norm_names(spec) + [(s, f'backbone.{s}') for s in shortcuts]:
        out.update(_convert_norm(reader, src, dst, spec))
    copy('fc.weight', 'head.fc.weight')
    copy('fc.bias', 'head.fc.bias')
    unused = [k for k in source if k not in reader.used and not k.endswith('num_batches_tracked')]
    return out, spec, reader.problems, unused


def classifier_config(spec: ResNetSpec) -> dict:
    """The mmpretrain model config the converted state dict belongs to."""
    return dict(
        type='ImageClassifier',
        backbone=dict(type=spec.backbone_type, depth=spec.depth, num_stages=4, out_indices=(3, ),
                      style=spec.style, norm_cfg=spec.norm_cfg, conv_cfg=spec.conv_cfg),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=spec.num_classes,
                  in_channels=spec.in_channels, loss=dict(type='CrossEntropyLoss'),
                  topk=(1, 5)))


def check_against(converted: Mapping[str, object], target: Mapping[str, object]
                  ) -> Tuple[List[str], List[str], List[str]]:
    """Compare with a model's state dict: ``(missing, unexpected, shape_mismatches)``.

    Bookkeeping buffers the model fills in itself (``num_batches_tracked``, ``stats_ready``)
    are not required.
    """
    optional = ('num_batches_tracked', 'stats_ready', 'estimate_rate', 'in_var_unbiased')
    missing = [k for k in target if k not in converted and not k.endswith(optional)]
    unexpected = [k for k in converted if k not in target]
    mismatched = []
    for key, value in converted.items():
        reference = target.get(key)
        if isinstance(value, Tensor) and isinstance(reference, Tensor) \
                and value.shape != reference.shape:
            mismatched.append(f'{key}: {tuple(value.shape)} vs model {tuple(reference.shape)}')
    return missing, unexpected, mismatched
