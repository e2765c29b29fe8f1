# As mask-rcnn_r50_fpn_sn_2x_coco.py with SN_tied (one ratio vector for means and variances).
_base_ = './mask-rcnn_r50_fpn_sn_2x_coco.py'

pretrained = 'checkpoints/resnet50_sn-tied_8xb2_in1k.pth'
norm_cfg = dict(type='SN_tied', eval_stats='batch_average')
model = dict(
    backbone=dict(norm_cfg=norm_cfg, init_cfg=dict(checkpoint=pretrained)),
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg), mask_head=dict(norm_cfg=norm_cfg)))
