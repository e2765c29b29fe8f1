# Micro-batch SN (1 image/GPU, Omega = {IN, LN}) for the DeepLabv3 Cityscapes config.
_base_ = './deeplabv3_r50-d8_sn_8xb1-80k_cityscapes-769x769.py'

pretrained = 'checkpoints/resnet50_sn-nobn_8xb1_in1k.pth'
norm_cfg = dict(type='SN', using_bn=False, eval_stats='moving')
model = dict(backbone=dict(norm_cfg=norm_cfg, init_cfg=dict(checkpoint=pretrained)),
             decode_head=dict(norm_cfg=norm_cfg), auxiliary_head=dict(norm_cfg=norm_cfg))
custom_hooks = [dict(type='SNRatioLoggerHook', interval=1000)]
