# Copyright (c) mmnorm contributors. All rights reserved.
"""Bad arguments to the functional forms, setters and checkpoints get an error that names the
argument and what it should be (instead of an IndexError or AttributeError from deep inside, or
a silently wrong result), where ``F.batch_norm`` and ``nn.Module.load_state_dict`` refuse the
same kind of mistake."""
import numpy as np
import pytest
import torch

from mmcv.cnn import build_norm_layer

import mmnorm.functional as MF
from mmnorm import BatchChannelNorm, SparseSwitchableNorm, WSConv2d
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


# A config's flag given as a string is true to Python: using_bn='False' built a layer *with* BN.
FLAG_CASES = [
    ('SN', dict(using_bn='False'), 'using_bn'), ('SN', dict(in_unbiased='False'), 'in_unbiased'),
    ('SN', dict(affine='no'), 'affine'), ('SSN', dict(track_running_stats='0'),
                                           'track_running_stats'),
    ('BCN', dict(num_groups=2, estimate='yes'), 'estimate'),
    ('BCN', dict(num_groups=2, affine=None), 'affine'),
]


@pytest.mark.parametrize('norm, options, name', FLAG_CASES)
def test_flags_that_are_not_booleans_are_refused(norm, options, name):
    with pytest.raises(TypeError, match=f'{name} must be True or False'):
        build_norm_layer(dict(type=norm, **options), 4)


def test_flags_given_as_zero_and_one_and_numpy_integers_are_taken():
    layer = build_norm_layer(dict(type='SN', using_bn=0, affine=np.True_), np.int64(4))[1]
    assert layer.normalizers == ('IN', 'LN') and layer.weight is not None
    assert layer.using_bn is False and type(layer.num_features) is int
    bcn = build_norm_layer(dict(type='BCN', num_groups=np.int32(2), estimate=1), 4)[1]
    assert bcn.estimated and bcn.num_groups == 2 and type(bcn.num_groups) is int
    grouped = build_norm_layer(dict(type='SN', ratio_groups=np.int64(2)), 4)[1]
    assert grouped.mean_logits.shape == (2, 3)


@pytest.mark.parametrize('build, error, message', [
    (lambda: build_norm_layer(dict(type='SN', momentum=True), 4), TypeError,
     'momentum must be a number'),
    (lambda: build_norm_layer(dict(type='BCN', num_groups=2, momentum='0.1'), 4), TypeError,
     'momentum must be a number'),
    (lambda: build_norm_layer(dict(type='SSN', eps='1e-5'), 4), TypeError,
     'eps must be a number'),
    (lambda: build_norm_layer(dict(type='SN', eps=None), 4), TypeError, 'eps must be a number'),
    (lambda: WSConv2d(3, 4, 3, eps='a'), TypeError, 'WSConv: eps must be a number'),
    (lambda: build_norm_layer(dict(type='SN'), 4.0), ValueError,
     'num_features must be a positive int'),
    (lambda: build_norm_layer(dict(type='BCN', num_groups=2.0), 4), ValueError,
     'num_groups must be a positive int'),
    (lambda: MF.switchable_norm(X, [0., 0., 0.], [0., 0., 0.]), TypeError,
     'mean_logits must be a floating-point tensor'),
    (lambda: MF.switchable_norm(X, torch.zeros(3, dtype=torch.long),
                                torch.zeros(3, dtype=torch.long)), TypeError,
     'mean_logits must be a floating-point tensor'),
    (lambda: MF.sparse_switchable_norm(X, [1., 1., 1.], [1., 1., 1.], 0.3), TypeError,
     'mean_scores must be a floating-point tensor'),
    (lambda: MF.switchable_norm(X, LOGITS, LOGITS, training='False'), TypeError,
     'training must be True or False'),
    (lambda: MF.batch_channel_norm(X, 2, training='no'), TypeError,
     'training must be True or False'),
    (lambda: MF.sparse_switchable_norm(X, torch.ones(3), torch.ones(3), 0.3, fix_choices='yes'),
     TypeError, 'fix_choices must be True or False'),
])
def test_arguments_of_the_wrong_kind_are_named(build, error, message):
    with pytest.raises(error, match=message):
        build()


@pytest.mark.parametrize('convert', ['half', 'bfloat16', 'to'])
def test_converting_a_layer_keeps_the_radius_and_the_rate_exact(convert):
    """``.half()`` / ``.bfloat16()`` / ``.to(dtype)`` convert every floating-point buffer: SSN's
    radius and estimated BCN's rate stay in float32, as a layer built with ``dtype=`` keeps them
    (in float16 a rate of 1e-8 became 0; in bfloat16 a radius of 0.999 became 1, one-hot)."""
    ssn, bcn = SparseSwitchableNorm(4), BatchChannelNorm(4, num_groups=2, estimate=True)
    ssn.set_progress(0.999)
    bcn.set_estimate_rate(1e-8)
    for layer in (ssn, bcn):
        if convert == 'to':
            layer.to(torch.float16)
        else:
            getattr(layer, convert)()
        assert layer.weight.dtype == layer.running_mean.dtype != torch.float32
    assert ssn.radius.dtype == bcn.estimate_rate.dtype == torch.float32
    assert ssn.radius.item() == torch.tensor(0.999).item()
    assert bcn.estimate_rate.item() == torch.tensor(1e-8).item()
    ssn.double()  # back to a full-precision dtype: that dtype, as the constructor's
    assert ssn.radius.dtype == torch.float64 and ssn.radius.item() == torch.tensor(0.999).item()
    assert SparseSwitchableNorm(4, device='meta').half().radius.dtype == torch.float32
