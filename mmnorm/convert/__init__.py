# Copyright (c) mmnorm contributors. All rights reserved.
"""Checkpoint conversion from the papers' released models (:mod:`.resnet`) and hard-ratio /
deploy forms of SN models (:mod:`.hard_ratios`)."""
from .hard_ratios import DEPLOY_ACTIONS, hard_choices, harden_ratios, summarize, to_deploy
from .reference import source_forward
from .resnet import (FORMATS, ConversionError, ResNetSpec, check_against, classifier_config,
                     convert_state_dict, resnet_spec, strip_prefix)

__all__ = [
    'FORMATS', 'ConversionError', 'ResNetSpec', 'check_against', 'classifier_config',
    'convert_state_dict', 'resnet_spec', 'strip_prefix', 'source_forward', 'DEPLOY_ACTIONS',
    'hard_choices', 'harden_ratios', 'summarize', 'to_deploy'
]
