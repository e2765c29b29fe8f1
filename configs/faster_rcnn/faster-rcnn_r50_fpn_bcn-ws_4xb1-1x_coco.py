# BCN+WS (BCN Table 6): 1 image/GPU x 4 GPUs, estimated BCN (Algorithm 1, rate = LR via
# EstimateRateHook) + WSConv in backbone, FPN and 4conv1fc box head; LR 0.02 x 4/16.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmnorm'], allow_failed_imports=False)

pretrained = 'checkpoints/resnet50_bcn-ws_8xb32_in1k.pth'
conv_cfg = dict(type='WSConv')
norm_cfg = dict(type='BCN', num_groups=32, estimate=True)
model = dict(
    backbone=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg, norm_eval=False,
                  init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    neck=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(type='Shared4Conv1FCBBoxHead', conv_out_channels=256,
                                 conv_cfg=conv_cfg, norm_cfg=norm_cfg)))
train_dataloader = dict(batch_size=1)
optim_wrapper = dict(constructor='NormAwareOptimWrapperConstructor',
                     optimizer=dict(lr=0.005), paramwise_cfg=dict(norm_decay_mult=0.0))
auto_scale_lr = dict(base_batch_size=4)
custom_hooks = [dict(type='EstimateRateHook')]
