# GN+WS baseline (BCN Table 5): GroupNorm(32) + WSConv, same protocol as the BCN+WS config.
_base_ = './deeplabv3_r101-d16_bcn-ws_8xb2-30k_voc12aug-513x513.py'

pretrained = 'checkpoints/resnet101_gn-ws_8xb32_in1k.pth'
norm_cfg = dict(_delete_=True, type='GN', num_groups=32, requires_grad=True)
model = dict(backbone=dict(norm_cfg=norm_cfg, init_cfg=dict(checkpoint=pretrained)),
             decode_head=dict(norm_cfg=norm_cfg), auxiliary_head=dict(norm_cfg=norm_cfg))
optim_wrapper = dict(constructor='DefaultOptimWrapperConstructor')
