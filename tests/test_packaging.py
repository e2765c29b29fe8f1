# Copyright (c) mmnorm contributors. All rights reserved.
"""mmnorm as users install it outside the checkout: the model index that mim reads, the built wheel
and sdist installed into fresh virtual environments (which reuse the project's torch / mmcv
stack), and the mim route (`mim train`, `mim test`, `mim run`, `mim search`, and `mim run mmnorm
gpu_check`, which needs nothing from tests/) from a directory that is not the checkout."""
import glob
import json
import os
import os.path as osp
import subprocess
import sys
import sysconfig

import pytest
import yaml

from tests.conftest import ROOT

STACK = sysconfig.get_paths()['purelib']  # the project's .venv: torch, mmcv, mmdet, mim, ...


def test_model_index_names_every_metafile_and_mim_reads_it():
    with open(osp.join(ROOT, 'model-index.yml')) as f:
        imports = yaml.safe_load(f)['Import']
    metafiles = sorted(osp.relpath(p, ROOT)
                       for p in glob.glob(osp.join(ROOT, 'configs', '*', 'metafile.yml')))
    assert sorted(imports) == metafiles
    from mim.commands.search import convert2df
    from modelindex.load_model_index import load
    index = load(osp.join(ROOT, 'model-index.yml'))
    table = convert2df(index)  # what `mim search mmnorm` shows; it fails on what it cannot read
    configs = {osp.normpath(c) for c in table['config']}
    listed = {osp.relpath(p, ROOT) for p in glob.glob(osp.join(ROOT, 'configs', '*', '*.py'))}
    assert configs == listed
    for config in configs:
        assert osp.isfile(osp.join(ROOT, config)), config
    assert set(table['normalization']) >= {'sn', 'ssn', 'bcn', 'bn', 'gn'}


def _run(args, cwd, **env):
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, **env))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.fixture(scope='module')
def artifacts(tmp_path_factory):
    """The sdist and the wheel, built by the standard frontend as `make dist` builds them (the
    wheel from the sdist)."""
    out = tmp_path_factory.mktemp('dist')
    _run([sys.executable, '-m', 'build', '--no-isolation', '--outdir', str(out), ROOT], ROOT)
    return {'sdist': glob.glob(str(out / '*.tar.gz'))[0],
            'wheel': glob.glob(str(out / '*.whl'))[0]}


def _fresh_venv(path, artifact):
    """A new virtual environment that sees the project's stack through a .pth line (not its
    editable mmnorm: the .pth files of that directory are not processed), with ``artifact``
    installed in it."""
    subprocess.run([sys.executable, '-m', 'venv', str(path)], check=True, timeout=300)
    python = str(path / 'bin' / 'python')
    site = subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()'
                           '["purelib"])'], capture_output=True, text=True, check=True).stdout
    with open(osp.join(site.strip(), 'project_stack.pth'), 'w') as f:
        f.write(STACK + '\n')
    _run([python, '-m', 'pip', 'install', '--no-deps', '--no-index', '--no-build-isolation',
          artifact], str(path))
    return python


@pytest.mark.parametrize('kind', ['wheel', 'sdist'])
def test_installed_package_imports_builds_and_runs_a_tool(artifacts, kind, tmp_path):
    python = _fresh_venv(tmp_path / 'venv', artifacts[kind])
    work = tmp_path / 'elsewhere'
    work.mkdir()
    out = _run([python, '-c', '''
import os, torch, mmnorm
from mmcv.cnn import build_norm_layer
assert mmnorm.__file__.startswith(os.environ['VENV']), mmnorm.__file__
name, layer = build_norm_layer(dict(type='SSN'), 8)
assert name == 'ssn' and layer(torch.randn(2, 8, 4, 4)).shape == (2, 8, 4, 4)
mim = os.path.join(os.path.dirname(mmnorm.__file__), '.mim')
for item in ('configs/demo/mask-rcnn_r18-tiny_fpn_sn_demo.py', 'tools/train.py',
             'model-index.yml'):
    assert os.path.isfile(os.path.join(mim, item)), item
torch.save({'state_dict': layer.state_dict(), 'optimizer': {}, 'meta': {}}, 'trained.pth')
'''], str(work), VENV=str(tmp_path / 'venv'))
    # a tool of the installed package, through mim, from outside the checkout
    out = _run([python, '-m', 'mim', 'run', 'mmnorm', 'publish_model', 'trained.pth',
                'published.pth'], str(work))
    published = glob.glob(str(work / 'published-*.pth'))
    assert len(published) == 1 and 'dropped' in out and "'optimizer'" in out
    # the model index travels too: `mim search` reads it from the installed package
    out = _run([python, '-m', 'mim', 'search', 'mmnorm', '--field', 'normalization'],
               str(work))
    assert 'resnet50_ssn_8xb32_in1k' in out
    # the prepared GPU check, with what it shares with the tests (mmnorm.testing), in its CPU
    # short mode (three short sections; its spawned ranks re-import the installed tool; the
    # SparsestMax kernel's source read from the installed package by Triton's interpreter)
    out = _run([python, '-m', 'mim', 'run', 'mmnorm', 'gpu_check', '--device', 'cpu',
                '--sections', 'environment', 'distributed', 'kernels', '--out', 'gc'],
               str(work))
    assert '.mim/tools/gpu_check.py' in out and 'Verdict: PASSED' in out
    with open(work / 'gc' / 'gpu_check.json') as f:
        report = json.load(f)
    assert report['exit_status'] == 0 and report['sections'][1]['passed'] == 2
    assert report['sections'][2]['passed'] == 3
    assert report['sections'][0]['rows'][0]['mmnorm_from'].startswith(str(tmp_path / 'venv'))


def test_mim_train_and_test_outside_the_checkout(artifacts, tmp_path):
    python = _fresh_venv(tmp_path / 'venv', artifacts['wheel'])
    work = tmp_path / 'elsewhere'
    work.mkdir()
    _run([python, '-c', 'from mmnorm.demo import generate_demo_data; '
          'generate_demo_data("data", num_train=8, num_val=4, seed=0)'], str(work))
    data = str(work / 'data') + '/'
    options = [f'{s}_dataloader.dataset.data_root={data}' for s in ('train', 'val', 'test')] + [
        f'{s}_evaluator.ann_file={data}annotations/instances_val.json' for s in ('val', 'test')
    ] + [f'{s}_dataloader.{k}' for s in ('train', 'val', 'test')
         for k in ('num_workers=0', 'persistent_workers=False')]
    config = 'configs/demo/mask-rcnn_r18-tiny_fpn_ssn_demo.py'  # not a path here: mim finds it
    assert not (work / config).exists()
    out = _run([python, '-m', 'mim', 'train', 'mmnorm', config, '--work-dir', 'work',
                '--cfg-options', *options, 'train_cfg.max_iters=2', 'train_cfg.val_interval=2',
                'default_hooks.checkpoint.interval=2', 'param_scheduler.0.end=1',
                'param_scheduler.1.begin=1', 'param_scheduler.1.end=2',
                'custom_hooks.1.num_iters=1'], str(work))
    assert '.mim/configs/demo/mask-rcnn_r18-tiny_fpn_ssn_demo.py' in out
    assert (work / 'work' / 'iter_2.pth').exists()
    out = _run([python, '-m', 'mim', 'test', 'mmnorm', config, '--checkpoint',
                'work/iter_2.pth', '--cfg-options', *options], str(work))
    assert 'coco/bbox_mAP' in out and 'Testing finished successfully' in out
