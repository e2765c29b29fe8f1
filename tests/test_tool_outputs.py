# Copyright (c) mmnorm contributors. All rights reserved.
"""Every tool that writes a checkpoint or a model refuses to replace an existing file, and its
own input above all, unless given --overwrite; writes are atomic (mmnorm.utils.files)."""
import hashlib
import importlib
import json
import os
import os.path as osp
import sys

import pytest
import torch

from mmnorm.utils import (OutputExistsError, atomic_write, check_output, prepare_output_file,
                          save_checkpoint, write_json)
from tests.conftest import ROOT

CONFIG = osp.join(ROOT, 'tests', 'data', 'configs', 'tiny_classifier.py')

#: tool module -> argv builder (source checkpoint, output path).
TOOLS = {
    'convert_checkpoint': lambda src, out: [src, out, '--format', 'sn'],
    'export_hard_ratios': lambda src, out: [CONFIG, src, out],
    'recompute_stats': lambda src, out: [CONFIG, src, '--out', out],
    'deploy.export_onnx': lambda src, out: [CONFIG, src, out],
}


def _tool(name):
    for folder in ('tools', osp.join('tools', 'deploy')):
        if osp.join(ROOT, folder) not in sys.path:
            sys.path.insert(0, osp.join(ROOT, folder))
    return importlib.import_module(name.split('.')[-1])


def _digest(path):
    return hashlib.sha256(open(path, 'rb').read()).hexdigest()


@pytest.fixture
def source(tmp_path):
    path = str(tmp_path / 'model.pth')
    torch.save({'state_dict': {'w': torch.arange(4.)}, 'optimizer': {'lr': 0.1}}, path)
    return path


@pytest.mark.parametrize('tool', list(TOOLS))
def test_tool_refuses_its_own_input(tool, source):
    before = _digest(source)
    with pytest.raises(SystemExit, match='also an input of this command.*--overwrite'):
        _tool(tool).main(TOOLS[tool](source, source))
    # The same file under another name is still the input.
    alias = osp.join(osp.dirname(source), '.', '..', osp.basename(osp.dirname(source)),
                     osp.basename(source))
    with pytest.raises(SystemExit, match='also an input'):
        _tool(tool).main(TOOLS[tool](source, alias))
    assert _digest(source) == before


@pytest.mark.parametrize('tool', list(TOOLS))
def test_tool_refuses_an_existing_output(tool, source, tmp_path):
    existing = tmp_path / 'existing.out'
    existing.write_bytes(b'keep me')
    with pytest.raises(SystemExit, match='existing.out exists; pass --overwrite'):
        _tool(tool).main(TOOLS[tool](source, str(existing)))
    assert existing.read_bytes() == b'keep me'


def test_check_output_rules(tmp_path):
    out = tmp_path / 'out.pth'
    check_output(str(out), [str(tmp_path / 'src.pth'), None])  # neither exists: fine
    out.write_bytes(b'x')
    with pytest.raises(OutputExistsError, match='--overwrite'):
        check_output(str(out))
    with pytest.raises(OutputExistsError, match='also an input'):
        check_output(str(out), [str(out)])
    link = tmp_path / 'link.pth'
    link.symlink_to(out)
    with pytest.raises(OutputExistsError, match='also an input'):
        check_output(str(link), [str(out)])
    check_output(str(out), [str(out)], overwrite=True)  # asked for


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    out = tmp_path / 'out.pth'
    save_checkpoint({'v': 1}, str(out))
    before = _digest(out)

    def fails(tmp):
        open(tmp, 'wb').write(b'partial')
        raise KeyboardInterrupt  # interrupted half-way

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(out), fails)
    assert _digest(out) == before
    assert sorted(os.listdir(tmp_path)) == ['out.pth']  # no temporary left behind
    save_checkpoint({'v': 2}, str(tmp_path / 'sub' / 'new.pth'))  # creates the folder
    assert torch.load(tmp_path / 'sub' / 'new.pth')['v'] == 2
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~mask  # as a plain open() would make it


def test_a_checkpoint_of_another_model_is_one_clear_error(tmp_path):
    from mmengine.config import Config

    from mmnorm.utils.model import build_model
    state = build_model(Config.fromfile(CONFIG)).state_dict()
    wrong_shape = dict(state, **{'backbone.conv1.weight': torch.zeros(16, 3, 7, 7)})
    torch.save({'state_dict': wrong_shape}, tmp_path / 'shape.pth')
    missing = {k: v for k, v in state.items() if 'layer4' not in k}
    torch.save({'state_dict': missing}, tmp_path / 'missing.pth')
    export = _tool('deploy.export_onnx')
    with pytest.raises(SystemExit, match=r'does not fit the model of the config: 1 shape\(s\) '
                       r'\(backbone.conv1.weight \(16, 3, 7, 7\) vs \(8, 3, 7, 7\)\)'):
        export.main([CONFIG, str(tmp_path / 'shape.pth'), str(tmp_path / 'a.onnx')])
    with pytest.raises(SystemExit, match=r'missing key\(s\) \(backbone.layer4'):
        export.main([CONFIG, str(tmp_path / 'missing.pth'), str(tmp_path / 'a.onnx')])
    assert not (tmp_path / 'a.onnx').exists()


class _NotAllowListed:
    """An object a checkpoint may not carry (its unpickling would run this module's code)."""


def test_publish_model_keeps_weights_and_meta_and_names_the_hash(tmp_path):
    source = tmp_path / 'iter_9.pth'
    state = {'w': torch.arange(4.)}
    torch.save({'state_dict': state, 'optimizer': {'lr': 0.1}, 'meta': {'iter': 9},
                'message_hub': {'log': [1]}}, source)
    before = _digest(source)
    publish = _tool('publish_model')
    final = publish.main([str(source), str(tmp_path / 'model.pth')])
    assert final == str(tmp_path / f'model-{_digest(final)[:8]}.pth')
    published = torch.load(final, weights_only=True)
    assert set(published) == {'state_dict', 'meta'} and published['meta'] == {'iter': 9}
    assert torch.equal(published['state_dict']['w'], state['w'])
    assert _digest(source) == before
    kept = publish.main([str(source), str(tmp_path / 'hub.pth'), '--keep', 'message_hub'])
    assert set(torch.load(kept, weights_only=True)) == {'state_dict', 'meta', 'message_hub'}
    with pytest.raises(SystemExit, match=r"--keep \['ema'\]: not in the checkpoint"):
        publish.main([str(source), str(tmp_path / 'x.pth'), '--keep', 'ema'])
    unsafe = tmp_path / 'unsafe.pth'
    torch.save({'state_dict': state, 'hook': _NotAllowListed()}, unsafe)
    with pytest.raises(SystemExit, match='_NotAllowListed'):
        publish.main([str(unsafe), str(tmp_path / 'y.pth')])
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith('.')) == []  # no temporaries


def test_publish_model_is_reproducible(tmp_path):
    # The same checkpoint published twice: the same bytes, so the same name, which a second
    # run then refuses to replace (torch.save given the temporary's random path named the
    # archive's folder after it: a new hash every run).
    source = tmp_path / 'iter_9.pth'
    torch.save({'state_dict': {'w': torch.arange(4.)}, 'meta': {'iter': 9}}, source)
    publish = _tool('publish_model')
    first = publish.main([str(source), str(tmp_path / 'a' / 'model.pth')])
    second = publish.main([str(source), str(tmp_path / 'b' / 'model.pth')])
    assert osp.basename(first) == osp.basename(second)
    assert _digest(first) == _digest(second)
    with pytest.raises(SystemExit, match='exists; pass --overwrite'):
        publish.main([str(source), str(tmp_path / 'a' / 'model.pth')])
    assert publish.main([str(source), str(tmp_path / 'a' / 'model.pth'), '--overwrite']) == first
    for name in ('x.pth', 'y.pth'):
        save_checkpoint({'w': torch.arange(3.)}, str(tmp_path / name))
    assert _digest(tmp_path / 'x.pth') == _digest(tmp_path / 'y.pth')


def test_directories_are_not_output_files(tmp_path):
    folder = tmp_path / 'out'
    folder.mkdir()
    for call in (lambda: check_output(str(folder)), lambda: check_output(str(folder),
                                                                          overwrite=True),
                 lambda: save_checkpoint({}, str(folder)), lambda: prepare_output_file(
                     str(folder)), lambda: write_json(str(folder), {})):
        with pytest.raises(IsADirectoryError, match='is a directory'):
            call()
    assert os.listdir(folder) == []
    with pytest.raises(SystemExit, match='is a directory'):
        _tool('convert_checkpoint').main([str(tmp_path / 'missing.pth'), str(folder),
                                          '--format', 'sn', '--overwrite'])
    with pytest.raises(SystemExit, match='is a directory, not a checkpoint file'):
        _tool('convert_checkpoint').main([str(folder), str(tmp_path / 'out.pth'), '--format',
                                          'sn'])


def test_json_outputs_create_their_folder_before_the_work(tmp_path):
    path = tmp_path / 'new' / 'deeper' / 'metrics.json'
    prepare_output_file(str(path))  # what tools/test.py runs before evaluating
    assert path.parent.is_dir() and not path.exists()
    write_json(str(tmp_path / 'other' / 'm.json'), {'mAP': 0.5}, indent=2)
    assert json.load(open(tmp_path / 'other' / 'm.json')) == {'mAP': 0.5}
    test_tool = _tool('test')
    with pytest.raises(SystemExit, match='checkpoint .*missing.pth does not exist'):
        test_tool.main([CONFIG, str(tmp_path / 'missing.pth')])
    with pytest.raises(SystemExit, match='is a directory, not a checkpoint file'):
        test_tool.main([CONFIG, str(tmp_path / 'new')])
    checkpoint = tmp_path / 'model.pth'
    torch.save({}, checkpoint)
    with pytest.raises(SystemExit, match='is not a config.*config comes first'):
        test_tool.main([str(checkpoint), CONFIG])


@pytest.mark.parametrize('argv, match', [
    (['--iters', '1'], '--iters must be >= 2, got 1'),  # (no iteration left to warm up in)
    (['--quick', '--iters', '0'], '--iters must be >= 2, got 0'),  # (ran the default length)
    (['--stats-iters', '0'], '--stats-iters must be >= 1'),
])
def test_demo_refuses_bad_lengths_before_any_work(argv, match, tmp_path):
    with pytest.raises(SystemExit, match=match):
        _tool('demo').main(argv + ['--work-dir', str(tmp_path / 'work'), '--data-root',
                                   str(tmp_path / 'data')])
    assert os.listdir(tmp_path) == []


def test_convert_refuses_an_empty_verification_before_any_work(source, tmp_path):
    for flag in ('--verify-size', '--verify-batch'):
        with pytest.raises(SystemExit, match='--verify-size and --verify-batch must be >= 1'):
            _tool('convert_checkpoint').main([source, str(tmp_path / 'out.pth'), '--format',
                                              'sn', '--verify', flag, '0'])
    assert not (tmp_path / 'out.pth').exists()


@pytest.mark.parametrize('config, refused', [
    ('configs/mask_rcnn/mask-rcnn_r50_fpn_sn_2x_coco.py', True),
    ('configs/demo/mask-rcnn_r18-tiny_fpn_sn_demo.py', True),
    ('configs/faster_rcnn/faster-rcnn_r50_fpn_sn_1x_coco.py', False),
])
def test_tta_refuses_box_merging_for_a_mask_model_up_front(config, refused):
    # mmdet's DetTTAModel asserts after the model is built and the checkpoint loaded
    # ('TTA of instance segmentation does not support now'); the guide's command hit it.
    from mmengine.config import Config
    cfg = Config.fromfile(osp.join(ROOT, config))
    test = _tool('test')
    if refused:
        with pytest.raises(SystemExit, match='merges boxes only.*mask_head=None'):
            test.setup_tta(cfg)
        cfg.merge_from_dict({'model.roi_head.mask_roi_extractor': None,
                             'model.roi_head.mask_head': None})  # the options it names
    test.setup_tta(cfg)
    assert cfg.model['type'] == 'DetTTAModel'


@pytest.mark.parametrize('config, refused', [
    ('configs/demo/mask-rcnn_r18-tiny_fpn_sn_demo.py', True),
    ('configs/faster_rcnn/faster-rcnn_r50_fpn_sn_1x_coco.py', True),
    ('configs/demo/deeplabv2_r18-tiny-d8_sn_demo.py', False),
])
def test_amp_without_cuda_refuses_a_two_stage_detector_up_front(config, refused, monkeypatch):
    # Its first iteration stopped in mmcv's CPU nms ('expected scalar type Float but found
    # BFloat16'); segmentation trains in bfloat16 on the CPU.
    from mmengine.config import Config
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    cfg = Config.fromfile(osp.join(ROOT, config))
    train = _tool('train')
    if refused:
        with pytest.raises(SystemExit, match='two-stage detector'):
            train.enable_amp(cfg)
    else:
        train.enable_amp(cfg)
        assert cfg.optim_wrapper.type == 'CPUAmpOptimWrapper'


def test_an_output_that_cannot_be_written_fails_before_the_work(source, tmp_path):
    """A file where the output's folder should be (or a read-only folder: the same check, by
    creating a file there) is refused in one line before the work, not after it."""
    from mmnorm.utils import OutputNotWritableError, check_writable
    blocker = tmp_path / 'a_file'
    blocker.write_bytes(b'')
    for out in (blocker / 'out.pth', blocker / 'deeper' / 'out.pth'):
        with pytest.raises(OutputNotWritableError, match='is a file, not a folder'):
            check_writable(str(out))
        for tool in TOOLS:
            with pytest.raises(SystemExit, match='cannot write .*is a file, not a folder'):
                _tool(tool).main(TOOLS[tool](source, str(out)))
        with pytest.raises(SystemExit, match='cannot write'):  # (--metrics-out)
            _tool('test').main([CONFIG, source, '--metrics-out', str(out)])
        for tool, argv in (('publish_model', [source, str(out)]),
                           ('plot_ratios', [source, '--out', str(out.with_suffix('.png'))])):
            with pytest.raises(SystemExit, match='cannot write'):
                _tool(tool).main(argv)
    check_writable(str(tmp_path / 'new' / 'deeper' / 'out.pth'))  # created later: fine
    assert not (tmp_path / 'new').exists()
    assert sorted(os.listdir(tmp_path)) == ['a_file', 'model.pth']  # no probe left behind


def test_resume_from_a_missing_checkpoint_is_refused_up_front(tmp_path):
    with pytest.raises(SystemExit, match='--resume .*nope.pth: no such checkpoint file'):
        _tool('train').main([CONFIG, '--work-dir', str(tmp_path / 'w'), '--resume',
                             str(tmp_path / 'nope.pth')])
    assert not (tmp_path / 'w').exists()  # before the runner was built


def test_a_damaged_checkpoint_is_one_line_in_test(tmp_path):
    from mmengine.config import Config

    from mmnorm.utils.model import build_model
    good = tmp_path / 'good.pth'
    torch.save({'state_dict': build_model(Config.fromfile(CONFIG)).state_dict()}, good)
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(good.read_bytes()[:1000])
    from tests.helpers.images import make_class_folders
    data = make_class_folders(str(tmp_path / 'classes'), per_class=1)
    with pytest.raises(SystemExit, match='^error: .*truncated.pth'):
        _tool('test').main([CONFIG, str(truncated), '--work-dir', str(tmp_path / 'w'),
                            '--cfg-options', f'test_dataloader.dataset.data_root={data}'])


def test_demo_data_written_again_keeps_no_stale_images(tmp_path):
    """Written again with fewer images into the same folder, the dataset holds only the new
    ones (mmseg lists the folder: 6 images against annotations for 4)."""
    tool = _tool('make_demo_data')
    root = tmp_path / 'demo'
    tool.main(['--root', str(root), '--num-train', '3', '--num-val', '3', '--image-size', '32',
               '--min-size', '8', '--max-size', '16'])
    (root / 'images' / 'val' / 'notes.txt').write_text('mine')
    tool.main(['--root', str(root), '--num-train', '2', '--num-val', '1', '--image-size', '32',
               '--min-size', '8', '--max-size', '16'])
    assert sorted(os.listdir(root / 'images' / 'train')) == ['000000.png', '000001.png']
    assert sorted(os.listdir(root / 'seg_labels' / 'val')) == ['000000.png']
    assert sorted(os.listdir(root / 'images' / 'val')) == ['000000.png', 'notes.txt']
    annotations = json.load(open(root / 'annotations' / 'instances_val.json'))
    assert len(annotations['images']) == 1


@pytest.mark.parametrize('argv, match', [
    (['--shapes', '2,8,4'], "'2,8,4' is not N,C,H,W"),
    (['--shapes', 'abc'], "'abc' is not N,C,H,W"),
    (['--rounds', '0'], '--rounds must be >= 1'),
    (['--deploy-shape', '1,3,0,224'], 'is not N,C,H,W'),
    (['--device', 'cuda'], 'torch sees no CUDA device'),
    (['--json', 'FILE/b.json'], '--json: cannot write'),
])
def test_benchmark_refuses_bad_arguments_before_timing(argv, match, tmp_path, monkeypatch,
                                                       capsys):
    if argv[0] == '--device' and torch.cuda.is_available():
        pytest.skip('a CUDA device is present')
    (tmp_path / 'FILE').write_bytes(b'')
    argv = [a.replace('FILE', str(tmp_path / 'FILE')) for a in argv]
    monkeypatch.setattr(sys, 'argv', ['benchmark_norms.py', *argv])
    with pytest.raises(SystemExit) as stopped:
        _tool('benchmark_norms').main()
    assert stopped.value.code == 2
    assert match in capsys.readouterr().err


def test_gpu_check_refuses_an_output_it_cannot_write_before_any_section(tmp_path, capsys):
    (tmp_path / 'FILE').write_bytes(b'')
    for out, match in ((tmp_path / 'FILE', 'is a file; give a folder'),
                       (tmp_path / 'FILE' / 'report', 'is a file, not a folder')):
        with pytest.raises(SystemExit) as stopped:
            _tool('gpu_check').main(['--device', 'cpu', '--out', str(out)])
        assert stopped.value.code == 2
        err = capsys.readouterr()
        assert match in err.err and '[gpu_check] environment' not in err.out
