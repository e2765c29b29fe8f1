# ResNet-18 (CIFAR variant) with BCN + WS on CIFAR-10, large batch: 128 images per batch
# (BCN Table 2). 200 epochs, LR 0.1 with steps at 100 and 150, weight decay 1e-4; GN groups 32.
_base_ = [
    'mmpretrain::_base_/models/resnet18_cifar.py',
    'mmpretrain::_base_/datasets/cifar10_bs16.py',
    'mmpretrain::_base_/schedules/cifar10_bs128.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmnorm'], allow_failed_imports=False)

conv_cfg = dict(type='WSConv')
norm_cfg = dict(type='BCN', num_groups=32)
model = dict(backbone=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg))
train_dataloader = dict(batch_size=128)
