# The demo with group-wise Sparse SN, ratio_groups=16: each of the 32 SSN layers has one ratio
# vector for the means and one for the variances per group of C / 16 contiguous channels, so that a
# layer can split its channels between IN, LN and BN:
#   make demo NORM=SSN-G16        (python tools/demo.py --norm SSN-G16)
# The layers have 16 (5 layers), 32 (5), 64 (17) or 128 (5) channels, all divisible by 16. The
# rest (data, schedule, hooks) is mask-rcnn_r18-tiny_fpn_ssn_demo.py's.
_base_ = './mask-rcnn_r18-tiny_fpn_ssn_demo.py'

norm_cfg = dict(type='SSN', eval_stats='batch_average', ratio_groups=16)
model = dict(
    backbone=dict(norm_cfg=norm_cfg), neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg), mask_head=dict(norm_cfg=norm_cfg)))
