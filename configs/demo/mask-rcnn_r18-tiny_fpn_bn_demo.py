# The demo with plain BN at 2 images per batch (batch statistics of 2 images in training;
# batch-average statistics for evaluation, like the SN run): python tools/demo.py --norm BN
_base_ = './mask-rcnn_r18-tiny_fpn_sn_demo.py'

norm_cfg = dict(_delete_=True, type='BN', requires_grad=True)
model = dict(
    backbone=dict(norm_cfg=norm_cfg), neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg), mask_head=dict(norm_cfg=norm_cfg)))
custom_hooks = [dict(type='BatchAverageStatsHook', num_iters=50, before_val=True,
                     before_test=False)]
