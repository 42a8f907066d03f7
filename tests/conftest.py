"""Fixtures every test file shares: the tiny offline run most tests train."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

# 192 train / 64 test images of 8x8 noise around 4 class means: a run of one epoch takes
# well under a second on a CPU and still learns something (chance is 25%).
SYNTHETIC = "synthetic:train=192,test=64,size=8,channels=1,classes=4"

TINY_RUN: dict[str, Any] = {
    "model": "simple_cnn", "dataset": SYNTHETIC, "epochs": 1, "batch_size": 32, "lr": 0.05,
    "device": "cpu", "progress": "none",
}


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
