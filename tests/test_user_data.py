"""Datasets users bring: ``folder:PATH``, ``npz:FILE`` and ``@register_dataset`` functions, checked against
torchvision's ImageFolder on real image files, and every bad input as one line that caches nothing."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import reslab.user_datasets as user_datasets
from reslab.cli import main
from reslab.datasets import (
    _REGISTRY,
    DatasetMissing,
    Splits,
    dataset_source,
    list_datasets,
    load_dataset,
    register_dataset,
)
from reslab.errors import SpecError

CLASSES = ("Dog", "ant", "cat")  # sorted as ImageFolder sorts them: case-sensitive


@pytest.fixture(autouse=True)
def cache(monkeypatch, tmp_path):
    """Every test caches into its own folder, returned."""
    path = tmp_path / "cache"
    monkeypatch.setenv("RESLAB_CACHE", str(path))
    return path


def cached_files(cache):
    return sorted(cache.glob("*")) if cache.exists() else []


@pytest.fixture(scope="session")
def digits():
    """The scikit-learn 8x8 digits as uint8 (N, 8, 8) in 0..255, and their labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.rint(bunch.images * 255 / 16).astype(np.uint8), bunch.target


def save(path, array):
    """Write a uint8 (H, W) or (H, W, C) array as an image file (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"quality": 95, "subsampling": 0} if path.suffix.lower() in (".jpg", ".jpeg") else {}
    Image.fromarray(array).save(path, **options)


def write_split(root, digits, per_class, start=0, suffix=".png", colour=False):
    """``per_class`` digits of each class in CLASSES under ``root/<class>/``; returns {relative path: image}."""
    images, labels = digits
    written = {}
    for label, name in enumerate(CLASSES):
        for k, i in enumerate(np.flatnonzero(labels == label)[start:start + per_class]):
            img = images[i]
            if colour:  # three different channels, so a colour image is no gray one in disguise
                img = np.stack([img, 255 - img, np.roll(img, 1, axis=1)], axis=-1)
            path = root / name / f"{k:03d}{suffix}"
            save(path, img)
            written[str(path)] = img
    return written


@pytest.fixture
def tree(tmp_path, digits):
    """A train/test ImageFolder tree of gray PNG digits, 6 + 2 per class."""
    root = tmp_path / "digits"
    write_split(root / "train", digits, 6)
    write_split(root / "test", digits, 2, start=6)
    return root


@pytest.fixture
def registered():
    """Datasets registered by a test are removed again after it."""
    before = set(_REGISTRY)
    yield
    for name in set(_REGISTRY) - before:
        del _REGISTRY[name]


def test_extensions_are_torchvisions():
    assert user_datasets.IMG_EXTENSIONS == torchvision.datasets.folder.IMG_EXTENSIONS


# --- folder ------------------------------------------------------------------------------------------


def test_folder_follows_image_folder(tree):
    ds = load_dataset(f"folder:{tree}")
    reference = torchvision.datasets.ImageFolder(str(tree / "train"))
    assert reference.class_to_idx == {name: i for i, name in enumerate(ds.classes)}
    assert ds.classes == CLASSES and ds.num_classes == 3
    assert ds.train_labels.tolist() == reference.targets  # same order, hence the same multiset
    assert ds.train_images.dtype == torch.uint8 and ds.train_images.shape == (18, 1, 8, 8)
    assert (ds.num_eval, ds.eval_split, ds.in_channels, ds.image_size) == (6, "test", 1, 8)
    rgb = load_dataset(f"folder:{tree},channels=3")  # what ImageFolder's PIL loader gives: RGB
    assert rgb.train_images.shape == (18, 3, 8, 8)
    for i in range(len(reference)):
        pil, target = reference[i]
        assert torch.equal(rgb.train_images[i], torch.from_numpy(np.array(pil)).permute(2, 0, 1))
        assert torch.equal(ds.train_images[i, 0], rgb.train_images[i, 0]) and int(ds.train_labels[i]) == target
    assert ds.mean == pytest.approx([ds.train_images.double().mean().item() / 255])


def test_colour_jpegs_and_channels(tmp_path, digits):
    written = write_split(tmp_path / "rgb" / "train", digits, 3, suffix=".jpg", colour=True)
    write_split(tmp_path / "rgb" / "test", digits, 1, start=3, suffix=".JPEG", colour=True)  # any case
    ds = load_dataset(f"folder:{tmp_path / 'rgb'}")
    assert ds.train_images.shape == (9, 3, 8, 8) and ds.in_channels == 3 and ds.num_eval == 3
    for i, img in enumerate(written.values()):  # JPEG is lossy: compare with PIL's decode of the same file
        pil = np.asarray(Image.open(list(written)[i]).convert("RGB")).transpose(2, 0, 1)
        assert np.abs(ds.train_images[i].numpy().astype(int) - pil).max() <= 2
        assert np.abs(pil.astype(int) - img.transpose(2, 0, 1)).mean() < 10  # the file written, in order
    gray = load_dataset(f"folder:{tmp_path / 'rgb'},channels=1")
    expected = torchvision.transforms.v2.functional.rgb_to_grayscale(ds.train_images)
    assert gray.train_images.shape == (9, 1, 8, 8) and torch.equal(gray.train_images, expected)


def test_mixed_gray_and_colour_alpha_bmp_and_16_bit(tmp_path, digits):
    images, _ = digits
    root = tmp_path / "mixed"
    save(root / "train" / "a" / "gray.png", images[0])
    save(root / "train" / "a" / "rgba.png", np.dstack([images[1]] * 3 + [np.full((8, 8), 7, np.uint8)]))
    save(root / "train" / "b" / "gray.bmp", images[2])  # PIL decodes what torchvision cannot
    (root / "test" / "a").mkdir(parents=True)
    Image.fromarray(images[3].astype(np.uint16) * 257).save(root / "test" / "a" / "deep.png")  # 16 bits
    save(root / "test" / "b" / "rgb.tif", np.dstack([images[4]] * 3))
    ds = load_dataset(f"folder:{root}")
    assert ds.train_images.shape == (3, 3, 8, 8)  # one colour image: 3 channels for all, alpha dropped
    for i, source in enumerate([images[0], images[1], images[2]]):
        assert torch.equal(ds.train_images[i], torch.from_numpy(source).expand(3, 8, 8))
    assert torch.equal(ds.eval_images[0], torch.from_numpy(images[3]).expand(3, 8, 8))
    assert torch.equal(ds.eval_images[1], torch.from_numpy(images[4]).expand(3, 8, 8))


def test_size_resizes_as_torchvision(tmp_path, digits):
    images, _ = digits
    root = tmp_path / "sizes"
    big = np.kron(images[0], np.ones((3, 5), np.uint8))  # 24x40: neither square nor 8x8
    sources = {"train/a/small.png": images[1], "train/a/wide.png": big, "train/b/other.png": images[2],
               "test/a/x.png": images[3], "test/b/y.png": images[4]}
    for rel, source in sources.items():
        save(root / rel, source)
    ds = load_dataset(f"folder:{root},size=16")
    assert ds.image_size == 16 and ds.train_images.shape == (3, 1, 16, 16) and ds.eval_images.shape == (2, 1, 16, 16)
    resize = torchvision.transforms.v2.functional.resize
    for img, source in zip(torch.cat([ds.train_images, ds.eval_images]), sources.values(), strict=True):
        assert torch.equal(img, resize(torch.from_numpy(source)[None], [16, 16], antialias=True))
    assert load_dataset(f"folder:{root},size=8,channels=3").train_images.shape == (3, 3, 8, 8)


def test_val_folder_stands_in_for_test(tmp_path, digits):
    write_split(tmp_path / "d" / "train", digits, 4)
    write_split(tmp_path / "d" / "val", digits, 2, start=4)
    ds = load_dataset(f"folder:path={tmp_path / 'd'}")
    assert (ds.num_train, ds.num_eval, ds.eval_split) == (12, 6, "test")
    assert sorted(ds.eval_labels.tolist()) == [0, 0, 1, 1, 2, 2]


def test_single_tree_needs_val_split(tmp_path, digits, cache):
    write_split(tmp_path / "flat", digits, 10)
    with pytest.raises(SpecError, match="--val-split") as info:
        load_dataset(f"folder:{tmp_path / 'flat'}")
    assert "\n" not in str(info.value) and not cached_files(cache)
    ds = load_dataset(f"folder:{tmp_path / 'flat'}", val_split=0.2)
    assert (ds.num_train, ds.num_eval, ds.eval_split) == (24, 6, "val") and ds.classes == CLASSES


def test_cache_lives_in_reslab_cache_and_follows_the_files(tree, tmp_path, cache, monkeypatch, digits):
    data_dir = tmp_path / "data"
    first = load_dataset(f"folder:{tree}", data_dir=data_dir)
    files = cached_files(cache)
    assert len(files) == 1 and files[0].name.startswith("folder-")
    assert not data_dir.exists() and not list(tree.rglob("*.pt"))  # nothing next to the user's files
    calls = []
    real = user_datasets.decode_file

    def decode(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(user_datasets, "decode_file", lambda path: pytest.fail(f"decoded {path} again"))
    again = load_dataset(f"folder:{tree}")  # from the cache: not one image decoded
    assert torch.equal(again.train_images, first.train_images) and again.classes == first.classes
    monkeypatch.setattr(user_datasets, "decode_file", decode)
    save(tree / "train" / "ant" / "new.png", digits[0][100])  # an added file: a new cache
    assert load_dataset(f"folder:{tree}").num_train == 19 and calls
    calls.clear()
    path = tree / "train" / "cat" / "000.png"
    save(path, 255 - np.asarray(Image.open(path)))  # a changed file: a new cache
    assert not torch.equal(load_dataset(f"folder:{tree}").train_images[-6], first.train_images[-6])
    assert calls and len(cached_files(cache)) == 3
    assert load_dataset(f"folder:{tree},size=4").image_size == 4  # options are part of the key too


def test_memory_check_refuses_before_decoding(tree, monkeypatch, cache):
    monkeypatch.setattr(user_datasets, "available_memory", lambda: 1000)
    with pytest.raises(SpecError) as info:
        load_dataset(f"folder:{tree},size=32,channels=3")
    message = str(info.value)
    assert "24 images of 3x32x32 need 73.7 kB; 1.0 kB available: pass size=N or use fewer images" in message
    assert not cached_files(cache)
    assert user_datasets.format_bytes(120_000 * 3 * 224 * 224) == "18.1 GB"
    monkeypatch.setattr(user_datasets, "available_memory", lambda: None)  # unknown: no check
    assert load_dataset(f"folder:{tree},size=32").num_train == 18


# --- bad folders: one line each, nothing cached -----------------------------------------------------


def _bad_folder(kind, root, digits):
    images, _ = digits
    if kind == "missing":
        return root / "nowhere"
    root.mkdir()
    if kind == "empty":
        return root
    if kind == "no classes":
        (root / "notes.txt").write_text("no images here")
        return root
    write_split(root / "train", digits, 2)
    if kind == "no images":
        write_split(root / "test", digits, 1)
        (root / "test" / "emu").mkdir()
        (root / "test" / "emu" / "readme.txt").write_text("not an image")
    elif kind == "classes differ":
        write_split(root / "test", digits, 1)
        (root / "test" / "ant").rename(root / "test" / "bee")
    elif kind == "undecodable":
        write_split(root / "test", digits, 1)
        (root / "test" / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    elif kind == "sizes differ":
        write_split(root / "test", digits, 1)
        save(root / "test" / "cat" / "big.png", np.zeros((10, 10), np.uint8))
    elif kind == "not square":
        write_split(root / "test", digits, 1)
        for path in sorted((root / "train").rglob("*.png"))[:1]:
            save(path, np.zeros((8, 6), np.uint8))
    elif kind == "no test":
        pass
    return root


def _refused_in_one_line(spec, error, fragments, cache):
    """Loading ``spec`` raises ``error`` in one line holding every fragment, and caches nothing."""
    with pytest.raises(error) as info:
        load_dataset(spec)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    assert not cached_files(cache)


@pytest.mark.parametrize("kind, error, fragments", [
    ("missing", DatasetMissing, ["nowhere does not exist", "PATH/<class>/<image>"]),
    ("empty", SpecError, ["bad is empty", "PATH/train/<class>/<image>"]),
    ("no classes", SpecError, ["holds no class folders"]),
    ("no images", SpecError, ["class folder test/emu/ holds no images", ".png"]),
    ("classes differ", SpecError, ["different classes", "only in train/: ant", "only in test/: bee"]),
    ("undecodable", SpecError, ["cannot decode test/cat/broken.png"]),
    ("sizes differ", SpecError, ["train/Dog/000.png is 8x8", "test/cat/big.png is 10x10", "size=N"]),
    ("not square", SpecError, ["train/Dog/000.png is 8x6 (HxW), not square", "size=N"]),
    ("no test", SpecError, ["train/ but no test/ or val/", "--val-split"]),
])
def test_bad_folder_is_one_line_and_caches_nothing(kind, error, fragments, tmp_path, digits, cache):
    root = _bad_folder(kind, tmp_path / "bad", digits)
    _refused_in_one_line(f"folder:{root}", error, [str(root), *fragments], cache)


def test_a_file_is_no_folder(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"")
    with pytest.raises(SpecError, match="is not a folder; for a NumPy file use 'npz:"):
        load_dataset(f"folder:{tmp_path / 'x.npz'}")


@pytest.mark.parametrize("spec, fragment", [
    ("folder", "needs argument 'path'"),
    ("folder:x,size=-1", "'-1' for argument 'size'"),
    ("folder:x,channels=2", "expected 1, 3 or auto"),
    ("npz", "needs argument 'path'"),
])
def test_bad_folder_and_npz_arguments(spec, fragment):
    with pytest.raises(SpecError, match=fragment):
        load_dataset(spec)


# --- npz ----------------------------------------------------------------------------------------------


@pytest.fixture
def arrays():
    g = np.random.default_rng(0)
    return {"x_train": g.integers(0, 256, (20, 6, 6, 3), dtype=np.uint8), "y_train": g.integers(0, 4, 20),
            "x_test": g.integers(0, 256, (8, 6, 6, 3), dtype=np.uint8), "y_test": g.integers(0, 4, 8)}


@pytest.mark.parametrize("layout", ["NHWC", "NCHW", "NHW", "float", "keras labels"])
def test_npz_layouts_give_the_same_arrays(layout, arrays, tmp_path):
    expected = torch.from_numpy(arrays["x_train"]).permute(0, 3, 1, 2)
    saved = dict(arrays)
    if layout == "NCHW":
        saved["x_train"], saved["x_test"] = (a.transpose(0, 3, 1, 2) for a in (arrays["x_train"], arrays["x_test"]))
    elif layout == "NHW":
        saved["x_train"], saved["x_test"] = arrays["x_train"][..., 0], arrays["x_test"][..., 0]
        expected = expected[:, :1]
    elif layout == "float":
        saved["x_train"], saved["x_test"] = (a.astype(np.float32) / 255 for a in (arrays["x_train"], arrays["x_test"]))
    elif layout == "keras labels":
        saved["y_train"] = arrays["y_train"][:, None]
    np.savez(tmp_path / "d.npz", **saved)
    ds = load_dataset(f"npz:{tmp_path / 'd.npz'}")
    assert ds.train_images.dtype == torch.uint8 and torch.equal(ds.train_images, expected)
    assert torch.equal(ds.train_labels, torch.from_numpy(arrays["y_train"]).long())
    assert ds.eval_images.shape[1:] == expected.shape[1:] and ds.num_eval == 8
    assert ds.num_classes == int(max(arrays["y_train"].max(), arrays["y_test"].max())) + 1 and ds.classes is None


def test_npz_classes_and_val_split(arrays, tmp_path, cache):
    del arrays["x_test"], arrays["y_test"]
    np.savez(tmp_path / "d.npz", **arrays, classes=np.array(["a", "b", "c", "d", "e"]))
    with pytest.raises(SpecError, match="no x_test and y_test: pass --val-split"):
        load_dataset(f"npz:{tmp_path / 'd.npz'}")
    assert not cached_files(cache)
    ds = load_dataset(f"npz:{tmp_path / 'd.npz'}", val_split=0.25)
    assert ds.classes == ("a", "b", "c", "d", "e") and ds.num_classes == 5
    assert (ds.num_train, ds.num_eval, ds.eval_split) == (15, 5, "val")
    assert [f.name[:4] for f in cached_files(cache)] == ["npz-"]
    assert load_dataset(f"npz:{tmp_path / 'd.npz'}", val_split=0.25).classes == ds.classes  # from the cache


def _bad_npz(kind, path, arrays):
    if kind == "missing":
        return path
    if kind == "not npz":
        path.write_text("x_train,y_train\n1,2\n")
        return path
    if kind == "npy":
        np.save(path, arrays["x_train"])
        path.with_suffix(".npz.npy").rename(path)
        return path
    broken = dict(arrays)
    if kind == "lacks x_train":
        broken["images"] = broken.pop("x_train")
    elif kind == "lengths":
        broken["y_train"] = broken["y_train"][:-1]
    elif kind == "label range":
        broken["y_test"] = broken["y_test"] - 1
    elif kind == "float labels":
        broken["y_train"] = broken["y_train"].astype(np.float32)
    elif kind == "ndim":
        broken["x_train"] = broken["x_train"].reshape(20, -1)
    elif kind == "float range":
        broken["x_train"] = broken["x_train"].astype(np.float32)
    elif kind == "classes too few":
        broken["classes"] = np.array(["a", "b"])
    elif kind == "half a test pair":
        del broken["y_test"]
    np.savez(path, **broken)
    return path


@pytest.mark.parametrize("kind, error, fragments", [
    ("missing", DatasetMissing, ["does not exist"]),
    ("not npz", SpecError, ["is not a NumPy .npz file"]),
    ("npy", SpecError, ["holds a single array"]),
    ("lacks x_train", SpecError, ["lacks array 'x_train'", "it holds: y_train, x_test, y_test, images"]),
    ("lengths", SpecError, ["x_train holds 20 images but y_train 19 labels"]),
    ("label range", SpecError, ["y_test holds labels from -1 to", "expected integers 0.."]),
    ("float labels", SpecError, ["y_train holds float32 values; labels must be integers"]),
    ("ndim", SpecError, ["x_train has shape (20, 108)", "(N, H, W)"]),
    ("float range", SpecError, ["x_train holds floats in [0, 255]", "must lie in [0, 1]"]),
    ("classes too few", SpecError, ["expected integers 0..1 (classes names 2)"]),
    ("half a test pair", SpecError, ["has x_test but no y_test"]),
])
def test_bad_npz_is_one_line_and_caches_nothing(kind, error, fragments, arrays, tmp_path, cache):
    path = _bad_npz(kind, tmp_path / "bad.npz", arrays)
    _refused_in_one_line(f"npz:{path}", error, [str(path), *fragments], cache)


# --- datasets registered from Python ---------------------------------------------------------------


def test_register_dataset_decorator(registered, arrays):
    @register_dataset
    def pets(*, size: int = 6, gray: bool = False, scale: float = 1.0, tag: str = "x"):
        """Pet photos, small.

        More text that is not the description.
        """
        x = arrays["x_train"][:, :size, :size]
        x = x[..., :1] if gray else x
        return {"x_train": x, "y_train": arrays["y_train"], "x_test": x[:4], "y_test": arrays["y_train"][:4],
                "classes": ["a", "b", "c", "d"], "scale": scale, "tag": tag}

    assert pets(size=2)["x_train"].shape == (20, 2, 2, 3)  # the function itself is returned unchanged
    description = list_datasets()["pets"]
    assert description == "Pet photos, small. (args: size=6, gray=False, scale=1, tag=x, crop=0, flip=False)"
    ds = load_dataset("pets:size=4,gray=true,scale=0.5,tag=y,flip=true")
    assert ds.train_images.shape == (20, 1, 4, 4) and ds.classes == ("a", "b", "c", "d") and ds.augment.flip
    with pytest.raises(SpecError, match="'many' for argument 'size'"):
        load_dataset("pets:size=many")
    with pytest.raises(ValueError, match="'pets' is already registered"):
        register_dataset(name="pets")(lambda: None)
    source = dataset_source("pets:size=4")
    assert source == {"module": __name__, "file": str(Path(__file__).resolve())}
    assert dataset_source("digits") is None and dataset_source("folder:x") is None
    assert dataset_source("unregistered:size=3") is None


def test_registered_functions_return_tuples_and_splits(registered, arrays):
    @register_dataset(name="as-tuple")
    def as_tuple():
        return arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"]

    @register_dataset(name="as-splits")
    def as_splits():
        x = torch.from_numpy(arrays["x_train"]).permute(0, 3, 1, 2).contiguous()
        y = torch.from_numpy(arrays["y_train"])
        return Splits(x, y, x[:4], y[:4], num_classes=7)

    @register_dataset(name="as-list")
    def as_list():
        return [1, 2]

    tup, spl = load_dataset("as-tuple"), load_dataset("as-splits")
    assert torch.equal(tup.train_images, spl.train_images) and spl.num_classes == 7 and tup.num_eval == 8
    assert list_datasets()["as-tuple"] == f"as-tuple (registered from {__name__}) (args: crop=0, flip=False)"
    with pytest.raises(SpecError, match="'as-list': the function returned a list; expected a dict"):
        load_dataset("as-list")


def test_registered_function_without_test_split_needs_val_split(registered, arrays):
    register_dataset(name="trainonly")(lambda: {"x_train": arrays["x_train"], "y_train": arrays["y_train"]})
    with pytest.raises(SpecError, match="'trainonly' has no test split: pass --val-split"):
        load_dataset("trainonly")
    assert load_dataset("trainonly", val_split=0.5).num_eval == 10


def test_register_dataset_refuses_bad_functions(registered):
    def positional(size=3):
        return None

    with pytest.raises(TypeError, match="'positional': every parameter must be keyword-only with a default"):
        register_dataset(positional)
    with pytest.raises(TypeError, match="keyword-only with a default"):
        register_dataset(name="nodefault")(lambda *, size: None)
    with pytest.raises(TypeError, match="'flip' is taken"):
        register_dataset(name="flips")(lambda *, flip=True: None)
    with pytest.raises(ValueError, match="not a spec name"):
        register_dataset(name="my pets")(lambda: None)
    with pytest.raises(ValueError, match="'digits' is already registered"):
        register_dataset(name="digits")(lambda: None)
    assert not {"positional", "nodefault", "flips", "my pets"} & set(_REGISTRY)


# --- the command line -------------------------------------------------------------------------------


def test_list_datasets_shows_folder_and_npz(capsys):
    assert main(["list", "datasets"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "path=<required>, size=0, channels=auto" in lines["folder"]
    assert "path=<required>" in lines["npz"] and "x_train" in lines["npz"]


def test_cli_bad_folder_is_one_line_exit_2(capsys, tmp_path):
    code = main(["train", "--dataset", f"folder:{tmp_path / 'nowhere'}", "--model", "simple_cnn", "--epochs", "1",
                 "--device", "cpu", "--out", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1 and "nowhere does not exist" in err
