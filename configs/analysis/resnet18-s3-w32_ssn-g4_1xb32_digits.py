# The digits config with group-wise Sparse SN (tools/analysis/ratio_study.py CONFIG): the SSN
# config's model, data, schedule and hooks (SSNRadiusHook, the ratio rules, the ratios logged every
# 25 iterations), every SSN with ratio_groups=4: one SparsestMax ratio vector for the means and
# one for the variances per group of C / 4 contiguous channels, each ending one-hot on its own,
# so that a layer can end as a split of its channels between IN, LN and BN.
_base_ = './resnet18-s3-w32_ssn_1xb32_digits.py'

model = dict(backbone=dict(norm_cfg=dict(type='SSN', ratio_groups=4)))
