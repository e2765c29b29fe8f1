# ResNet-50 with Sparse Switchable Normalization on ImageNet, SSN(8,32), as the SSN authors train
# it (switchablenorms/Sparse_SwitchNorm, configs/config_resnetv1ssn50_step_moving_average.yaml and
# train_imagenet.py): their ResNet-v1 (ResNetV1SSN: stem max pooling without padding, rounded up),
# zero-initialised last gamma of each block, SGD momentum 0.9, LR 0.1 per 256 images divided by 10
# after 30, 60 and 90 epochs, 100 epochs, weight decay 1e-4; the ratio parameters at a tenth of the
# learning rate, without weight decay, their gradient norm clipped to 1; the SparsestMax radius
# grows from 0 to 1 with the training progress (SSNRadiusHook); moving averages in eval, kept as
# their layer keeps them: 0.997 of the old value (momentum 0.003 in PyTorch's convention) and the
# unbiased IN variance (in_unbiased=True). (Their running variance starts at 0, ours at 1: a
# difference of 0.997^k after k iterations, gone long before the end of the schedule.)
_base_ = [
    'mmpretrain::_base_/models/resnet50.py',
    'mmpretrain::_base_/datasets/imagenet_bs32.py',
    'mmpretrain::_base_/schedules/imagenet_bs256.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmnorm'], allow_failed_imports=False)

norm_cfg = dict(type='SSN', momentum=0.003, in_unbiased=True)
model = dict(backbone=dict(type='ResNetV1SSN', norm_cfg=norm_cfg, zero_init_residual=True))
optim_wrapper = dict(
    constructor='NormAwareOptimWrapperConstructor',
    paramwise_cfg=dict(ratio_lr_mult=0.1, ratio_decay_mult=0.0,
                       ratio_clip_grad=dict(max_norm=1.0)))
custom_hooks = [dict(type='SSNRadiusHook'), dict(type='SNRatioLoggerHook', interval=1000),
                dict(type='FrozenRatiosHook'), dict(type='BatchedRatiosHook')]
