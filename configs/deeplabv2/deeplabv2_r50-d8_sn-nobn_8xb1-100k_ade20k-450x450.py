# Micro-batch SN on ADE20K: 1 image/GPU, Omega = {IN, LN} (BN statistics would equal IN's);
# linear LR scaling from 16 to 8 images.
_base_ = './deeplabv2_r50-d8_sn_8xb2-100k_ade20k-450x450.py'

pretrained = 'checkpoints/resnet50_sn-nobn_8xb1_in1k.pth'
norm_cfg = dict(type='SN', using_bn=False, eval_stats='moving')
model = dict(backbone=dict(norm_cfg=norm_cfg, init_cfg=dict(checkpoint=pretrained)),
             auxiliary_head=dict(norm_cfg=norm_cfg))
train_dataloader = dict(batch_size=1)
optim_wrapper = dict(optimizer=dict(lr=0.005))
custom_hooks = [dict(type='SNRatioLoggerHook', interval=1000)]
