# Micro-batch SN (1 image/GPU, Omega = {IN, LN}); linear LR scaling for 8 images.
_base_ = './faster-rcnn_r50_fpn_sn_1x_coco.py'

pretrained = 'checkpoints/resnet50_sn-nobn_8xb1_in1k.pth'
norm_cfg = dict(type='SN', using_bn=False, eval_stats='moving')
model = dict(
    backbone=dict(norm_cfg=norm_cfg, init_cfg=dict(checkpoint=pretrained)),
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg)))
train_dataloader = dict(batch_size=1)
optim_wrapper = dict(optimizer=dict(lr=0.01))
auto_scale_lr = dict(base_batch_size=8)
custom_hooks = [dict(type='SNRatioLoggerHook', interval=500)]
