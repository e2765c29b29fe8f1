# Multi-scale test of the SN model (SN study Appendix C: input sizes 300, 400, 500, 600); for
# tools/test.py only. Works the same for the other ADE20K configs: change _base_.
_base_ = './deeplabv2_r50-d8_sn_8xb2-100k_ade20k-450x450.py'

test_sizes = [300, 400, 500, 600]
tta_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='TestTimeAug', transforms=[
        [dict(type='Resize', scale=(4 * s, s), keep_ratio=True) for s in test_sizes],
        [dict(type='LoadAnnotations', reduce_zero_label=True)],
        [dict(type='PackSegInputs')],
    ]),
]
model = dict(_delete_=True, type='SegTTAModel', module={{_base_.model}})
test_dataloader = dict(dataset=dict(pipeline=tta_pipeline))
