# Micro-batch SN(8,1): with one image per GPU BN's statistics equal IN's, so BN is dropped
# (Omega = {IN, LN}, the SN authors' (8,1) models). LR 0.1 x 8/256.
_base_ = './resnet50_sn_8xb32_in1k.py'

norm_cfg = dict(type='SN', using_bn=False)
model = dict(backbone=dict(norm_cfg=norm_cfg))
train_dataloader = dict(batch_size=1)
optim_wrapper = dict(optimizer=dict(lr=0.003125))
