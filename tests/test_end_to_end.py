# Copyright (c) mmnorm contributors. All rights reserved.
"""End-to-end runs of the tools on tiny generated data: for mmdet, mmseg and mmpretrain,
train -> checkpoint -> resume -> recompute statistics -> test, through tools/*.py; a 2-process
CPU tools/dist_train.sh run of the detector; and one model-zoo config per codebase (train step +
test step, dataset paths overridden with --cfg-options)."""
import json
import os
import os.path as osp
import socket
import subprocess
import sys

import pytest
import torch

import mmnorm  # noqa: F401  (allow-lists the globals of mmengine checkpoints for torch.load)

from tests.conftest import ROOT
from tests.helpers.tiny_data import (make_imagenet_format, make_shapes, mmdet_zoo_options,
                                     mmpretrain_zoo_options, mmseg_zoo_options)

TOOLS = osp.join(ROOT, 'tools')


def _env(port=None):
    env = dict(os.environ, PYTHON=sys.executable,
               PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    if port:
        env['PORT'] = port
    return env


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return str(s.getsockname()[1])


def _run(args, timeout=600, check=True, **kwargs):
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                            env=kwargs.pop('env', _env()), cwd=ROOT, **kwargs)
    if not check:
        return result
    assert result.returncode == 0, (' '.join(args) + '\n' + result.stdout[-4000:]
                                    + result.stderr[-4000:])
    return result.stdout + result.stderr


def _tool(name, *args, **kwargs):
    return _run([sys.executable, osp.join(TOOLS, name), *args], **kwargs)


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    return make_shapes(str(tmp_path_factory.mktemp('shapes')))


def _demo_det_options(root):
    return [f'{s}_dataloader.dataset.data_root={root}' for s in ('train', 'val', 'test')] + [
        f'{s}_evaluator.ann_file={root}annotations/instances_val.json' for s in ('val', 'test')
    ] + [f'{s}_dataloader.num_workers=0' for s in ('train', 'val', 'test')] + [
        f'{s}_dataloader.persistent_workers=False' for s in ('train', 'val', 'test')
    ] + ['custom_hooks.0.num_iters=2']


def _demo_seg_options(root):
    return [f'{s}_dataloader.dataset.data_root={root}' for s in ('train', 'val', 'test')] + [
        f'{s}_dataloader.num_workers=0' for s in ('train', 'val', 'test')] + [
        f'{s}_dataloader.persistent_workers=False' for s in ('train', 'val', 'test')
    ] + ['custom_hooks.0.num_iters=2']


CASES = {
    'mmdet': ('configs/demo/mask-rcnn_r18-tiny_fpn_sn_demo.py', _demo_det_options,
              'coco/segm_mAP'),
    'mmseg': ('configs/demo/deeplabv2_r18-tiny-d8_sn_demo.py', _demo_seg_options, 'mIoU'),
}


@pytest.mark.parametrize('codebase', list(CASES))
def test_train_resume_recompute_test(codebase, shapes, tmp_path):
    config, options_of, metric = CASES[codebase]
    options = options_of(shapes)
    work = str(tmp_path / 'work')
    iters = ['train_cfg.max_iters={}', 'train_cfg.val_interval=100',
             'default_hooks.checkpoint.interval=1']
    _tool('train.py', config, '--work-dir', work, '--cfg-options', *options,
          *[o.format(2) for o in iters])
    assert osp.exists(osp.join(work, 'iter_2.pth'))
    out = _tool('train.py', config, '--work-dir', work, '--resume', '--cfg-options', *options,
                *[o.format(3) for o in iters])
    assert 'resumed epoch: 0, iter: 2' in out
    final = osp.join(work, 'iter_3.pth')
    state = torch.load(final, weights_only=True)['state_dict']
    assert any(k.endswith('stats_ready') and bool(v) for k, v in state.items())  # hook ran
    recomputed = str(tmp_path / 'recomputed.pth')
    _tool('recompute_stats.py', config, final, '--num-iters', '2', '--out', recomputed,
          '--cfg-options', *options)
    assert torch.load(recomputed, weights_only=True)['meta']['batch_stats']['num_iters'] == 2
    metrics_file = str(tmp_path / 'metrics.json')
    _tool('test.py', config, recomputed, '--work-dir', str(tmp_path / 'test'),
          '--metrics-out', metrics_file, '--cfg-options', *options)
    with open(metrics_file) as f:
        assert metric in json.load(f)
    _check_out_and_tta(codebase, config, recomputed, options, tmp_path)


def _check_out_and_tta(codebase, config, checkpoint, options, tmp_path):
    """--out and --tta as the codebase's own test tool takes them."""
    if codebase == 'mmdet':  # a .pkl of predictions; flip TTA without tta_model in the config
        dump = str(tmp_path / 'tta.pkl')
        # (mmdet's DetTTAModel merges boxes only: the detector without its mask head)
        boxes_only = ['model.roi_head.mask_roi_extractor=None', 'model.roi_head.mask_head=None',
                      'test_evaluator.metric=bbox']
        out = _tool('test.py', config, checkpoint, '--work-dir', str(tmp_path / 'tta'), '--tta',
                    '--out', dump, '--cfg-options', *options, *boxes_only)
        assert 'flip test-time augmentation' in out
        import pickle
        with open(dump, 'rb') as f:
            predictions = pickle.load(f)
        assert len(predictions) == 4 and 'pred_instances' in predictions[0]
        bad = _run([sys.executable, osp.join(TOOLS, 'test.py'), config, checkpoint, '--out',
                    str(tmp_path / 'preds'), '--cfg-options', *options], check=False)
        assert bad.returncode != 0 and 'must be a .pkl' in bad.stderr
    else:  # mmseg: a directory of prediction images; no TTA fallback, as in mmseg's tool
        out_dir = tmp_path / 'seg_out'
        _tool('test.py', config, checkpoint, '--work-dir', str(tmp_path / 'o'), '--out',
              str(out_dir), '--cfg-options', *options)
        assert len(list(out_dir.glob('**/*.png'))) == 4
        bad = _run([sys.executable, osp.join(TOOLS, 'test.py'), config, checkpoint, '--tta',
                    '--cfg-options', *options], check=False)
        assert bad.returncode != 0 and 'has no fallback' in bad.stderr
        assert 'Traceback' not in bad.stderr


def test_dist_train_detector_two_cpu_processes(shapes, tmp_path):
    config, options_of, _ = CASES['mmdet']
    work = str(tmp_path / 'work')
    out = _run(['bash', osp.join(TOOLS, 'dist_train.sh'), config, '2', '--work-dir', work,
                '--cfg-options', *options_of(shapes), 'train_cfg.max_iters=2',
                'train_cfg.val_interval=100'],
               env=dict(_env(_free_port()), CUDA_VISIBLE_DEVICES=''))  # CPU ranks (gloo)
    assert 'Iter(train) [2/2]' in out
    assert osp.exists(osp.join(work, 'iter_2.pth'))


def test_mmpretrain_path_train_resume_recompute_test(tmp_path):
    from tests.helpers.images import make_class_folders
    config = 'tests/data/configs/tiny_classifier.py'
    data = make_class_folders(str(tmp_path / 'data'))
    options = [f'{s}_dataloader.dataset.data_root={data}' for s in ('train', 'val', 'test')]
    work = str(tmp_path / 'work')
    _tool('train.py', config, '--work-dir', work, '--cfg-options', *options,
          'train_cfg.max_iters=2')
    out = _tool('train.py', config, '--work-dir', work, '--resume', '--cfg-options', *options,
                'train_cfg.max_iters=4')
    assert 'resumed epoch: 0, iter: 2' in out
    recomputed = str(tmp_path / 'recomputed.pth')
    _tool('recompute_stats.py', config, osp.join(work, 'iter_4.pth'), '--num-iters', '2',
          '--out', recomputed, '--cfg-options', *options)
    metrics_file = str(tmp_path / 'metrics.json')
    _tool('test.py', config, recomputed, '--work-dir', str(tmp_path / 'test'),
          '--metrics-out', metrics_file, '--cfg-options', *options)
    with open(metrics_file) as f:
        assert 'accuracy/top1' in json.load(f)
    # mmpretrain's --out-item metrics, and its flip TTA when the config has no tta_model
    dump = str(tmp_path / 'tta_metrics.pkl')
    out = _tool('test.py', config, recomputed, '--work-dir', str(tmp_path / 'tta'), '--tta',
                '--out', dump, '--out-item', 'metrics', '--cfg-options', *options)
    assert 'flip test-time augmentation' in out
    import pickle
    with open(dump, 'rb') as f:
        assert 'accuracy/top1' in pickle.load(f)


ZOO = {
    'mmdet': ('configs/mask_rcnn/mask-rcnn_r50_fpn_sn_2x_coco.py', mmdet_zoo_options,
              'coco/bbox_mAP', 'custom_hooks.0.num_iters=2'),
    'mmseg': ('configs/deeplabv2/deeplabv2_r50-d8_sn_8xb1-260k_cityscapes-713x713.py',
              mmseg_zoo_options, 'mIoU', 'custom_hooks.0.num_iters=2'),
    'mmpretrain': ('configs/resnet/resnet50_sn_8xb32_in1k.py', mmpretrain_zoo_options,
                   'accuracy/top1', None),
}


@pytest.mark.parametrize('codebase', list(ZOO))
def test_model_zoo_config_train_and_test_step(codebase, shapes, tmp_path):
    config, options_of, metric, extra = ZOO[codebase]
    root = shapes if codebase != 'mmpretrain' else make_imagenet_format(str(tmp_path / 'in'))
    options = options_of(root) + ([extra] if extra else [])
    work = str(tmp_path / 'work')
    _tool('train.py', config, '--work-dir', work, '--cfg-options', *options)
    checkpoint = open(osp.join(work, 'last_checkpoint')).read().strip()
    metrics_file = str(tmp_path / 'metrics.json')
    _tool('test.py', config, checkpoint, '--work-dir', str(tmp_path / 'test'), '--metrics-out',
          metrics_file, '--cfg-options', *options)
    with open(metrics_file) as f:
        assert metric in json.load(f)
