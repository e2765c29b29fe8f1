# Micro-batch BCN + WS on CIFAR-10 (BCN Table 2): 1 image per batch, BCN with estimated
# statistics (Algorithm 1) updated at the learning rate (EstimateRateHook). LR scaled linearly
# from 0.1 at 128 images.
_base_ = './resnet18_bcn-ws_1xb128_cifar10.py'

norm_cfg = dict(type='BCN', num_groups=32, estimate=True)
model = dict(backbone=dict(norm_cfg=norm_cfg))
train_dataloader = dict(batch_size=1)
optim_wrapper = dict(optimizer=dict(lr=0.1 / 128))
custom_hooks = [dict(type='EstimateRateHook')]
