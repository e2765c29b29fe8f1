# GN+WS baseline (BCN Table 4): GroupNorm(32) with weight-standardized convs (mmnorm's WSConv:
# unbiased variance, eps inside the root, as the BCN/WS reference) everywhere.
_base_ = './mask-rcnn_r50_fpn_gn_2x_coco.py'

pretrained = 'checkpoints/resnet50_gn-ws_8xb32_in1k.pth'
conv_cfg = dict(_delete_=True, type='WSConv')  # the base sets None
model = dict(
    backbone=dict(conv_cfg=conv_cfg, init_cfg=dict(checkpoint=pretrained)),
    neck=dict(conv_cfg=conv_cfg),
    roi_head=dict(bbox_head=dict(conv_cfg=conv_cfg), mask_head=dict(conv_cfg=conv_cfg)))
