# Copyright (c) mmnorm contributors. All rights reserved.
"""An optimizer-wrapper constructor that treats mmnorm layers as norms and their ratio parameters
separately."""
import logging
from typing import List, Optional, Union

from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor, OptimWrapper
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS
from torch import nn
from torch.nn.utils import clip_grad_norm_

from ...layers import BatchStatsNorm

__all__ = ['NormAwareOptimWrapperConstructor', 'SSN_RATIO_RULES']

#: The ``paramwise_cfg`` keys of the ratio rules.
RATIO_KEYS = ('ratio_lr_mult', 'ratio_decay_mult', 'ratio_clip_grad')

#: The Sparse SN authors' rules for ratio parameters: the defaults for layers that follow the
#: training progress (SSN), where ``paramwise_cfg`` leaves them unset.
SSN_RATIO_RULES = dict(ratio_lr_mult=0.1, ratio_decay_mult=0.0,
                       ratio_clip_grad=dict(max_norm=1.0))


def _show(value) -> str:
    """A config value as a config writes it (``dict(max_norm=1.0)``)."""
    if isinstance(value, dict):
        return 'dict(' + ', '.join(f'{k}={_show(v)}' for k, v in value.items()) + ')'
    return repr(value)


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class NormAwareOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """mmengine's default constructor, plus rules for SN / SN_tied / BCN parameters.

    mmengine recognises norms by type (``_BatchNorm``, ``GroupNorm``, ...), which mmnorm's layers
    are not. With this constructor (``optim_wrapper=dict(constructor=
    'NormAwareOptimWrapperConstructor', paramwise_cfg=...)``):

    - ``norm_decay_mult`` applies to the affine parameters of SN/SN_tied/BCN (``weight``,
      ``bias``, ``bn_weight``, ``bn_bias``), exactly as to BN/GN ones;
    - ``ratio_decay_mult`` / ``ratio_lr_mult`` apply to the ratio parameters of SN and its
      variants (each layer names them: ``ratio_params``, e.g. SN's ``mean_logits``,
      ``var_logits``, SN_tied's ``logits``); when unset, they follow the generic rules
      (``flat_decay_mult``, else the base weight decay and learning rate);
    - ``ratio_clip_grad`` (e.g. ``dict(max_norm=1.0)``, the arguments of
      ``torch.nn.utils.clip_grad_norm_``) clips the gradient norm of all ratio parameters
      together before every optimizer step (after AMP's unscaling), the others untouched;
    - ``custom_keys`` still take precedence over everything; every other module is handled by
      :class:`~mmengine.optim.DefaultOptimWrapperConstructor` unchanged.

    Sparse SN's authors train the ratio parameters at a tenth of the learning rate, without
    weight decay, with their gradient norm clipped to 1:
    ``paramwise_cfg=dict(ratio_lr_mult=0.1, ratio_decay_mult=0., ratio_clip_grad=dict(
    max_norm=1.0))``, as mmnorm's SSN configs do. These are also the defaults
    (:data:`SSN_RATIO_RULES`) for the ratio parameters of layers that follow the training progress
    (``follows_progress``: SSN, SyncSSN), each where ``paramwise_cfg`` leaves it unset: an explicit
    setting wins (``None`` included: ``ratio_clip_grad=None`` clips nothing), and the default
    clipping covers those layers' ratio parameters only. SN's ratio parameters keep the generic
    rules. What was applied is logged. The constructor marks each such layer, which checks it on
    its first training step in a Runner (an SSN run without this constructor stops there with an
    error that says what to add).

    Defaults come from the papers: without ``paramwise_cfg`` every parameter (conv weights, γ, β
    and the ratios) gets the base weight decay, the SN study's ImageNet protocol ("weight decay of
    1e-4 for all parameters including γ and β"; the ratios too, Sec. 3). Its COCO protocol sets
    weight decay 0 on γ and β: use ``paramwise_cfg=dict(norm_decay_mult=0.)`` there, as mmnorm's
    detection configs do.
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: Optional[dict] = None):
        super().__init__(optim_wrapper_cfg, paramwise_cfg)
        unknown = sorted(key for key in self.paramwise_cfg
                         if key.startswith('ratio') and key not in RATIO_KEYS)
        if unknown:  # (mmengine ignores keys it does not know: a typo would train silently)
            raise ValueError(f'unknown paramwise_cfg key(s) {unknown}: the ratio rules are '
                             f'{list(RATIO_KEYS)}')
        for key in ('ratio_lr_mult', 'ratio_decay_mult'):
            value = self.paramwise_cfg.get(key)
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, (int, float)) or value < 0):
                raise ValueError(f'{key} must be a number >= 0, got {value!r}')
        if 'ratio_decay_mult' in self.paramwise_cfg and self.base_wd is None:
            raise ValueError('ratio_decay_mult needs weight_decay in the optimizer config')
        clip = self.paramwise_cfg.get('ratio_clip_grad')
        if clip is not None and not (isinstance(clip, dict) and 'max_norm' in clip):
            raise ValueError(f'ratio_clip_grad must be a dict of clip_grad_norm_ arguments with '
                             f'max_norm, e.g. dict(max_norm=1.0); got {clip!r}')

    def __call__(self, model: nn.Module) -> OptimWrapper:
        model = getattr(model, 'module', model)
        progress_layers = [m for m in model.modules()
                           if isinstance(m, BatchStatsNorm) and m.follows_progress]
        if progress_layers and not self.paramwise_cfg:
            # mmengine's default builds parameter groups (add_params) only with a paramwise_cfg;
            # SSN's ratio rules need them. A key with its default value makes it non-empty.
            self.paramwise_cfg = dict(bypass_duplicate=False)
        optim_wrapper = super().__call__(model)
        defaults = {key: value for key, value in SSN_RATIO_RULES.items()
                    if key not in self.paramwise_cfg}
        if progress_layers and defaults:
            print_log(f'NormAwareOptimWrapperConstructor: {len(progress_layers)} layer(s) that '
                      f'follow the training progress (SSN); their ratio parameters get the SSN '
                      f"authors' rules that paramwise_cfg leaves unset: "
                      + ', '.join(f'{key}={_show(value)}' for key, value in defaults.items()),
                      logger='current')
        if 'ratio_clip_grad' in self.paramwise_cfg:  # every ratio parameter, as set
            clip = self.paramwise_cfg['ratio_clip_grad']
            clipped = [m for m in model.modules() if isinstance(m, BatchStatsNorm)]
        else:  # the SSN default: their ratio parameters only
            clip = SSN_RATIO_RULES['ratio_clip_grad']
            clipped = progress_layers
        ratio_params = [param for module in clipped
                        for name, param in module.named_parameters(recurse=False)
                        if name in module.ratio_params and param.requires_grad]
        if clip is not None and ratio_params:
            clip = dict(clip)

            def clip_ratio_gradients(optimizer, args, kwargs) -> None:
                clip_grad_norm_(ratio_params, **clip)

            # A step pre-hook of the optimizer itself: it runs inside every wrapper's step
            # (AmpOptimWrapper has unscaled the gradients by then, and skips the step on inf).
            optim_wrapper.optimizer.register_step_pre_hook(clip_ratio_gradients)
            print_log(f'NormAwareOptimWrapperConstructor: gradient norm of {len(ratio_params)} '
                      f'ratio parameter(s) clipped with {_show(clip)}', logger='current')
        return optim_wrapper

    def add_params(self, params: List[dict], module: nn.Module, prefix: str = '',
                   is_dcn_module: Optional[Union[int, float]] = None) -> None:
        if not isinstance(module, BatchStatsNorm):
            # The default handles this module and recurses into children through this method.
            super().add_params(params, module, prefix, is_dcn_module)
            return
        # Read by the layer on its first training step in a Runner (it warns when the config's
        # norm_decay_mult did not reach it).
        module._norm_rules_applied = True
        if module.follows_progress:
            # Read by the layer on its first training step in a Runner (SSN refuses to train
            # without its ratio rules).
            module._ratio_rules_applied = True
        cfg = self.paramwise_cfg
        custom_keys = cfg.get('custom_keys', {})
        sorted_keys = sorted(sorted(custom_keys), key=len, reverse=True)
        for name, param in module.named_parameters(recurse=False):
            full_name = f'{prefix}.{name}' if prefix else name
            group = {'params': [param]}
            if cfg.get('bypass_duplicate', False) and self._is_in(group, params):
                continue
            if not param.requires_grad:
                print_log(f'{full_name} is skipped since its requires_grad=False',
                          logger='current', level=logging.WARNING)
                continue
            key = next((k for k in sorted_keys if k in f'{prefix}.{name}'), None)
            if key is not None:
                options = custom_keys[key]
                group['lr'] = self.base_lr * options.get('lr_mult', 1.)
                if self.base_wd is not None:
                    group['weight_decay'] = self.base_wd * options.get('decay_mult', 1.)
                group.update(options)
            elif name in module.ratio_params:
                self._ratio_rules(group, module)
            else:
                self._affine_rules(group, name, param)
            params.append(group)
            for option, value in group.items():
                if option != 'params':
                    print_log(f'paramwise_options -- {full_name}:{option}={value}',
                              logger='current')

    def _decay(self, group: dict, mult_key: str, default: Optional[float] = None) -> bool:
        mult = self.paramwise_cfg.get(mult_key, default)
        if self.base_wd is None or mult is None:
            return False
        group['weight_decay'] = self.base_wd * mult
        return True

    def _ratio_option(self, key: str, module: BatchStatsNorm):
        """``paramwise_cfg[key]``; when unset, the SSN default for a layer that follows the
        training progress, else None."""
        if key in self.paramwise_cfg or not module.follows_progress:
            return self.paramwise_cfg.get(key, None)
        return SSN_RATIO_RULES[key]

    def _ratio_rules(self, group: dict, module: BatchStatsNorm) -> None:
        lr_mult = self._ratio_option('ratio_lr_mult', module)
        if lr_mult is not None:
            group['lr'] = self.base_lr * lr_mult
        decay_mult = self._ratio_option('ratio_decay_mult', module)
        if not self._decay(group, 'ratio_decay_mult', decay_mult):
            self._decay(group, 'flat_decay_mult')

    def _affine_rules(self, group: dict, name: str, param: nn.Parameter) -> None:
        # The default's order for norm layers: norm_decay_mult, else bias, else flat.
        if self._decay(group, 'norm_decay_mult'):
            return
        if name.endswith('bias') and self._decay(group, 'bias_decay_mult'):
            return
        if param.ndim == 1:
            self._decay(group, 'flat_decay_mult')
