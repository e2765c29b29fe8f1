# The digits config with Sparse SN (tools/analysis/ratio_study.py CONFIG): the SN config's model,
# data and schedule, every SN an SSN, the SparsestMax radius growing with the training progress
# (SSNRadiusHook), the SSN authors' practice for the ratio parameters (lr/10, no weight decay,
# gradient norm clipped to 1), and the ratios logged every 25 iterations, so that the study shows
# how they become one-hot over training.
_base_ = './resnet18-s3-w32_sn_1xb32_digits.py'

model = dict(backbone=dict(norm_cfg=dict(type='SSN')))
optim_wrapper = dict(paramwise_cfg=dict(ratio_lr_mult=0.1, ratio_decay_mult=0.0,
                                        ratio_clip_grad=dict(max_norm=1.0)))
custom_hooks = [
    dict(type='SSNRadiusHook'),
    dict(type='SNRatioLoggerHook', interval=25),
    dict(type='BatchAverageStatsHook', num_iters=50, log_interval=1000),
    dict(type='FrozenRatiosHook'),  # the ratios once per validation / test epoch
    dict(type='BatchedRatiosHook'),  # all layers' ratios in one computation per forward
]
