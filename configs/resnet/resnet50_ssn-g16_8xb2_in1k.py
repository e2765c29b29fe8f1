# Group-wise SSN(8,2), ratio_groups=16: 2 images/GPU x 8 GPUs, LR 0.1 x 16/256 (linear scaling),
# as resnet50_ssn_8xb2_in1k.py. The backbone mask-rcnn_r50_fpn_ssn-g16_2x_coco.py starts from
# (matching pretraining and finetuning batch sizes, as the SN study's detection protocol). No
# reported numbers: neither the papers nor mmnorm have trained it.
_base_ = './resnet50_ssn-g16_8xb32_in1k.py'

train_dataloader = dict(batch_size=2)
optim_wrapper = dict(optimizer=dict(lr=0.00625))
