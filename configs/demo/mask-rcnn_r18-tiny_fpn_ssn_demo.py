# The demo with Sparse SN (SparsestMax ratios that end one-hot, so that each layer becomes one
# plain normalizer):
#   make demo NORM=SSN        (python tools/demo.py --norm SSN)
# The radius grows with the training progress (SSNRadiusHook); the ratio parameters train as the
# SSN authors train them: a tenth of the learning rate, no weight decay, gradient norm clipped to 1.
_base_ = './mask-rcnn_r18-tiny_fpn_sn_demo.py'

norm_cfg = dict(type='SSN', eval_stats='batch_average')
model = dict(
    backbone=dict(norm_cfg=norm_cfg), neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg), mask_head=dict(norm_cfg=norm_cfg)))
optim_wrapper = dict(paramwise_cfg=dict(ratio_lr_mult=0.1, ratio_decay_mult=0.0,
                                        ratio_clip_grad=dict(max_norm=1.0)))
custom_hooks = [
    dict(type='SSNRadiusHook'),
    dict(type='BatchAverageStatsHook', num_iters=50, before_val=True, before_test=False),
    dict(type='SNRatioLoggerHook', interval=100),
    dict(type='FrozenRatiosHook'),  # the ratios once per validation / test epoch
    dict(type='BatchedRatiosHook'),  # all layers' ratios in one computation per forward
]
