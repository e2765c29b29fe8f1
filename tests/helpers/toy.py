# Copyright (c) mmnorm contributors. All rights reserved.
"""A small mmengine model and dataset for Runner-level tests."""
from typing import Optional

import torch
from mmengine.evaluator import BaseMetric
from mmengine.model import BaseModel
from mmengine.registry import METRICS
from torch import nn
from torch.utils.data import Dataset

import mmnorm


class ToyModel(BaseModel):
    """conv -> norm -> relu -> conv -> norm -> pool -> linear; the norms are configurable."""

    def __init__(self, norm1: Optional[nn.Module] = None, norm2: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = mmnorm.WSConv2d(3, 8, 3, padding=1)
        self.norm1 = norm1 if norm1 is not None else mmnorm.SwitchableNorm(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.norm2 = norm2 if norm2 is not None else nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 2)

    def forward(self, inputs, labels, mode='tensor'):
        x = torch.stack(inputs) if isinstance(inputs, (list, tuple)) else inputs
        x = torch.relu(self.norm1(self.conv1(x)))
        logits = self.head(self.norm2(self.conv2(x)).mean((2, 3)))
        labels = torch.stack(labels) if isinstance(labels, (list, tuple)) else labels
        if mode == 'loss':
            return dict(loss=nn.functional.cross_entropy(logits.float(), labels))
        if mode == 'predict':
            return list(zip(logits.argmax(1), labels))
        return logits


class ToyData(Dataset):

    def __init__(self, size: int = 24, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, 3, 6, 6, generator=gen) * 2 + 0.5
        self.y = torch.randint(0, 2, (size, ), generator=gen)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return dict(inputs=self.x[i], labels=self.y[i])


@METRICS.register_module(force=True)
class ToyAccuracy(BaseMetric):

    def process(self, data_batch, data_samples) -> None:
        self.results.extend(float(pred == label) for pred, label in data_samples)

    def compute_metrics(self, results) -> dict:
        return dict(accuracy=sum(results) / max(len(results), 1))


def loader(size: int = 24, batch_size: int = 4, shuffle: bool = False, seed: int = 0) -> dict:
    return dict(dataset=ToyData(size, seed), batch_size=batch_size,
                sampler=dict(type='DefaultSampler', shuffle=shuffle),
                collate_fn=dict(type='default_collate'))
