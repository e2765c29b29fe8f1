# DeepLabv2 R50 (output stride 8) on Cityscapes with Sparse Switchable Normalization in the
# backbone and the auxiliary head: the SN study's protocol (deeplabv2_r50-d8_sn_8xb1-260k_...)
# with SSN, the SSN authors' practice for the ratio parameters (lr/10, no decay, gradient norm
# clipped to 1) and the radius following the training progress (SSNRadiusHook). From an ImageNet
# SSN(8,2) ResNet-50 (tools/convert_checkpoint.py --format ssn).
_base_ = './deeplabv2_r50-d8_sn_8xb1-260k_cityscapes-713x713.py'

pretrained = 'checkpoints/resnet50_ssn_8xb2_in1k.pth'
norm_cfg = dict(type='SSN', eval_stats='batch_average')
model = dict(
    backbone=dict(norm_cfg=norm_cfg,
                  init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    auxiliary_head=dict(norm_cfg=norm_cfg))
optim_wrapper = dict(paramwise_cfg=dict(ratio_lr_mult=0.1, ratio_decay_mult=0.0,
                                        ratio_clip_grad=dict(max_norm=1.0)))
custom_hooks = [
    dict(type='SSNRadiusHook'),
    dict(type='BatchAverageStatsHook', num_iters=200),
    dict(type='SNRatioLoggerHook', interval=1000),
    dict(type='FrozenRatiosHook'),  # the ratios once per validation / test epoch
    dict(type='BatchedRatiosHook'),  # all layers' ratios in one computation per forward
]
