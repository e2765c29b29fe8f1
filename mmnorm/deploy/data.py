# Copyright (c) mmnorm contributors. All rights reserved.
"""Real inputs for exported models: the config's test dataloader through the model's own data
preprocessor."""
import copy
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from mmengine.config import Config
from mmengine.runner import Runner
from torch import Tensor, nn

__all__ = ['test_dataloader', 'preprocessed_batches', 'fit_to', 'real_inputs', 'synthetic_batch',
           'input_channels']


def test_dataloader(cfg: Config, batch_size: Optional[int] = None):
    """The config's ``test_dataloader`` (single process, no workers kept alive), with an optional
    batch size. Raises ``SystemExit``-friendly ``RuntimeError`` when its data is missing."""
    if cfg.get('test_dataloader', None) is None:
        raise RuntimeError('the config has no test_dataloader')
    loader_cfg = copy.deepcopy(cfg.test_dataloader)
    if batch_size is not None:
        loader_cfg['batch_size'] = batch_size
    loader_cfg['num_workers'] = 0
    loader_cfg['persistent_workers'] = False
    try:
        return Runner.build_dataloader(loader_cfg, seed=0)
    except (FileNotFoundError, OSError) as error:
        raise RuntimeError(f"cannot read the config's test data ({error}); point the config at "
                           f'the data with --cfg-options test_dataloader.dataset.data_root=...')


def preprocessed_batches(model: nn.Module, loader) -> Iterator[dict]:
    """Each batch of ``loader`` after ``model.data_preprocessor`` (test mode)."""
    with torch.no_grad():
        for data in loader:
            yield model.data_preprocessor(data, False)


def fit_to(images: Tensor, size: Tuple[int, int]) -> Tensor:
    """Pad (with zeros, as the preprocessors pad) or crop images to ``size`` at the bottom
    right, keeping the top-left content where the preprocessors put it."""
    height, width = images.shape[-2:]
    images = images[..., :size[0], :size[1]]
    return F.pad(images, (0, max(size[1] - width, 0), 0, max(size[0] - height, 0)))


def real_inputs(cfg: Config, model: nn.Module, count: int,
                size: Optional[Tuple[int, int]] = None) -> Tensor:
    """The first ``count`` test images, preprocessed, as one ``(count, 3, H, W)`` batch at
    ``size`` (default: the first image's preprocessed size)."""
    images = []
    for data in preprocessed_batches(model, test_dataloader(cfg, batch_size=1)):
        image = data['inputs']
        size = size or tuple(image.shape[-2:])
        images.append(fit_to(image, size))
        if len(images) == count:
            break
    if len(images) < count:
        raise RuntimeError(f'the test set has {len(images)} image(s); {count} needed')
    return torch.cat(images)


def input_channels(model: nn.Module) -> int:
    """The channels of the images ``model`` takes: its first convolution's input channels (3
    for a model without one). The digits configs take 1."""
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    return 3 if first is None else first.in_channels


def synthetic_batch(model: nn.Module, size: Tuple[int, int], count: int = 1,
                    seed: int = 0) -> dict:
    """A batch as ``model.data_preprocessor`` returns it, of ``count`` random ``size`` images:
    ``inputs`` ``(count, C, H, W)`` (:func:`input_channels`) and the data samples the
    codebase's ``mode='tensor'`` / ``predict`` forwards read (image, pad and batch shapes;
    scale factor 1), ``None`` for a classifier."""
    from .onnx import model_kind
    kind = model_kind(model)
    inputs = torch.randn(count, input_channels(model), *size,
                         generator=torch.Generator().manual_seed(seed))
    if kind == 'classifier':
        return {'inputs': inputs, 'data_samples': None}
    if kind == 'detector':
        from mmdet.structures import DetDataSample as Sample
    else:
        from mmseg.structures import SegDataSample as Sample
    meta = dict(img_shape=tuple(size), ori_shape=tuple(size), pad_shape=tuple(size),
                batch_input_shape=tuple(size), scale_factor=(1.0, 1.0))
    return {'inputs': inputs, 'data_samples': [Sample(metainfo=meta) for _ in range(count)]}
