# Copyright (c) mmnorm contributors. All rights reserved.
"""mmsegmentation support: the DeepLabv2 head, ``norm_eval`` for mmnorm layers."""


def setup() -> None:
    from mmseg.registry import MODELS

    from ..norm_eval import respect_norm_eval_in_registry
    from . import deeplabv2_head  # noqa: F401  (registers DeepLabV2Head)
    respect_norm_eval_in_registry(MODELS)
