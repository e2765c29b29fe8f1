# GN baseline (SN study Table 1): GroupNorm with 32 groups, same protocol.
_base_ = './resnet50_sn_8xb32_in1k.py'

norm_cfg = dict(_delete_=True, type='GN', num_groups=32, requires_grad=True)
model = dict(backbone=dict(norm_cfg=norm_cfg))
custom_hooks = []
