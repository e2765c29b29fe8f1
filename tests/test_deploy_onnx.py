# Copyright (c) mmnorm contributors. All rights reserved.
"""tools/deploy/export_onnx.py and test_onnx.py: a classifier, the DeepLabv2 segmentor and the
Mask R-CNN backbone + neck, with SN and with BCN + WS, through ONNX Runtime on real test images at
two batch sizes; the folded hard-ratio export against the hard-ratio PyTorch model; the metrics
from ONNX Runtime against tools/test.py's."""
import json
import os.path as osp
import sys

import pytest
import torch

from mmnorm.layers.base import BatchStatsNorm
from tests.conftest import ROOT

pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')
sys.path.insert(0, osp.join(ROOT, 'tools', 'deploy'))
sys.path.insert(0, osp.join(ROOT, 'tools'))
import export_onnx  # noqa: E402
import test_onnx  # noqa: E402

#: Config lines turning a base config's backbone (and heads) to BCN + WS.
BCN_WS = ("norm_cfg = dict(_delete_=True, type='BCN', num_groups=4)\n"
          "conv_cfg = dict(type='WSConv')\n")


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    from tests.helpers.images import make_class_folders
    from tests.helpers.tiny_data import make_shapes
    root = tmp_path_factory.mktemp('deploy_data')
    return {'root': str(root), 'shapes': make_shapes(str(root / 'shapes')),
            'classes': make_class_folders(str(root / 'classes'), per_class=2)}


def _with_bcn_ws(base, heads, folder):
    """A config inheriting ``base`` with BCN + WS in the backbone and ``heads``."""
    path = osp.join(folder, 'bcn_ws_' + osp.basename(base))
    parts = ', '.join(f'{part}=dict(norm_cfg=norm_cfg, conv_cfg=conv_cfg)'
                      for part in ('backbone', ) + heads)
    with open(path, 'w') as f:
        f.write(f'_base_ = {base!r}\n{BCN_WS}model = dict({parts})\n')
    return path


def _case(name, data):
    """(config, --cfg-options) of each exported model."""
    if name.startswith('classifier'):
        options = [f'{s}_dataloader.dataset.data_root={data["classes"]}'
                   for s in ('train', 'val', 'test')]
        config = osp.join(ROOT, 'tests', 'data', 'configs', 'tiny_classifier.py')
        if name.endswith('bcn-ws'):
            config = _with_bcn_ws(config, (), data['root'])
        return config, options
    if name.startswith('deeplabv2'):
        options = [f'{s}_dataloader.dataset.data_root={data["shapes"]}'
                   for s in ('train', 'val', 'test')]
        options += [f'{s}_dataloader.{k}' for s in ('train', 'val', 'test')
                    for k in ('num_workers=0', 'persistent_workers=False')]
        config = osp.join(ROOT, 'configs', 'demo', 'deeplabv2_r18-tiny-d8_sn_demo.py')
        if name.endswith('bcn-ws'):
            config = _with_bcn_ws(config, ('auxiliary_head', ), data['root'])
        return config, options
    config = 'mask-rcnn_r18-tiny_fpn_bcn-ws_demo.py' if name.endswith('bcn-ws') else \
        'mask-rcnn_r18-tiny_fpn_sn_demo.py'
    options = [f'{s}_dataloader.dataset.data_root={data["shapes"]}' for s in ('train', 'test')]
    options += [f'{s}_dataloader.{k}' for s in ('train', 'val', 'test')
                for k in ('num_workers=0', 'persistent_workers=False')]
    return osp.join(ROOT, 'configs', 'demo', config), options


def test_deeplabv3_config_exports(data, tmp_path):
    """A DeepLabv3 config of this repository (ASPP with image pooling: SN on 1x1 maps)."""
    from tests.helpers.tiny_data import mmseg_zoo_options
    config = osp.join(ROOT, 'configs', 'deeplabv3',
                      'deeplabv3_r50-d8_sn_8xb1-80k_cityscapes-769x769.py')
    # (the Cityscapes configs test with sliding windows, which is not exported: whole images)
    options = mmseg_zoo_options(data['shapes'], crop=64) + ['model.test_cfg.mode=whole']
    _trained_looking_checkpoint(config, options, tmp_path / 'model.pth')
    result = export_onnx.main([config, str(tmp_path / 'model.pth'), str(tmp_path / 'm.onnx'),
                               '--verify', '--cfg-options', *options])
    assert result['kind'] == 'segmentor' and result['relative_difference'] <= 1e-4


def _parse_options(options):
    import argparse

    from mmengine.config import DictAction
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    return parser.parse_args(['--cfg-options', *options]).cfg_options


def _trained_looking_checkpoint(config, options, path, seed=0):
    """The config's model with its normalizers' parameters, ratios and running statistics
    moved away from their initial values (train-mode forwards on real images, then noise)."""
    from mmengine.config import Config

    from mmnorm.deploy import TensorForward, real_inputs
    from mmnorm.utils.model import build_model
    cfg = Config.fromfile(config)
    cfg.merge_from_dict(_parse_options(options))  # as the tools parse --cfg-options
    torch.manual_seed(seed)
    model = build_model(cfg)
    module = TensorForward(model)
    images = real_inputs(cfg, model, 2)
    model.train()
    for layer in model.modules():
        if getattr(layer, 'estimate', False):
            layer.set_estimate_rate(0.5)  # estimated BCN: the estimates move (Algorithm 1)
    with torch.no_grad():
        for _ in range(3):
            module(images * 1.3 + 0.1)
        gen = torch.Generator().manual_seed(seed)
        for layer in model.modules():
            if isinstance(layer, BatchStatsNorm):
                for name, param in layer.named_parameters():
                    if name.endswith('logits'):
                        param.normal_(0, 1.0, generator=gen)
                    elif 'weight' in name:
                        param.uniform_(0.5, 1.5, generator=gen)
                    else:
                        param.normal_(0, 0.2, generator=gen)
                if layer.track_running_stats:
                    layer.mark_stats_ready(True)  # as if batch-averaged after training
    model.eval()
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, path)
    return cfg, model


CASES = ['classifier-sn', 'classifier-bcn-ws', 'deeplabv2-sn', 'deeplabv2-bcn-ws',
         'mask-rcnn-sn', 'mask-rcnn-bcn-ws']


@pytest.mark.parametrize('name', CASES)
def test_onnx_runtime_reproduces_the_model(name, data, tmp_path, capsys):
    config, options = _case(name, data)
    _trained_looking_checkpoint(config, options, tmp_path / 'model.pth')
    out = tmp_path / 'model.onnx'
    result = export_onnx.main([config, str(tmp_path / 'model.pth'), str(out), '--dynamic-batch',
                               '--verify', '--cfg-options', *options])
    printed = capsys.readouterr().out
    assert 'verify: batch 1 of real test images' in printed
    assert 'verify: batch 2 of real test images' in printed
    assert result['relative_difference'] <= 1e-4
    kinds = {'classifier': 'classifier', 'deeplabv2': 'segmentor', 'mask': 'detector'}
    assert result['kind'] == kinds[name.split('-')[0]]


@pytest.mark.parametrize('name', ['deeplabv2-sn', 'classifier-sn'])
def test_folded_export_equals_the_hard_ratio_model(name, data, tmp_path, capsys):
    from mmnorm.convert import harden_ratios
    from mmnorm.deploy import TensorForward, ort_session, real_inputs, run_session
    config, options = _case(name, data)
    cfg, model = _trained_looking_checkpoint(config, options, tmp_path / 'model.pth')
    out = str(tmp_path / 'folded.onnx')
    result = export_onnx.main([config, str(tmp_path / 'model.pth'), out, '--fold',
                               '--cfg-options', *options])
    assert 'soft ratios, made one-hot now' in capsys.readouterr().out
    assert 'folded' in result['plan'].values()  # something was folded away
    harden_ratios(model)
    images = real_inputs(cfg, model, 1)
    with torch.no_grad():
        expected = TensorForward(model)(images)
    (actual, ) = run_session(ort_session(out), images)
    relative = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert relative <= 1e-4, relative


@pytest.mark.parametrize('name, metric', [('deeplabv2-sn', 'mIoU'),
                                          ('classifier-sn', 'accuracy/top1')])
def test_onnx_runtime_metrics_equal_pytorch_metrics(name, metric, data, tmp_path):
    import test as test_tool
    config, options = _case(name, data)
    _trained_looking_checkpoint(config, options, tmp_path / 'model.pth')
    export_onnx.main([config, str(tmp_path / 'model.pth'), str(tmp_path / 'm.onnx'),
                      '--cfg-options', *options])  # static batch 1: run image by image
    onnx_metrics = test_onnx.main([config, str(tmp_path / 'm.onnx'), '--metrics-out',
                                   str(tmp_path / 'onnx.json'), '--cfg-options', *options])
    torch_metrics = test_tool.main([config, str(tmp_path / 'model.pth'), '--work-dir',
                                    str(tmp_path / 'w'), '--cfg-options', *options])
    assert json.load(open(tmp_path / 'onnx.json'))[metric] == pytest.approx(onnx_metrics[metric])
    assert abs(onnx_metrics[metric] - torch_metrics[metric]) <= 0.1, (onnx_metrics,
                                                                       torch_metrics)


def test_detectors_and_slide_inference_are_refused_clearly(data, tmp_path):
    config, options = _case('deeplabv2-sn', data)
    _trained_looking_checkpoint(config, options, tmp_path / 'model.pth')
    with pytest.raises(SystemExit, match="test_cfg.mode is 'slide'"):
        export_onnx.main([config, str(tmp_path / 'model.pth'), str(tmp_path / 'm.onnx'),
                          '--cfg-options', *options, 'model.test_cfg.mode=slide',
                          'model.test_cfg.crop_size=(64,64)', 'model.test_cfg.stride=(32,32)'])
    assert not (tmp_path / 'm.onnx').exists()
    (tmp_path / 'd.onnx').write_bytes(b'')
    config, options = _case('mask-rcnn-sn', data)
    with pytest.raises(SystemExit, match='detector is exported up to its neck'):
        test_onnx.main([config, str(tmp_path / 'd.onnx'), '--cfg-options', *options])


@pytest.mark.parametrize('name', ['deeplabv2-sn', 'mask-rcnn-bcn-ws'])
def test_dynamic_shape_export_verifies_two_image_sizes(name, data, tmp_path, capsys):
    """--dynamic-shape: symbolic batch, height and width in the file; --verify at the export
    size and at a second size of another aspect ratio (odd sides), batches 1 and 2."""
    from mmnorm.deploy import ort_session
    config, options = _case(name, data)
    _trained_looking_checkpoint(config, options, tmp_path / 'model.pth')
    out = str(tmp_path / 'model.onnx')
    result = export_onnx.main([config, str(tmp_path / 'model.pth'), out, '--dynamic-shape',
                               '--shape', '96', '80', '--verify', '--cfg-options', *options])
    printed = capsys.readouterr().out
    for count in (1, 2):
        for size in ((96, 80), (145, 103)):
            assert f'verify: batch {count} of real test images ({count}, 3, {size[0]}, ' \
                   f'{size[1]})' in printed, printed
    assert result['relative_difference'] <= 1e-4
    assert ort_session(out).get_inputs()[0].shape == ['batch', 3, 'height', 'width']


def test_onnx_runtime_evaluates_other_image_sizes_through_a_dynamic_shape_export(data,
                                                                                  tmp_path):
    """The seg demo exported at 96x80 with --dynamic-shape, evaluated on its 128x128 test images
    (no resizing to the export size): tools/test.py's mIoU. A static export at 96x80 is refused
    with advice."""
    import test as test_tool
    config, options = _case('deeplabv2-sn', data)
    _trained_looking_checkpoint(config, options, tmp_path / 'model.pth')
    export_onnx.main([config, str(tmp_path / 'model.pth'), str(tmp_path / 'dynamic.onnx'),
                      '--dynamic-shape', '--shape', '96', '80', '--cfg-options', *options])
    onnx_metrics = test_onnx.main([config, str(tmp_path / 'dynamic.onnx'), '--cfg-options',
                                   *options])
    torch_metrics = test_tool.main([config, str(tmp_path / 'model.pth'), '--work-dir',
                                    str(tmp_path / 'w'), '--cfg-options', *options])
    assert abs(onnx_metrics['mIoU'] - torch_metrics['mIoU']) <= 0.1, (onnx_metrics,
                                                                       torch_metrics)
    export_onnx.main([config, str(tmp_path / 'model.pth'), str(tmp_path / 'static.onnx'),
                      '--shape', '96', '80', '--cfg-options', *options])
    with pytest.raises(SystemExit, match='exported for 96x80 images and the test data gives '
                       '128x128; export it with --dynamic-shape'):
        test_onnx.main([config, str(tmp_path / 'static.onnx'), '--cfg-options', *options])


def test_one_channel_model_exports_with_its_own_channels(tmp_path, capsys):
    # The digits configs take 1-channel images: the example input and the synthetic batch of
    # --shape have the model's channels, not 3 (a conv refused (1, 3, 8, 8)).
    from mmengine.config import Config

    from mmnorm.deploy import synthetic_batch
    from mmnorm.utils.model import build_model
    config = osp.join(ROOT, 'configs', 'analysis', 'resnet18-s3-w32_sn_1xb32_digits.py')
    model = build_model(Config.fromfile(config))
    torch.save({'state_dict': model.state_dict()}, tmp_path / 'model.pth')
    result = export_onnx.main([config, str(tmp_path / 'model.pth'), str(tmp_path / 'm.onnx'),
                               '--shape', '8', '8', '--verify'])
    assert 'input (N, 1, 8, 8)' in capsys.readouterr().out
    assert result['relative_difference'] <= 1e-4
    assert synthetic_batch(model, (8, 8))['inputs'].shape == (1, 1, 8, 8)


def test_an_export_that_fails_verify_replaces_nothing(data, tmp_path, monkeypatch, capsys):
    """With --verify the file becomes OUT only once it passed: a failed check leaves an existing
    OUT as it was (even with --overwrite) and nothing under its name or beside it."""
    config, options = _case('classifier-sn', data)
    _trained_looking_checkpoint(config, options, tmp_path / 'model.pth')
    out = tmp_path / 'out' / 'm.onnx'
    out.parent.mkdir()
    out.write_bytes(b'the previous export')
    monkeypatch.setattr(export_onnx, 'verify', lambda *args: 1.0)  # far above any tolerance
    with pytest.raises(SystemExit) as stopped:
        export_onnx.main([config, str(tmp_path / 'model.pth'), str(out), '--verify',
                          '--overwrite', '--cfg-options', *options])
    assert stopped.value.code == 1
    assert 'm.onnx was not written' in capsys.readouterr().err
    assert out.read_bytes() == b'the previous export'
    assert sorted(p.name for p in out.parent.iterdir()) == ['m.onnx']
    monkeypatch.setattr(export_onnx, 'verify', lambda *args: 0.0)  # passes: now it is written
    export_onnx.main([config, str(tmp_path / 'model.pth'), str(out), '--verify', '--overwrite',
                      '--cfg-options', *options])
    assert out.read_bytes()[:4] != b'the ' and sorted(p.name for p in out.parent.iterdir()) == [
        'm.onnx']


def test_a_file_onnx_runtime_cannot_load_is_one_line(tmp_path):
    config = osp.join(ROOT, 'tests', 'data', 'configs', 'tiny_classifier.py')
    corrupt = tmp_path / 'corrupt.onnx'
    corrupt.write_bytes(b'not a protobuf' * 10)
    with pytest.raises(SystemExit, match=r'^error: ONNX Runtime cannot load .*corrupt.onnx: '):
        test_onnx.main([config, str(corrupt)])
