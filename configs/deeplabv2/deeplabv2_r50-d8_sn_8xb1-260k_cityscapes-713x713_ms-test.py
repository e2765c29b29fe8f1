# Multi-scale test of the SN model (SN study Appendix C: scales 1.0, 1.25, 1.5, 1.75); for
# tools/test.py only. Works the same for the other Cityscapes configs: change _base_.
_base_ = './deeplabv2_r50-d8_sn_8xb1-260k_cityscapes-713x713.py'

img_ratios = [1.0, 1.25, 1.5, 1.75]
tta_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='TestTimeAug', transforms=[
        [dict(type='Resize', scale_factor=r, keep_ratio=True) for r in img_ratios],
        [dict(type='LoadAnnotations')],
        [dict(type='PackSegInputs')],
    ]),
]
model = dict(_delete_=True, type='SegTTAModel', module={{_base_.model}})
test_dataloader = dict(dataset=dict(pipeline=tta_pipeline))
