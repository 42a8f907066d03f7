"""What every dataset loader hands over, and where the converted datasets are cached.

:mod:`reslab.datasets` (the registry and the built-in loaders) and
:mod:`reslab.user_datasets` (folders, ``.npz`` files and functions users bring) share
these: the :class:`Splits` a loader returns, the :class:`LoadContext` it is called
with, the :class:`DatasetEntry` the registry holds, the errors of data that is not
there, and the cache (``$RESLAB_CACHE``, else ``~/.cache/reslab/data/reslab-cache``;
never a folder of the user's).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import Augment
from .errors import SpecError
from .fileio import atomic_torch_save
from .specs import Converter, to_bool, to_int

log = logging.getLogger(__name__)

ENV_DATA_DIR = "RESLAB_DATA"
ENV_CACHE_DIR = "RESLAB_CACHE"
DEFAULT_DATA_DIR = Path("~/.cache/reslab/data")
CACHE_SUBDIR = "reslab-cache"
# Bump when the cached tensors of an offline dataset change meaning (split, dtype, fields).
CACHE_VERSION = 2


class NoTestSplit(SpecError):
    """A dataset without a test split (one class-folder tree, an npz without its test arrays), loaded
    without ``val_split``: it has nothing to evaluate on."""


class DatasetMissing(SpecError):
    """The files of a dataset are not where we looked and downloading was not asked for."""


def default_data_dir() -> Path:
    """``$RESLAB_DATA`` if set, else ``~/.cache/reslab/data``."""
    env = os.environ.get(ENV_DATA_DIR)
    return Path(env).expanduser() if env else DEFAULT_DATA_DIR.expanduser()


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    return Path(data_dir).expanduser() if data_dir is not None else default_data_dir()


def cache_dir() -> Path:
    """Where every converted dataset is cached: ``$RESLAB_CACHE`` if set, else
    ``default_data_dir() / "reslab-cache"``.  Never a ``data_dir`` given to a load, so that
    pointing reslab at a folder of one's own files never writes into it."""
    env = os.environ.get(ENV_CACHE_DIR)
    return Path(env).expanduser() if env else default_data_dir() / CACHE_SUBDIR




@dataclass
class Splits:
    """What a loader returns: CPU uint8 images (N, C, H, W) and int64 labels.

    A dataset without a test split holds an empty one (0 images of the train
    split's shape): it loads only with a validation hold-out.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    classes: tuple[str, ...] | None = None  # the name of every label, when the data has them

    def as_dict(self) -> dict[str, Any]:
        return {"train_images": self.train_images, "train_labels": self.train_labels,
                "test_images": self.test_images, "test_labels": self.test_labels,
                "num_classes": self.num_classes, "classes": self.classes}


@dataclass(frozen=True)
class LoadContext:
    data_dir: Path
    download: bool
    val_split: float = 0.0  # the hold-out asked for: a loader of data without a test split refuses 0 up front


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    description: str  # one line, shown by `reslab list`
    load: Callable[..., Splits]  # (LoadContext, **loader_params) -> Splits on the CPU
    loader_params: dict[str, tuple[Converter, Any]] = field(default_factory=dict)  # argument -> (converter, default)
    augment: Augment = field(default_factory=Augment)  # default train augmentation: the crop/flip defaults
    check: Callable[..., str | None] | None = None  # (**every argument) -> problem or None, before loading
    module: str | None = None  # the module of the function a user registered (None: reslab's own)
    source: str | None = None  # that function's source file, so another process can import it again

    @property
    def params(self) -> dict[str, tuple[Converter, Any]]:
        """The loader's arguments, then the augmentation arguments every dataset takes."""
        return {**self.loader_params, **augment_params(self.augment)}


def _int_at_least(low: int, what: str) -> Converter:
    def convert(value: str) -> int:
        try:
            result = to_int(value)
        except ValueError:
            result = None
        if result is None or result < low:
            raise ValueError(f"expected {what}")
        return result

    return convert


def augment_params(augment: Augment) -> dict[str, tuple[Converter, Any]]:
    """The arguments every dataset takes, defaulting to its own augmentation: ``crop=P`` (random-crop
    padding in pixels, 0 = off) and ``flip=true|false``."""
    return {"crop": (_nonnegative_int, augment.crop_padding), "flip": (to_bool, augment.flip)}


def cache_file(name: str) -> Path:
    """Where the converted tensors cached under ``name`` live (in :func:`cache_dir`)."""
    return cache_dir() / f"{name}-v{CACHE_VERSION}.pt"


def cached(name: str, build: Callable[[], Splits]) -> Splits:
    """Load ``name``'s splits from the cache, or build them and cache them atomically.

    A build that raises writes nothing; an unwritable cache directory only
    means the next load builds again.
    """
    path = cache_file(name)
    if path.is_file():
        try:
            return Splits(**torch.load(path, weights_only=True))
        except Exception as exc:  # a corrupt or foreign file: rebuild and overwrite it
            log.warning("ignoring unreadable cache %s (%s)", path, exc)
    splits = build()
    try:
        atomic_torch_save(path, splits.as_dict())
    except OSError as exc:
        log.debug("not caching %s at %s: %s", name, path, exc)
    return splits


_nonnegative_int = _int_at_least(0, "a non-negative integer")

__all__ = ["CACHE_VERSION", "DatasetEntry", "DatasetMissing", "ENV_CACHE_DIR", "ENV_DATA_DIR", "LoadContext",
           "NoTestSplit", "Splits", "augment_params", "cache_dir", "cache_file", "cached", "default_data_dir",
           "resolve_data_dir"]
