# DeepLabv2 R50 (output stride 8) on ADE20K with SN in the backbone and the auxiliary head (SN
# study Sec. 4.2, Appendix C): images resized to 450 and cropped to 450x450, 2 images/GPU x 8 GPUs,
# 100k iterations, poly LR (power 0.9), auxiliary loss 0.4, batch-average evaluation. From an
# ImageNet SN(8,2) ResNet-50.
_base_ = [
    '../_base_/models/deeplabv2_r50-d8.py',
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_80k.py',
]
custom_imports = dict(imports=['mmnorm'], allow_failed_imports=False)

pretrained = 'checkpoints/resnet50_sn_8xb2_in1k.pth'
crop_size = (450, 450)
norm_cfg = dict(type='SN', eval_stats='batch_average')
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(norm_cfg=norm_cfg,
                  init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    decode_head=dict(num_classes=150),
    auxiliary_head=dict(num_classes=150, norm_cfg=norm_cfg))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(1800, 450), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(1800, 450), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(batch_size=2, num_workers=4, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
max_iters = 100000
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=10000)
param_scheduler = [
    dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=max_iters, by_epoch=False)
]
optim_wrapper = dict(constructor='NormAwareOptimWrapperConstructor',
                     optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=5e-4))
default_hooks = dict(checkpoint=dict(by_epoch=False, interval=10000))
custom_hooks = [
    dict(type='BatchAverageStatsHook', num_iters=200),
    dict(type='SNRatioLoggerHook', interval=1000),
]
