# DeepLabv3 R50 (output stride 8) on Cityscapes with SN in the backbone, the ASPP head and the
# auxiliary head: 1 image/GPU x 8 GPUs, 769x769 crops, 80k iterations, batch-average evaluation.
# From an ImageNet SN(8,2) ResNet-50 (plain v1 layout).
_base_ = [
    'mmseg::_base_/models/deeplabv3_r50-d8.py',
    'mmseg::_base_/datasets/cityscapes_769x769.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_80k.py',
]
custom_imports = dict(imports=['mmnorm'], allow_failed_imports=False)

pretrained = 'checkpoints/resnet50_sn_8xb2_in1k.pth'
crop_size = (769, 769)
norm_cfg = dict(type='SN', eval_stats='batch_average')
model = dict(
    data_preprocessor=dict(size=crop_size),
    pretrained=None,
    backbone=dict(type='ResNet', norm_cfg=norm_cfg,
                  init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    decode_head=dict(align_corners=True, norm_cfg=norm_cfg),
    auxiliary_head=dict(align_corners=True, norm_cfg=norm_cfg),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(513, 513)))
train_dataloader = dict(batch_size=1)
optim_wrapper = dict(constructor='NormAwareOptimWrapperConstructor')
custom_hooks = [
    dict(type='BatchAverageStatsHook', num_iters=200),
    dict(type='SNRatioLoggerHook', interval=1000),
]
