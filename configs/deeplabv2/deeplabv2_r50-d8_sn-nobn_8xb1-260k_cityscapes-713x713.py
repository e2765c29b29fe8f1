# Micro-batch SN on Cityscapes: with 1 image/GPU the BN statistics of SN equal the IN ones, so
# BN is dropped (Omega = {IN, LN}), as in the SN authors' (8,1) models.
_base_ = './deeplabv2_r50-d8_sn_8xb1-260k_cityscapes-713x713.py'

pretrained = 'checkpoints/resnet50_sn-nobn_8xb1_in1k.pth'
norm_cfg = dict(type='SN', using_bn=False, eval_stats='moving')
model = dict(backbone=dict(norm_cfg=norm_cfg, init_cfg=dict(checkpoint=pretrained)),
             auxiliary_head=dict(norm_cfg=norm_cfg))
custom_hooks = [dict(type='SNRatioLoggerHook', interval=1000)]
