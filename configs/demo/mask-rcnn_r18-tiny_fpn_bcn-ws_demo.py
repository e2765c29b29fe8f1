# The demo with BCN + WS (micro-batch form: estimated statistics updated at the learning rate,
# EstimateRateHook; 8 groups for the narrow widths): python tools/demo.py --norm BCN-WS
_base_ = './mask-rcnn_r18-tiny_fpn_sn_demo.py'

conv_cfg = dict(_delete_=True, type='WSConv')
norm_cfg = dict(_delete_=True, type='BCN', num_groups=8, estimate=True)
model = dict(
    backbone=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg),
    neck=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg),
                  mask_head=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg)))
custom_hooks = [dict(type='EstimateRateHook')]  # estimated statistics: nothing to average
