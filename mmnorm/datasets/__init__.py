# Copyright (c) mmnorm contributors. All rights reserved.
"""Datasets mmnorm registers (mmengine's root ``DATASETS``, found from every codebase's scope)."""
from .digits import DIGITS_SPLITS, DIGITS_TEST_EVERY, DigitsDataset, load_digits_split

__all__ = ['DigitsDataset', 'load_digits_split', 'DIGITS_SPLITS', 'DIGITS_TEST_EVERY']
