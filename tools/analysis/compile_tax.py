# Copyright (c) mmnorm contributors. All rights reserved.
"""What compiling mmnorm's layers costs a short job: the same short job in each form of
``MMNORM_COMPILE``, each in a fresh process, as times and ratios to the first mode's (the eager
forms, ``never``, the default).

    python tools/analysis/compile_tax.py [--modes never auto always] [--cold]
        [--job short | multi-scale]

The short job is what mmdet's backbone and neck unit tests do (``tests/test_models/
test_backbones/{test_resnet, test_renext, test_res2net, test_regnet, test_resnest,
test_mobilenet_v2, test_csp_darknet}.py``, ``test_necks``): build mmdet's backbones in their
tested variants and run a few small forwards in training and eval mode, with every BN name of
the registry (``BN``, ``BN1d``, ``BN2d``, ``BN3d``, ``SyncBN``) built as mmnorm's SN, the way a
user who swaps BN for SN in a codebase's test suite or a one-off evaluation runs it.
``--job multi-scale`` runs 40 random ``(N, C, H, W)`` inputs (N = 1 and H or W = 1 among them)
through SN, SN_tied, SSN, BCN and estimated BCN in training and eval: the graphs multi-scale
training compiles. ``--cold`` gives each process an empty Inductor cache (a first run on a
machine); without it the cache of earlier runs is used (a later run).

The jobs run outside a Runner: ``auto`` has no ``CompiledFormHook`` to switch it to the compiled
form at a training iteration, so it runs as ``never`` (the row shows it: no graph, no compiled
call).
"""
import argparse
import json
import os
import os.path as osp
import subprocess
import sys
import tempfile
import time

ROOT = osp.abspath(osp.join(osp.dirname(__file__), '..', '..'))


def short_job() -> dict:
    """The workload (run inside the measured process)."""
    sys.path.insert(0, ROOT)
    import torch
    from mmengine.registry import MODELS

    import mmnorm  # noqa: F401
    from mmnorm import SwitchableNorm
    import mmdet.models  # noqa: F401
    from mmdet.models import backbones, necks
    for name in ('BN', 'BN1d', 'BN2d', 'BN3d', 'SyncBN'):
        MODELS._module_dict[name] = SwitchableNorm
    torch.manual_seed(0)
    start = time.perf_counter()
    builds = [
        lambda: backbones.ResNet(18), lambda: backbones.ResNet(50, base_channels=1),
        lambda: backbones.ResNet(50, base_channels=2, frozen_stages=1),
        lambda: backbones.ResNetV1d(depth=50, base_channels=2),
        lambda: backbones.ResNet(18, with_cp=True), lambda: backbones.ResNet(18, norm_eval=True),
        lambda: backbones.ResNeXt(depth=50, groups=32, base_width=4),
        lambda: backbones.Res2Net(depth=50, scales=4, base_width=26),
        lambda: backbones.RegNet('regnetx_400mf'), lambda: backbones.RegNet('regnetx_800mf'),
        lambda: backbones.ResNeSt(depth=50, radix=2, reduction_factor=4, base_channels=4),
        lambda: backbones.MobileNetV2(), lambda: backbones.MobileNetV2(widen_factor=0.5),
        lambda: backbones.CSPDarknet(deepen_factor=0.33, widen_factor=0.25),
        lambda: backbones.CSPDarknet(arch='P6', deepen_factor=0.33, widen_factor=0.25),
    ]
    calls = 0
    for build in builds:
        model = build()
        for size, train in ((32, True), (64, True), (32, False)):
            model.train(train)
            with torch.set_grad_enabled(train):
                features = model(torch.randn(1 if train else 2, 3, size, size))
                if train:
                    sum(f.float().mean() for f in features).backward()
            calls += 1
    neck = necks.FPN([64, 128, 256, 512], 64, 4, norm_cfg=dict(type='BN'))
    for size in (8, 16):
        neck([torch.randn(1, c, size // 2**i, size // 2**i)
              for i, c in enumerate([64, 128, 256, 512])])
    return _result(start)


def multi_scale_job() -> dict:
    """Multi-scale use: 40 random ``(N, C, H, W)`` inputs through 5 layer kinds, each in
    training (forward and backward) and eval."""
    sys.path.insert(0, ROOT)
    import random

    import torch

    from mmnorm import (BatchChannelNorm, SparseSwitchableNorm, SwitchableNorm,
                        SwitchableNormTied)
    rng = random.Random(0)
    kinds = [SwitchableNorm, SwitchableNormTied, SparseSwitchableNorm,
             lambda c: BatchChannelNorm(c, num_groups=8),
             lambda c: BatchChannelNorm(c, num_groups=8, estimate=True)]
    start = time.perf_counter()
    for _ in range(40):
        n, c = rng.choice([1, 2, 4, 8]), rng.choice([16, 32, 64, 128, 256])
        h, w = rng.randint(1, 40), rng.randint(1, 40)
        for kind in kinds:
            layer = kind(c)
            x = torch.randn(n, c, h, w, requires_grad=True)
            layer(x).sum().backward()
            layer.eval()
            with torch.no_grad():
                layer(x)
    return _result(start)


def _result(start: float) -> dict:
    """The job's time, the graphs compiled and the calls that ran compiled (per kind)."""
    from mmnorm.functional import compiled
    return {'seconds': time.perf_counter() - start, 'graphs': compiled.COMPILED.graphs,
            'mode': compiled.compile_mode(), 'compiled_calls': compiled.COMPILED.compiled_calls,
            'calls': compiled.COMPILED.calls, 'failed': compiled.COMPILED.failed}


def measure(mode: str, cold: bool, job: str) -> dict:
    env = dict(os.environ, MMNORM_COMPILE=mode)
    # (a cold cache is a fresh folder, removed with what the job compiled into it)
    cache = (tempfile.TemporaryDirectory(prefix='inductor-', ignore_cleanup_errors=True)
             if cold else None)
    if cache:
        env['TORCHINDUCTOR_CACHE_DIR'] = cache.name
    # Each job runs for seconds to minutes with its output captured: say what runs.
    print(f'[compile_tax] MMNORM_COMPILE={mode}: the {job} job in a new process'
          f'{" with an empty Inductor cache" if cold else ""} ...', file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, __file__, '--job', job, '--inner'], env=env,
                             capture_output=True, text=True)
    finally:
        if cache:
            cache.cleanup()
    if out.returncode:
        raise SystemExit(f'the {job} job failed in mode {mode}:\n{out.stderr[-3000:]}')
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result['process_seconds'] = time.perf_counter() - start
    print(f'[compile_tax] MMNORM_COMPILE={mode}: done in {result["process_seconds"]:.1f} s',
          file=sys.stderr, flush=True)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--modes', nargs='+', default=['never', 'auto', 'always'])
    parser.add_argument('--cold', action='store_true', help='empty Inductor cache per process')
    parser.add_argument('--job', choices=('short', 'multi-scale'), default='short',
                        help='the mmdet short job (default) or the multi-scale layer job')
    parser.add_argument('--inner', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner:
        print(json.dumps(short_job() if args.job == 'short' else multi_scale_job()))
        return {}
    results = {mode: measure(mode, args.cold, args.job) for mode in args.modes}
    reference = results[args.modes[0]]['seconds']
    what = ('short job (mmdet backbones and FPN, BN built as SN)' if args.job == 'short' else
            'multi-scale job (40 random (N, C, H, W), 5 layer kinds, training and eval)')
    print(f'{what}, {"cold" if args.cold else "warm"} Inductor cache')
    print(f'{"MMNORM_COMPILE":<15} {"job s":>8} {"process s":>10} {"graphs":>7} '
          f'{"compiled calls":>15} {"x " + args.modes[0]:>9}')
    for mode, r in results.items():
        print(f'{mode:<15} {r["seconds"]:>8.1f} {r["process_seconds"]:>10.1f} '
              f'{r["graphs"]:>7} {r["compiled_calls"]:>15} {r["seconds"] / reference:>9.2f}'
              + (f'  (fell back: {r["failed"]})' if r['failed'] else ''))
    return results


if __name__ == '__main__':
    main()
