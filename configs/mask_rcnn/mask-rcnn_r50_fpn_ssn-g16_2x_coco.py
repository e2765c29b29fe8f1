# Mask R-CNN R50-FPN 2x on COCO with group-wise Sparse SN (ratio_groups=16: one SparsestMax ratio
# vector for the means and one for the variances per group of C / 16 contiguous channels) in the
# backbone, FPN, 4conv1fc box head and mask head; otherwise mask-rcnn_r50_fpn_ssn_2x_coco.py: the
# SN study's detection protocol (2 images/GPU x 8 GPUs, BN statistics evaluated with a batch
# average, no weight decay on gamma/beta), the SSN authors' ratio-parameter practice and
# SSNRadiusHook. From a group-wise SSN(8,2) ImageNet backbone trained with
# configs/resnet/resnet50_ssn-g16_8xb2_in1k.py (no such model is released; a layer-wise SSN
# checkpoint would load too, every group starting from its layer's ratios, but the released one's
# ratios arrive fixed, so its groups could never split). No reported numbers: neither the papers
# nor mmnorm have trained it.
_base_ = './mask-rcnn_r50_fpn_ssn_2x_coco.py'

pretrained = 'checkpoints/resnet50_ssn-g16_8xb2_in1k.pth'
norm_cfg = dict(type='SSN', eval_stats='batch_average', ratio_groups=16)
model = dict(
    backbone=dict(norm_cfg=norm_cfg,
                  init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg), mask_head=dict(norm_cfg=norm_cfg)))
