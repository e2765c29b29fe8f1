# Mask R-CNN R50-FPN 2x on COCO with Sparse Switchable Normalization in the backbone, FPN,
# 4conv1fc box head and mask head, with the SN study's detection protocol (2 images/GPU x 8 GPUs,
# BN statistics neither frozen nor synchronized, evaluated with a batch average, no weight decay on
# gamma/beta) and the SSN authors' practice for the ratio parameters (lr/10, no decay, gradient
# norm clipped to 1). From an ImageNet SSN(8,2) ResNet-50 (tools/convert_checkpoint.py --format
# ssn): its ratios arrive fixed (one-hot); those of the new FPN and heads follow the radius
# (SSNRadiusHook), from 0 to 1 over the finetuning.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_2x_coco.py'
custom_imports = dict(imports=['mmnorm'], allow_failed_imports=False)

pretrained = 'checkpoints/resnet50_ssn_8xb2_in1k.pth'
conv_cfg = None
norm_cfg = dict(type='SSN', eval_stats='batch_average')
model = dict(
    backbone=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg, norm_eval=False,
                  init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    neck=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg),
    roi_head=dict(
        bbox_head=dict(type='Shared4Conv1FCBBoxHead', conv_out_channels=256,
                       conv_cfg=conv_cfg, norm_cfg=norm_cfg),
        mask_head=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg)))
optim_wrapper = dict(constructor='NormAwareOptimWrapperConstructor',
                     paramwise_cfg=dict(norm_decay_mult=0.0, ratio_lr_mult=0.1,
                                        ratio_decay_mult=0.0,
                                        ratio_clip_grad=dict(max_norm=1.0)))
custom_hooks = [
    dict(type='SSNRadiusHook'),
    dict(type='BatchAverageStatsHook', num_iters=200),
    dict(type='SNRatioLoggerHook', interval=500),
    dict(type='FrozenRatiosHook'),  # the ratios once per validation / test epoch
    dict(type='BatchedRatiosHook'),  # all layers' ratios in one computation per forward
]
