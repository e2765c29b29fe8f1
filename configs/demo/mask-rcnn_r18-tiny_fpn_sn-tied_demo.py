# The demo with SN_tied (one ratio vector for means and variances):
#   python tools/demo.py --norm SN_tied
_base_ = './mask-rcnn_r18-tiny_fpn_sn_demo.py'

norm_cfg = dict(type='SN_tied', eval_stats='batch_average')
model = dict(
    backbone=dict(norm_cfg=norm_cfg), neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg), mask_head=dict(norm_cfg=norm_cfg)))
