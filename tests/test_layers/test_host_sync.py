# Copyright (c) mmnorm contributors. All rights reserved.
"""No host-device synchronization in any forward or backward of the layers (on a GPU, a sync
stalls the launch queue every layer): training steps, eval with moving and batch-average
statistics, on every available device (mmnorm/testing/host_sync.py says how the CPU checks)."""
import pytest
import torch

from mmnorm import SwitchableNorm, WSConv2d
from mmnorm.testing.host_sync import HostSyncError, no_host_sync
from mmnorm.testing.layers import LAYERS, batches, make_layer, train_steps
from tests.conftest import logged


def test_the_detector_catches_a_sync(device):
    """The check itself: reading a value back is caught."""
    x = torch.ones(3, device=device)
    with pytest.raises((HostSyncError, RuntimeError)), no_host_sync(device):
        bool(x.sum() > 0)


@pytest.mark.parametrize('name', list(LAYERS))
def test_training_step_and_eval_do_not_sync(name, device):
    layer = make_layer(name, device=device)
    x, grad = (t.to(device) for t in batches(2))
    x.requires_grad_()
    with no_host_sync(device):
        y = layer(x)
        y.backward(grad)
    # Entering eval mode from training reads SSN's choices once (is every one fixed? then its
    # eval forwards take the one-hot ratios, test_trained_ssn_eval.py); never a forward.
    layer.eval()
    with no_host_sync(device):
        layer.eval()  # again, nothing changed: a teacher put in eval every iteration
        with torch.no_grad():
            layer(x)
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize('trained', [False, True])
def test_iterations_in_eval_mode_do_not_sync(trained, device):
    """``norm_eval=True`` under mmengine's IterBasedTrainLoop: ``model.train()`` every
    iteration, then the layer back in ``.eval()``, a step with gradients. SSN reads its choices
    on ``.eval()`` only when they changed (a training step writes them; these steps do not)."""
    layer = make_layer('SSN', device=device)
    x, grad = (t.to(device) for t in batches(2))
    if trained:
        with torch.no_grad():
            layer.mean_choice.fill_(1)
            layer.var_choice.fill_(0)
    layer.eval()  # the first check reads
    with no_host_sync(device):
        for _ in range(3):
            layer.train()
            layer.eval()
            layer(x.requires_grad_()).backward(grad)
            with torch.no_grad():
                layer(x)
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize('momentum', [0.1, None])
def test_batch_average_eval_does_not_sync(momentum, device, mmnorm_log):
    """Eval of an ``eval_stats='batch_average'`` layer checks whether its statistics are
    recomputed on the host (it warned through ``bool(stats_ready)`` of a device tensor)."""
    layer = SwitchableNorm(8, eval_stats='batch_average', momentum=momentum).to(device)
    train_steps(layer)
    layer.mark_stats_ready(True)
    layer.eval()
    with no_host_sync(device), torch.no_grad():
        layer(batches(1)[0].to(device))
    layer.train()
    with no_host_sync(device):  # a training step (cumulative average: a tensor momentum)
        layer(batches(1)[0].to(device))
    layer.eval()
    assert not logged(mmnorm_log, 'not recomputed')
    with no_host_sync(device), torch.no_grad():
        layer(batches(1)[0].to(device))  # stale after training: warned from the host copy
    assert len(logged(mmnorm_log, 'not recomputed')) == 1


def test_host_copy_follows_loading(mmnorm_log):
    """The host copy is read back from a loaded checkpoint (no sync in the forward after)."""
    source = SwitchableNorm(8, eval_stats='batch_average')
    source.mark_stats_ready(True)
    layer = SwitchableNorm(8, eval_stats='batch_average')
    layer.load_state_dict(source.state_dict())
    layer.eval()
    layer(batches(1)[0])
    assert not logged(mmnorm_log, 'not recomputed')  # the loaded statistics are fresh
    layer.mark_stats_ready(False)
    assert not bool(layer.stats_ready)


def test_ws_conv_does_not_sync(device):
    conv = WSConv2d(8, 4, 3, padding=1).to(device)
    x = batches(1)[0].to(device).requires_grad_()
    with no_host_sync(device):
        conv(x).sum().backward()
