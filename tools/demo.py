# Copyright (c) mmnorm contributors. All rights reserved.
"""The embedded demo: train a detector (or a segmenter) whose normalizers are switchable, on a
dataset mmnorm generates, evaluate it with the standard metrics and look at what SN learned.

    python tools/demo.py                      # Mask R-CNN with SN, ~15 min of training on 2 cores
    python tools/demo.py --norm BN            # the same with BN (also: SN_tied, SSN, BCN-WS, GN)
    python tools/demo.py --norm SSN-G16       # group-wise ratios: SN-G4, SN-G16, SSN-G4, SSN-G16
    python tools/demo.py --quick              # a smoke run of about a minute
    python tools/demo.py --task seg           # DeepLabv2 with SN, mIoU

Steps: (1) generate the shapes dataset under --data-root if absent; (2) train with
tools/train.py; (3) recompute batch-average statistics with tools/recompute_stats.py; (4) evaluate
with tools/test.py (COCO bbox/segm mAP, or mIoU); (5) plot the learned SN ratios; (6) draw
predictions on a few validation images; then print where everything is. Everything goes to
--work-dir (default work_dirs/demo or work_dirs/demo-seg).
"""
import argparse
import json
import os
import os.path as osp
import shutil
import subprocess
import sys
import time
import warnings

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIGS = {
    'det': {
        'SN': 'configs/demo/mask-rcnn_r18-tiny_fpn_sn_demo.py',
        'SN_tied': 'configs/demo/mask-rcnn_r18-tiny_fpn_sn-tied_demo.py',
        'SSN': 'configs/demo/mask-rcnn_r18-tiny_fpn_ssn_demo.py',
        # group-wise ratios (ratio_groups=4 or 16: one ratio vector per group of channels)
        'SN-G4': 'configs/demo/mask-rcnn_r18-tiny_fpn_sn-g4_demo.py',
        'SN-G16': 'configs/demo/mask-rcnn_r18-tiny_fpn_sn-g16_demo.py',
        'SSN-G4': 'configs/demo/mask-rcnn_r18-tiny_fpn_ssn-g4_demo.py',
        'SSN-G16': 'configs/demo/mask-rcnn_r18-tiny_fpn_ssn-g16_demo.py',
        'BCN-WS': 'configs/demo/mask-rcnn_r18-tiny_fpn_bcn-ws_demo.py',
        'GN': 'configs/demo/mask-rcnn_r18-tiny_fpn_gn_demo.py',
        'BN': 'configs/demo/mask-rcnn_r18-tiny_fpn_bn_demo.py',
    },
    'seg': {
        'SN': 'configs/demo/deeplabv2_r18-tiny-d8_sn_demo.py',
    },
}
#: The normalizers that mix others by learned ratios (their ratios are plotted).
RATIO_NORMS = ('SN', 'SN_tied', 'SSN', 'SN-G4', 'SN-G16', 'SSN-G4', 'SSN-G16')
#: --quick: a smoke run (not a result).
QUICK = dict(num_train=60, num_val=20, iters=40, stats_iters=5)


def say(message: str) -> None:
    print(f'[demo] {message}', flush=True)


def run(step: str, args: list, log_path: str = None) -> None:
    """Run a tool, streaming its output (and keeping it in ``log_path``)."""
    say(step)
    start = time.time()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    with subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        log = open(log_path, 'w') if log_path else None
        try:
            for line in proc.stdout:
                if log:
                    log.write(line)
                if _worth_showing(line):
                    print('   ' + line.rstrip()[:240], flush=True)
        finally:
            if log:
                log.close()
    if proc.returncode != 0:
        raise SystemExit(f'[demo] step failed ({step}); see the output above'
                         + (f' and {log_path}' if log_path else ''))
    say(f'  done in {time.time() - start:.0f} s')


def _worth_showing(line: str) -> bool:
    """Progress and results, not the environment report or the config dump."""
    if ' - mmengine - ' in line:
        return any(k in line for k in (
            'Iter(train)', 'Iter(val)', 'Iter(test)', 'BatchAverageStatsHook:', 'recomputed',
            'Saving checkpoint', 'mAP_copypaste', 'mIoU', 'ERROR', 'Error'))
    stripped = line.strip()
    return (stripped.startswith(('Traceback', 'recomputed', 'wrote', 'hard ratios',
                                 'mean divergence', 'layers whose', 'groups whose',
                                 'metrics written', '|',
                                 '+-', 'File "', 'raise', 'SystemExit'))
            or 'Average Precision' in line or 'Error:' in line)


def ensure_data(data_root: str, quick: bool, args) -> None:
    from mmnorm.demo import DEFAULTS, generate_demo_data
    wanted = dict(DEFAULTS, num_train=args.num_train, num_val=args.num_val)
    if quick:
        wanted.update(num_train=QUICK['num_train'], num_val=QUICK['num_val'])
    meta_path = osp.join(data_root, 'meta.json')
    if osp.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if all(meta.get(k) == v for k, v in wanted.items()):
            say(f'step 1/6: dataset found in {data_root} ({meta["objects"]} objects)')
            return
        say(f'step 1/6: {data_root} holds another version of the dataset; regenerating')
        for sub in ('images', 'seg_labels', 'annotations'):
            shutil.rmtree(osp.join(data_root, sub), ignore_errors=True)
    else:
        say(f'step 1/6: generating the shapes dataset in {data_root}')
    start = time.time()
    total = wanted['num_train'] + wanted['num_val']

    def progress(done, _):
        if done % max(1, total // 10) == 0 or done == total:
            say(f'  {done}/{total} images')

    objects = generate_demo_data(data_root, progress=progress, **{
        k: wanted[k] for k in ('num_train', 'num_val', 'image_size', 'min_size', 'max_size',
                               'max_objects', 'min_visible', 'seed')})
    say(f'  {objects} objects in {time.time() - start:.0f} s')


def draw_predictions(config: str, checkpoint: str, data_root: str, out_dir: str, task: str,
                     count: int = 4) -> list:
    """Draw the model's predictions on the first ``count`` validation images."""
    import mmcv
    from mmengine.config import Config
    os.makedirs(out_dir, exist_ok=True)
    cfg = Config.fromfile(osp.join(ROOT, config))
    cfg.merge_from_dict(_data_options(data_root, task))
    images = sorted(os.listdir(osp.join(data_root, 'images', 'val')))[:count]
    written = []
    if task == 'det':
        from mmdet.apis import inference_detector, init_detector
        from mmdet.registry import VISUALIZERS
        model = init_detector(cfg, checkpoint, device='cpu')
        visualizer = VISUALIZERS.build(cfg.visualizer)
        visualizer.dataset_meta = model.dataset_meta
        for name in images:
            image = mmcv.imread(osp.join(data_root, 'images', 'val', name), channel_order='rgb')
            result = inference_detector(model, image)
            out = osp.join(out_dir, name)
            visualizer.add_datasample(name, image, result, draw_gt=False, pred_score_thr=0.5,
                                      out_file=out)
            written.append(out)
    else:
        from mmseg.apis import inference_model, init_model
        from mmseg.registry import VISUALIZERS
        model = init_model(cfg, checkpoint, device='cpu')
        visualizer = VISUALIZERS.build(cfg.visualizer)
        visualizer.dataset_meta = model.dataset_meta
        for name in images:
            image = mmcv.imread(osp.join(data_root, 'images', 'val', name), channel_order='rgb')
            result = inference_model(model, image)
            out = osp.join(out_dir, name)
            visualizer.add_datasample(name, image, result, draw_gt=False, out_file=out)
            written.append(out)
    return written


def _data_options(data_root: str, task: str) -> dict:
    root = data_root.rstrip('/') + '/'
    options = {f'{split}_dataloader.dataset.data_root': root
               for split in ('train', 'val', 'test')}
    if task == 'det':
        options['val_evaluator.ann_file'] = root + 'annotations/instances_val.json'
        options['test_evaluator.ann_file'] = root + 'annotations/instances_val.json'
    return options


def main(argv=None) -> dict:
    from mmnorm.demo import DEFAULTS
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--task', choices=['det', 'seg'], default='det')
    parser.add_argument('--norm', default='SN',
                        help='det: SN, SN_tied, SSN, BCN-WS, GN or BN, or group-wise SN-G4, '
                        'SN-G16, SSN-G4, SSN-G16; seg: SN (default SN)')
    parser.add_argument('--quick', action='store_true', help='smoke run on a tiny dataset')
    parser.add_argument('--iters', type=int, default=None, help='training iterations')
    parser.add_argument('--seed', type=int, default=None,
                        help="training's random seed (default: the config's, 0); the generated "
                             'data stay the same')
    parser.add_argument('--stats-iters', type=int, default=50,
                        help='batches for the batch-average statistics')
    parser.add_argument('--data-root', default=osp.join(ROOT, 'data', 'demo'))
    parser.add_argument('--num-train', type=int, default=DEFAULTS['num_train'])
    parser.add_argument('--num-val', type=int, default=DEFAULTS['num_val'])
    parser.add_argument('--work-dir', default=None)
    args = parser.parse_args(argv)
    # (--iters 1 left no iteration to warm up in; 0 ran the default length)
    for flag, value, least in (('--iters', args.iters, 2), ('--stats-iters', args.stats_iters, 1),
                               ('--num-train', args.num_train, 1),
                               ('--num-val', args.num_val, 1)):
        if value is not None and value < least:
            raise SystemExit(f'error: {flag} must be >= {least}, got {value}')
    if args.norm not in CONFIGS[args.task]:
        raise SystemExit(f'--norm {args.norm} is not available for --task {args.task}; '
                         f'choose one of {sorted(CONFIGS[args.task])}')
    config = CONFIGS[args.task][args.norm]
    data_root = osp.abspath(args.data_root if not args.quick or args.data_root !=
                            osp.join(ROOT, 'data', 'demo') else osp.join(ROOT, 'data',
                                                                           'demo-quick'))
    name = 'demo' if args.task == 'det' else 'demo-seg'
    if args.norm != 'SN':
        name += f'-{args.norm.lower()}'
    work_dir = osp.abspath(args.work_dir or osp.join(ROOT, 'work_dirs',
                                                     name + ('-quick' if args.quick else '')))
    os.makedirs(work_dir, exist_ok=True)
    start = time.time()
    say(f'{args.task} demo with {args.norm}: config {config}, outputs in {work_dir}')

    ensure_data(data_root, args.quick, args)
    data_options = [f'{k}={v}' for k, v in _data_options(data_root, args.task).items()]

    iters = args.iters if args.iters is not None else (QUICK['iters'] if args.quick else None)
    train_options = list(data_options)
    if iters is not None:
        train_options += [f'max_iters={iters}', f'train_cfg.max_iters={iters}',
                          f'train_cfg.val_interval={iters}',
                          f'default_hooks.checkpoint.interval={iters}',
                          'default_hooks.logger.interval=10' if args.quick else
                          'default_hooks.logger.interval=50',
                          f'param_scheduler.1.end={iters}']
        # The configs warm up for 100 iterations, then decay until max_iters: a shorter run
        # (--quick: 40) must also warm up for less, or the decay would end before it begins.
        from mmengine.config import Config
        warmup = min(Config.fromfile(osp.join(ROOT, config)).param_scheduler[0]['end'], iters // 2)
        train_options += [f'param_scheduler.0.end={warmup}', f'param_scheduler.1.begin={warmup}']
    if args.seed is not None:
        train_options.append(f'randomness.seed={args.seed}')
    stats_iters = QUICK['stats_iters'] if args.quick else args.stats_iters
    run('step 2/6: training (tools/train.py)',
        ['tools/train.py', config, '--work-dir', work_dir, '--cfg-options', *train_options],
        osp.join(work_dir, 'train_output.log'))
    from mmnorm.utils.runner import last_checkpoint
    checkpoint = last_checkpoint(work_dir)

    final = osp.join(work_dir, 'model_batch_average.pth')
    run('step 3/6: batch-average statistics (tools/recompute_stats.py)',
        ['tools/recompute_stats.py', config, checkpoint, '--num-iters', str(stats_iters),
         '--out', final, '--overwrite', '--cfg-options', *data_options])

    metrics_file = osp.join(work_dir, 'metrics.json')
    run('step 4/6: evaluation (tools/test.py)',
        ['tools/test.py', config, final, '--work-dir', osp.join(work_dir, 'test'),
         '--metrics-out', metrics_file, '--cfg-options', *data_options],
        osp.join(work_dir, 'test_output.log'))
    with open(metrics_file) as f:
        metrics = json.load(f)

    ratio_png = osp.join(work_dir, 'sn_ratios.png')
    history = osp.join(work_dir, 'sn_ratios.jsonl')  # written by SNRatioLoggerHook
    if args.norm in RATIO_NORMS:
        run('step 5/6: learned SN ratios (tools/plot_ratios.py)',
            ['tools/plot_ratios.py', final, '--out', ratio_png, '--title',
             f'{name}: {args.norm}'] + (['--history', history] if osp.exists(history) else []))
    else:
        say(f'step 5/6: no SN ratios to plot for {args.norm}')
        ratio_png = None

    say('step 6/6: drawing predictions on validation images')
    with warnings.catch_warnings():  # the codebases' deprecation chatter, not the demo's
        warnings.simplefilter('ignore')
        drawn = draw_predictions(config, final, data_root, osp.join(work_dir, 'predictions'),
                                 args.task)
    elapsed = time.time() - start

    print('\n' + '=' * 78)
    say(f'finished in {elapsed / 60:.1f} min')
    if args.task == 'det':
        say(f'COCO bbox mAP@[.5:.95] = {metrics.get("coco/bbox_mAP", float("nan")):.3f}   '
            f'segm mAP@[.5:.95] = {metrics.get("coco/segm_mAP", float("nan")):.3f}   '
            f'(bbox mAP@.5 = {metrics.get("coco/bbox_mAP_50", float("nan")):.3f})')
    else:
        say(f'mIoU = {metrics.get("mIoU", float("nan")):.2f}   aAcc = '
            f'{metrics.get("aAcc", float("nan")):.2f}')
    if args.quick:
        say('(--quick is a smoke run on a tiny dataset: its numbers mean nothing)')
    say(f'training log      : {work_dir}/<timestamp>/<timestamp>.log, train_output.log')
    say(f'checkpoint        : {final}  (raw: {checkpoint})')
    say(f'metrics           : {metrics_file}')
    if ratio_png:
        say(f'SN ratios         : {ratio_png}  (history: {work_dir}/sn_ratios.jsonl)')
    say(f'predictions       : {", ".join(drawn)}')
    print('=' * 78)
    summary = dict(task=args.task, norm=args.norm, quick=args.quick, minutes=elapsed / 60,
                   metrics=metrics, checkpoint=final, ratio_png=ratio_png, predictions=drawn)
    from mmnorm.utils.files import write_json
    write_json(osp.join(work_dir, 'summary.json'), summary, indent=2)  # (atomically)
    return summary


if __name__ == '__main__':
    main()
