# Copyright (c) mmnorm contributors. All rights reserved.
"""Evaluate an exported classifier or segmentor with ONNX Runtime, through the config's own test
dataloader, preprocessing, postprocessing and evaluator.

    python tools/deploy/test_onnx.py CONFIG MODEL.onnx [--metrics-out FILE] [--cfg-options k=v]

MODEL.onnx comes from tools/deploy/export_onnx.py with the same CONFIG. Each test batch goes
through the model's data preprocessor (built from the config; no weights are loaded), then ONNX
Runtime at the batch's own size (image by image when the file has a static batch of 1; a file
exported with --dynamic-shape takes any image size, a static one only its own), then the
codebase's own postprocessing (mmseg: ``postprocess_result``, which removes padding and resizes
to the original image; mmpretrain: softmax scores and labels) and the config's
``test_evaluator``. The metrics are the ones ``tools/test.py CONFIG CHECKPOINT`` prints for the
PyTorch model.
"""
import argparse
import numbers
import os.path as osp
import sys

sys.path.insert(0, osp.join(osp.dirname(osp.abspath(__file__)), '..', '..'))

import mmnorm  # noqa: E402,F401  (registers the layers)
import torch  # noqa: E402
from mmengine.config import DictAction  # noqa: E402
from mmengine.evaluator import Evaluator  # noqa: E402
from mmengine.utils import ProgressBar  # noqa: E402

from mmnorm.deploy import (model_kind, ort_session, preprocessed_batches,  # noqa: E402
                           run_session, test_dataloader)
from mmnorm.utils.files import prepare_output_file, write_json  # noqa: E402
from mmnorm.utils.model import build_model, load_config  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config')
    parser.add_argument('model', help='the .onnx file (tools/deploy/export_onnx.py)')
    parser.add_argument('--metrics-out', help='write the metrics as JSON to this file')
    parser.add_argument('--threads', type=int, default=None, help='ONNX Runtime threads')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings in the config, key=value')
    return parser.parse_args(argv)


def _static_batch(session):
    batch = session.get_inputs()[0].shape[0]
    return batch if isinstance(batch, int) else None


def _check_size(session, inputs: torch.Tensor) -> None:
    """A clear error where a file with a static height and width meets other image sizes."""
    expected = session.get_inputs()[0].shape[2:]
    if all(isinstance(side, int) for side in expected) and \
            list(inputs.shape[2:]) != list(expected):
        raise SystemExit(f'error: the model was exported for {expected[0]}x{expected[1]} images '
                         f'and the test data gives {inputs.shape[2]}x{inputs.shape[3]}; export '
                         f'it with --dynamic-shape (or --shape {inputs.shape[2]} '
                         f'{inputs.shape[3]})')


def _run(session, inputs: torch.Tensor) -> torch.Tensor:
    """The first output for ``inputs``, image by image if the file has a static batch of 1."""
    _check_size(session, inputs)
    static = _static_batch(session)
    if static is None or static == inputs.shape[0]:
        return run_session(session, inputs)[0]
    if static != 1:
        raise SystemExit(f'error: the model has a static batch of {static}; test with '
                         f'--cfg-options test_dataloader.batch_size={static}')
    return torch.cat([run_session(session, image[None])[0] for image in inputs])


def _classifier_predictions(logits: torch.Tensor, data_samples):
    """Scores and labels as mmpretrain's classification heads set them."""
    scores = logits.softmax(dim=1)
    labels = scores.argmax(dim=1, keepdim=True).detach()
    for sample, score, label in zip(data_samples, scores, labels):
        sample.set_pred_score(score).set_pred_label(label)
    return data_samples


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not osp.isfile(args.model):
        raise SystemExit(f'error: {args.model} not found')
    cfg = load_config(args.config, args.cfg_options)
    if args.metrics_out:  # a wrong path fails now, not after the evaluation
        try:
            prepare_output_file(args.metrics_out)
        except OSError as error:
            raise SystemExit(f'error: {error}')
    model = build_model(cfg).eval()  # preprocessing and postprocessing only
    kind = model_kind(model)
    if kind == 'detector':
        raise SystemExit('error: a detector is exported up to its neck features; evaluate its '
                         'boxes with mmdeploy (the detection heads are not exported)')
    try:
        session = ort_session(args.model, args.threads)
    except Exception as error:  # (ONNX Runtime's errors live in a private module)
        raise SystemExit(f'error: ONNX Runtime cannot load {args.model}: '
                         f'{str(error).strip().splitlines()[-1]}')
    try:
        loader = test_dataloader(cfg)
    except RuntimeError as error:
        raise SystemExit(f'error: {error}')
    evaluator = Evaluator(cfg.test_evaluator)
    evaluator.dataset_meta = getattr(loader.dataset, 'metainfo', None)
    bar = ProgressBar(len(loader.dataset))
    for data in preprocessed_batches(model, loader):
        try:
            outputs = _run(session, data['inputs'])
        except SystemExit:
            print()  # (the message on a line of its own, not after the progress bar)
            raise
        samples = data['data_samples']
        if kind == 'segmentor':
            samples = model.postprocess_result(outputs, samples)
        else:
            samples = _classifier_predictions(outputs, samples)
        evaluator.process(data_samples=samples, data_batch=data)
        for _ in samples:
            bar.update()
    print()
    metrics = evaluator.evaluate(len(loader.dataset))
    print(f'ONNX Runtime, {args.model}: ' +
          ', '.join(f'{k}: {float(v):.4f}' if isinstance(v, numbers.Real) else f'{k}: {v}'
                    for k, v in metrics.items()))
    if args.metrics_out:
        write_json(args.metrics_out, {k: float(v) for k, v in metrics.items()}, indent=2)
        print(f'metrics written to {args.metrics_out}')
    return metrics


if __name__ == '__main__':
    main()
