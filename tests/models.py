"""Models the tests trace: the PyTorch tutorial's LeNet as written, its nn.Sequential forms, and a model
that uses stride/padding/dilation/groups, BatchNorm2d, Dropout, AdaptiveAvgPool2d, Flatten, Softmax(dim=3)."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from fusednn.models import LeNet  # the tutorial's Net class, exactly as written there

__all__ = ["LeNet", "lenet_sequential", "lenet_ordered", "Mixed"]


def lenet_sequential() -> nn.Sequential:
    """LeNet written as a list-form nn.Sequential."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, 10),
    )


def lenet_ordered() -> nn.Sequential:
    """LeNet written as an nn.Sequential of an OrderedDict with named layers."""
    return nn.Sequential(OrderedDict([
        ("c1", nn.Conv2d(1, 6, 5)), ("relu1", nn.ReLU(inplace=True)), ("s2", nn.MaxPool2d(2)),
        ("c3", nn.Conv2d(6, 16, 5)), ("relu3", nn.ReLU(inplace=True)), ("s4", nn.MaxPool2d(2)),
        ("flat", nn.Flatten()),
        ("f5", nn.Linear(400, 120)), ("relu5", nn.ReLU()),
        ("f6", nn.Linear(120, 84)), ("relu6", nn.ReLU()),
        ("f7", nn.Linear(84, 10)),
    ]))


class Mixed(nn.Module):
    """Strided, padded, dilated and grouped convs, batch norm, dropout, adaptive pooling, softmax over dim 3."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, (3, 2), padding=(2, 1), dilation=(2, 1), groups=2, bias=False)
        self.drop = nn.Dropout(0.25)
        self.pool = nn.AdaptiveAvgPool2d((2, 3))
        self.head = nn.Sequential(nn.Flatten(start_dim=2), nn.Linear(6, 4))
        self.softmax = nn.Softmax(dim=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = self.drop(self.grouped(x).tanh())
        x = self.head(self.pool(x))          # [N, 8, 4]
        return self.softmax(x.unsqueeze(1))  # [N, 1, 8, 4], softmax over the last dim
