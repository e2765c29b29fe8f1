# Copyright (c) mmnorm contributors. All rights reserved.
"""Tiny generated image-classification folders (mmpretrain ``CustomDataset`` layout)."""
import os
import os.path as osp

import numpy as np
from PIL import Image


def make_class_folders(root: str, num_classes: int = 3, per_class: int = 8, size: int = 32,
                       seed: int = 0) -> str:
    """``root/class{k}/{i}.png``: noise with a bright square in colour channel ``k % 3``."""
    rng = np.random.default_rng(seed)
    for k in range(num_classes):
        folder = osp.join(root, f'class{k}')
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            img = (rng.random((size, size, 3)) * 60).astype(np.uint8)
            lo = int(rng.integers(0, size // 2))
            img[lo:lo + size // 3, lo:lo + size // 3, k % 3] = 220
            Image.fromarray(img).save(osp.join(folder, f'{i}.png'))
    return root
