# The demo with group-wise SN, ratio_groups=4: each of the 32 SN layers has one ratio vector
# for the means and one for the variances per group of C / 4 contiguous channels, so that a
# layer can split its channels between IN, LN and BN:
#   make demo NORM=SN-G4        (python tools/demo.py --norm SN-G4)
# The layers have 16 (5 layers), 32 (5), 64 (17) or 128 (5) channels, all divisible by 4. The
# rest (data, schedule, hooks) is mask-rcnn_r18-tiny_fpn_sn_demo.py's.
_base_ = './mask-rcnn_r18-tiny_fpn_sn_demo.py'

norm_cfg = dict(type='SN', eval_stats='batch_average', ratio_groups=4)
model = dict(
    backbone=dict(norm_cfg=norm_cfg), neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg), mask_head=dict(norm_cfg=norm_cfg)))
