# Copyright (c) mmnorm contributors. All rights reserved.
"""tools/dist_train.sh runs 2 CPU processes (gloo); tools/test.py evaluates the result."""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

import mmnorm  # noqa: F401  (allow-lists the globals of mmengine checkpoints for torch.load)

from tests.conftest import ROOT
from tests.helpers.images import make_class_folders

CONFIG = osp.join(ROOT, 'tests', 'data', 'configs', 'tiny_classifier.py')


def _env():
    # These tests assume the CPU (gloo, CPUAmpOptimWrapper): the GPUs are hidden from the ranks
    # (on one GPU, mmengine would put both ranks on it with NCCL, which refuses that).
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='')
    env['PYTHON'] = sys.executable
    env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
    return env


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return str(s.getsockname()[1])


@pytest.fixture(scope='module')
def dist_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('dist')
    data = make_class_folders(str(root / 'data'))
    work = str(root / 'work')
    env = _env()
    env['PORT'] = _free_port()
    options = [f'train_dataloader.dataset.data_root={data}',
               f'val_dataloader.dataset.data_root={data}',
               f'test_dataloader.dataset.data_root={data}']
    result = subprocess.run(
        ['bash', osp.join(ROOT, 'tools', 'dist_train.sh'), CONFIG, '2', '--work-dir', work,
         '--cfg-options', *options], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return work, options, env


def test_dist_train_two_cpu_processes_agree(dist_run):
    work, _, _ = dist_run
    states = [torch.load(osp.join(work, f'rank{r}_state.pth'), weights_only=True)
              for r in (0, 1)]
    assert states[0].keys() == states[1].keys()
    sn_keys = [k for k in states[0] if '.sn1.mean_logits' in k]
    assert sn_keys, 'the model has no SN layers'
    for key, value in states[0].items():
        if key.endswith(('running_mean', 'running_var', 'num_batches_tracked')):
            continue  # buffers are per-rank statistics (broadcast_buffers=False)
        torch.testing.assert_close(states[1][key], value, rtol=0, atol=0,
                                   msg=lambda m, k=key: f'{k} differs between ranks: {m}')
    # The training moved the parameters away from their initial values.
    assert not torch.allclose(states[0][sn_keys[0]], torch.zeros(3))
    assert osp.exists(osp.join(work, 'iter_4.pth'))


def _independent_scores(checkpoint, options):
    """Class scores of every test image: the config's model built directly (with its top-level
    data preprocessor), the checkpoint's state dict loaded, eval mode, softmax."""
    import argparse

    from mmengine.config import Config, DictAction
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.runner import Runner
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    cfg = Config.fromfile(CONFIG)
    cfg.merge_from_dict(parser.parse_args(['--cfg-options', *options]).cfg_options)
    init_default_scope('mmpretrain')
    model = MODELS.build(dict(cfg.model, data_preprocessor=cfg.data_preprocessor))
    model.load_state_dict(torch.load(checkpoint, weights_only=True)['state_dict'])
    model.eval()
    scores = []
    with torch.no_grad():
        for data in Runner.build_dataloader(cfg.test_dataloader):
            data = model.data_preprocessor(data, False)
            scores.append(model(data['inputs'], mode='tensor').softmax(1))
    return torch.cat(scores)


def test_test_tool_evaluates_the_checkpoint(dist_run, tmp_path):
    import pickle
    work, options, env = dist_run
    metrics_file = str(tmp_path / 'metrics.json')
    dump = str(tmp_path / 'predictions.pkl')
    result = subprocess.run(
        [sys.executable, osp.join(ROOT, 'tools', 'test.py'), CONFIG,
         osp.join(work, 'iter_4.pth'), '--work-dir', str(tmp_path), '--metrics-out',
         metrics_file, '--out', dump, '--cfg-options', *options], env=env, capture_output=True,
        text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(metrics_file) as f:
        metrics = json.load(f)
    with open(dump, 'rb') as f:
        predictions = pickle.load(f)
    # The tool ran the checkpoint's weights in eval mode: its scores are those of the same
    # model computed here, and its accuracy is theirs.
    expected = _independent_scores(osp.join(work, 'iter_4.pth'), options)
    actual = torch.stack([torch.as_tensor(p['pred_score']) for p in predictions])
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6)
    labels = torch.tensor([int(p['gt_label']) for p in predictions])
    accuracy = (expected.argmax(1) == labels).double().mean().item() * 100
    assert metrics['accuracy/top1'] == pytest.approx(accuracy, abs=1e-4)


def test_dist_train_resume_two_processes(dist_run):
    work, options, env = dist_run
    env = dict(env, PORT=_free_port())
    result = subprocess.run(
        ['bash', osp.join(ROOT, 'tools', 'dist_train.sh'), CONFIG, '2', '--work-dir', work,
         '--resume', '--cfg-options', 'train_cfg.max_iters=6', *options], env=env,
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'resumed epoch: 0, iter: 4' in result.stdout + result.stderr
    assert osp.exists(osp.join(work, 'iter_6.pth'))


@pytest.mark.skipif(not osp.exists(osp.join(ROOT, '.venv', 'bin', 'python')),
                    reason='no project environment (.venv) to find')
def test_dist_train_finds_the_project_environment(dist_run, tmp_path):
    """A new user's shell: nothing activated, no PYTHON, a PATH whose python has no torch.
    The script must run the project's .venv."""
    _, options, _ = dist_run
    path = '/usr/bin:/bin'
    probe = subprocess.run(['bash', '-c', 'python3 -c "import torch"'], capture_output=True,
                           env={'PATH': path})
    assert probe.returncode != 0, 'the bare PATH should not provide torch'
    env = {'PATH': path, 'HOME': os.environ.get('HOME', str(tmp_path)), 'PORT': _free_port(),
           'MMNORM_COMPILE': '0'}
    result = subprocess.run(
        ['bash', osp.join(ROOT, 'tools', 'dist_train.sh'), CONFIG, '2', '--work-dir',
         str(tmp_path / 'work'), '--cfg-options', *options, 'train_cfg.max_iters=2'], env=env,
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / 'work' / 'iter_2.pth').exists()
    # An explicit PYTHON still wins.
    fake = tmp_path / 'fake-python'
    fake.write_text('#!/bin/sh\necho "fake python: $*"\nexit 3\n')
    fake.chmod(0o755)
    env['PYTHON'] = str(fake)
    result = subprocess.run(['bash', osp.join(ROOT, 'tools', 'dist_train.sh'), CONFIG, '2'],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 3 and 'fake python: -m torch.distributed.run' in result.stdout


def test_dist_train_usage_error():
    result = subprocess.run(['bash', osp.join(ROOT, 'tools', 'dist_train.sh')],
                            capture_output=True, text=True)
    assert result.returncode == 2 and 'usage' in result.stderr


def test_sync_norm_and_amp_switches(tmp_path):
    """--sync-norm: SN running statistics are the global batch's, identical on both ranks;
    --amp: bfloat16 autocast on CPU (CPUAmpOptimWrapper; the GPUs are hidden, see _env)."""
    data = make_class_folders(str(tmp_path / 'data'))
    work = str(tmp_path / 'work')
    env = dict(_env(), PORT=_free_port())
    options = [f'{split}_dataloader.dataset.data_root={data}'
               for split in ('train', 'val', 'test')] + ['train_cfg.max_iters=2']
    result = subprocess.run(
        ['bash', osp.join(ROOT, 'tools', 'dist_train.sh'), CONFIG, '2', '--work-dir', work,
         '--sync-norm', '--amp', '--cfg-options', *options], env=env, capture_output=True,
        text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'CPUAmpOptimWrapper' in result.stdout + result.stderr
    assert "type='SyncSN'" in open(osp.join(work, "tiny_classifier.py")).read()
    states = [torch.load(osp.join(work, f'rank{r}_state.pth'), weights_only=True)
              for r in (0, 1)]
    buffers = [k for k in states[0] if k.endswith('.running_var') and '.sn' in k]
    assert buffers
    for key in buffers:
        torch.testing.assert_close(states[1][key], states[0][key], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(states[0][buffers[0]], torch.ones_like(states[0][buffers[0]]))


def _recompute(args, env, timeout=300):
    return subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'recompute_stats.py'),
                           *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_recompute_stats_cli(dist_run, tmp_path):
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.runner import Runner, load_checkpoint

    from mmnorm.engine import recompute_batch_stats

    work, options, env = dist_run
    source = osp.join(work, 'iter_4.pth')
    out = str(tmp_path / 'recomputed.pth')
    result = _recompute([CONFIG, source, '--num-iters', '3', '--out', out, '--cfg-options',
                         *options], env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert '3/3' in result.stdout  # progress
    new = torch.load(out, weights_only=True)
    old = torch.load(source, weights_only=True)
    meta = new['meta']['batch_stats']
    assert meta['estimator'] == 'batch_average' and meta['num_iters'] == 3
    assert meta['world_size'] == 1 and meta['source_checkpoint'] == source
    assert set(new) == set(old)  # optimizer, message hub, ... kept
    changed = 0
    for key, value in old['state_dict'].items():
        if key.endswith(('running_mean', 'running_var')):
            changed += not torch.equal(new['state_dict'][key], value)
        elif key.endswith('stats_ready'):
            assert bool(new['state_dict'][key])
        else:
            assert torch.equal(new['state_dict'][key], value), f'{key} changed'
    assert changed > 0
    # Same statistics as the in-process function on the same batches.
    cfg = Config.fromfile(CONFIG)
    cfg.merge_from_dict(dict(o.split('=', 1) for o in options))
    init_default_scope('mmpretrain')
    # Built as the Runner builds it: the config's top-level data_preprocessor normalizes the
    # images (the tool once built the model without it and averaged unnormalized statistics).
    model = MODELS.build(dict(cfg.model, data_preprocessor=cfg.data_preprocessor))
    load_checkpoint(model, source, map_location='cpu')
    recompute_batch_stats(model, Runner.build_dataloader(cfg.train_dataloader, seed=0), 3)
    for key, value in model.state_dict().items():
        if key.endswith(('running_mean', 'running_var')):
            torch.testing.assert_close(new['state_dict'][key], value)
    # Refuses to replace a file unless asked.
    again = _recompute([CONFIG, source, '--num-iters', '1', '--out', out, '--cfg-options',
                        *options], env)
    assert again.returncode != 0 and '--overwrite' in again.stderr


def test_recompute_stats_cli_two_processes(dist_run, tmp_path):
    work, options, env = dist_run
    env = dict(env, PORT=_free_port())
    out = str(tmp_path / 'recomputed.pth')
    result = subprocess.run(
        ['bash', osp.join(ROOT, 'tools', 'dist_run.sh'), '2', 'recompute_stats.py', CONFIG,
         osp.join(work, 'iter_4.pth'), '--num-iters', '2', '--out', out, '--estimator',
         'population', '--cfg-options', *options], env=env, capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    meta = torch.load(out, weights_only=True)['meta']['batch_stats']
    assert meta['world_size'] == 2 and meta['estimator'] == 'population'
