# BN baseline (SN study Table 3): BN synchronized across the 8 GPUs, from an ImageNet BN
# ResNet-50 (torchvision layout).
_base_ = './deeplabv2_r50-d8_sn_8xb2-100k_ade20k-450x450.py'

norm_cfg = dict(_delete_=True, type='SyncBN', requires_grad=True)
model = dict(backbone=dict(norm_cfg=norm_cfg,
                           init_cfg=dict(checkpoint='torchvision://resnet50')),
             auxiliary_head=dict(norm_cfg=norm_cfg))
optim_wrapper = dict(constructor='DefaultOptimWrapperConstructor')
custom_hooks = []
