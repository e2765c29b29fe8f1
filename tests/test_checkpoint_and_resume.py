# Copyright (c) mmnorm contributors. All rights reserved.
"""Checkpoints written by mmengine load again under torch's weights_only unpickler; unsafe
pickles are refused, and told apart from damaged files and files that are not checkpoints; a
resumed Runner continues with identical state; ``--resume`` finds the newest checkpoint that
loads when ``last_checkpoint`` is empty."""
import os
import pickle
import subprocess
import sys

import pytest
import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner import Runner, load_checkpoint

from mmnorm.utils import (CheckpointFileError, UnsafeCheckpointError, find_resume_checkpoint,
                          register_checkpoint_loader)
from mmnorm.utils.checkpoint import _history_buffer_getattr
from tests.helpers.toy import ToyModel, loader


# mmengine's load_checkpoint with mmnorm's loader and its errors (opt-in, as mmnorm's tools do).
register_checkpoint_loader()


def make_runner(work_dir, max_epochs, resume=False, load_from=None):
    torch.manual_seed(0)
    return Runner(
        model=ToyModel(),
        work_dir=str(work_dir),
        train_dataloader=loader(),
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.05, momentum=0.9,
                                          weight_decay=1e-4)),
        # 'end' fixed, so the schedule does not depend on max_epochs (mmengine clips it).
        param_scheduler=dict(type='MultiStepLR', milestones=[1], gamma=0.5, end=2),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1),
                           logger=dict(type='LoggerHook', interval=1)),
        randomness=dict(seed=0),
        resume=resume,
        load_from=load_from,
        experiment_name=f'exp_{os.path.basename(str(work_dir))}_{max_epochs}_{resume}',
    )


def _state(runner):
    return {k: v.detach().clone() for k, v in runner.model.state_dict().items()}


def test_resume_continues_with_identical_state(tmp_path):
    straight = make_runner(tmp_path / 'straight', max_epochs=2)
    straight.train()

    first = make_runner(tmp_path / 'split', max_epochs=1)
    first.train()
    saved_iter = first.iter
    saved_params = _state(first)
    saved_optim = first.optim_wrapper.state_dict()
    ckpt = tmp_path / 'split' / 'epoch_1.pth'
    raw = torch.load(ckpt, weights_only=True)  # the safe unpickler, explicitly
    assert {'meta', 'state_dict', 'message_hub', 'optimizer', 'param_schedulers'} <= set(raw)
    assert isinstance(raw['message_hub']['log_scalars']['train/loss'], HistoryBuffer)

    # Resume only (max_epochs reached): the restored state must equal the saved one exactly.
    restored = make_runner(tmp_path / 'split', max_epochs=1, resume=True, load_from=str(ckpt))
    restored.train()
    assert restored.iter == saved_iter == 6 and restored.epoch == 1
    for key, value in saved_params.items():
        torch.testing.assert_close(restored.model.state_dict()[key], value, rtol=0, atol=0)
    restored_optim = restored.optim_wrapper.state_dict()
    assert restored_optim['param_groups'] == saved_optim['param_groups']
    for index, state in saved_optim['state'].items():
        torch.testing.assert_close(restored_optim['state'][index]['momentum_buffer'],
                                   state['momentum_buffer'], rtol=0, atol=0)
    assert restored.param_schedulers[0].last_step == first.param_schedulers[0].last_step

    # Resume and continue: identical to the uninterrupted run.
    resumed = make_runner(tmp_path / 'split', max_epochs=2, resume=True, load_from=str(ckpt))
    resumed.train()
    assert resumed.iter == straight.iter == 12
    for key, value in _state(straight).items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=1e-6,
                                   atol=1e-7, msg=lambda m, k=key: f'{k}: {m}')


def test_load_checkpoint_under_weights_only(tmp_path):
    runner = make_runner(tmp_path, max_epochs=1)
    runner.train()
    model = ToyModel()
    checkpoint = load_checkpoint(model, str(tmp_path / 'epoch_1.pth'), map_location='cpu')
    assert 'message_hub' in checkpoint
    for key, value in runner.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)


class _RunsShell:

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}', )


class _CallsEval:

    def __reduce__(self):
        return eval, ('__import__("os").getcwd()', )


@pytest.mark.parametrize('payload', ['shell', 'eval'])
def test_malicious_pickle_is_refused(tmp_path, payload):
    marker = tmp_path / 'pwned'
    evil = _RunsShell(marker) if payload == 'shell' else _CallsEval()
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'meta': evil}, path)
    with pytest.raises(UnsafeCheckpointError, match='refused to load .*evil.pth'):
        load_checkpoint(ToyModel(), str(path), map_location='cpu')
    assert not marker.exists()


def test_restricted_getattr_refuses_everything_but_history_buffer_methods():
    assert _history_buffer_getattr(HistoryBuffer, 'mean') is HistoryBuffer.mean
    for obj, name in [(HistoryBuffer, '__init__'), (HistoryBuffer, '__class__'),
                      (os, 'system'), (HistoryBuffer, 'nonexistent')]:
        with pytest.raises(pickle.UnpicklingError):
            _history_buffer_getattr(obj, name)


def test_history_buffer_getattr_global_is_not_plain_getattr(tmp_path):
    # A pickle that uses getattr to reach os.system through an allowed class is refused.
    class Sneaky:
        def __reduce__(self):
            return getattr, (HistoryBuffer, '__init__')
    path = tmp_path / 'sneaky.pth'
    torch.save({'meta': Sneaky()}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def test_resume_in_fresh_process(tmp_path):
    """HistoryBuffer registers its statistics lazily; a fresh process must still load."""
    runner = make_runner(tmp_path, max_epochs=1)
    runner.train()
    code = ('import torch, mmnorm; '
            f'ck = torch.load({str(tmp_path / "epoch_1.pth")!r}, weights_only=True); '
            'print(sorted(ck))')
    out = subprocess.run([sys.executable, '-c', code], check=True, capture_output=True,
                         text=True, timeout=120)
    assert 'message_hub' in out.stdout


def _corrupt_one_pickle_byte(path):
    """Set the first opcode after the pickle's PROTO header to 0xff (stored uncompressed in the
    zip archive, so the archive itself stays valid)."""
    data = bytearray(open(path, 'rb').read())
    start = data.find(b'\x80\x02')
    assert start >= 0
    data[start + 2] = 0xff
    open(path, 'wb').write(bytes(data))


def test_damaged_checkpoint_is_not_called_unsafe(tmp_path):
    runner = make_runner(tmp_path, max_epochs=1)
    runner.train()
    path = str(tmp_path / 'epoch_1.pth')
    _corrupt_one_pickle_byte(path)
    with pytest.raises(CheckpointFileError, match='damaged.*Unsupported operand 255') as info:
        load_checkpoint(ToyModel(), path, map_location='cpu')
    assert not isinstance(info.value, UnsafeCheckpointError)
    assert 'arbitrary code' not in str(info.value)
    # Truncated: the archive's directory is gone.
    data = open(str(tmp_path / 'last_checkpoint')).read().strip()
    whole = open(data, 'rb').read()
    open(tmp_path / 'cut.pth', 'wb').write(whole[:len(whole) // 2])
    with pytest.raises(CheckpointFileError, match='damaged'):
        load_checkpoint(ToyModel(), str(tmp_path / 'cut.pth'), map_location='cpu')


@pytest.mark.parametrize('zip_format', [True, False])
def test_not_a_checkpoint_and_foreign_objects_are_told_apart(tmp_path, zip_format):
    text = tmp_path / 'notes.pth'
    text.write_text('these are my notes\n')
    with pytest.raises(CheckpointFileError, match='not a checkpoint written by torch.save'):
        load_checkpoint(ToyModel(), str(text), map_location='cpu')
    marker = tmp_path / 'pwned'
    evil = tmp_path / 'evil.pth'
    torch.save({'meta': _RunsShell(marker)}, evil, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UnsafeCheckpointError, match='system'):
        load_checkpoint(ToyModel(), str(evil), map_location='cpu')
    assert not marker.exists()
    # A damaged legacy (non-zip) file is damaged, not unsafe.
    good = tmp_path / 'good.pth'
    torch.save({'w': torch.ones(2)}, good, _use_new_zipfile_serialization=zip_format)
    _corrupt_one_pickle_byte(good)
    with pytest.raises(CheckpointFileError, match='damaged'):
        load_checkpoint(ToyModel(), str(good), map_location='cpu')


def test_find_resume_checkpoint_skips_empty_pointer_and_damaged_files(tmp_path):
    runner = make_runner(tmp_path, max_epochs=3)
    runner.train()
    (tmp_path / 'last_checkpoint').write_text('')  # killed while rewriting it
    _corrupt_one_pickle_byte(str(tmp_path / 'epoch_3.pth'))  # killed while saving
    messages = []
    found = find_resume_checkpoint(str(tmp_path), log=messages.append)
    assert found == str(tmp_path / 'epoch_2.pth')
    assert any('is empty' in m for m in messages)
    assert any('epoch_3.pth' in m and 'damaged' in m for m in messages)
    assert messages[-1].startswith(f'resuming from {found}')
    # An intact pointer is used as it is, silently.
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'epoch_1.pth'))
    messages.clear()
    assert find_resume_checkpoint(str(tmp_path), log=messages.append).endswith('epoch_1.pth')
    assert messages == []
    # Nothing loadable: None (a fresh start), said so.
    empty = tmp_path / 'empty'
    empty.mkdir()
    assert find_resume_checkpoint(str(empty), log=messages.append) is None
    assert 'starts from the beginning' in messages[-1]


def test_train_tool_resumes_after_empty_last_checkpoint(tmp_path, capsys):
    import os.path as osp

    from tests.conftest import ROOT
    from tests.helpers.images import make_class_folders
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    import train
    config = osp.join(ROOT, 'tests', 'data', 'configs', 'tiny_classifier.py')
    data = make_class_folders(str(tmp_path / 'data'))
    options = [f'{s}_dataloader.dataset.data_root={data}' for s in ('train', 'val', 'test')]
    work = tmp_path / 'work'
    train.main([config, '--work-dir', str(work), '--cfg-options', *options])
    assert (work / 'iter_4.pth').exists()
    (work / 'last_checkpoint').write_text('')
    runner = train.main([config, '--work-dir', str(work), '--resume', '--cfg-options', *options,
                         'train_cfg.max_iters=6'])
    out = capsys.readouterr().out
    assert f'resuming from {work / "iter_4.pth"}' in out
    assert runner.iter == 6 and (work / 'iter_6.pth').exists()
