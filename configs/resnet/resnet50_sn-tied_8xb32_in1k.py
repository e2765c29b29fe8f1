# SN_tied(8,32): one ratio vector for means and variances (SN study Table 1).
_base_ = './resnet50_sn_8xb32_in1k.py'

norm_cfg = dict(type='SN_tied')
model = dict(backbone=dict(norm_cfg=norm_cfg))
