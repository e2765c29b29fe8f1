# SN(8,2): 2 images/GPU x 8 GPUs, LR 0.1 x 16/256 (linear scaling). The backbone the SN study
# finetunes for COCO, Cityscapes and ADE20K.
_base_ = './resnet50_sn_8xb32_in1k.py'

train_dataloader = dict(batch_size=2)
optim_wrapper = dict(optimizer=dict(lr=0.00625))
