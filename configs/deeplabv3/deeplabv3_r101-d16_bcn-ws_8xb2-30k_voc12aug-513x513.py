# DeepLabv3 R101 on PASCAL VOC 2012 aug with BCN + WS (BCN paper Sec. 4.3, Table 5): output stride
# 16, multi-grid (1, 1, 1), crop 513, batch 16 (2 images/GPU x 8 GPUs, BCN's batch statistics
# synchronized so they cover the 16 images: the paper's large-batch form), LR 0.007 with
# polynomial decay, 30k iterations; single-scale test without flipping. From an ImageNet
# BCN+WS ResNet-101. BCN and WSConv in the backbone, the ASPP head and the auxiliary head.
_base_ = [
    'mmseg::_base_/models/deeplabv3_r50-d8.py',
    'mmseg::_base_/datasets/pascal_voc12_aug.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_20k.py',
]
custom_imports = dict(imports=['mmnorm'], allow_failed_imports=False)

pretrained = 'checkpoints/resnet101_bcn-ws_8xb32_in1k.pth'
crop_size = (513, 513)
conv_cfg = dict(type='WSConv')
norm_cfg = dict(type='SyncBCN', num_groups=32)
model = dict(
    data_preprocessor=dict(size=crop_size),
    pretrained=None,
    backbone=dict(
        type='ResNet', depth=101, dilations=(1, 1, 1, 2), strides=(1, 2, 2, 1),
        multi_grid=(1, 1, 1), conv_cfg=conv_cfg, norm_cfg=norm_cfg, norm_eval=False,
        contract_dilation=True,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    decode_head=dict(dilations=(1, 6, 12, 18), num_classes=21, conv_cfg=conv_cfg,
                     norm_cfg=norm_cfg),
    auxiliary_head=dict(num_classes=21, conv_cfg=conv_cfg, norm_cfg=norm_cfg))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=(2048, 513), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='Pad', size=crop_size),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2048, 513), keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(batch_size=2, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
max_iters = 30000
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=5000)
param_scheduler = [
    dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=max_iters, by_epoch=False)
]
optim_wrapper = dict(constructor='NormAwareOptimWrapperConstructor',
                     optimizer=dict(type='SGD', lr=0.007, momentum=0.9, weight_decay=1e-4))
default_hooks = dict(checkpoint=dict(by_epoch=False, interval=5000))
