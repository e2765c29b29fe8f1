# Copyright (c) mmnorm contributors. All rights reserved.
r"""The deploy form of a hardened SN layer whose groups of channels chose different normalizers
(``ratio_groups`` > 1): :class:`GroupwiseHardNorm`, one reduction and one elementwise pass.

With one-hot ratios every channel ``c`` of a grouped SN layer uses exactly one normalizer for its
mean, :math:`z^\mu_c`, and one for its variance, :math:`z^\sigma_c` (those of its group), so the
layer is, per sample and channel, the affine map :math:`y = a x + b` whose coefficients come from
those two statistics alone. :class:`GroupwiseHardNorm` computes the IN moments once, pools the LN
moments from them only if some channel uses LN, reads BN's from constants, and applies
:math:`a x + b` in one elementwise pass: no other statistic is computed, no ratio function runs.
"""
from itertools import groupby
from typing import ClassVar, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..functional import NORMALIZERS, check_norm_input, is_tracing, row_affine
from ..functional.moments import bessel_factor
from ..layers import BatchStatsNorm
from ..layers.base import full_precision
from ..layers.fx import fx_leaf

__all__ = ['GroupwiseHardNorm', 'choice_label']

#: A layer's choice for μ or σ: one normalizer's name, or one per group of channels.
Choice = Union[str, Tuple[str, ...]]


def choice_label(choice: Choice) -> str:
    """A choice as one short word: the name itself for a layer-wise choice; for one name per
    group, the runs of consecutive equal names with their lengths, in channel order (``('IN',
    'IN', 'BN', 'BN')`` -> ``'IN×2,BN×2'``; a run of one is the name alone)."""
    if isinstance(choice, str):
        return choice
    return ','.join(name if count == 1 else f'{name}×{count}'
                    for name, count in ((name, len(list(run))) for name, run in groupby(choice)))


class GroupwiseHardNorm(nn.Module):
    r"""A hardened SN layer whose channels use different normalizers, in one pass (eval only).

    Channel :math:`c` takes its mean from the normalizer :math:`z^\mu_c` and its variance from
    :math:`z^\sigma_c`, each one of IN, LN and BN:

    .. math::
        y_{nc} = a_{nc}\, x_{nc} + b_{nc}, \qquad
        a_{nc} = \frac{\gamma_c}{\sqrt{\sigma^2_{z^\sigma_c}(n, c) + \epsilon}}, \qquad
        b_{nc} = \beta_c - a_{nc}\, \mu_{z^\mu_c}(n, c),

    with :math:`\mu_{IN}(n, c), \sigma^2_{IN}(n, c)` the moments of sample ``n``, channel ``c``
    over space (the variance biased, or with Bessel's correction for ``in_unbiased``);
    :math:`\mu_{LN}(n), \sigma^2_{LN}(n)` those of sample ``n`` over channels and space, pooled
    from the IN moments (:math:`\sigma^2_{LN} = \mathrm{mean}_c\,\sigma^2_{IN} +
    \mathrm{var}_c\,\mu_{IN}`, what the SN layers compute, from the corrected IN variance with
    ``in_unbiased``); and :math:`\mu_{BN}(c), \sigma^2_{BN}(c)` the running buffers.

    The choices are stored as 0/1 masks and constants, per channel, so that

    .. math::
        \mu = [z^\mu = IN]\,\mu_{IN} + [z^\mu = LN]\,\mu_{LN} + [z^\mu = BN]\,\mu_{BN}, \quad
        \sigma^2 + \epsilon = [z^\sigma = IN]\,\sigma^2_{IN} + [z^\sigma = LN]\,\sigma^2_{LN}
            + \big([z^\sigma = BN]\,\sigma^2_{BN} + \epsilon\big),

    are two multiply-adds on ``(N, C)`` (four with LN): one reduction of the input
    (``var_mean``), the ``(N, C)`` coefficients, one elementwise pass ``a x + b``. This is exactly
    the hardened layer's eval output (its zero ratios contribute exact zeros). Statistics and
    coefficients are computed in float32 for float16 / bfloat16 inputs, as the layers do.

    Buffers (each ``(C,)``): ``mean_in`` / ``mean_ln`` and ``var_in`` / ``var_ln`` (the masks),
    ``mean_const`` (:math:`\mu_{BN}` where BN is chosen, else 0) and ``var_const``
    (:math:`\sigma^2_{BN} + \epsilon` where BN is chosen, else :math:`\epsilon`). Parameters
    ``weight`` / ``bias`` (:math:`\gamma, \beta`) when affine.

    Args:
        mean_choices (sequence of str): the normalizer each channel's mean comes from, one of
            ``'IN'``, ``'LN'``, ``'BN'`` per channel.
        var_choices (sequence of str): the same for the variances.
        weight (Tensor, optional): :math:`\gamma`, ``(C,)``. Defaults to None (1).
        bias (Tensor, optional): :math:`\beta`, ``(C,)``. Defaults to None (0).
        running_mean (Tensor, optional): BN's mean, ``(C,)``; needed if a channel chose BN.
        running_var (Tensor, optional): BN's variance, ``(C,)``; needed if a channel chose BN.
        eps (float): added to the variance. Defaults to 1e-5.
        in_unbiased (bool): the IN variance with Bessel's correction (layers converted from
            the SN authors' models). Defaults to False.

    Shape:
        - Input: ``(N, C, *)``
        - Output: same as input.

    Examples:
        >>> norm = GroupwiseHardNorm(['IN'] * 4 + ['BN'] * 4, ['IN'] * 4 + ['BN'] * 4,
        ...                          running_mean=torch.zeros(8), running_var=torch.ones(8))
        >>> norm
        GroupwiseHardNorm(8, mean=IN×4,BN×4, var=IN×4,BN×4, eps=1e-05)
        >>> norm(torch.randn(2, 8, 5, 5)).shape
        torch.Size([2, 8, 5, 5])
    """

    #: mmengine's FLOP analysis counts the arithmetic ops traced inside this module
    #: (:mod:`mmnorm.integration.mmengine_flops`).
    flops_from_traced_ops: ClassVar[bool] = True

    def __init__(self, mean_choices: Sequence[str], var_choices: Sequence[str],
                 weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                 running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
                 eps: float = 1e-5, in_unbiased: bool = False):
        super().__init__()
        self.mean_choices, self.var_choices = tuple(mean_choices), tuple(var_choices)
        channels = len(self.mean_choices)
        if channels == 0 or len(self.var_choices) != channels:
            raise ValueError('mean_choices and var_choices need one name per channel each, got '
                             f'{len(self.mean_choices)} and {len(self.var_choices)}')
        unknown = set(self.mean_choices + self.var_choices) - set(NORMALIZERS)
        if unknown:
            raise ValueError(f'unknown normalizer(s) {sorted(unknown)}: choose from {NORMALIZERS}')
        uses_bn = 'BN' in self.mean_choices + self.var_choices
        if uses_bn and (running_mean is None or running_var is None):
            raise ValueError('channels that chose BN need running_mean and running_var')
        for name, tensor in (('weight', weight), ('bias', bias), ('running_mean', running_mean),
                             ('running_var', running_var)):
            if tensor is not None and tuple(tensor.shape) != (channels, ):
                raise ValueError(f'{name} should have shape ({channels},), got '
                                 f'{tuple(tensor.shape)}')
        self.num_features = channels
        self.eps = eps
        self.in_unbiased = bool(in_unbiased)
        #: Whether some channel uses LN (then the LN moments are pooled in the forward).
        self.uses_ln = 'LN' in self.mean_choices + self.var_choices
        reference = next((t for t in (weight, running_mean, running_var, bias)
                          if t is not None), None)
        factory = dict(device=reference.device if reference is not None else None,
                       dtype=reference.dtype if reference is not None else None)

        def mask(choices, name):
            return torch.tensor([float(choice == name) for choice in choices], **factory)

        with torch.no_grad():
            bn_mean, bn_var = (mask(c, 'BN') for c in (self.mean_choices, self.var_choices))
            mean_const = bn_mean * running_mean.to(bn_mean) if running_mean is not None \
                else torch.zeros_like(bn_mean)
            var_const = (bn_var * running_var.to(bn_var) if running_var is not None
                         else torch.zeros_like(bn_var)) + eps
        for prefix, choices in (('mean', self.mean_choices), ('var', self.var_choices)):
            self.register_buffer(f'{prefix}_in', mask(choices, 'IN'))
            self.register_buffer(f'{prefix}_ln', mask(choices, 'LN'))
        self.register_buffer('mean_const', mean_const)
        self.register_buffer('var_const', var_const)
        self.weight = None if weight is None else nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @classmethod
    @torch.no_grad()
    def from_layer(cls, layer: BatchStatsNorm) -> 'GroupwiseHardNorm':
        """The eval-mode equivalent of a hardened (one-hot) SN-like layer, grouped or not."""
        mean_ratios, var_ratios = layer.ratios()
        if not all(((r == 0) | (r == 1)).all() and bool((r.sum(-1) == 1).all())
                   for r in (mean_ratios, var_ratios)):
            raise ValueError(f'{type(layer).__name__} has soft ratios: harden them first '
                             '(mmnorm.convert.harden_ratios)')
        channels, names = layer.num_features, layer.normalizers

        def per_channel(ratios: Tensor) -> Tuple[str, ...]:
            index = ratios.argmax(-1).reshape(-1)  # one per group (one group: the layer)
            index = index.repeat_interleave(channels // index.numel())
            return tuple(names[i] for i in index.tolist())

        return cls(per_channel(mean_ratios), per_channel(var_ratios), layer.weight, layer.bias,
                   layer.running_mean, layer.running_var, layer.eps,
                   getattr(layer, 'in_unbiased', False))

    @fx_leaf
    def forward(self, input: Tensor) -> Tensor:
        if not torch.jit.is_tracing():  # a traced graph has its shapes fixed
            check_norm_input(input, self.num_features)
        with full_precision(input):
            x = input if input.dtype in (torch.float32, torch.float64) else input.float()
            dtype, (n, c), dims = x.dtype, x.shape[:2], tuple(range(2, x.dim()))
            # The light form's policy (mmnorm.functional.row_affine): on the CPU simpler passes
            # are faster (two-pass moments, multiply then add); on accelerators and in traced
            # graphs the fewest ops (one var_mean, one addcmul).
            simple = not is_tracing() and row_affine.simple_passes(x)
            if not dims:  # (N, C): one value per sample and channel
                mean, var = x, torch.zeros_like(x)
            elif simple:
                mean, var = (t.view(n, c) for t in row_affine.stat_moments(x, dims))
            else:
                var, mean = torch.var_mean(x, dims, correction=0)
            if self.in_unbiased:  # as the layers: corrected before LN pools it
                var = var * bessel_factor(x).to(var.dtype)
            mu = torch.addcmul(self.mean_const.to(dtype), self.mean_in.to(dtype), mean)
            s2 = torch.addcmul(self.var_const.to(dtype), self.var_in.to(dtype), var)
            if self.uses_ln:  # law of total variance over the channels: (N, 1)
                ln_var, ln_mean = torch.var_mean(mean, 1, keepdim=True, correction=0)
                ln_var = ln_var + var.mean(1, keepdim=True)
                mu = torch.addcmul(mu, self.mean_ln.to(dtype), ln_mean)
                s2 = torch.addcmul(s2, self.var_ln.to(dtype), ln_var)
            scale = torch.rsqrt(s2)
            if self.weight is not None:
                scale = scale * self.weight.to(dtype)
            shift = torch.addcmul(self.bias.to(dtype), scale, mu, value=-1) \
                if self.bias is not None else -(scale * mu)
            shape = scale.shape + (1, ) * len(dims)
            scale, shift = scale.view(shape), shift.view(shape)
            out = (x * scale).add_(shift) if simple else torch.addcmul(shift, x, scale)
            return out.to(input.dtype)

    def extra_repr(self) -> str:
        return (f'{self.num_features}, mean={choice_label(self.mean_choices)}, '
                f'var={choice_label(self.var_choices)}, eps={self.eps}'
                + (', in_unbiased=True' if self.in_unbiased else ''))
