# BCN+WS (BCN paper Sec. 4.4, Table 4): micro-batch training, 1 image/GPU x 4 GPUs, BCN with
# estimated batch statistics (Algorithm 1) whose update rate follows the learning rate
# (EstimateRateHook), WS convs, in backbone, FPN, 4conv1fc box head and mask head. LR scaled
# linearly from 0.02 at 16 images.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_2x_coco.py'
custom_imports = dict(imports=['mmnorm'], allow_failed_imports=False)

pretrained = 'checkpoints/resnet50_bcn-ws_8xb32_in1k.pth'
conv_cfg = dict(type='WSConv')
norm_cfg = dict(type='BCN', num_groups=32, estimate=True)
model = dict(
    backbone=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg, norm_eval=False,
                  init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    neck=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg),
    roi_head=dict(
        bbox_head=dict(type='Shared4Conv1FCBBoxHead', conv_out_channels=256,
                       conv_cfg=conv_cfg, norm_cfg=norm_cfg),
        mask_head=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg)))
train_dataloader = dict(batch_size=1)
optim_wrapper = dict(constructor='NormAwareOptimWrapperConstructor',
                     optimizer=dict(lr=0.005), paramwise_cfg=dict(norm_decay_mult=0.0))
auto_scale_lr = dict(base_batch_size=4)
custom_hooks = [dict(type='EstimateRateHook')]
