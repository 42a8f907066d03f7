"""Datasets users bring: a folder of images, a NumPy ``.npz``, arrays from a function of their own.

Three ways in, one result: the :class:`reslab.datasets.Splits` every loader
returns (CPU uint8 ``(N, C, H, W)`` images, int64 labels, class names).

``folder:PATH`` (:func:`load_folder`) reads torchvision's ImageFolder layout:

* ``PATH/train/<class>/...`` with ``PATH/test/<class>/...``, or ``PATH/val/<class>/...``
  when there is no ``test/``; both must hold the same classes.  Without a
  ``test/`` or ``val/`` the train folder is all there is.
* or, when ``PATH/train/`` does not exist, one tree ``PATH/<class>/...``.
  Neither of these two has a test split, so they load only with a validation
  hold-out (``--val-split F``); without one the load is refused before any
  image is read.
* Classes are the sorted names of the subfolders (ImageFolder's rule: hidden
  ones too), and an image's label is its class's index.  Images are found
  anywhere below a class folder, in sorted order, by the extensions ImageFolder
  accepts (``torchvision.datasets.folder.IMG_EXTENSIONS``, any case); other
  files are ignored.  A class folder without images is an error.
* Images are decoded by torchvision (PNG, JPEG, WebP) or, for what it cannot
  decode (BMP, TIFF, PPM/PGM), by PIL, on a pool of threads.  EXIF orientation
  is not applied (nor is it by ImageFolder's PIL loader), alpha is dropped and
  16-bit images are scaled to 8 bits.
* ``size=N`` resizes every image to NxN (bilinear, antialiased); without it
  every image must be square (``Dataset.image_size`` is both sides) and all of
  one size.  ``channels=1`` turns colour images gray (torchvision's
  ``rgb_to_grayscale``), ``channels=3`` repeats gray ones; ``channels=auto``
  (the default) is 1 when every image is stored grayscale, else 3.
* Before decoding, N x C x H x W bytes (H, W and C from ``size=``,
  ``channels=`` or the first image) are compared with the memory available
  (:func:`available_memory`): a set that would not fit is refused.
* The decoded tensors are cached (:func:`reslab.datasets.cache_dir`) under
  ``folder-<hash>``, the hash a SHA-256 of every image's path relative to PATH,
  byte size and modification time in ns, of the options and of a version: a
  second load of an unchanged folder is one ``torch.load``, and changing,
  adding or removing an image makes a new cache.

``npz:FILE`` (:func:`load_npz`) and the functions registered with
:func:`reslab.datasets.register_dataset` (:func:`function_entry`) hand over
arrays - NumPy arrays or torch tensors - under one set of rules
(:func:`splits_from_arrays`):

* ``x_train`` and ``y_train``; ``x_test`` and ``y_test``, both or neither (neither:
  ``--val-split`` needed); optionally ``classes``, the class names (strings).
* Images: ``(N, H, W)`` is grayscale; a 4-D array is ``(N, C, H, W)`` when dim 1
  is 1 or 3, else ``(N, H, W, C)`` when the last dim is 1 or 3 (so
  ``(N, 3, 32, 32)`` is NCHW and ``(N, 32, 32, 3)`` NHWC).  Square.  uint8
  0..255 (any integer type whose values lie in 0..255), or floats in [0, 1],
  scaled by 255 and rounded.
* Labels: integers 0..K-1, ``(N,)`` or ``(N, 1)`` (as Keras ships them); K is
  ``len(classes)`` if given, else the largest label + 1.

An ``.npz`` is cached like a folder, under ``npz-<hash>`` of its resolved
path, byte size and modification time: reading and converting its arrays
costs several times a ``torch.load`` of the result (a CIFAR-sized NHWC uint8
file: 0.9 s against 0.25 s; stored as float32 in [0, 1]: 5 s).

Every problem is one line, a :class:`reslab.errors.SpecError` (a missing path:
:class:`reslab.datasets.DatasetMissing`) that names the file, array or value,
raised before anything is cached.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import re
import threading
import warnings
import zipfile
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import SpecError
from .fileio import source_file_of
from .specs import Converter, converter_for
from .splits import DatasetEntry, DatasetMissing, LoadContext, NoTestSplit, Splits, cached

# Bump when the cached tensors of a folder or an .npz change meaning (decoding, conversion, fields).
FOLDER_CACHE_VERSION = 1
ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")
# torchvision.datasets.folder.IMG_EXTENSIONS, copied so that a cached load never imports
# torchvision (~0.5 s); the tests check that the two agree.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_CHUNK = 64  # images per task of the decoding pool
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")  # a spec name (reslab.specs)


def _no_test_split(where: str, what: str) -> SpecError:
    return NoTestSplit(f"{where} has {what}: pass --val-split F (val_split=F) to hold out a fraction F "
                     f"of its train images for evaluation")


# --- memory ---------------------------------------------------------------------------


def available_memory() -> int | None:
    """Bytes a new allocation can take: ``MemAvailable`` of ``/proc/meminfo`` (free memory plus
    the caches the kernel gives back), else free pages x page size (``os.sysconf``); None where
    neither is known, and the memory check is skipped."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def format_bytes(n: float) -> str:
    """``18.1 GB``, ``3.2 MB``, ``512 bytes``: decimal units, one decimal."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def check_fits(n: int, c: int, h: int, w: int, where: str) -> None:
    """Refuse ``n`` uint8 images of ``c x h x w`` that need more memory than is available."""
    need = n * c * h * w
    available = available_memory()
    if available is not None and need > available:
        raise SpecError(f"{where}: {n:,} images of {c}x{h}x{w} need {format_bytes(need)}; "
                        f"{format_bytes(available)} available: pass size=N or use fewer images")


# --- folder: the scan ------------------------------------------------------------------------


@dataclass
class _Folder:
    root: Path
    classes: tuple[str, ...]
    train: list[tuple[str, int]]  # (path relative to root, label)
    test: list[tuple[str, int]]  # empty: no test split
    key: list[tuple[str, int, int]]  # (path relative to root, bytes, mtime in ns) of every image


def _scan_split(split_dir: Path, root: Path, where: str) -> tuple[list[str], list[tuple[str, int, int, int]]]:
    """The class names of one split folder, and its images as (path relative to root, label,
    bytes, mtime ns), in ImageFolder's order."""
    classes = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    if not classes:
        rel = split_dir.relative_to(root)
        raise SpecError(f"{where}: {'the folder' if rel == Path() else f'{rel}/'} holds no class folders; "
                        f"expected <class>/<image> folders in it")
    extensions = IMG_EXTENSIONS
    files: list[tuple[str, int, int, int]] = []
    for label, name in enumerate(classes):
        before = len(files)
        for dirpath, _, names in sorted(os.walk(split_dir / name, followlinks=True)):
            rel_dir = os.path.relpath(dirpath, root)  # once per folder: relpath is slow
            for fname in sorted(names):
                if fname.lower().endswith(extensions):
                    rel = os.path.join(rel_dir, fname)
                    try:
                        st = os.stat(os.path.join(dirpath, fname))
                    except OSError as exc:
                        raise SpecError(f"{where}: cannot read {rel} ({exc.strerror})") from None
                    files.append((rel, label, st.st_size, st.st_mtime_ns))
        if len(files) == before:
            raise SpecError(f"{where}: class folder {(split_dir / name).relative_to(root)}/ holds no images "
                            f"(files ending in {', '.join(extensions)})")
    return classes, files


def _scan_folder(root: Path, val_split: float, where: str) -> _Folder:
    """Find the layout, classes and images of an ImageFolder tree; every problem a one-line error."""
    if not root.exists():
        raise DatasetMissing(f"{where} does not exist; expected PATH/train/<class>/<image> and "
                             f"PATH/test/<class>/<image>, or PATH/<class>/<image>")
    if not root.is_dir():
        hint = f"; for a NumPy file use 'npz:{root}'" if root.suffix == ".npz" else ""
        raise SpecError(f"{where} is not a folder{hint}")
    if not any(os.scandir(root)):
        raise SpecError(f"{where} is empty; expected PATH/train/<class>/<image> and PATH/test/<class>/<image>, "
                        f"or PATH/<class>/<image>")
    train_dir = root / "train"
    if train_dir.is_dir():
        test_dir = next((root / name for name in ("test", "val") if (root / name).is_dir()), None)
        missing = "train/ but no test/ or val/"
    else:
        train_dir, test_dir, missing = root, None, "no train/ and test/ (or val/) folders"
    classes, train = _scan_split(train_dir, root, where)
    test: list[tuple[str, int, int, int]] = []
    if test_dir is not None:
        test_classes, test = _scan_split(test_dir, root, where)
        if test_classes != classes:
            only_train = sorted(set(classes) - set(test_classes))
            only_test = sorted(set(test_classes) - set(classes))
            raise SpecError(f"{where}: train/ and {test_dir.name}/ hold different classes (only in train/: "
                            f"{', '.join(only_train) or 'none'}; only in {test_dir.name}/: "
                            f"{', '.join(only_test) or 'none'})")
    elif not val_split:
        raise _no_test_split(where, missing)
    return _Folder(root, tuple(classes), [(f, label) for f, label, _, _ in train],
                   [(f, label) for f, label, _, _ in test], [(f, size, mtime) for f, _, size, mtime in train + test])


# --- folder: decoding -------------------------------------------------------------------------


def _pil_array(path: str) -> np.ndarray:
    """An image PIL reads, as a uint8 (H, W) or (H, W, C) array (C 3 or 4)."""
    from PIL import Image

    with Image.open(path) as im:
        mode = im.mode
        if mode.startswith("I;16") or mode in ("I", "F"):  # 16/32-bit gray: scale 16 bits to 8
            arr = np.asarray(im, dtype=np.float64)
            scale = 255 / 65535 if mode.startswith("I;16") or arr.max() > 255 else 1.0
            return np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
        if mode not in ("L", "RGB", "LA", "RGBA"):
            im = im.convert("L" if mode == "1" else "RGBA" if "transparency" in im.info or "A" in mode else "RGB")
        return np.array(im, dtype=np.uint8)


@functools.lru_cache(maxsize=1)
def _torchvision_decoder() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """torchvision's ``decode_image`` (unchanged mode), or None where this torchvision has none."""
    try:
        from torchvision.io import ImageReadMode, decode_image
    except ImportError:
        return None
    return functools.partial(decode_image, mode=ImageReadMode.UNCHANGED)


def decode_file(path: str) -> torch.Tensor:
    """One image file as uint8 ``(C, H, W)``, C 1 (gray) or 3 (colour): alpha dropped, the first
    frame of an animation, 16 bits scaled to 8.  torchvision decodes the file's bytes; PIL what
    torchvision cannot."""
    decode = _torchvision_decoder()
    try:
        if decode is None:
            raise RuntimeError("no torchvision decoder")
        with open(path, "rb") as f:  # torchvision.io.read_file's bytes, at a third of its cost per call
            img = decode(torch.frombuffer(bytearray(f.read()), dtype=torch.uint8))
    except RuntimeError:
        arr = _pil_array(path)
        img = torch.from_numpy(arr).unsqueeze(0) if arr.ndim == 2 else torch.from_numpy(arr).permute(2, 0, 1)
    if img.ndim == 4:
        img = img[0]
    if img.dtype != torch.uint8:
        img = img.to(torch.float32).mul_(255 / torch.iinfo(img.dtype).max).round_().to(torch.uint8)
    return img[:1] if img.shape[0] == 2 else img[:3] if img.shape[0] == 4 else img


def _decode(root: Path, rel: str, where: str) -> torch.Tensor:
    try:
        return decode_file(str(root / rel))
    except Exception as exc:  # torchvision's RuntimeError, PIL's UnidentifiedImageError/OSError, ...
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise SpecError(f"{where}: cannot decode {rel} as an image ({reason})") from None


def _to_channels(img: torch.Tensor, channels: int) -> torch.Tensor:
    if channels == 3:
        return img.expand(3, -1, -1)
    from torchvision.transforms.v2.functional import rgb_to_grayscale

    return rgb_to_grayscale(img, num_output_channels=1)


def _resize(img: torch.Tensor, size: int) -> torch.Tensor:
    """``torchvision.transforms.v2.functional.resize(img, [size, size], antialias=True)``: for uint8
    on the CPU that is this one call, without its per-call overhead (the tests check they agree)."""
    if img.shape[1:] == (size, size):
        return img
    return F.interpolate(img[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def _threads() -> int:
    try:
        return max(1, min(16, len(os.sched_getaffinity(0))))
    except AttributeError:  # not Linux
        return max(1, min(16, os.cpu_count() or 1))


def _parallel(work: Callable[[int], None], n: int) -> None:
    """``work(i)`` for every ``i < n`` on a pool of threads (decoders release the GIL).  The first
    error stops the pool and is raised here (of those raised, the one of the lowest index)."""
    stop = threading.Event()
    errors: list[tuple[int, Exception]] = []

    def run(start: int) -> None:
        for i in range(start, min(start + _CHUNK, n)):
            if stop.is_set():
                return
            try:
                work(i)
            except Exception as exc:
                errors.append((i, exc))
                stop.set()
                return

    starts = range(0, n, _CHUNK)
    with ThreadPoolExecutor(min(_threads(), len(starts))) as pool:
        list(pool.map(run, starts))
    if errors:
        raise min(errors, key=lambda e: e[0])[1]


def decode_images(root: Path, files: list[str], *, size: int, channels: int | str, where: str) -> torch.Tensor:
    """Decode ``files`` (relative to ``root``) into one uint8 ``(N, C, H, W)`` tensor.

    The first image fixes H, W (unless ``size``) and, for ``channels="auto"``, C;
    the memory check runs before any other image is read.  Images are written
    into the tensor as they are decoded, so memory peaks at the tensor itself.
    """
    with warnings.catch_warnings():  # torchvision >= 0.29 warns at every decode that its decoders are deprecated
        warnings.filterwarnings("ignore", message=".*[Dd]ecoding.*deprecated", category=DeprecationWarning)
        return _decode_images(root, files, size=size, channels=channels, where=where)


def _decode_images(root: Path, files: list[str], *, size: int, channels: int | str, where: str) -> torch.Tensor:
    first = _decode(root, files[0], where)
    c0, h0, w0 = first.shape
    if not size and h0 != w0:
        raise SpecError(f"{where}: {files[0]} is {h0}x{w0} (HxW), not square: pass size=N to resize every "
                        f"image to NxN")
    c = c0 if channels == "auto" else int(channels)
    h, w = (size, size) if size else (h0, w0)
    check_fits(len(files), c, h, w, where)
    out = torch.empty(len(files), c, h, w, dtype=torch.uint8)
    colour: dict[int, torch.Tensor] = {}  # channels=auto: colour images met while the tensor holds gray ones

    def fill(i: int) -> None:
        img = first if i == 0 else _decode(root, files[i], where)
        if size:
            img = _resize(img, size)
        elif img.shape[1:] != (h0, w0):
            raise SpecError(f"{where}: images differ in size ({files[0]} is {h0}x{w0}, {files[i]} is "
                            f"{img.shape[1]}x{img.shape[2]}, HxW): pass size=N to resize every image to NxN")
        if img.shape[0] != c:
            if channels == "auto" and c == 1:
                colour[i] = img
                return
            img = _to_channels(img, c)
        out[i] = img

    _parallel(fill, len(files))
    if colour:  # a mixed set under channels=auto: 3 channels after all
        out = out.expand(-1, 3, -1, -1).contiguous()
        for i, img in colour.items():
            out[i] = img
    return out


def _build_folder(folder: _Folder, size: int, channels: int | str, where: str) -> Splits:
    files = [rel for rel, _ in folder.train + folder.test]
    images = decode_images(folder.root, files, size=size, channels=channels, where=where)
    labels = torch.tensor([label for _, label in folder.train + folder.test], dtype=torch.int64)
    n = len(folder.train)
    return Splits(images[:n], labels[:n], images[n:], labels[n:], num_classes=len(folder.classes),
                  classes=folder.classes)


def folder_cache_name(folder: _Folder, size: int, channels: int | str) -> str:
    """``folder-<hash>``: the cache name of ``folder``'s decoded images under these options."""
    key = {"version": FOLDER_CACHE_VERSION, "size": size, "channels": channels, "files": folder.key}
    return "folder-" + hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def load_folder(ctx: LoadContext, *, path: str, size: int = 0, channels: int | str = "auto") -> Splits:
    """The splits of the ImageFolder tree at ``path`` (module docstring), from the cache when the
    folder has not changed since it was written."""
    root = Path(path).expanduser()
    where = f"folder dataset {root}"
    folder = _scan_folder(root, ctx.val_split, where)
    return cached(folder_cache_name(folder, size, channels), lambda: _build_folder(folder, size, channels, where))


# --- arrays: npz files and registered functions -----------------------------------------------


def _as_tensor(x: Any, name: str, where: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise SpecError(f"{where}: {name} holds {arr.dtype} values, not numbers")
    if arr.dtype.kind == "u" and arr.dtype.itemsize > 1:  # torch's min/max lack the wide unsigned types
        arr = arr.astype(np.int64)
    elif not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return torch.from_numpy(arr)


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")  # float32, as NumPy names it


def _to_uint8(t: torch.Tensor, name: str, where: str) -> torch.Tensor:
    """Pixel values as uint8: uint8 as is, integers in 0..255, floats in [0, 1] times 255, rounded."""
    if t.dtype == torch.uint8:
        return t
    if t.dtype == torch.bool or t.dtype.is_complex:
        raise SpecError(f"{where}: {name} holds {_dtype(t)} values; images must be uint8 0..255 or floats in [0, 1]")
    lo, hi = (t.min().item(), t.max().item()) if t.numel() else (0, 0)
    if t.dtype.is_floating_point:
        if not (0.0 <= lo and hi <= 1.0):
            raise SpecError(f"{where}: {name} holds floats in [{lo:g}, {hi:g}]; float images must lie in [0, 1] "
                            f"(or be uint8 0..255)")
        out = torch.empty(t.shape, dtype=torch.uint8)
        for src, dst in zip(t.split(4096), out.split(4096), strict=True):  # never a float copy of all of it
            dst.copy_(src.to(torch.float32).mul(255).round_())
        return out
    if lo < 0 or hi > 255:
        raise SpecError(f"{where}: {name} holds integers in [{lo}, {hi}]; integer images must lie in 0..255")
    return t.to(torch.uint8)


def images_from_array(x: Any, name: str, where: str) -> torch.Tensor:
    """Array ``x`` as uint8 ``(N, C, H, W)`` by the rules of the module docstring; SpecError otherwise."""
    t = _as_tensor(x, name, where)
    shape = tuple(t.shape)
    if t.ndim == 3:
        t = t.unsqueeze(1)
    elif t.ndim == 4 and shape[1] not in (1, 3):
        if shape[3] not in (1, 3):
            raise SpecError(f"{where}: {name} has shape {shape}; a 4-D image array needs 1 or 3 channels, "
                            f"in dim 1 (NCHW) or in the last dim (NHWC)")
        t = t.permute(0, 3, 1, 2)
    elif t.ndim != 4:
        raise SpecError(f"{where}: {name} has shape {shape}; expected (N, H, W), (N, C, H, W) or (N, H, W, C)")
    if t.shape[2] != t.shape[3]:
        raise SpecError(f"{where}: {name} holds {t.shape[2]}x{t.shape[3]} (HxW) images; they must be square")
    return _to_uint8(t, name, where).contiguous()


def labels_from_array(y: Any, name: str, where: str) -> torch.Tensor:
    """Array ``y`` as int64 ``(N,)`` labels (``(N, 1)`` is flattened); SpecError if not integers."""
    t = _as_tensor(y, name, where)
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.ndim != 1:
        raise SpecError(f"{where}: {name} has shape {tuple(t.shape)}; expected (N,) labels")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise SpecError(f"{where}: {name} holds {_dtype(t)} values; labels must be integers 0..K-1")
    return t.to(torch.int64)


def _class_names(classes: Any, where: str) -> tuple[str, ...] | None:
    if classes is None:
        return None
    if isinstance(classes, np.ndarray) and classes.dtype.kind not in "US":
        raise SpecError(f"{where}: classes holds {classes.dtype} values; expected the class names as strings")
    names = [c.decode() if isinstance(c, bytes) else c for c in np.asarray(classes).reshape(-1).tolist()]
    if not all(isinstance(c, str) for c in names):
        raise SpecError(f"{where}: classes must be the class names as strings, got {names[:3]!r}")
    return tuple(names)


def _check_labels(labels: torch.Tensor, name: str, k: int, classes: tuple[str, ...] | None, where: str) -> None:
    if not len(labels):
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= k:
        names = f" (classes names {k})" if classes is not None else ""
        raise SpecError(f"{where}: {name} holds labels from {lo} to {hi}; expected integers 0..{k - 1}{names}")


def _pair(arrays: Mapping[str, Any], split: str, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = images_from_array(arrays[f"x_{split}"], f"x_{split}", where)
    y = labels_from_array(arrays[f"y_{split}"], f"y_{split}", where)
    if len(x) != len(y):
        raise SpecError(f"{where}: x_{split} holds {len(x):,} images but y_{split} {len(y):,} labels")
    return x, y


def splits_from_arrays(arrays: Mapping[str, Any], where: str) -> Splits:
    """The splits of ``x_train``, ``y_train``, the optional ``x_test``, ``y_test`` and ``classes``
    (module docstring); a missing test pair leaves the test split empty."""
    for key in ("x_train", "y_train"):
        if arrays.get(key) is None:
            raise SpecError(f"{where}: no {key!r} (given: {', '.join(k for k in arrays if arrays[k] is not None)})")
    has_test = [arrays.get(key) is not None for key in ("x_test", "y_test")]
    if has_test[0] != has_test[1]:
        given, absent = ("x_test", "y_test") if has_test[0] else ("y_test", "x_test")
        raise SpecError(f"{where}: has {given} but no {absent}; give both or neither (then use --val-split)")
    x_train, y_train = _pair(arrays, "train", where)
    if not len(x_train):
        raise SpecError(f"{where}: x_train holds no images")
    x_test, y_test = _pair(arrays, "test", where) if has_test[0] else (x_train[:0], y_train[:0])
    if x_test.shape[1:] != x_train.shape[1:]:
        shapes = ["x".join(map(str, t.shape[1:])) for t in (x_train, x_test)]
        raise SpecError(f"{where}: x_train images are {shapes[0]} but x_test images {shapes[1]} (CxHxW)")
    classes = _class_names(arrays.get("classes"), where)
    k = len(classes) if classes is not None else int(torch.cat([y_train, y_test]).max()) + 1
    for name, labels in (("y_train", y_train), ("y_test", y_test)):
        _check_labels(labels, name, k, classes, where)
    return Splits(x_train, y_train, x_test, y_test, num_classes=k, classes=classes)


def _read_npz(file: Path, where: str, val_split: float) -> dict[str, np.ndarray]:
    try:
        data = np.load(file, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):
        raise SpecError(f"{where} is not a NumPy .npz file (a zip of .npy arrays, as numpy.savez writes)") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise SpecError(f"{where} holds a single array (a .npy file), not an .npz with x_train, y_train, ...")
    with data:
        for key in ("x_train", "y_train"):
            if key not in data.files:
                raise SpecError(f"{where} lacks array {key!r} (it holds: {', '.join(data.files) or 'nothing'})")
        if "x_test" not in data.files and "y_test" not in data.files and not val_split:
            raise _no_test_split(where, "no x_test and y_test")
        arrays = {}
        for key in (*ARRAY_KEYS, "classes"):
            if key in data.files:
                try:
                    arrays[key] = data[key]
                except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
                    reason = " ".join(str(exc).split())
                    raise SpecError(f"{where}: cannot read array {key!r} ({reason})") from None
    return arrays


def load_npz(ctx: LoadContext, *, path: str) -> Splits:
    """The splits of the ``.npz`` at ``path`` (module docstring)."""
    file = Path(path).expanduser()
    where = f"npz dataset {file}"
    if not file.exists():
        raise DatasetMissing(f"{where} does not exist")
    if not file.is_file():
        hint = f"; for a folder of images use 'folder:{file}'" if file.is_dir() else ""
        raise SpecError(f"{where} is not a file{hint}")
    stat = file.stat()
    key = {"version": FOLDER_CACHE_VERSION, "file": str(file.resolve()), "bytes": stat.st_size,
           "mtime_ns": stat.st_mtime_ns}
    name = "npz-" + hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    return cached(name, lambda: splits_from_arrays(_read_npz(file, where, ctx.val_split), where))


# --- datasets registered from Python ------------------------------------------------------------

def _converter(default: Any) -> Converter:
    """A spec value (a string) becomes the type of the argument's default (strings stay strings)."""
    return converter_for(default) or str


def _splits_from_result(result: Any, where: str) -> Splits:
    if isinstance(result, Splits):
        if result.train_images.dtype != torch.uint8 or result.train_images.ndim != 4:
            raise SpecError(f"{where}: the Splits returned hold {result.train_images.dtype} images of shape "
                            f"{tuple(result.train_images.shape)}; expected uint8 (N, C, H, W)")
        return result
    if isinstance(result, Mapping):
        return splits_from_arrays(result, where)
    if isinstance(result, (tuple, list)) and len(result) == 4:
        return splits_from_arrays(dict(zip(ARRAY_KEYS, result, strict=True)), where)
    raise SpecError(f"{where}: the function returned a {type(result).__name__}; expected a dict with x_train, "
                    f"y_train, x_test, y_test (and classes), a 4-tuple (x_train, y_train, x_test, y_test) or a Splits")


def _load_function(fn: Callable[..., Any], name: str, ctx: LoadContext, **kwargs: Any) -> Splits:
    return _splits_from_result(fn(**kwargs), f"dataset {name!r}")


def function_entry(fn: Callable[..., Any], name: str) -> DatasetEntry:
    """The registry entry of a user's dataset function (see :func:`reslab.datasets.register_dataset`)."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"dataset name {name!r} is not a spec name: letters, digits, _ and -, "
                         f"starting with a letter or _")
    params = list(inspect.signature(fn).parameters.values())
    for p in params:
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.default is inspect.Parameter.empty:
            raise TypeError(f"dataset function {name!r}: every parameter must be keyword-only with a default "
                            f"(def {name}(*, {p.name}=...)); {p.name!r} is not")
        if p.name in ("crop", "flip"):
            raise TypeError(f"dataset function {name!r}: parameter {p.name!r} is taken by the augmentation "
                            f"every dataset has (crop=, flip=)")
    doc = (inspect.getdoc(fn) or "").strip()
    description = doc.splitlines()[0] if doc else f"{name} (registered from {fn.__module__})"
    return DatasetEntry(
        name, description, functools.partial(_load_function, fn, name),
        {p.name: (_converter(p.default), p.default) for p in params},
        module=fn.__module__, source=str(file) if (file := source_file_of(fn)) else None,
    )


__all__ = [
    "available_memory", "check_fits", "decode_file", "decode_images", "format_bytes", "function_entry",
    "images_from_array", "labels_from_array", "load_folder", "load_npz", "splits_from_arrays",
]
