# SN(8,8): 8 images/GPU x 8 GPUs, LR 0.1 x 64/256 (linear scaling).
_base_ = './resnet50_sn_8xb32_in1k.py'

train_dataloader = dict(batch_size=8)
optim_wrapper = dict(optimizer=dict(lr=0.025))
