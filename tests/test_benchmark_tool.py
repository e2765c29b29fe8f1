# Copyright (c) mmnorm contributors. All rights reserved.
"""tools/analysis/benchmark.py (model inference over the test pipeline, ratios to native-layer
baselines in one run), its baseline configs and the interleaved timer it shares with
tools/benchmark_norms.py. Tiny runs: what is checked is what is timed and reported, not speed."""
import json
import os.path as osp
import sys

import pytest
import torch
from mmengine.config import Config

from mmnorm.layers import BatchStatsNorm, WSConv2d
from mmnorm.utils.config import plain_layers_config
from mmnorm.utils.model import build_model
from mmnorm.utils.timing import time_rounds
from tests.conftest import ROOT

SEG_DEMO = osp.join(ROOT, 'configs', 'demo', 'deeplabv2_r18-tiny-d8_sn_demo.py')


@pytest.fixture(scope='module')
def benchmark():
    sys.path.insert(0, osp.join(ROOT, 'tools', 'analysis'))
    import benchmark
    return benchmark


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    from tests.helpers.tiny_data import make_shapes
    return make_shapes(str(tmp_path_factory.mktemp('bench') / 'shapes'), num_train=1, num_val=2)


def _options(root):
    return ['--cfg-options', f'test_dataloader.dataset.data_root={root}',
            'test_dataloader.num_workers=0', 'test_dataloader.persistent_workers=False']


def test_benchmark_times_every_form_against_the_baselines(benchmark, shapes, tmp_path, capsys):
    out = tmp_path / 'bench.json'
    results = benchmark.main([SEG_DEMO, '--baselines', 'BN', 'GN:16', '--num-images', '2',
                              '--rounds', '2', '--warmup', '1', '--json', str(out),
                              *_options(shapes)])
    assert list(results) == ['soft', 'hard', 'deploy', 'BN', 'GN:16']
    assert results['BN']['ratio'] == 1.0  # the first baseline is the reference
    for r in results.values():
        assert r['images_per_s'] > 0 and r['ms_per_image'] * r['images_per_s'] == \
            pytest.approx(1e3)
    printed = capsys.readouterr().out
    assert '2 test images in batches of 1' in printed and 'x BN' in printed
    assert 'no checkpoint' in printed
    saved = json.loads(out.read_text())
    assert saved['reference'] == 'BN' and saved['images'] == 2


def test_benchmark_errors(benchmark, shapes):
    with pytest.raises(SystemExit, match="unknown baseline 'LN'"):
        benchmark.main([SEG_DEMO, '--baselines', 'LN', *_options(shapes)])
    with pytest.raises(SystemExit, match=r"unknown baseline 'GN:0'.*groups > 0"):
        benchmark.main([SEG_DEMO, '--baselines', 'GN:0', *_options(shapes)])
    with pytest.raises(SystemExit, match='no CUDA device'):
        if benchmark.torch.cuda.is_available():
            pytest.skip('this machine has CUDA')
        benchmark.main([SEG_DEMO, '--device', 'cuda', *_options(shapes)])
    with pytest.raises(SystemExit, match="cannot read the config's test data"):
        benchmark.main([SEG_DEMO, *_options('/nonexistent/')])


def test_baseline_config_has_no_mmnorm_layers():
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'demo',
                                   'mask-rcnn_r18-tiny_fpn_bcn-ws_demo.py'))
    before = build_model(cfg)
    assert any(isinstance(m, BatchStatsNorm) for m in before.modules())
    assert any(isinstance(m, WSConv2d) for m in before.modules())
    assert plain_layers_config(cfg.model, dict(type='GN', num_groups=16)) > 0
    model = build_model(cfg)
    assert not any(isinstance(m, (BatchStatsNorm, WSConv2d)) for m in model.modules())
    assert sum(type(m).__name__ == 'GroupNorm' for m in model.modules()) == \
        sum(isinstance(m, BatchStatsNorm) for m in before.modules())


def test_time_rounds_synchronizes_around_every_timed_call_and_warms_up():
    calls = []
    fns = {'a': lambda: calls.append('a'), 'b': lambda: calls.append('b')}
    timings = time_rounds(fns, rounds=3, inner=2, reference='a',
                          synchronize=lambda: calls.append('sync'), warmup=2)
    assert calls[:4] == ['a', 'a', 'b', 'b']  # warm-up first, not timed
    timed = calls[4:]
    assert len(timed) == 3 * 2 * (2 + 2)  # per round and function: sync, 2 calls, sync
    for start in range(0, len(timed), 4):
        block = timed[start:start + 4]
        assert block[0] == block[3] == 'sync' and block[1] == block[2] != 'sync'
    assert timings['a'][1] == 1.0


def test_cuda_events_time_the_benchmarked_devices_stream(monkeypatch):
    """On a CUDA device the events are recorded in that device's stream: ``Event.record()``
    alone takes the current device's, and on a second GPU (``--device cuda:1``) would time an
    empty stream. No GPU here: the CUDA calls are stand-ins that record what they get."""
    from mmnorm.utils import timing
    recorded = []

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self, stream=None):
            recorded.append(stream)

        def elapsed_time(self, end):
            return 1.0

    monkeypatch.setattr(torch.cuda, 'Event', Event)
    monkeypatch.setattr(torch.cuda, 'current_stream', lambda device=None: ('stream', device))
    monkeypatch.setattr(torch.cuda, 'synchronize', lambda device=None: None)
    samples = timing.sample_rounds({'a': lambda: None, 'b': lambda: None}, rounds=2, inner=1,
                                   warmup=0, device='cuda:1')
    assert samples == {'a': [1.0, 1.0], 'b': [1.0, 1.0]}
    assert recorded == [('stream', 'cuda:1')] * 8
