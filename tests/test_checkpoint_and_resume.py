# Copyright (c) mmnorm contributors. All rights reserved.
"""Checkpoints written by mmengine load again under torch's weights_only unpickler; unsafe
pickles are refused; a resumed Runner continues with identical state."""
import os
import pickle
import subprocess
import sys

import pytest
import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner import Runner, load_checkpoint

from mmnorm.utils import UnsafeCheckpointError
from mmnorm.utils.checkpoint import _history_buffer_getattr
from tests.helpers.toy import ToyModel, loader


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
