# Copyright (c) mmnorm contributors. All rights reserved.
"""The UCI handwritten digits as scikit-learn ships them, as an mmpretrain dataset.

``sklearn.datasets.load_digits`` holds 1797 real 8x8 grey images of the digits 0-9 (43 writers,
values 0-16), installed with scikit-learn: no download. mmnorm's analysis tools
(``tools/analysis/``) train on them by default. scikit-learn is optional
(``pip install -e '.[analysis]'``); it is imported only when the data is loaded.

Split (fixed, no randomness): sample ``i`` of ``load_digits()`` is in ``'test'`` when
``i % 5 == 0`` (360 images) and in ``'train'`` otherwise (1437 images).
"""
from typing import List, Tuple

import numpy as np
from mmengine.dataset import BaseDataset
from mmengine.registry import DATASETS

from ..registry import register

__all__ = ['DigitsDataset', 'load_digits_split', 'DIGITS_SPLITS', 'DIGITS_TEST_EVERY']

DIGITS_SPLITS = ('train', 'test')
#: Every fifth sample (index % 5 == 0) is a test sample.
DIGITS_TEST_EVERY = 5
_MAX_VALUE = 16  # load_digits counts 0..16 set pixels of a 4x4 block per 8x8 pixel


def load_digits_split(split: str) -> Tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 8, 8)`` uint8 (0-255, from the 0-16 counts) and labels ``(N,)`` int64.

    Raises:
        ValueError: an unknown split.
        ImportError: scikit-learn is not installed (with the command that installs it).
    """
    if split not in DIGITS_SPLITS:
        raise ValueError(f'split must be one of {DIGITS_SPLITS}, got {split!r}')
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn "
                          "(in mmnorm's checkout: pip install -e '.[analysis]')") from error
    digits = load_digits()
    in_test = np.arange(len(digits.target)) % DIGITS_TEST_EVERY == 0
    keep = in_test if split == 'test' else ~in_test
    images = np.rint(digits.images[keep] * (255.0 / _MAX_VALUE)).astype(np.uint8)
    return images, digits.target[keep].astype(np.int64)


@register(DATASETS, 'DigitsDataset')
class DigitsDataset(BaseDataset):
    """UCI handwritten digits (scikit-learn's copy) for mmpretrain classifiers.

    Each sample is ``dict(img=(8, 8, 1) uint8, gt_label=int, sample_idx=int)``: mmpretrain's
    ``PackInputs`` makes a ``(1, 8, 8)`` input of it, so the model takes ``in_channels=1``.

    Args:
        split (str): ``'train'`` (1437 images) or ``'test'`` (360). Defaults to ``'train'``.
        **kwargs: mmengine ``BaseDataset`` arguments (``pipeline``, ``test_mode``, ``indices``,
            ...); no ``data_root`` or ``ann_file`` is needed.

    Example:
        >>> train_dataloader = dict(batch_size=32, dataset=dict(
        ...     type='DigitsDataset', split='train', pipeline=[dict(type='PackInputs')]),
        ...     sampler=dict(type='DefaultSampler', shuffle=True))
    """

    METAINFO = dict(classes=tuple(str(digit) for digit in range(10)))

    def __init__(self, split: str = 'train', **kwargs):
        if split not in DIGITS_SPLITS:
            raise ValueError(f'split must be one of {DIGITS_SPLITS}, got {split!r}')
        self.split = split
        super().__init__(**kwargs)

    def load_data_list(self) -> List[dict]:
        images, labels = load_digits_split(self.split)
        return [dict(img=image[..., None], gt_label=int(label), sample_idx=index)
                for index, (image, label) in enumerate(zip(images, labels))]
