"""reslab.measure: BatchNorm running statistics against the population statistics of each layer's input."""

import math
import shutil

import pytest
import torch

from conftest import TINY_RUN
from reslab.config import TrainConfig
from reslab.errors import SpecError
from reslab.evaluate import load_run, split_data
from reslab.measure import (
    BN_HEADERS,
    MEASUREMENTS,
    batchnorm_layers,
    bn_statistics,
    bn_variance_measurement,
    is_batchnorm,
    layer_row,
    population_statistics,
    run_measurements,
)
from reslab.norms import GhostBatchNorm2d
from reslab.rundir import MODEL_STATE, Run, read_checkpoint
from reslab.training import run_dataset, train

BN_LAYERS = [("bn1", 16), ("bn2", 32), ("bn3", 64)]  # simple_cnn, in forward order


def _train(out, norm):
    # the tiny run every test trains (tests/conftest.py), here shared by the module's tests
    result = train(TrainConfig(**{**TINY_RUN, "norm": norm, "init": "kaiming_normal", "out": str(out)}))
    assert result.summary["status"] == "completed"
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    return {"root": root, "ghost": _train(root / "ghost2", "bn:ghost=2"), "bn": _train(root / "bn", "bn")}


def _read(run_dir):
    run = Run.read(run_dir)
    return run.config, run.summary


def _run(path, status="completed", **fields):
    """A run record as a sweep hands it over: its directory, config and status."""
    return Run(path=path, config=TrainConfig(**fields), summary={"status": status})


@pytest.mark.slow
def test_one_row_per_bn_layer_in_forward_order(runs):
    rows = bn_statistics(runs["ghost"])
    assert [(r["layer"], r["channels"]) for r in rows] == BN_LAYERS
    for row in rows:
        assert set(row) == {"layer", "channels", "var_ratio", "var_ratio_q10", "var_ratio_q90", "mean_shift"}
        assert 0 < row["var_ratio_q10"] <= row["var_ratio"] <= row["var_ratio_q90"]
        assert math.isfinite(row["mean_shift"]) and row["mean_shift"] >= 0
    # a subset of the images: the same layers, other numbers; the run's test split works too
    assert [r["layer"] for r in bn_statistics(runs["ghost"], max_images=100)] == [n for n, _ in BN_LAYERS]
    assert len(bn_statistics(runs["ghost"], split="test")) == 3


def test_population_statistics_are_exact_and_in_forward_order(runs):
    """Hooks see each layer's input; streamed float64 sums equal the moments of the whole set at once."""
    run = load_run(runs["bn"])
    cfg = run.config
    data = split_data(cfg, run_dataset(cfg), "train")
    layers = batchnorm_layers(run.model)
    registered_backwards = dict(reversed(list(layers.items())))  # hook order must come from the forward, not this
    stats = population_statistics(run.model, data.eval_batches(100), registered_backwards)
    assert list(stats) == [n for n, _ in BN_LAYERS]
    x = torch.cat([xb for xb, _ in data.eval_batches(10_000)])
    with torch.no_grad():
        y = run.model.conv1(x).double()  # bn1's input, all images at once
    mean, var = stats["bn1"]
    assert torch.allclose(mean, y.mean((0, 2, 3)), rtol=0, atol=1e-9)
    assert torch.allclose(var, y.var((0, 2, 3), correction=0), rtol=1e-9, atol=1e-12)


def test_known_ratio_and_shift(runs, tmp_path):
    """running_var = 2 x population var and running_mean = mean + std/2 everywhere: var_ratio 2, mean_shift 0.5."""
    folder = tmp_path / "run"
    shutil.copytree(runs["bn"], folder)
    run = load_run(folder)
    data = split_data(run.config, run_dataset(run.config), "train")
    layers = batchnorm_layers(run.model)
    # In eval mode a layer's input depends on the running statistics of the layers before it, so
    # set them in forward order, each from the population its input has with the earlier ones set.
    for name, layer in layers.items():
        mean, var = population_statistics(run.model, data.eval_batches(512), {name: layer})[name]
        layer.running_var.copy_(2 * var)
        layer.running_mean.copy_(mean + var.sqrt() / 2)
    state = read_checkpoint(folder)
    state[MODEL_STATE] = run.model.state_dict()
    torch.save(state, folder / "checkpoint.pt")
    rows = bn_statistics(folder)
    assert [r["layer"] for r in rows] == [n for n, _ in BN_LAYERS]
    for row in rows:
        for key in ("var_ratio", "var_ratio_q10", "var_ratio_q90"):
            assert row[key] == pytest.approx(2.0, abs=1e-6), (row["layer"], key)
        assert row["mean_shift"] == pytest.approx(0.5, abs=1e-6), row["layer"]


def _ghost_ratio(ghost, images, size=4, between=1.0, within=0.1, batch=64):
    """var_ratio of one GhostBatchNorm2d whose running statistics are the cumulative average over ``images``.

    Each image is a per-channel constant drawn with std ``between`` plus pixel noise of std
    ``within``: nearly all the variance is between images, which groups of G samples see
    only (G - 1) / G of.
    """
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(images, 4, 1, 1, generator=gen) * between
         + torch.randn(images, 4, size, size, generator=gen) * within)
    layer = GhostBatchNorm2d(4, ghost=ghost, momentum=None)  # momentum None: the plain average over batches
    model = torch.nn.Sequential(layer)
    model.train()
    with torch.no_grad():
        for start in range(0, images, batch):
            model(x[start:start + batch])
    model.eval()
    mean, var = population_statistics(model, x.split(batch))["0"]
    return layer_row("0", layer, mean, var)["var_ratio"]


def test_small_groups_underestimate_the_variance_between_images():
    """Hoffer et al. 2017 / Wu & He 2018: per-device groups of 2 miss half the between-image variance."""
    hw, w, b = 16, 0.1**2, 1.0

    def expected(g):  # E[unbiased variance of g images x hw pixels] / population variance
        return (g * hw * w + (g - 1) * hw * b) / ((g * hw - 1) * (w + b))

    ghost2, full = _ghost_ratio(2, 2048), _ghost_ratio(64, 2048)
    assert ghost2 < full
    assert ghost2 == pytest.approx(expected(2), abs=0.05)  # ~0.52
    assert full == pytest.approx(expected(64), abs=0.05)  # ~0.99


def test_measurement_groups_by_norm_and_batch_size(runs):
    root = runs["root"]
    entries = [
        Run(runs["ghost"].relative_to(root), *_read(runs["ghost"])),  # relative: under study_dir
        Run.read(runs["bn"]),  # the run record reports and sweeps read
        _run(root / "gn", norm="gn", batch_size=32),  # not BatchNorm: never read
        _run(root / "lost", "diverged", norm="bn", batch_size=32),  # not completed: never read
    ]
    result = bn_variance_measurement(root, entries)
    assert result["title"] == "BatchNorm running statistics against the population"
    assert result["headers"] == BN_HEADERS
    assert [row[:4] for row in result["rows"]] == [["bn:ghost=2", 32, 1, 3], ["bn", 32, 1, 3]]
    ghost_rows = bn_statistics(runs["ghost"])
    ratios = sorted(r["var_ratio"] for r in ghost_rows)
    row = result["rows"][0]
    assert row[4] == float(f"{ratios[1]:.3g}")  # median over the 3 layers, 3 significant digits
    assert row[5] == float(f"{sum(r < 0.9 for r in ratios) / 3:.3g}")
    assert row[6] == float(f"{sorted(r['mean_shift'] for r in ghost_rows)[1]:.3g}")
    assert "running variance" in result["text"] and "bn:ghost=2 at batch 32" in result["text"]


def test_measurement_is_none_without_batchnorm(tmp_path):
    entries = [_run(tmp_path / "a", norm="gn", batch_size=8),
               _run(tmp_path / "b", "failed", norm="bn:ghost=2", batch_size=8)]
    assert bn_variance_measurement(tmp_path, entries) is None
    assert run_measurements(tmp_path, ["bn_running_var"], entries) == []


def test_batchnorm_specs():
    for norm in ("bn", "bn:ghost=2", "bn:splits=8", "bn:momentum=0.01", "brn", "brn:r_max=2,d_max=1"):
        assert is_batchnorm(norm), norm
    for norm in ("gn", "gn:cpg=16", "ln", "in", "rms", "frn", "evonorm", "none"):
        assert not is_batchnorm(norm), norm


def test_run_measurements_and_unknown_name(runs):
    entries = [Run.read(runs["ghost"])]
    results = run_measurements(runs["root"], ["bn_running_var"], entries)
    assert len(results) == 1 and results[0]["rows"][0][:4] == ["bn:ghost=2", 32, 1, 3]
    assert set(MEASUREMENTS) == {"bn_running_var"}
    with pytest.raises(SpecError, match=r"unknown measurement 'bn_runing_var'.*valid choices: bn_running_var"):
        run_measurements(runs["root"], ["bn_running_var", "bn_runing_var"], entries)
    with pytest.raises(SpecError, match="max_images"):
        bn_statistics(runs["ghost"], max_images=0)
