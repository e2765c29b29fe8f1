# Mask R-CNN R50-FPN 2x on COCO with Switchable Normalization in the backbone, FPN, 4conv1fc box
# head and mask head (SN study Sec. 4.2, Appendix C): finetuned at 2 images/GPU x 8 GPUs from an
# ImageNet SN(8,2) ResNet-50; BN in SN is neither frozen nor synchronized and is evaluated with
# batch-average statistics; no weight decay on gamma/beta.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_2x_coco.py'
custom_imports = dict(imports=['mmnorm'], allow_failed_imports=False)

# ImageNet backbone converted with tools/convert_checkpoint.py (see configs/mask_rcnn/README.md)
pretrained = 'checkpoints/resnet50_sn_8xb2_in1k.pth'
conv_cfg = None
norm_cfg = dict(type='SN', eval_stats='batch_average')
model = dict(
    backbone=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg, norm_eval=False,
                  init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    neck=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg),
    roi_head=dict(
        bbox_head=dict(type='Shared4Conv1FCBBoxHead', conv_out_channels=256,
                       conv_cfg=conv_cfg, norm_cfg=norm_cfg),
        mask_head=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg)))
optim_wrapper = dict(constructor='NormAwareOptimWrapperConstructor',
                     paramwise_cfg=dict(norm_decay_mult=0.0))
custom_hooks = [
    dict(type='BatchAverageStatsHook', num_iters=200),
    dict(type='SNRatioLoggerHook', interval=500),
]
