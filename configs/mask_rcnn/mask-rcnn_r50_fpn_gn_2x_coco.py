# GN baseline (SN study Table 3; BCN Table 4): GroupNorm(32) in backbone, FPN, 4conv1fc box head
# and mask head, 2 images/GPU x 8 GPUs, from an ImageNet GN ResNet-50.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_2x_coco.py'
custom_imports = dict(imports=['mmnorm'], allow_failed_imports=False)

pretrained = 'checkpoints/resnet50_gn_8xb32_in1k.pth'
conv_cfg = None
norm_cfg = dict(type='GN', num_groups=32, requires_grad=True)
model = dict(
    backbone=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg, norm_eval=False,
                  init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    neck=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg),
    roi_head=dict(
        bbox_head=dict(type='Shared4Conv1FCBBoxHead', conv_out_channels=256,
                       conv_cfg=conv_cfg, norm_cfg=norm_cfg),
        mask_head=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg)))
optim_wrapper = dict(paramwise_cfg=dict(norm_decay_mult=0.0))
