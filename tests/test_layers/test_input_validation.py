# Copyright (c) mmnorm contributors. All rights reserved.
"""Bad arguments to the functional forms, setters and checkpoints get an error that names the
argument and what it should be (instead of an IndexError or AttributeError from deep inside, or
a silently wrong result), where ``F.batch_norm`` and ``nn.Module.load_state_dict`` refuse the
same kind of mistake."""
import numpy as np
import pytest
import torch

import mmnorm.functional as MF
from mmnorm import BatchChannelNorm, SparseSwitchableNorm
from mmnorm.functional.weight_std import standardize_weight

X = torch.randn(2, 4, 3, 3)
ZEROS, ONES, LOGITS = torch.zeros(4), torch.ones(4), torch.zeros(3)

CASES = {
    'running_mean without running_var': (
        lambda: MF.switchable_norm(X, LOGITS, LOGITS, running_mean=ZEROS),
        ValueError, 'running_mean and running_var must both be given'),
    'running_var without running_mean, eval': (
        lambda: MF.switchable_norm(X, LOGITS, LOGITS, running_var=ONES, training=False),
        ValueError, 'running_mean and running_var must both be given'),
    'BCN running_mean alone': (
        lambda: MF.batch_channel_norm(X, 2, running_mean=ZEROS),
        ValueError, 'running_mean and running_var must both be given'),
    'momentum None where running statistics move': (
        lambda: MF.switchable_norm(X, LOGITS, LOGITS, running_mean=ZEROS.clone(),
                                   running_var=ONES.clone(), momentum=None),
        TypeError, 'momentum must be a number'),
    'momentum 2': (
        lambda: MF.batch_channel_norm(X, 2, running_mean=ZEROS.clone(),
                                      running_var=ONES.clone(), momentum=2.0),
        ValueError, r'momentum must be in \[0, 1\]'),
    'choice out of range': (
        lambda: MF.sparse_switchable_norm(X, torch.ones(3), torch.ones(3), 0.5,
                                          mean_choice=torch.tensor(5)),
        ValueError, 'mean_choice must hold -1'),
    'choice below -1': (
        lambda: MF.sparse_switchable_norm(X, torch.ones(3), torch.ones(3), 0.5,
                                          var_choice=torch.tensor(-3)),
        ValueError, 'var_choice must hold -1'),
    'float choice': (
        lambda: MF.sparse_switchable_norm(X, torch.ones(3), torch.ones(3), 0.5,
                                          mean_choice=torch.tensor(1.0)),
        TypeError, 'mean_choice must be an integer tensor'),
    'choice of the wrong shape': (
        lambda: MF.sparse_switchable_norm(X, torch.ones(2, 3), torch.ones(2, 3), 0.5,
                                          mean_choice=torch.tensor(-1)),
        ValueError, r'mean_choice must have shape \(2,\)'),
    'sparsestmax of a 0-dim tensor': (
        lambda: MF.sparsestmax(torch.tensor(0.2), 0.3), ValueError, 'shaped'),
    'sparsestmax of nothing': (
        lambda: MF.sparsestmax(torch.zeros(0), 0.3), ValueError, 'K >= 1'),
    'sparsestmax of integers': (
        lambda: MF.sparsestmax(torch.ones(3, dtype=torch.long), 0.3), TypeError,
        'floating point'),
    'negative radius': (
        lambda: MF.sparsestmax(torch.ones(3), -1.0), ValueError, r'radius must be in \[0, 1\]'),
    'one radius per entry': (
        lambda: MF.sparsestmax(torch.ones(3), torch.tensor([0.1, 0.2, 0.3])), ValueError,
        r'broadcastable to \(\.\.\., 1\)'),
    'a rate per channel': (
        lambda: MF.batch_channel_norm(X, 2, running_mean=ZEROS.clone(),
                                      running_var=ONES.clone(), estimate=True,
                                      rate=torch.full((4, ), 0.1)),
        ValueError, 'one-element tensor'),
    'negative eps of weight standardization': (
        lambda: standardize_weight(torch.randn(4, 3, 3, 3), eps=-1), ValueError, 'eps'),
    'a radius that is no number': (
        lambda: SparseSwitchableNorm(4).set_progress('half'), TypeError, 'must be a number'),
}


@pytest.mark.parametrize('case', list(CASES))
def test_refused_with_a_message(case):
    call, error, message = CASES[case]
    with pytest.raises(error, match=message):
        call()


def test_one_hot_radius_per_vector_and_one_element_tensors_are_accepted():
    rows = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.3, 0.5]])
    per_row = MF.sparsestmax(rows, torch.tensor([[0.0], [1.0]]))
    torch.testing.assert_close(per_row[0], MF.sparsestmax(rows[0], 0.0))
    torch.testing.assert_close(per_row[1], MF.sparsestmax(rows[1], 1.0))
    layer = SparseSwitchableNorm(4)
    layer.set_progress(torch.tensor([0.5]))
    assert float(layer.radius) == 0.5
    layer.set_progress(np.float32(0.75))  # (a hook's value may be a NumPy scalar)
    assert float(layer.radius) == 0.75
    bcn = BatchChannelNorm(4, num_groups=2, estimate=True)
    bcn.set_estimate_rate(torch.tensor([0.25]))
    assert float(bcn.estimate_rate) == 0.25


@pytest.mark.parametrize('key, value, message', [
    ('mean_choice', torch.tensor(5), 'mean_choice: a fixed choice must be -1'),
    ('var_choice', torch.tensor(-3), 'var_choice: a fixed choice must be -1'),
    ('mean_choice', torch.tensor(1.0), 'mean_choice: a fixed choice'),
    ('radius', torch.tensor(5.0), r'radius must be in \[0, 1\]'),
    ('radius', torch.tensor(float('nan')), r'radius must be in \[0, 1\]'),
])
def test_checkpoint_with_impossible_ssn_state_is_refused(key, value, message):
    source = SparseSwitchableNorm(4)
    with torch.no_grad():
        source.weight.fill_(3.0)
    state = source.state_dict()
    state[key] = value
    layer = SparseSwitchableNorm(4)
    layer.set_progress(0.25)
    before = layer.state_dict()[key].clone()
    with pytest.raises(RuntimeError, match=message):
        layer.load_state_dict(state)
    assert torch.equal(layer.state_dict()[key], before)  # the impossible value is not copied
    assert (layer.weight == 3.0).all()  # the rest loads, as with a wrong shape
    valid = dict(state, **{key: torch.tensor(2 if 'choice' in key else 0.5)})
    SparseSwitchableNorm(4).load_state_dict(valid)  # the same checkpoint with a possible value
