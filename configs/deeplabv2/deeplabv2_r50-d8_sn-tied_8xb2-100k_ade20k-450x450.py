# As deeplabv2_r50-d8_sn_8xb2-100k_ade20k-450x450.py with SN_tied.
_base_ = './deeplabv2_r50-d8_sn_8xb2-100k_ade20k-450x450.py'

pretrained = 'checkpoints/resnet50_sn-tied_8xb2_in1k.pth'
norm_cfg = dict(type='SN_tied', eval_stats='batch_average')
model = dict(backbone=dict(norm_cfg=norm_cfg, init_cfg=dict(checkpoint=pretrained)),
             auxiliary_head=dict(norm_cfg=norm_cfg))
