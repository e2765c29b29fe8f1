# The segmentation demo (make demo-seg): DeepLabv2 (ASPP of summed dilated 3x3 classifiers,
# mmnorm's DeepLabV2Head) on a narrow ResNet-18 at output stride 8 with SN in the backbone and
# the auxiliary FCN head, trained from scratch on the semantic labels of the generated shapes
# dataset (tools/make_demo_data.py): background + 4 shape classes, 128x128 images.
_base_ = [
    '../_base_/models/deeplabv2_r50-d8.py',
    'mmseg::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmnorm'], allow_failed_imports=False)

norm_cfg = dict(type='SN', eval_stats='batch_average')
data_root = 'data/demo/'
crop_size = (128, 128)
classes = ('background', 'circle', 'square', 'triangle', 'star')
palette = [[0, 0, 0], [220, 20, 60], [0, 128, 255], [50, 205, 50], [255, 215, 0]]
model = dict(
    data_preprocessor=dict(size=crop_size, mean=[127.5] * 3, std=[64.0] * 3),
    backbone=dict(type='ResNet', depth=18, stem_channels=16, base_channels=16,
                  norm_cfg=norm_cfg, init_cfg=None),
    # dilations scaled to the 16x16 feature map of a 128x128 image (the paper's 6-24 are for
    # 713x713 crops)
    decode_head=dict(in_channels=128, dilations=(2, 4, 6, 8), num_classes=len(classes)),
    auxiliary_head=dict(in_channels=64, channels=32, num_classes=len(classes),
                        norm_cfg=norm_cfg))
dataset = dict(type='BaseSegDataset', data_root=data_root,
               metainfo=dict(classes=classes, palette=palette), img_suffix='.png',
               seg_map_suffix='.png', reduce_zero_label=False)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomFlip', prob=0.5, direction=['horizontal', 'vertical']),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=4, num_workers=2, persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(**dataset, pipeline=train_pipeline,
                 data_prefix=dict(img_path='images/train', seg_map_path='seg_labels/train')))
val_dataloader = dict(
    batch_size=4, num_workers=2, persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(**dataset, pipeline=test_pipeline,
                 data_prefix=dict(img_path='images/val', seg_map_path='seg_labels/val')))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

max_iters = 4000
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(
    constructor='NormAwareOptimWrapperConstructor',
    optimizer=dict(type='AdamW', lr=2e-3, weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.0, ratio_decay_mult=0.0, bias_decay_mult=0.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=100),
    dict(type='PolyLR', eta_min=1e-5, power=0.9, by_epoch=False, begin=100, end=max_iters),
]
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters,
                    max_keep_ckpts=1))
custom_hooks = [
    dict(type='BatchAverageStatsHook', num_iters=50, before_val=True, before_test=False),
    dict(type='SNRatioLoggerHook', interval=100),
]
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)
