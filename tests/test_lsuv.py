"""reslab.lsuv: LSUV (Mishkin & Matas 2016, arXiv 1511.06422) on ResNet-20 and the MLP."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import reslab
from reslab.errors import SpecError
from reslab.inits import CONV_TYPES
from reslab.lsuv import DEFAULT_MAX_ITER, DEFAULT_TOL, LsuvLayer, check_lsuv_args, lsuv_init, lsuv_variances

LAYERS = (*CONV_TYPES, nn.Linear)


@pytest.fixture(autouse=True)
def _seeded():
    """Seed the global RNG (model init, orthogonal_) without leaking it to other tests."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    """64 noise images; ResNet-20 tests take the first 16 (a ResNet-20 LSUV is ~20 forward passes)."""
    return torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def resnet20(norm: str = "none") -> nn.Module:
    return reslab.build_model("cifar_resnet20", norm=norm, num_classes=10, in_channels=1)


def mlp() -> nn.Module:
    return reslab.build_model("mlp", num_classes=10, in_channels=1)


def layer_paths(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, LAYERS)]


def others(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer except conv/linear weights and biases, cloned."""
    layer_params = {id(p) for m in model.modules() if isinstance(m, LAYERS) for p in m.parameters(recurse=False)}
    out = {f"param:{n}": p.detach().clone() for n, p in model.named_parameters() if id(p) not in layer_params}
    out.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()})
    return out


def modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def assert_same(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_defaults_are_the_papers():
    assert (DEFAULT_TOL, DEFAULT_MAX_ITER) == (0.1, 10)


@pytest.mark.parametrize("norm, tol", [("none", 0.1), ("none", 0.02), ("bn", 0.1)])
def test_resnet20_every_layer_ends_within_tol(batch, norm, tol):
    batch = batch[:16]
    model = resnet20(norm)
    if norm == "bn":  # non-trivial affines and running stats, which LSUV must not touch
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.5, 0.5)
        with torch.no_grad():
            model(batch)
    before = others(model)
    rows = lsuv_init(model, batch, tol=tol)
    assert all(isinstance(r, LsuvLayer) for r in rows)
    assert [r.path for r in rows] == layer_paths(model)  # ResNet-20 registers in forward order
    assert all(r.converged and abs(r.variance - 1) <= tol and 0 <= r.iterations <= DEFAULT_MAX_ITER for r in rows)
    assert sum(r.iterations for r in rows) >= len(rows) // 2  # orthogonal_ alone is not unit variance
    variances = lsuv_variances(model, batch)
    assert list(variances) == [r.path for r in rows]
    for r in rows:  # later rescalings leave earlier outputs as they were
        assert abs(variances[r.path] - 1) <= tol, r.path
        assert variances[r.path] == pytest.approx(r.variance, rel=1e-9)
    assert_same(before, others(model))


def test_mlp_with_dropout(batch):
    model = mlp()
    model.train()
    before, modes_before = others(model), modes(model)
    rows = lsuv_init(model, batch)
    assert [r.path for r in rows] == ["features.0", "features.3", "fc"]
    assert all(r.converged for r in rows)
    assert modes(model) == modes_before and model.features[2].training
    # Dropout is off while measuring: the same numbers every time, in training mode.
    first, second = lsuv_variances(model, batch), lsuv_variances(model, batch)
    assert first == second
    assert [first[r.path] for r in rows] == pytest.approx([r.variance for r in rows], rel=1e-9)
    assert_same(before, others(model))


def test_orthogonal_rows(batch):
    model = mlp()
    lsuv_init(model, batch)
    for layer in (model.features[0], model.features[3], model.fc):  # out <= in: W W^T = I / s^2
        w = layer.weight.detach().double()
        gram = w @ w.T
        scale = gram.diagonal().mean()
        assert torch.allclose(gram / scale, torch.eye(w.shape[0], dtype=torch.float64), atol=1e-5)
        assert torch.count_nonzero(layer.bias) == 0
    model = resnet20()
    lsuv_init(model, batch[:8])
    conv = model.layer2[0].conv1  # (32, 16*3*3) as a matrix
    w = conv.weight.detach().double().flatten(1)
    gram = w @ w.T
    assert torch.allclose(gram / gram.diagonal().mean(), torch.eye(32, dtype=torch.float64), atol=1e-5)


def test_orthogonal_false_keeps_the_callers_weights_up_to_scale(batch):
    model = mlp()
    nn.init.normal_(model.features[0].bias, 0.0, 0.01)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = lsuv_init(model, batch, orthogonal=False)
    assert all(r.converged for r in rows)
    for name, p in model.named_parameters():
        if name.endswith("weight"):  # a positive multiple of the original
            ratio = p.detach() / saved[name]
            assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-4)
            assert ratio.flatten()[0] > 0
        else:
            assert torch.equal(p.detach(), saved[name]), name


def test_variance_is_the_population_variance_in_float64(batch):
    model = mlp()
    variances = lsuv_variances(model, batch)
    model.eval()  # no BN in the MLP: eval differs from LSUV's passes only in dropout, which LSUV turns off
    with torch.no_grad():
        logits = model(batch).double()
    assert variances["fc"] == pytest.approx(float(logits.var(correction=0)), rel=1e-6)


def test_stops_after_max_iter(batch):
    """Only the weight is divided (the paper): a bias alone of variance ~4 keeps the output above 1 + tol."""
    layer = nn.Linear(784, 10)
    with torch.no_grad():
        layer.bias.copy_(torch.linspace(-3.4, 3.4, 10))
    model = nn.Sequential(nn.Flatten(), layer)
    [row] = lsuv_init(model, batch, max_iter=3, orthogonal=False)
    assert (row.path, row.iterations, row.converged) == ("1", 3, False)
    assert math.isfinite(row.variance) and row.variance > 1.1


def test_each_step_runs_the_net_only_up_to_the_layer(batch):
    model = mlp()
    calls = {"features.0": 0, "fc": 0}
    for name in calls:
        model.get_submodule(name).register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    rows = {r.path: r for r in lsuv_init(model, batch)}
    # fc: the pass that finds the order, then its own measurements; features.0: every measurement
    assert calls["fc"] == 1 + rows["fc"].iterations + 1
    assert calls["features.0"] == 1 + sum(r.iterations + 1 for r in rows.values())


class Reversed(nn.Module):
    """Registers fc before conv, calls conv first, never calls ``unused``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4 * 28 * 28, 10)
        self.unused = nn.Linear(3, 3)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_forward_order_not_registration_order(batch):
    model = Reversed()
    rows = lsuv_init(model, batch[:8])
    assert [r.path for r in rows] == ["conv", "fc"]
    assert list(lsuv_variances(model, batch[:8])) == ["conv", "fc"]


def test_resnet20_order_starts_at_stem_and_ends_at_fc(batch):
    rows = lsuv_init(resnet20(), batch[:4])
    assert rows[0].path == "conv1" and rows[-1].path == "fc"
    assert rows[1].path == "layer1.0.conv1"


@pytest.mark.parametrize("tol, max_iter, bad", [
    (0, 10, "0"), (1, 10, "1"), (-0.1, 10, "-0.1"), (1.5, 10, "1.5"), (float("nan"), 10, "nan"),
    (True, 10, "True"), ("0.1", 10, "'0.1'"),
    (0.1, 0, "0"), (0.1, 2.5, "2.5"), (0.1, -1, "-1"), (0.1, True, "True"), (0.1, "3", "'3'"),
])
def test_check_lsuv_args(tol, max_iter, bad):
    with pytest.raises(SpecError) as info:
        check_lsuv_args(tol, max_iter)
    message = str(info.value)
    assert "\n" not in message and message.endswith(f"got {bad}")
    assert ("tol" if max_iter == 10 else "max_iter") in message


def test_check_lsuv_args_accepts_good_values():
    check_lsuv_args(0.1, 10)
    check_lsuv_args(0.02, 1)


def test_lsuv_init_checks_args_first(batch):
    model = mlp()
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(SpecError, match="max_iter"):
        lsuv_init(model, batch, max_iter=0)
    assert_same(saved, {n: p.detach() for n, p in model.named_parameters()})


def test_zero_weight_layer_is_not_converged_and_gives_no_nan(batch):
    model = resnet20()
    nn.init.zeros_(model.layer1[1].conv2.weight)
    rows = {r.path: r for r in lsuv_init(model, batch[:8], orthogonal=False)}
    zero = rows["layer1.1.conv2"]
    assert (zero.variance, zero.iterations, zero.converged) == (0.0, 0, False)
    assert all(r.converged for path, r in rows.items() if path != "layer1.1.conv2")
    assert all(math.isfinite(r.variance) for r in rows.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.count_nonzero(model.layer1[1].conv2.weight) == 0


def test_non_finite_output_names_the_layer(batch):
    model = resnet20()
    bad = batch[:4].clone()
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(SpecError, match="'conv1'") as info:
        lsuv_init(model, bad)
    assert "\n" not in str(info.value)


def test_modes_restored_and_buffers_untouched(batch):
    model = resnet20("bn")
    model.train()
    model.layer2.eval()  # a mixed state must come back exactly
    with torch.no_grad():
        model(batch[:8])
    before, modes_before = others(model), modes(model)
    lsuv_init(model, batch[:8])
    assert modes(model) == modes_before
    assert_same(before, others(model))
    model.eval()
    lsuv_variances(model, batch[:8])
    assert not any(modes(model).values())
    assert_same(before, others(model))


def test_lsuv_variances_leaves_the_model_alone(batch):
    model = resnet20("bn")
    saved = {n: t.detach().clone() for n, t in model.state_dict().items()}
    variances = lsuv_variances(model, batch[:16])
    assert list(variances) == layer_paths(model)
    assert all(v > 0 for v in variances.values())
    assert_same(saved, {n: t.detach() for n, t in model.state_dict().items()})


@pytest.mark.parametrize("bad, match", [
    ([[1.0]], "tensor"), (torch.empty(0, 1, 28, 28), "at least one sample"), (torch.tensor(1.0), "at least one"),
])
def test_bad_batch(bad, match):
    with pytest.raises(SpecError, match=match):
        lsuv_init(mlp(), bad)
    with pytest.raises(SpecError, match=match):
        lsuv_variances(mlp(), bad)


def test_model_without_layers_is_an_error(batch):
    with pytest.raises(SpecError, match="no conv or linear"):
        lsuv_init(nn.Sequential(nn.Flatten(), nn.ReLU()), batch[:2])
