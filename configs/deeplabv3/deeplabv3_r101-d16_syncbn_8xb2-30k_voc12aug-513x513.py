# BN baseline (BCN Table 5): BN synchronized over the 16 images, plain convs, from an ImageNet
# BN ResNet-101 (torchvision layout).
_base_ = './deeplabv3_r101-d16_bcn-ws_8xb2-30k_voc12aug-513x513.py'

conv_cfg = None
norm_cfg = dict(_delete_=True, type='SyncBN', requires_grad=True)
model = dict(
    backbone=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg,
                  init_cfg=dict(checkpoint='torchvision://resnet101')),
    decode_head=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg),
    auxiliary_head=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg))
optim_wrapper = dict(constructor='DefaultOptimWrapperConstructor')
