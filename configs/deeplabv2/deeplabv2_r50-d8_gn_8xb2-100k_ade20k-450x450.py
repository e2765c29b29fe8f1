# GN baseline (SN study Table 3): GroupNorm(32) in the backbone and auxiliary head.
_base_ = './deeplabv2_r50-d8_sn_8xb2-100k_ade20k-450x450.py'

pretrained = 'checkpoints/resnet50_gn_8xb32_in1k.pth'
norm_cfg = dict(_delete_=True, type='GN', num_groups=32, requires_grad=True)
model = dict(backbone=dict(norm_cfg=norm_cfg, init_cfg=dict(checkpoint=pretrained)),
             auxiliary_head=dict(norm_cfg=norm_cfg))
optim_wrapper = dict(constructor='DefaultOptimWrapperConstructor')
custom_hooks = []
