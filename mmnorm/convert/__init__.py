# Copyright (c) mmnorm contributors. All rights reserved.
"""Checkpoint conversion from the papers' released models (:mod:`.resnet`) and hard-ratio /
deploy forms of SN models (:mod:`.hard_ratios`; grouped layers whose groups chose differently:
:mod:`.groupwise`), conv + affine folding that respects weight standardization
(:mod:`.folding`)."""
from .folding import bn_affine, conv_weight, fold_affine_into_conv, fold_bn_into_conv
from .groupwise import GroupwiseHardNorm, choice_label
from .hard_ratios import (DEPLOY_ACTIONS, BatchNormNd, InstanceNormNd, hard_choices, harden_ratios,
                          summarize, to_deploy)
from .reference import source_forward
from .resnet import (FORMATS, SN_SOURCE_MOMENTUM, SOURCE_MOMENTUM, ConversionError, ResNetSpec,
                     check_against, classifier_config, convert_state_dict, resnet_spec,
                     strip_prefix)

__all__ = [
    'FORMATS', 'SN_SOURCE_MOMENTUM', 'SOURCE_MOMENTUM', 'ConversionError', 'ResNetSpec',
    'check_against', 'classifier_config', 'convert_state_dict', 'resnet_spec', 'strip_prefix',
    'source_forward',
    'DEPLOY_ACTIONS', 'hard_choices', 'harden_ratios', 'summarize', 'to_deploy', 'bn_affine',
    'conv_weight', 'fold_affine_into_conv', 'fold_bn_into_conv', 'GroupwiseHardNorm',
    'choice_label', 'BatchNormNd', 'InstanceNormNd'
]
