# The analysis tools' default (tools/analysis/ratio_study.py, statdiff_study.py; `make study`):
# a small CIFAR-style ResNet with SN on the UCI handwritten digits that scikit-learn ships
# (1437 train / 360 test real 8x8 images; mmnorm's DigitsDataset, no download).
#
# ResNet-18's first three stages (2 BasicBlocks each, widths 32/64/128, strides 1/2/2 on 8x8
# inputs: 8x8, 4x4, 2x2), a 3x3 stride-1 stem without max-pooling, SN after every conv
# (15 SN layers in depth order), one-pixel random shifts in training. Batch 32 on one process,
# SGD lr 0.1 (the tools scale it linearly with the batch size), 10 epochs, cosine schedule. BN
# statistics of SN are evaluated with a batch average (SN study Sec. 3): BatchAverageStatsHook
# before every test/validation.
default_scope = 'mmpretrain'
custom_imports = dict(imports=['mmnorm'], allow_failed_imports=False)

model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='ResNet_CIFAR', depth=18, in_channels=1, stem_channels=32, base_channels=32,
        num_stages=3, strides=(1, 2, 2), dilations=(1, 1, 1), out_indices=(2, ),
        norm_cfg=dict(type='SN')),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='LinearClsHead', num_classes=10, in_channels=128,
              loss=dict(type='CrossEntropyLoss'), topk=(1, )))
# GN / BCN groups and StatDiff's groups in tools/analysis/statdiff_study.py (group sizes 4, 8 and
# 16 channels in the three stages; GN's usual 32 groups would make stage 1 an instance norm).
statdiff_groups = 8
# Pixel mean / std of the training split (0-255 scale).
data_preprocessor = dict(num_classes=10, mean=[77.8], std=[95.9], to_rgb=False)

# Shifts of up to one pixel (pad 1, crop 8x8) keep the task from being memorized in a few epochs,
# so the ratios keep learning; without them the training loss is ~0.002 by epoch 4.
train_pipeline = [dict(type='RandomCrop', crop_size=8, padding=1), dict(type='PackInputs')]
pipeline = [dict(type='PackInputs')]
train_dataloader = dict(
    batch_size=32, num_workers=0,
    dataset=dict(type='DigitsDataset', split='train', pipeline=train_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=True))
val_dataloader = dict(
    batch_size=120, num_workers=0,
    dataset=dict(type='DigitsDataset', split='test', pipeline=pipeline, test_mode=True),
    sampler=dict(type='DefaultSampler', shuffle=False))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_evaluator = val_evaluator

train_cfg = dict(by_epoch=True, max_epochs=10, val_interval=10)
val_cfg = dict()
test_cfg = dict()
optim_wrapper = dict(
    constructor='NormAwareOptimWrapperConstructor',
    optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4))
param_scheduler = dict(type='CosineAnnealingLR', by_epoch=True, T_max=10,
                       convert_to_iter_based=True)
# A batch average over 50 training batches (the whole split at batch 32).
custom_hooks = [dict(type='BatchAverageStatsHook', num_iters=50, log_interval=1000)]

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=10, max_keep_ckpts=1),
    sampler_seed=dict(type='DistSamplerSeedHook'))
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork'),
               dist_cfg=dict(backend='nccl'))
randomness = dict(seed=0)
log_level = 'INFO'
load_from = None
resume = False
