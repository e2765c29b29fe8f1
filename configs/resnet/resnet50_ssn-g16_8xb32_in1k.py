# ResNet-50 with group-wise Sparse SN on ImageNet, SSN(8,32) with ratio_groups=16: every SSN layer
# has one SparsestMax ratio vector for the means and one for the variances per group of C / 16
# contiguous channels (4 to 128 channels per group: the layers have 64 to 2048 channels), each
# ending one-hot on its own, so that a layer can end as a split of its channels between IN, LN
# and BN (the SN study's future work; IBN-Net sets such a split by hand). Everything else is
# resnet50_ssn_8xb32_in1k.py: the SSN authors' ResNet-v1, schedule and ratio-parameter practice,
# SSNRadiusHook, moving averages in eval. No reported numbers: neither the papers nor mmnorm have
# trained it.
_base_ = './resnet50_ssn_8xb32_in1k.py'

norm_cfg = dict(type='SSN', ratio_groups=16)
model = dict(backbone=dict(norm_cfg=norm_cfg))
