# Faster R-CNN R50-FPN 1x on COCO with SN in backbone, FPN and 4conv1fc box head (2 images/GPU,
# batch-average evaluation, no weight decay on gamma/beta), from an ImageNet SN(8,2) ResNet-50.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmnorm'], allow_failed_imports=False)

pretrained = 'checkpoints/resnet50_sn_8xb2_in1k.pth'
conv_cfg = None
norm_cfg = dict(type='SN', eval_stats='batch_average')
model = dict(
    backbone=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg, norm_eval=False,
                  init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    neck=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(type='Shared4Conv1FCBBoxHead', conv_out_channels=256,
                                 conv_cfg=conv_cfg, norm_cfg=norm_cfg)))
optim_wrapper = dict(constructor='NormAwareOptimWrapperConstructor',
                     paramwise_cfg=dict(norm_decay_mult=0.0))
custom_hooks = [
    dict(type='BatchAverageStatsHook', num_iters=200),
    dict(type='SNRatioLoggerHook', interval=500),
]
