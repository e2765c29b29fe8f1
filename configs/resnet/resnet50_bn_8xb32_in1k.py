# BN baseline (SN study Table 1) under the same protocol (no zero-gamma, decay on all).
_base_ = './resnet50_sn_8xb32_in1k.py'

norm_cfg = dict(_delete_=True, type='BN', requires_grad=True)
model = dict(backbone=dict(norm_cfg=norm_cfg))
custom_hooks = []
