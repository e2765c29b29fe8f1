# GN baseline for micro-batch training on CIFAR-10 (BCN Tables 1-2): GroupNorm(32), 1 image per
# batch, plain convs, LR scaled linearly from 0.1 at 128.
_base_ = './resnet18_bcn-ws_1xb128_cifar10.py'

model = dict(backbone=dict(conv_cfg=None,
                           norm_cfg=dict(_delete_=True, type='GN', num_groups=32,
                                         requires_grad=True)))
train_dataloader = dict(batch_size=1)
optim_wrapper = dict(optimizer=dict(lr=0.1 / 128))
