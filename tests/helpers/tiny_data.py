# Copyright (c) mmnorm contributors. All rights reserved.
"""Tiny generated datasets in the codebases' own formats, and --cfg-options pointing configs at
them (no config is edited)."""
import os
import os.path as osp
from typing import List

import numpy as np
from PIL import Image

from mmnorm.demo import CLASSES, generate_demo_data

SHAPE_CLASSES = '[' + ','.join(CLASSES) + ']'
SEG_CLASSES = '[background,' + ','.join(CLASSES) + ']'


def make_shapes(root: str, num_train: int = 8, num_val: int = 4) -> str:
    """The demo shapes dataset (COCO instances + semantic labels), small."""
    generate_demo_data(root, num_train=num_train, num_val=num_val, seed=3)
    return root.rstrip('/') + '/'


def make_imagenet_format(root: str, num_classes: int = 3, per_class: int = 4,
                         size: int = 32) -> str:
    """``root/{train,val}/*.png`` with ``root/meta/{train,val}.txt`` (mmpretrain ImageNet)."""
    rng = np.random.default_rng(0)
    os.makedirs(osp.join(root, 'meta'), exist_ok=True)
    for split in ('train', 'val'):
        os.makedirs(osp.join(root, split), exist_ok=True)
        lines = []
        for k in range(num_classes):
            for i in range(per_class):
                img = (rng.random((size, size, 3)) * 60).astype(np.uint8)
                img[4:20, 4:20, k % 3] = 220
                name = f'{k}_{i}.png'
                Image.fromarray(img).save(osp.join(root, split, name))
                lines.append(f'{name} {k}')
        with open(osp.join(root, 'meta', f'{split}.txt'), 'w') as f:
            f.write('\n'.join(lines) + '\n')
    return root.rstrip('/') + '/'


def mmdet_zoo_options(root: str, scale: int = 128) -> List[str]:
    """Point a COCO mmdet config at the shapes data: 4 classes, 4 small images, 1 epoch, few
    proposals and RoIs (a 4conv1fc head on 512 RoIs per image dominates the CPU time)."""
    options = ['model.backbone.init_cfg=None', 'train_cfg.max_epochs=1',
               'train_cfg.val_interval=100', 'model.roi_head.bbox_head.num_classes=4',
               'model.roi_head.mask_head.num_classes=4', 'model.train_cfg.rcnn.sampler.num=32',
               'model.train_cfg.rpn_proposal.max_per_img=100', 'model.test_cfg.rpn.max_per_img=50',
               'train_dataloader.dataset.indices=4', 'test_dataloader.dataset.indices=2']
    for split, ann in (('train', 'train'), ('test', 'val'), ('val', 'val')):
        prefix = f'{split}_dataloader'
        options += [f'{prefix}.dataset.data_root={root}',
                    f'{prefix}.dataset.ann_file=annotations/instances_{ann}.json',
                    f'{prefix}.dataset.data_prefix.img=images/{ann}/',
                    f'{prefix}.dataset.metainfo.classes={SHAPE_CLASSES}',
                    f'{prefix}.num_workers=0', f'{prefix}.persistent_workers=False']
    options += [f'train_dataloader.dataset.pipeline.2.scale=({scale},{scale})',
                f'test_dataloader.dataset.pipeline.1.scale=({scale},{scale})',
                f'val_dataloader.dataset.pipeline.1.scale=({scale},{scale})',
                f'test_evaluator.ann_file={root}annotations/instances_val.json',
                f'val_evaluator.ann_file={root}annotations/instances_val.json']
    return options


def mmseg_zoo_options(root: str, crop: int = 128) -> List[str]:
    """Point an mmseg config at the shapes' semantic labels (5 classes), small crops."""
    options = ['model.backbone.init_cfg=None', 'train_cfg.max_iters=2',
               'train_cfg.val_interval=100', 'model.decode_head.num_classes=5',
               'model.auxiliary_head.num_classes=5',
               f'model.data_preprocessor.size=({crop},{crop})']
    for split, ann in (('train', 'train'), ('test', 'val'), ('val', 'val')):
        prefix = f'{split}_dataloader'
        options += [f'{prefix}.dataset.type=BaseSegDataset',
                    f'{prefix}.dataset.data_root={root}',
                    f'{prefix}.dataset.data_prefix.img_path=images/{ann}',
                    f'{prefix}.dataset.data_prefix.seg_map_path=seg_labels/{ann}',
                    f'{prefix}.dataset.img_suffix=.png', f'{prefix}.dataset.seg_map_suffix=.png',
                    f'{prefix}.dataset.metainfo.classes={SEG_CLASSES}',
                    f'{prefix}.num_workers=0', f'{prefix}.persistent_workers=False']
    options += [f'train_dataloader.dataset.pipeline.2.scale=({2 * crop},{crop})',
                f'train_dataloader.dataset.pipeline.3.crop_size=({crop},{crop})',
                f'test_dataloader.dataset.pipeline.1.scale=({crop},{crop})',
                f'val_dataloader.dataset.pipeline.1.scale=({crop},{crop})']
    return options


def mmpretrain_zoo_options(root: str) -> List[str]:
    """Point an ImageNet mmpretrain config at a tiny ImageNet-format folder, small crops."""
    options = ['train_cfg.max_epochs=1', 'train_dataloader.batch_size=2',
               'val_dataloader.batch_size=2', 'test_dataloader.batch_size=2']
    for split, ann in (('train', 'train'), ('test', 'val'), ('val', 'val')):
        prefix = f'{split}_dataloader'
        options += [f'{prefix}.dataset.data_root={root}', f'{prefix}.num_workers=0',
                    f'{prefix}.persistent_workers=False']
    options += ['train_dataloader.dataset.pipeline.1.scale=64',
                'test_dataloader.dataset.pipeline.1.scale=72',
                'test_dataloader.dataset.pipeline.2.crop_size=64',
                'val_dataloader.dataset.pipeline.1.scale=72',
                'val_dataloader.dataset.pipeline.2.crop_size=64']
    return options
