# BN baseline on CIFAR-10 (BCN Table 2), 128 images per batch, plain convs.
_base_ = './resnet18_bcn-ws_1xb128_cifar10.py'

model = dict(backbone=dict(conv_cfg=None,
                           norm_cfg=dict(_delete_=True, type='BN', requires_grad=True)))
