"""Fixtures every test file shares: the tiny offline run most tests train."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest -n N each worker is one of N processes sharing the cores: one intra-op
    # thread each, so the workers do not oversubscribe them.
    torch.set_num_threads(1)

# 192 train / 64 test images of 8x8 noise around 4 class means: a run of one epoch takes
# well under a second on a CPU and still learns something (chance is 25%).
SYNTHETIC = "synthetic:train=192,test=64,size=8,channels=1,classes=4"

TINY_RUN: dict[str, Any] = {
    "model": "simple_cnn", "dataset": SYNTHETIC, "epochs": 1, "batch_size": 32, "lr": 0.05,
    "device": "cpu", "progress": "none",
}


# The source of a user's model file: a small ResNet whose blocks declare their residual branch
# (reslab.model_inits), with the arguments reslab passes (num_classes, in_channels) and options.
RESIDUAL_NET = '''
import torch
from torch import nn


class Block(nn.Module):
    """A basic residual block that declares its branch."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)

    def residual_branch(self):
        return [self.conv1, self.bn1, self.conv2, self.bn2]

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(out)))


class TinyResNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16, blocks: int = 2,
                 dropout: float | None = None):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.blocks = nn.Sequential(*[Block(width) for _ in range(blocks)])
        self.drop = nn.Dropout(dropout or 0.0)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.drop(self.blocks(self.stem(x)).mean((2, 3))))
'''


@pytest.fixture
def synthetic() -> str:
    """The dataset spec of :data:`TINY_RUN`."""
    return SYNTHETIC


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config(out=None, **overrides)``: a fresh config mapping for a one-epoch run on synthetic data.

    ``out`` (a path) becomes the run directory; every override replaces or adds a field.
    """

    def make(out: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
        config = {**TINY_RUN, **overrides}
        if out is not None:
            config["out"] = str(out)
        return config

    return make
