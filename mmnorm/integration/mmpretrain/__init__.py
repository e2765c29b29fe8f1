# Copyright (c) mmnorm contributors. All rights reserved.
"""mmpretrain support: ``ResNetV1SSN`` (the SSN authors' stem), ``norm_eval`` for mmnorm
layers."""


def setup() -> None:
    from mmpretrain.registry import MODELS

    from ..norm_eval import respect_norm_eval_in_registry
    from . import resnet_v1_ssn  # noqa: F401  (registers ResNetV1SSN)
    respect_norm_eval_in_registry(MODELS)
