# ResNet-50 with Switchable Normalization on ImageNet, SN(8,32) (SN study Sec. 3, Appendix C):
# every BN replaced by SN (ratios initialised to 1/3, gamma 1, beta 0; no zero-gamma trick),
# SGD momentum 0.9, LR 0.1 per 256 images, divided by 10 after 30, 60, 90 epochs, 100 epochs,
# weight decay 1e-4 on all parameters including gamma, beta and the ratios; means and variances
# per GPU; ratio logging on. This follows the paper; the authors' released code and configs
# differ: their ImageNet configs zero-initialise the last gamma of each block (last_gamma: True;
# set zero_init_residual=True for that) and their layer uses the unbiased IN variance
# (in_unbiased=True).
_base_ = [
    'mmpretrain::_base_/models/resnet50.py',
    'mmpretrain::_base_/datasets/imagenet_bs32.py',
    'mmpretrain::_base_/schedules/imagenet_bs256.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmnorm'], allow_failed_imports=False)

norm_cfg = dict(type='SN')
model = dict(backbone=dict(norm_cfg=norm_cfg, zero_init_residual=False))
optim_wrapper = dict(constructor='NormAwareOptimWrapperConstructor')  # decay on everything
custom_hooks = [dict(type='SNRatioLoggerHook', interval=1000)]
# The SN study evaluates ImageNet models with the moving averages kept in training.
