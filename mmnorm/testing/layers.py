# Copyright (c) mmnorm contributors. All rights reserved.
"""Every mmnorm normalizer configuration, with non-trivial parameters and trained buffers."""
import torch
from torch import nn

from mmnorm import BatchChannelNorm, SparseSwitchableNorm, SwitchableNorm, SwitchableNormTied
from . import oracles

__all__ = ['CHANNELS', 'LAYERS', 'make_layer', 'batches', 'train_steps', 'train_step',
           'float64_oracle']

#: The channels of every configuration in :data:`LAYERS`.
CHANNELS = 8

#: name -> constructor of each layer configuration the portability tests and the GPU check
#: cover.
#:
#: :meta hide-value:
LAYERS = {
    'SN': lambda: SwitchableNorm(CHANNELS, momentum=0.3),
    'SN_std': lambda: SwitchableNorm(CHANNELS, momentum=0.3, mix='std'),
    'SN_tied': lambda: SwitchableNormTied(CHANNELS, momentum=0.3),
    'SN_noBN': lambda: SwitchableNorm(CHANNELS, using_bn=False),
    'BCN': lambda: BatchChannelNorm(CHANNELS, num_groups=4, momentum=0.3),
    'BCN_est': lambda: _estimated(BatchChannelNorm(CHANNELS, num_groups=4, estimate=True)),
    'SSN': lambda: _at_radius(SparseSwitchableNorm(CHANNELS, momentum=0.3)),
    # Group-wise ratios: SN with 4 groups of 2 channels, SSN with a choice per channel.
    'SN_g4': lambda: SwitchableNorm(CHANNELS, momentum=0.3, ratio_groups=4),
    'SSN_g8': lambda: _at_radius(SparseSwitchableNorm(CHANNELS, momentum=0.3,
                                                      ratio_groups=CHANNELS)),
}


def _estimated(layer: BatchChannelNorm) -> BatchChannelNorm:
    layer.set_estimate_rate(0.2)
    return layer


def _at_radius(layer: SparseSwitchableNorm) -> SparseSwitchableNorm:
    layer.set_progress(0.3)  # SparsestMax between sparsemax and one-hot
    return layer


def make_layer(name: str, seed: int = 0, dtype=torch.float32, device='cpu') -> nn.Module:
    """``LAYERS[name]`` with random parameters (positive scales), in train mode."""
    torch.manual_seed(seed)
    layer = LAYERS[name]()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in layer.named_parameters():
            value = torch.randn(p.shape, generator=gen) * 0.5
            if pname in ('weight', 'bn_weight'):
                value = value.abs() + 0.5
            p.copy_(value)
    return layer.to(device=device, dtype=dtype)


def batches(count: int, shape=(4, CHANNELS, 5, 6), seed: int = 0, dtype=torch.float32):
    """``count`` different inputs with channel-dependent offsets, made on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.linspace(-2, 3, shape[1]).view(1, -1, *[1] * (len(shape) - 2))
    return [(torch.randn(shape, generator=gen) * 1.5 + offsets).to(dtype) for _ in range(count)]


def train_steps(layer: nn.Module, count: int = 3, seed: int = 100) -> nn.Module:
    """Run ``count`` training forwards so the running buffers / estimates are not initial."""
    layer.train()
    for x in batches(count, seed=seed):
        layer(x.to(next(layer.parameters()).device))
    return layer


def train_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    """One training forward and backward of ``layer`` on a copy of ``x``: the output, the input
    gradient and the parameter gradients (copies)."""
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(grad.to(y.dtype))
    return y.detach(), x.grad, [p.grad.clone() for p in layer.parameters()]


def float64_oracle(layer: nn.Module, x: torch.Tensor, differentiable: bool = False
                   ) -> torch.Tensor:
    """Float64 oracle of a layer in train mode (batch statistics). ``differentiable``: the
    layer's own (float64) parameters are used, so that gradients reach them."""
    p = {n: t if differentiable else t.detach().double() for n, t in layer.named_parameters()}
    if isinstance(layer, BatchChannelNorm):
        return oracles.bcn(x, layer.num_groups, p['weight'], p['bias'], p['bn_weight'],
                           p['bn_bias'], eps=layer.eps)
    if 'mean_scores' in p:  # SSN: SparsestMax ratios at the layer's radius
        ratios = [p[k].cpu() for k in ('mean_scores', 'var_scores')]
        ratios = [torch.stack([oracles.sparsestmax(row, float(layer.radius)) for row in r])
                  if r.dim() == 2 else oracles.sparsestmax(r, float(layer.radius))
                  for r in ratios]
        weight, bias = p['weight'].cpu(), p['bias'].cpu()
    else:
        ratios = [torch.softmax(p.get('logits', p.get(k)), -1)
                  for k in ('mean_logits', 'var_logits')]
        weight, bias = p['weight'], p['bias']
    if ratios[0].dim() == 2:  # one ratio row per group of channels
        return oracles.grouped_mixture(x, *ratios, weight, bias, eps=layer.eps, mix=layer.mix)
    return oracles.mixture(x, *ratios, weight, bias, eps=layer.eps, mix=layer.mix)
