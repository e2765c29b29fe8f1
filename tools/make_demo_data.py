# Copyright (c) mmnorm contributors. All rights reserved.
"""Generate the demo dataset: COCO-format instance segmentation + mmseg semantic labels.

    python tools/make_demo_data.py [--root data/demo] [--num-train 1200] [--num-val 200]
        [--image-size 128] [--min-size 16] [--max-size 56] [--max-objects 6] [--seed 0]

Deterministic from the seed; see mmnorm/demo/shapes.py for what the images contain and the
layout written under --root.
"""
import argparse
import os.path as osp
import sys
import time

sys.path.insert(0, osp.join(osp.dirname(osp.abspath(__file__)), '..'))

from mmnorm.demo import DEFAULTS, generate_demo_data  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--root', default='data/demo', help='output folder')
    for key in ('num_train', 'num_val', 'image_size', 'min_size', 'max_size', 'max_objects',
                'min_visible', 'seed'):
        parser.add_argument('--' + key.replace('_', '-'), type=int, default=DEFAULTS[key],
                            help=f'default {DEFAULTS[key]}')
    args = parser.parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k != 'root'}
    start = time.time()
    total = args.num_train + args.num_val

    def progress(done, _):
        if done % max(1, total // 20) == 0 or done == total:
            print(f'\r{done}/{total} images', end='', flush=True)

    try:
        objects = generate_demo_data(args.root, progress=progress, **options)
    except ValueError as error:
        raise SystemExit(f'error: {error}')
    print(f'\nwrote {total} images with {objects} objects to {args.root} in '
          f'{time.time() - start:.1f} s')
    return objects


if __name__ == '__main__':
    main()
