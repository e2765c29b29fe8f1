# The embedded demo (make demo): Mask R-CNN with Switchable Normalization in the backbone, the
# FPN, the box head and the mask head, trained from scratch on the generated shapes dataset
# (tools/make_demo_data.py) in about 15 minutes on 2 CPU cores.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmnorm'], allow_failed_imports=False)

norm_cfg = dict(type='SN', eval_stats='batch_average')
conv_cfg = None
data_root = 'data/demo/'
image_size = 128
classes = ('circle', 'square', 'triangle', 'star')
widths = dict(stem=16, base=16, fpn=64, head=64, fc=256)

model = dict(
    data_preprocessor=dict(mean=[127.5] * 3, std=[64.0] * 3, bgr_to_rgb=True,
                           pad_size_divisor=32),
    backbone=dict(
        depth=18, stem_channels=widths['stem'], base_channels=widths['base'],
        frozen_stages=-1, norm_eval=False, conv_cfg=conv_cfg, norm_cfg=norm_cfg,
        init_cfg=None),
    neck=dict(in_channels=[widths['base'] * 2**i for i in range(4)], out_channels=widths['fpn'],
              conv_cfg=conv_cfg, norm_cfg=norm_cfg),
    rpn_head=dict(
        in_channels=widths['fpn'], feat_channels=widths['fpn'],
        anchor_generator=dict(scales=[4], ratios=[0.5, 1.0, 2.0], strides=[4, 8, 16, 32, 64])),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=widths['fpn']),
        bbox_head=dict(
            _delete_=True, type='ConvFCBBoxHead', num_shared_convs=2, num_shared_fcs=1,
            in_channels=widths['fpn'], conv_out_channels=widths['head'],
            fc_out_channels=widths['fc'], roi_feat_size=7, num_classes=len(classes),
            conv_cfg=conv_cfg, norm_cfg=norm_cfg,
            bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0.0] * 4,
                            target_stds=[0.1, 0.1, 0.2, 0.2]),
            reg_class_agnostic=False,
            loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
            loss_bbox=dict(type='SmoothL1Loss', beta=1.0 / 9.0, loss_weight=1.0)),
        mask_roi_extractor=dict(out_channels=widths['fpn']),
        mask_head=dict(num_convs=2, in_channels=widths['fpn'], conv_out_channels=widths['head'],
                       num_classes=len(classes), conv_cfg=conv_cfg, norm_cfg=norm_cfg)),
    train_cfg=dict(
        rpn=dict(sampler=dict(num=128)),
        rpn_proposal=dict(nms_pre=400, max_per_img=200),
        rcnn=dict(sampler=dict(num=64, pos_fraction=0.25), mask_size=28)),
    test_cfg=dict(
        rpn=dict(nms_pre=400, max_per_img=200),
        rcnn=dict(score_thr=0.05, max_per_img=20)))

metainfo = dict(classes=classes, palette=[(220, 20, 60), (0, 128, 255), (50, 205, 50),
                                          (255, 215, 0)])
backend_args = None
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5, direction=['horizontal', 'vertical']),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                                          'scale_factor')),
]
train_dataloader = dict(
    batch_size=2, num_workers=2, persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    batch_sampler=dict(type='AspectRatioBatchSampler'),
    dataset=dict(type='CocoDataset', data_root=data_root, metainfo=metainfo,
                 ann_file='annotations/instances_train.json',
                 data_prefix=dict(img='images/train/'),
                 filter_cfg=dict(filter_empty_gt=True, min_size=4), pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4, num_workers=2, persistent_workers=True, drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type='CocoDataset', data_root=data_root, metainfo=metainfo,
                 ann_file='annotations/instances_val.json', data_prefix=dict(img='images/val/'),
                 test_mode=True, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='CocoMetric', ann_file=data_root + 'annotations/instances_val.json',
                     metric=['bbox', 'segm'], format_only=False)
test_evaluator = val_evaluator

max_iters = 2400
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(
    constructor='NormAwareOptimWrapperConstructor',
    optimizer=dict(type='AdamW', lr=2e-3, weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.0, ratio_decay_mult=0.0, bias_decay_mult=0.0),
    clip_grad=dict(max_norm=10.0, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=100),
    dict(type='CosineAnnealingLR', eta_min=2e-5, by_epoch=False, begin=100, end=max_iters),
]
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=50),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters, max_keep_ckpts=1),
    visualization=dict(type='DetVisualizationHook'))
custom_hooks = [
    dict(type='BatchAverageStatsHook', num_iters=50, before_val=True, before_test=False),
    dict(type='SNRatioLoggerHook', interval=100),
]
log_processor = dict(by_epoch=False)
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='nccl'))
randomness = dict(seed=0)
auto_scale_lr = dict(enable=False, base_batch_size=2)
