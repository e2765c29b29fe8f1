# Copyright (c) mmnorm contributors. All rights reserved.
"""Networks laid out as the papers' authors' released code lays them out, to make checkpoints in
their format for the conversion tests.

Written for these tests from reading the authors' published layer definitions (their code is
not copied; the SN repository is under a non-commercial licence):

- SN (switchablenorms/Switchable-Normalization, ``SwitchNorm2d`` and ``ResNetV1SN``):
  ``weight`` / ``bias`` shaped ``(1, C, 1, 1)``; ratio logits ``mean_weight`` / ``var_weight``
  with 3 entries (IN, LN, BN) or 2 (``using_bn=False``); ``running_mean`` / ``running_var``
  shaped ``(1, C, 1)`` registered **only** with BN, updated as ``m * running + (1 - m) * batch``
  (m = 0.9). IN variance unbiased; LN and BN variances from ``E[var_IN + mean_IN^2] - mean^2``.
  Names ``sn{k}`` and ``downsample.{0,1}``; the stride on the bottleneck's 3x3 conv.
- BCN (joe-siyuan-qiao/Batch-Channel-Normalization, ``layers.py`` and the ImageNet ResNet):
  each norm is a ``BatchNorm2d`` named ``pbn`` followed by a group normalization with per-group
  ``weight`` / ``bias`` shaped ``(1, G, 1)``; convolutions standardize their filters with the
  unbiased variance and 1e-5 inside the root; torchvision names ``bn{k}``.

The models pool globally (the authors' SN ResNet uses ``AvgPool2d(7)``, the same at 224 px) so
that the tests can run at 64 px.
"""
import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-5


class AuthorsSwitchNorm(nn.Module):
    """The SN authors' layer, as their checkpoints hold it."""

    def __init__(self, channels: int, using_bn: bool = True, momentum: float = 0.9):
        super().__init__()
        self.using_bn, self.momentum = using_bn, momentum
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.mean_weight = nn.Parameter(torch.ones(3 if using_bn else 2))
        self.var_weight = nn.Parameter(torch.ones(3 if using_bn else 2))
        if using_bn:
            self.register_buffer('running_mean', torch.zeros(1, channels, 1))
            self.register_buffer('running_var', torch.zeros(1, channels, 1))

    def forward(self, x):
        return authors_mixture(self, x, self.mean_weight.softmax(0), self.var_weight.softmax(0),
                               self.using_bn)


def authors_mixture(layer: nn.Module, x, mean_ratios, var_ratios, using_bn: bool = True):
    """The SN and SSN authors' normalization with the given ratios: unbiased IN variance, LN and
    BN variances ``E[var_IN + mean_IN^2] - mean^2``, BN's running buffers moved in training as
    ``m * running + (1 - m) * batch`` (``m = layer.momentum``) and used in eval."""
    n, c, h, w = x.shape
    rows = x.reshape(n, c, h * w)
    mean_in = rows.mean(-1, keepdim=True)
    var_in = rows.var(-1, keepdim=True)
    second = var_in + mean_in.square()
    mean_ln = mean_in.mean(1, keepdim=True)
    var_ln = second.mean(1, keepdim=True) - mean_ln.square()
    means, variances = [mean_in, mean_ln], [var_in, var_ln]
    if using_bn:
        if layer.training:
            mean_bn = mean_in.mean(0, keepdim=True)
            var_bn = second.mean(0, keepdim=True) - mean_bn.square()
            with torch.no_grad():
                layer.running_mean.mul_(layer.momentum).add_((1 - layer.momentum) * mean_bn)
                layer.running_var.mul_(layer.momentum).add_((1 - layer.momentum) * var_bn)
        else:
            mean_bn, var_bn = layer.running_mean, layer.running_var
        means.append(mean_bn)
        variances.append(var_bn)
    mean = sum(r * m for r, m in zip(mean_ratios, means))
    var = sum(r * v for r, v in zip(var_ratios, variances))
    out = ((rows - mean) / (var + EPS).sqrt()).reshape(n, c, h, w)
    return out * layer.weight + layer.bias


class AuthorsBCN(nn.Module):
    """The BCN authors' layer: ``pbn`` (BatchNorm2d), then per-group normalization."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.ones(1, groups, 1))
        self.bias = nn.Parameter(torch.zeros(1, groups, 1))
        self.pbn = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = self.pbn(x)
        grouped = out.reshape(x.shape[0], self.groups, -1)
        var, mean = torch.var_mean(grouped, -1, correction=0, keepdim=True)
        grouped = (grouped - mean) / (var + EPS).sqrt()
        return (grouped * self.weight + self.bias).reshape_as(x)


class AuthorsWSConv(nn.Conv2d):
    """The BCN authors' weight-standardized convolution."""

    def forward(self, x):
        flat = self.weight.flatten(1)
        std = (flat.var(1, keepdim=True) + EPS).sqrt()
        weight = ((flat - flat.mean(1, keepdim=True)) / std).view_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class _Block(nn.Module):

    def __init__(self, tag, conv, norm, inplanes, planes, stride, bottleneck):
        super().__init__()
        self.bottleneck = bottleneck
        widths = [(inplanes, planes, 1, 1), (planes, planes, 3, stride),
                  (planes, planes * 4, 1, 1)] if bottleneck else \
            [(inplanes, planes, 3, stride), (planes, planes, 3, 1)]
        for k, (cin, cout, size, s) in enumerate(widths, start=1):
            setattr(self, f'conv{k}', conv(cin, cout, size, s, size // 2, bias=False))
            setattr(self, f'{tag}{k}', norm(cout))
        self.tag, self.count = tag, len(widths)
        out = widths[-1][1]
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(conv(inplanes, out, 1, stride, 0, bias=False),
                                            norm(out))

    def forward(self, x):
        out = x
        for k in range(1, self.count + 1):
            out = getattr(self, f'{self.tag}{k}')(getattr(self, f'conv{k}')(out))
            if k < self.count:
                out = F.relu(out)
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class AuthorsResNet(nn.Module):
    """ResNet-18 / 50 with the authors' names for ``fmt`` ``'sn'``, ``'ssn'`` or ``'bcn'``."""

    def __init__(self, fmt: str, depth: int = 18, num_classes: int = 10, using_bn: bool = True,
                 groups: int = 8):
        super().__init__()
        bottleneck, blocks = {18: (False, (2, 2, 2, 2)), 50: (True, (3, 4, 6, 3))}[depth]
        self.fmt = fmt
        if fmt == 'sn':
            tag, conv = 'sn', nn.Conv2d

            def norm(c):
                return AuthorsSwitchNorm(c, using_bn)
        elif fmt == 'ssn':
            from .authors_ssn import AuthorsSSN
            tag, conv, norm = 'sn', nn.Conv2d, AuthorsSSN
        else:
            tag, conv = 'bn', AuthorsWSConv

            def norm(c):
                return AuthorsBCN(c, groups)
        self.conv1 = conv(3, 64, 7, 2, 3, bias=False)
        setattr(self, f'{tag}1', norm(64))
        self.tag = tag
        inplanes = 64
        for stage, count in enumerate(blocks, start=1):
            planes = 64 * 2 ** (stage - 1)
            layers = []
            for index in range(count):
                stride = 2 if stage > 1 and index == 0 else 1
                layers.append(_Block(tag, conv, norm, inplanes, planes, stride, bottleneck))
                inplanes = planes * (4 if bottleneck else 1)
            setattr(self, f'layer{stage}', nn.Sequential(*layers))
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = F.relu(getattr(self, f'{self.tag}1')(self.conv1(x)))
        if self.fmt == 'ssn':  # the Sparse SN authors' stem pooling: no padding, rounded up
            x = F.max_pool2d(x, 3, 2, 0, ceil_mode=True)
        else:
            x = F.max_pool2d(x, 3, 2, 1)
        for stage in range(1, 5):
            x = getattr(self, f'layer{stage}')(x)
        return self.fc(x.mean((2, 3)))


def trained_authors_model(fmt: str, depth: int = 18, using_bn: bool = True, steps: int = 2,
                          seed: int = 0):
    """An authors'-layout model after a few SGD steps (ratios, affine and running statistics
    moved away from their initial values), with its optimizer."""
    torch.manual_seed(seed)
    model = AuthorsResNet(fmt, depth, using_bn=using_bn)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(steps):
        x = torch.randn(4, 3, 64, 64) * 1.5 + 0.3
        loss = F.cross_entropy(model(x), torch.randint(0, 10, (4, )))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, optimizer


def authors_checkpoint(model: nn.Module, optimizer) -> dict:
    """What the authors' training scripts save: a ``DataParallel``-prefixed ``state_dict`` beside
    the epoch, the architecture name, the best accuracy and the optimizer state."""
    return {'epoch': 100, 'model': 'resnetv1sn18',
            'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()},
            'best_prec1': 71.2, 'optimizer': optimizer.state_dict()}
