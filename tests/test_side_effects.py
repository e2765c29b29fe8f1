# Copyright (c) mmnorm contributors. All rights reserved.
"""What ``import mmnorm`` changes outside mmnorm (mmnorm.side_effects): exactly the listed
effects, each idempotent and observable on its own; the opt-in one only when asked for."""
import json
import subprocess
import sys

from tests.conftest import ROOT


def _run(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object."""
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_installs_exactly_the_listed_effects():
    result = _run(
        'import json, sys, mmnorm\n'
        'from mmnorm import side_effects\n'
        'from mmnorm.integration import post_import\n'
        'from mmengine.runner.checkpoint import CheckpointLoader\n'
        'state = side_effects.installed()\n'
        'loader = CheckpointLoader._get_checkpoint_loader("x.pth").__module__\n'
        'waiting = post_import.pending(); hooked = post_import._finder in sys.meta_path\n'
        'import mmdet.models, mmseg.models, mmpretrain.models, mmcv.cnn\n'
        'from mmseg.registry import MODELS\n'
        'from mmdet.models.backbones import ResNet\n'
        'import mmcv.cnn.utils.fuse_conv_bn\n'
        'from mmengine.analysis import FlopAnalyzer\n'
        'fuse = sys.modules["mmcv.cnn.utils.fuse_conv_bn"]._fuse_conv_bn\n'
        'control = sys.modules["mmengine.model.efficient_conv_bn_eval"]'
        '.efficient_conv_bn_eval_control\n'
        'print(json.dumps(dict(state=state, loader=loader, waiting=waiting, hooked=hooked,\n'
        '    after=post_import.pending(), hooked_after=post_import._finder in sys.meta_path,\n'
        '    head=MODELS.get("DeepLabV2Head") is not None,\n'
        '    train=getattr(ResNet.train, "_mmnorm_respects_norm_eval", False),\n'
        '    fuse=hasattr(fuse, "__mmnorm_wraps__"),\n'
        '    control=hasattr(control, "__mmnorm_wraps__"),\n'
        '    flops=hasattr(FlopAnalyzer.__init__, "__mmnorm_wraps__"))))\n')
    assert result['state'] == {'registries': True, 'checkpoint_globals': True,
                               'codebase_integrations': True, 'checkpoint_loader': False}
    assert result['loader'] == 'mmengine.runner.checkpoint'  # mmengine's own, not replaced
    assert set(result['waiting']) == {'mmdet.models', 'mmseg.models', 'mmpretrain.models',
                                      'mmcv.cnn.utils.fuse_conv_bn',
                                      'mmcv.cnn.bricks.conv_module',
                                      'mmengine.analysis.complexity_analysis'}
    assert result['hooked']
    # Once each codebase is imported its integration has run and the finder is gone.
    assert result['after'] == [] and not result['hooked_after']
    assert result['head'] and result['train'] and result['fuse'] and result['flops']
    assert result['control']  # mmengine's efficient_conv_bn_eval (imported with mmengine.model)


def test_every_effect_is_idempotent():
    result = _run(
        'import json, sys, importlib, mmnorm\n'
        'from mmnorm import side_effects\n'
        'from mmnorm.integration import post_import\n'
        'everything = side_effects.ON_IMPORT + side_effects.OPT_IN\n'
        'side_effects.install(*everything); side_effects.install(*everything)\n'
        'importlib.reload(mmnorm)\n'
        'finders = sum(f is post_import._finder for f in sys.meta_path)\n'
        'import mmdet.models, mmcv.cnn\n'
        'from mmdet.models.backbones import ResNet\n'
        'side_effects.install(*everything)\n'
        'train = ResNet.train\n'
        'wrapped_twice = hasattr(getattr(train, "__wrapped__", None), '
        '"_mmnorm_respects_norm_eval")\n'
        'fuse = sys.modules["mmcv.cnn.utils.fuse_conv_bn"]._fuse_conv_bn\n'
        'from mmengine.analysis import FlopAnalyzer\n'
        'from mmnorm.integration import mmengine_flops\n'
        'mmengine_flops.install(); mmengine_flops.install()\n'
        'print(json.dumps(dict(finders=finders, wrapped_twice=wrapped_twice,\n'
        '    fuse_twice=hasattr(fuse.__mmnorm_wraps__, "__mmnorm_wraps__"),\n'
        '    flops_twice=hasattr(FlopAnalyzer.__init__.__mmnorm_wraps__, "__mmnorm_wraps__"),\n'
        '    state=side_effects.installed())))\n')
    assert result['finders'] <= 1
    assert not result['wrapped_twice'] and not result['fuse_twice']
    assert not result['flops_twice']
    assert all(result['state'].values())


def test_checkpoint_loader_is_opt_in_and_works_on_its_own(tmp_path):
    damaged = tmp_path / 'damaged.pth'
    damaged.write_bytes(b'PK\x03\x04 not really a zip archive')
    code = (
        'import json, mmnorm\n'
        'from mmengine.runner import load_checkpoint\n'
        'from torch import nn\n'
        'def error():\n'
        '    try:\n'
        f'        load_checkpoint(nn.Linear(1, 1), {str(damaged)!r})\n'
        '    except Exception as e:\n'
        '        return type(e).__name__\n'
        'before = error()\n'
        'mmnorm.side_effects.install("checkpoint_loader")\n'
        'print(json.dumps(dict(before=before, after=error(),\n'
        '    state=mmnorm.side_effects.installed()["checkpoint_loader"])))\n')
    result = _run(code)
    assert result['before'] != 'CheckpointFileError'  # mmengine's loader: torch's own error
    assert result['after'] == 'CheckpointFileError' and result['state']
