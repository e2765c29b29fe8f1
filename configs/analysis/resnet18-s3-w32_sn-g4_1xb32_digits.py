# The digits config with group-wise SN (tools/analysis/ratio_study.py CONFIG): the SN config's
# model, data and schedule, every SN with ratio_groups=4: one ratio vector for the means and one
# for the variances per group of C / 4 contiguous channels (8, 16 and 32 channels per group in
# the three stages), so that a layer can split its channels between IN, LN and BN. The study
# adds what the groups chose (ratio_study.md, ratio_study_groups.csv, a heat map per batch size).
_base_ = './resnet18-s3-w32_sn_1xb32_digits.py'

model = dict(backbone=dict(norm_cfg=dict(type='SN', ratio_groups=4)))
