# Copyright (c) mmnorm contributors. All rights reserved.
r"""Switchable Normalization modules: ``SN`` and ``SN_tied``, and their synchronized twins.

Reference::

    @article{luo2019normalization,
      title   = {Do Normalization Layers in a Deep ConvNet Really Need to Be Distinct?},
      author  = {Luo, Ping and Peng, Zhanglin and Ren, Jiamin and Zhang, Ruimao},
      journal = {arXiv:1811.07727},
      year    = {2018}}

Implemented from the paper (Eq. (1), Sec. 2-3, Appendix B/C); the authors' repository is
CC-BY-NC-4.0 and none of its code is used.
"""
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..functional import (MIX_MODES, NORMALIZERS, check_norm_input, mix_normalizers,
                          softmax_ratios)
from ..functional.arguments import check_flag
from ..functional.switchable import check_ratio_groups
from ..registry import MODELS, register
from .base import BatchStatsNorm, SyncNorm, full_precision
from .fx import fx_leaf

__all__ = ['SwitchableNorm', 'SwitchableNormTied', 'SyncSwitchableNorm', 'SyncSwitchableNormTied',
           'NORMALIZERS']

#: The gap between the winning logit and the others that :meth:`SwitchableNorm.harden_ratios_`
#: sets: ``exp(-1e4)`` is exactly 0 in float32 and float64 (and the layers compute their ratios
#: in float32 or wider), so the softmax is exactly one-hot.
_HARD_GAP = 1e4


@register(MODELS, 'SN')
class SwitchableNorm(BatchStatsNorm):
    r"""Switchable Normalization (registered as ``SN``).

    .. math::
        y = \gamma\,\frac{x - \sum_{z\in\Omega}\lambda^\mu_z\mu_z}
                        {\sqrt{\sum_{z\in\Omega}\lambda^\sigma_z\sigma^2_z + \epsilon}} + \beta,
        \qquad \Omega = \{IN, LN, BN\},

    with separate softmax ratios :math:`\lambda^\mu, \lambda^\sigma` for means and variances
    (``mix='std'``: :math:`\sum_z \lambda^\sigma_z\sqrt{\sigma^2_z+\epsilon}` in the denominator,
    Eq. (1) literally). In training the BN branch uses the batch's statistics and updates the
    running buffers; in eval it uses the running buffers, while IN and LN are always computed per
    sample. All statistics come from the per-(n, c) moments of the input (see
    :mod:`mmnorm.functional.moments`).

    Args:
        num_features (int): channels ``C``.
        eps (float): added to the variance. Defaults to 1e-5.
        momentum (float, optional): running-buffer momentum, PyTorch convention; ``None`` for a
            cumulative average. Defaults to 0.1.
        affine (bool): learn per-channel ``weight`` (γ) and ``bias`` (β). Defaults to True.
        track_running_stats (bool): keep running BN buffers for eval. Defaults to True.
        using_bn (bool): include BN in Ω. ``False`` gives Ω = {IN, LN}, for one sample per GPU
            where BN equals IN. Defaults to True.
        mix (str): ``'var'`` (default, the SN authors' formulation) or ``'std'`` (Eq. (1)).
        in_unbiased (bool): IN variance with Bessel's correction, as the SN authors' released
            code computes it. Saved with the weights (buffer ``in_var_unbiased``), so a
            checkpoint written by ``tools/convert_checkpoint.py --format sn`` turns it on when
            loaded. Defaults to False.
        eval_stats (str): ``'moving'`` or ``'batch_average'`` (SN study Sec. 3: BN in SN is
            evaluated with a batch average computed after training). Defaults to ``'moving'``.
        ratio_groups (int): ``G`` contiguous groups of ``C / G`` channels, each with its own
            ratio vectors (the SN study's future work: ratios per group of channels, so that a
            layer can learn IBN-Net's split of IN and BN channels). IN and BN statistics stay per
            channel and LN per sample over all channels; only the weights that mix them differ
            between groups. The ratio parameters are ``(G, |Ω|)`` and :meth:`ratios` returns
            ``(G, |Ω|)`` tensors. ``C`` must be divisible by ``G``; ``G = C`` is a choice per
            channel. Defaults to 1: one vector per layer, shaped ``(|Ω|,)`` as in the paper.
            It comes after ``device`` and ``dtype`` (the factory keywords of torch's layers),
            which 0.1.0 took in the places before it: calls that pass them by position keep
            working.

    Shape:
        - Input: ``(N, C, *)``
        - Output: same as input.

    Examples:
        >>> from mmcv.cnn import build_norm_layer
        >>> name, sn = build_norm_layer(dict(type='SN'), 64, postfix=1)
        >>> name
        'sn1'
        >>> sn(torch.randn(2, 64, 8, 8)).shape
        torch.Size([2, 64, 8, 8])
        >>> [r.tolist() for r in sn.ratios()]  # initialised equal (Appendix C)
        [[0.333..., 0.333..., 0.333...], [0.333..., 0.333..., 0.333...]]
        >>> grouped = SwitchableNorm(64, ratio_groups=8)  # one ratio vector per 8 channels
        >>> grouped.ratios()[0].shape
        torch.Size([8, 3])
    """

    _abbr_ = 'sn'
    ratio_fn = staticmethod(softmax_ratios)
    ratio_state = ratio_params = ('mean_logits', 'var_logits')

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, using_bn: bool = True,
                 mix: str = 'var', in_unbiased: bool = False, eval_stats: str = 'moving',
                 device=None, dtype=None, ratio_groups: int = 1):
        super().__init__(num_features, eps, momentum, track_running_stats, eval_stats, device,
                         dtype)
        ratio_groups = check_ratio_groups(self.num_features, ratio_groups)
        affine, using_bn = check_flag(affine, 'affine'), check_flag(using_bn, 'using_bn')
        in_unbiased = check_flag(in_unbiased, 'in_unbiased')
        if mix not in MIX_MODES:
            raise ValueError(f'mix must be one of {MIX_MODES}, got {mix!r}')
        if eval_stats == 'batch_average' and not using_bn:
            raise ValueError("eval_stats='batch_average' concerns BN statistics; with "
                             "using_bn=False use eval_stats='moving'")
        factory = {'device': device, 'dtype': dtype}
        self.affine = affine
        self.using_bn = using_bn
        self.mix = mix
        self.ratio_groups = ratio_groups
        self.register_buffer('in_var_unbiased', torch.tensor(bool(in_unbiased), device=device))
        self.in_unbiased = in_unbiased
        num_ratios = 3 if using_bn else 2
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter('weight', None)
            self.register_parameter('bias', None)
        self._create_logits(num_ratios, factory)
        self.reset_parameters()

    def _ratio_shape(self, num_ratios: int) -> Tuple[int, ...]:
        """The shape of a ratio parameter: ``(|Ω|,)``, or ``(G, |Ω|)`` with ratio groups."""
        return (num_ratios, ) if self.ratio_groups == 1 else (self.ratio_groups, num_ratios)

    def _create_logits(self, num_ratios: int, factory: dict) -> None:
        self.mean_logits = nn.Parameter(torch.empty(self._ratio_shape(num_ratios), **factory))
        self.var_logits = nn.Parameter(torch.empty(self._ratio_shape(num_ratios), **factory))

    def reset_parameters(self) -> None:
        """γ = 1, β = 0, equal ratios (all logits 0); running buffers reset. The
        ``in_var_unbiased`` buffer is written again from the option (after ``to_empty()``, a
        layer built on the ``meta`` device, it holds garbage that a checkpoint would save)."""
        self.reset_running_stats()
        self.in_unbiased = self.in_unbiased
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)
        for logits in self._logits():
            nn.init.zeros_(logits)

    def _logits(self) -> Tuple[nn.Parameter, ...]:
        return self.mean_logits, self.var_logits

    @property
    def normalizers(self) -> Tuple[str, ...]:
        """Names of Ω in the order of the ratios."""
        return NORMALIZERS[:self._logits()[0].shape[-1]]

    @property
    def keeps_batch_stats(self) -> bool:
        return super().keeps_batch_stats and self.using_bn

    @torch.no_grad()
    def harden_ratios_(self) -> None:
        """One-hot softmax ratios at the argmax (of each group's vector): the winning logit 0,
        the others ``-1e4`` (their softmax is exactly 0); the logits stop training
        (``requires_grad=False``)."""
        for logits in self._logits():
            winner = logits.argmax(-1, keepdim=True)
            logits.fill_(-_HARD_GAP)
            logits.scatter_(-1, winner, 0.0)
            logits.requires_grad_(False)

    @fx_leaf
    def forward(self, input: Tensor) -> Tensor:
        return self._mix(input)[0]

    def _mix(self, input: Tensor) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        """The output and the ratios it used: the computation every SN variant shares, with the
        variant's :attr:`ratio_fn` of :meth:`ratio_inputs`."""
        check_norm_input(input, self.num_features)  # before any bookkeeping
        running_mean, running_var, use_batch_stats, momentum = self._batch_stats_state(input)
        with full_precision(input):
            return mix_normalizers(input, self.ratio_fn, self.ratio_inputs(), self.weight,
                                   self.bias, running_mean, running_var, use_batch_stats,
                                   momentum, self.eps, self.mix, self.in_unbiased,
                                   self._sync_group() if use_batch_stats else None,
                                   self._scoped_ratios() if self.takes_ratios() else None)

    def takes_ratios(self) -> bool:
        # Only the light form (mix='var', biased IN variance) takes computed ratios.
        return self.mix == 'var' and not self.in_unbiased

    @property
    def in_unbiased(self) -> bool:
        """IN variance with Bessel's correction (saved as the bool buffer ``in_var_unbiased``,
        so a checkpoint converted from the SN authors' models keeps computing what they were
        trained with, whatever the config says)."""
        return self._in_unbiased

    @in_unbiased.setter
    def in_unbiased(self, value: bool) -> None:
        self._in_unbiased = bool(value)
        if 'in_var_unbiased' in self._buffers:
            self.in_var_unbiased.fill_(self._in_unbiased)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints from before the option existed (or from elsewhere) keep the configured one.
        state_dict.setdefault(prefix + 'in_var_unbiased', self.in_var_unbiased.clone())
        if self.ratio_groups > 1:  # a layer-wise checkpoint starts every group from its ratios
            for name in self.ratio_state:
                saved, own = state_dict.get(prefix + name), getattr(self, name)
                if isinstance(saved, Tensor) and saved.dim() + 1 == own.dim() \
                        and saved.shape == own.shape[1:]:
                    state_dict[prefix + name] = saved.expand_as(own).clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._in_unbiased = bool(self.in_var_unbiased)  # read once here, never in forward

    def config(self) -> Dict[str, Any]:
        return dict(super().config(), affine=self.affine, using_bn=self.using_bn, mix=self.mix,
                    in_unbiased=self.in_unbiased, ratio_groups=self.ratio_groups)


@register(MODELS, 'SN_tied')
class SwitchableNormTied(SwitchableNorm):
    r"""Switchable Normalization with one ratio vector for means and variances (``SN_tied``).

    Same as :class:`SwitchableNorm` with :math:`\lambda^\mu = \lambda^\sigma =
    \mathrm{softmax}(\text{logits})`; one parameter ``logits`` of size ``|Ω|``. Takes the same
    arguments.

    Examples:
        >>> m = SwitchableNormTied(16)
        >>> m(torch.randn(4, 16, 5, 5)).shape
        torch.Size([4, 16, 5, 5])
        >>> mean_ratios, var_ratios = m.ratios()
        >>> bool((mean_ratios == var_ratios).all())
        True
    """

    _abbr_ = 'sn'
    ratio_state = ratio_params = ('logits', )
    tied_ratios = True

    def _create_logits(self, num_ratios: int, factory: dict) -> None:
        self.logits = nn.Parameter(torch.empty(self._ratio_shape(num_ratios), **factory))

    def _logits(self) -> Tuple[nn.Parameter, ...]:
        return (self.logits, )


@register(MODELS, 'SyncSN')
class SyncSwitchableNorm(SyncNorm, SwitchableNorm):
    """:class:`SwitchableNorm` whose BN branch uses the global batch's statistics (registered
    as ``SyncSN``; :class:`~mmnorm.layers.SyncNorm`). Only the BN statistics are synchronized:
    IN and LN are per sample. Takes the same arguments plus ``process_group``."""


@register(MODELS, 'SyncSN_tied')
class SyncSwitchableNormTied(SyncNorm, SwitchableNormTied):
    """:class:`SwitchableNormTied` with synchronized BN statistics (registered as
    ``SyncSN_tied``)."""
