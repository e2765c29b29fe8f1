# SSN(8,2): 2 images/GPU x 8 GPUs, LR 0.1 x 16/256 (linear scaling); the SSN authors' (8,2)
# model is the released ssn_8x2 checkpoint (75.85 top-1). The backbone the SSN detection and
# segmentation configs start from.
_base_ = './resnet50_ssn_8xb32_in1k.py'

train_dataloader = dict(batch_size=2)
optim_wrapper = dict(optimizer=dict(lr=0.00625))
