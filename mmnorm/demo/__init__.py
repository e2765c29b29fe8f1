# Copyright (c) mmnorm contributors. All rights reserved.
"""The embedded demo: a dataset mmnorm makes itself (:mod:`.shapes`)."""
from .shapes import CLASSES, DEFAULTS, PALETTE, generate_demo_data, render_image

__all__ = ['CLASSES', 'PALETTE', 'DEFAULTS', 'generate_demo_data', 'render_image']
