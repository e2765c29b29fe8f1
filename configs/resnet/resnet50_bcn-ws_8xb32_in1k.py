# BCN + WS on ImageNet (BCN paper Sec. 4.2, Table 3): batch-channel normalization (large-batch
# form, 32 images/GPU, statistics per GPU) and weight-standardized convolutions.
_base_ = './resnet50_sn_8xb32_in1k.py'

norm_cfg = dict(_delete_=True, type='BCN', num_groups=32)
model = dict(backbone=dict(conv_cfg=dict(type='WSConv'), norm_cfg=norm_cfg))
custom_hooks = []
