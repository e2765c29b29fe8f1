# Copyright (c) mmnorm contributors. All rights reserved.
"""A synthetic instance- and semantic-segmentation dataset, written in the formats the codebases
load without any special loader.

Each image shows 1-6 objects of four shape classes (circle, square, triangle, star), randomly
rotated, scaled from ``min_size`` to ``max_size`` pixels, overlapping (later objects occlude
earlier ones), each filled with its own texture and colour (colour says nothing about the class),
on a textured background (smooth noise, stripes, gradients), with blur and sensor noise. The
annotations are the *visible* parts: a heavily occluded object keeps only what can be seen, and is
dropped below ``min_visible`` pixels.

Layout under ``root``::

    images/{train,val}/{id:06d}.png            RGB images
    annotations/instances_{train,val}.json     COCO instances (bbox, area, RLE masks, iscrowd)
    seg_labels/{train,val}/{id:06d}.png        semantic labels: 0 background, 1..4 the classes

Deterministic: the same ``seed`` and sizes give the same files on every machine.
"""
import json
import os
import os.path as osp
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
from pycocotools import mask as mask_utils

__all__ = ['CLASSES', 'PALETTE', 'generate_demo_data', 'render_image', 'DEFAULTS']

CLASSES = ('circle', 'square', 'triangle', 'star')
PALETTE = [(0, 0, 0), (220, 20, 60), (0, 128, 255), (50, 205, 50), (255, 215, 0)]

DEFAULTS = dict(num_train=1200, num_val=200, image_size=128, min_size=16, max_size=56,
                max_objects=6, min_visible=40, seed=0)


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """An RGB texture in [0, 255]: smooth noise, stripes or a gradient, with random colours."""
    kind = rng.integers(3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == 0:
        coarse = rng.random((rng.integers(3, 9), ) * 2).astype(np.float32)
        pattern = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    elif kind == 1:
        angle = rng.uniform(0, np.pi)
        freq = rng.uniform(4, 14)
        pattern = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (np.cos(angle) * xx
                                                          + np.sin(angle) * yy))
    else:
        angle = rng.uniform(0, 2 * np.pi)
        pattern = np.cos(angle) * xx + np.sin(angle) * yy
        pattern = (pattern - pattern.min()) / max(float(np.ptp(pattern)), 1e-6)
    low, high = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    pattern = np.clip(pattern, 0, 1)[..., None]
    return (low + (high - low) * pattern).astype(np.float32)


def _shape_polygon(rng: np.random.Generator, label: int, center: Tuple[float, float],
                   size: float) -> Optional[np.ndarray]:
    """Vertices of a class-``label`` shape of about ``size`` pixels (None: a circle)."""
    angle = rng.uniform(0, 2 * np.pi)
    if label == 0:
        return None
    if label == 1:
        radii, count = np.full(4, size / np.sqrt(2) / 2 * 1.0), 4
    elif label == 2:
        radii, count = np.full(3, size / 2 * 1.15), 3
    else:
        inner = rng.uniform(0.38, 0.5)
        radii, count = np.tile([size / 2 * 1.1, size / 2 * 1.1 * inner], 5), 10
    angles = angle + np.arange(count) * 2 * np.pi / count
    points = np.stack([center[0] + radii * np.cos(angles),
                       center[1] + radii * np.sin(angles)], 1)
    return np.round(points * 8).astype(np.int32)  # 3 fractional bits for cv2


def render_image(rng: np.random.Generator, image_size: int, min_size: int, max_size: int,
                 max_objects: int, min_visible: int) -> Tuple[np.ndarray, List[dict]]:
    """One image (uint8 RGB) and its visible objects ``[{'label', 'mask'}]``."""
    canvas = _texture(rng, image_size)
    count = int(rng.integers(1, max_objects + 1))
    masks, labels = [], []
    for _ in range(count):
        label = int(rng.integers(len(CLASSES)))
        size = float(np.exp(rng.uniform(np.log(min_size), np.log(max_size))))
        margin = size * 0.3
        center = (rng.uniform(margin, image_size - margin),
                  rng.uniform(margin, image_size - margin))
        mask = np.zeros((image_size, image_size), np.uint8)
        polygon = _shape_polygon(rng, label, center, size)
        if polygon is None:
            cv2.circle(mask, (int(round(center[0] * 8)), int(round(center[1] * 8))),
                       int(round(size / 2 * 8)), 1, -1, cv2.LINE_8, 3)
        else:
            cv2.fillPoly(mask, [polygon], 1, cv2.LINE_8, 3)
        fill = _texture(rng, image_size)
        canvas[mask > 0] = fill[mask > 0]
        masks.append(mask)
        labels.append(label)
    # Visible parts: later objects occlude earlier ones.
    objects = []
    covered = np.zeros((image_size, image_size), bool)
    for mask, label in zip(reversed(masks), reversed(labels)):
        visible = (mask > 0) & ~covered
        covered |= mask > 0
        if visible.sum() >= min_visible:
            objects.append(dict(label=label, mask=visible))
    objects.reverse()
    if rng.random() < 0.5:
        canvas = cv2.GaussianBlur(canvas, (3, 3), rng.uniform(0.3, 1.0))
    canvas += rng.normal(0, rng.uniform(4, 14), canvas.shape).astype(np.float32)
    return np.clip(canvas, 0, 255).astype(np.uint8), objects


def _annotation(obj: dict, image_id: int, ann_id: int) -> dict:
    rle = mask_utils.encode(np.asfortranarray(obj['mask'].astype(np.uint8)))
    x, y, w, h = mask_utils.toBbox(rle).tolist()
    rle['counts'] = rle['counts'].decode('ascii')
    return dict(id=ann_id, image_id=image_id, category_id=obj['label'] + 1,
                segmentation=rle, area=float(mask_utils.area(rle)), bbox=[x, y, w, h],
                iscrowd=0)


def _semantic_label(objects: List[dict], size: int) -> np.ndarray:
    label = np.zeros((size, size), np.uint8)
    for obj in objects:
        label[obj['mask']] = obj['label'] + 1
    return label


def _remove_stale(folder: str, count: int) -> None:
    """Remove the images of an earlier, larger run from ``folder``: the numbered PNGs from
    ``count`` on (mmseg lists the folder, and would load them with this run's annotations). The
    others this run writes over; files of other names are left alone."""
    for name in os.listdir(folder):
        stem, ext = osp.splitext(name)
        if ext == '.png' and len(stem) == 6 and stem.isdigit() and int(stem) >= count:
            os.remove(osp.join(folder, name))


def generate_demo_data(root: str, num_train: int = DEFAULTS['num_train'],
                       num_val: int = DEFAULTS['num_val'],
                       image_size: int = DEFAULTS['image_size'],
                       min_size: int = DEFAULTS['min_size'], max_size: int = DEFAULTS['max_size'],
                       max_objects: int = DEFAULTS['max_objects'],
                       min_visible: int = DEFAULTS['min_visible'], seed: int = DEFAULTS['seed'],
                       progress=None) -> Dict[str, int]:
    """Write the dataset under ``root`` (replacing one written there before); returns the
    number of objects per split.

    ``progress(done, total)`` is called after every image when given.
    """
    if not 4 <= min_size < max_size <= image_size:
        raise ValueError(f'need 4 <= min_size < max_size <= image_size, got {min_size}, '
                         f'{max_size}, {image_size}')
    if num_train < 1 or num_val < 1 or max_objects < 1:
        raise ValueError('num_train, num_val and max_objects must be >= 1')
    categories = [dict(id=i + 1, name=name, supercategory='shape')
                  for i, name in enumerate(CLASSES)]
    totals = {}
    done, total = 0, num_train + num_val
    for split, count, offset in (('train', num_train, 0), ('val', num_val, 10_000_000)):
        # Separate streams per split: changing num_train does not change the val split.
        rng = np.random.default_rng([seed, offset])
        for sub in ('images', 'seg_labels'):
            os.makedirs(osp.join(root, sub, split), exist_ok=True)
            _remove_stale(osp.join(root, sub, split), count)
        images, annotations = [], []
        for index in range(count):
            image, objects = render_image(rng, image_size, min_size, max_size, max_objects,
                                          min_visible)
            name = f'{index:06d}.png'
            cv2.imwrite(osp.join(root, 'images', split, name), image[..., ::-1])
            cv2.imwrite(osp.join(root, 'seg_labels', split, name),
                        _semantic_label(objects, image_size))
            image_id = index + 1
            images.append(dict(id=image_id, file_name=name, width=image_size,
                               height=image_size))
            for obj in objects:
                annotations.append(_annotation(obj, image_id, len(annotations) + 1))
            done += 1
            if progress is not None:
                progress(done, total)
        os.makedirs(osp.join(root, 'annotations'), exist_ok=True)
        with open(osp.join(root, 'annotations', f'instances_{split}.json'), 'w') as f:
            json.dump(dict(images=images, annotations=annotations, categories=categories,
                           info=dict(description='mmnorm demo shapes', seed=seed)), f)
        totals[split] = len(annotations)
    with open(osp.join(root, 'meta.json'), 'w') as f:
        json.dump(dict(num_train=num_train, num_val=num_val, image_size=image_size,
                       min_size=min_size, max_size=max_size, max_objects=max_objects,
                       min_visible=min_visible, seed=seed, classes=CLASSES, objects=totals),
                  f, indent=2)
    return totals
