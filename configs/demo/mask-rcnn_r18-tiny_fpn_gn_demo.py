# The demo with GroupNorm (8 groups: the narrow stem has 16 channels):
#   python tools/demo.py --norm GN
_base_ = './mask-rcnn_r18-tiny_fpn_sn_demo.py'

norm_cfg = dict(_delete_=True, type='GN', num_groups=8, requires_grad=True)
model = dict(
    backbone=dict(norm_cfg=norm_cfg), neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg), mask_head=dict(norm_cfg=norm_cfg)))
custom_hooks = []  # GN has no batch statistics to average, no ratios to log
