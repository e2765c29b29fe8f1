# Frozen-BN baseline (SN study Table 3: "BN is frozen in COCO"): the ResNet-50's BN layers keep
# their ImageNet statistics and affine parameters; FPN and heads (same 4conv1fc box head) have no
# normalization.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_2x_coco.py'
custom_imports = dict(imports=['mmnorm'], allow_failed_imports=False)

norm_cfg = dict(type='BN', requires_grad=False)
model = dict(
    backbone=dict(norm_cfg=norm_cfg, norm_eval=True),
    roi_head=dict(bbox_head=dict(type='Shared4Conv1FCBBoxHead', conv_out_channels=256,
                                 norm_cfg=None)))
