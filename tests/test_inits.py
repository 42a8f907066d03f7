"""reslab.inits: every scheme against the torch.nn.init formulas, policies, seeds, errors, report."""

from __future__ import annotations

import functools
import math
import statistics

import pytest
import torch
from torch import nn

from reslab.errors import SpecError
from reslab.inits import (
    InitPolicy,
    InitRow,
    init_entry,
    init_names,
    init_weights,
    list_inits,
    model_init_names,
    parse_policy,
)
from reslab.norms import make_norm

# Big enough that a sample std is within ~0.2% of the true one.
CONV_SHAPE = (128, 256, 3)       # Conv2d(128, 256, 3): fan_in 1152, fan_out 2304
LINEAR_SHAPE = (1024, 2048)      # Linear(1024, 2048): fan_in 1024, fan_out 2048
FANS = {"conv": (128 * 9, 256 * 9), "linear": (1024, 2048)}
RTOL = 0.03

# Schemes that need arguments to be usable, and schemes with no std formula (none today).
SAMPLE_SPECS = {"constant": "constant:0.5"}
NO_PREDICTION: set[str] = set()


def big_layer(kind: str) -> nn.Module:
    return nn.Conv2d(*CONV_SHAPE) if kind == "conv" else nn.Linear(*LINEAR_SHAPE)


@functools.cache
def init_layer(kind: str, spec: str):
    """A big layer initialized by ``{kind: spec}``, shared by the read-only tests below.

    Cached because QR (orthogonal) of a 2048x1024 matrix is slow on a busy CPU.
    """
    layer = big_layer(kind)
    report = init_weights(layer, {kind: spec})
    return layer, report


def test_registry_has_every_documented_scheme():
    expected = {"default", "zeros", "ones", "constant", "uniform", "normal", "trunc_normal",
                "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "orthogonal",
                "dirac", "eye", "sparse", "rule_uniform", "rule_normal"}
    assert expected <= set(init_names())
    descriptions = list_inits()
    assert list(descriptions) == init_names()
    assert all(text and "\n" not in text for text in descriptions.values())


# --- every registered scheme: prediction vs measurement, biases --------------

@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("name", [n for n in init_names() if n not in model_init_names()])
def test_scheme_prediction_matches_measurement(name, kind):
    spec = SAMPLE_SPECS.get(name, name)
    if kind not in init_entry(name).kinds:
        with pytest.raises(SpecError, match=name):
            init_layer(kind, spec)
        return
    layer, report = init_layer(kind, spec)
    weight, bias = report.rows
    assert (weight.path, weight.kind, weight.scheme) == ("weight", kind, spec)
    assert (weight.fan_in, weight.fan_out) == FANS[kind]
    assert weight.std_measured == pytest.approx(sample_std(layer.weight), rel=1e-5)
    if name in NO_PREDICTION:
        assert weight.std_predicted is None
    elif weight.std_predicted == 0:
        assert weight.std_measured == 0
    else:
        assert weight.std_measured == pytest.approx(weight.std_predicted, rel=RTOL)
    # Biases are zero unless the scheme is the layer's own default.
    if name == "default":
        assert bias.scheme == "default" and layer.bias.abs().max() > 0
        assert bias.std_measured == pytest.approx(bias.std_predicted, rel=0.25)  # only 256-2048 values
    else:
        assert bias.scheme == "zeros" and torch.all(layer.bias == 0)


# --- reference values from the torch.nn.init formulas -------------------------

RELU = math.sqrt(2.0)


def sample_std(tensor: torch.Tensor) -> float:
    """Sample std (ddof=1) by hand, in float64: sqrt(sum((x - mean)^2) / (n - 1))."""
    x = tensor.detach().double().flatten()
    return math.sqrt(float(((x - x.sum() / x.numel()) ** 2).sum()) / (x.numel() - 1))


def std_of_ones(ones: int, numel: int) -> float:
    """Sample std of ``numel`` values of which ``ones`` are 1 and the rest 0, from the values themselves."""
    return statistics.stdev([1.0] * ones + [0.0] * (numel - ones))


def truncated_normal_std(mean: float, std: float, a: float, b: float, steps: int = 200_000) -> float:
    """Std of N(mean, std^2) restricted to [a, b], by numerical integration of the density (midpoint rule)."""
    h = (b - a) / steps
    xs = [a + (i + 0.5) * h for i in range(steps)]
    ws = [math.exp(-0.5 * ((x - mean) / std) ** 2) for x in xs]
    mass = sum(ws)
    mu = sum(w * x for w, x in zip(ws, xs, strict=True)) / mass
    return math.sqrt(sum(w * (x - mu) ** 2 for w, x in zip(ws, xs, strict=True)) / mass)


def reference_table(fan_in: int, fan_out: int, rows: int, cols: int) -> dict[str, tuple[str, float]]:
    """spec -> ("std", value) or ("bound", b) for U(-b, b), straight from the papers' formulas."""
    return {
        "xavier_uniform": ("bound", math.sqrt(6 / (fan_in + fan_out))),
        "xavier_uniform:gain=relu": ("bound", RELU * math.sqrt(6 / (fan_in + fan_out))),
        "xavier_normal": ("std", math.sqrt(2 / (fan_in + fan_out))),
        "xavier_normal:gain=relu": ("std", RELU * math.sqrt(2 / (fan_in + fan_out))),
        "xavier_normal:gain=0.5": ("std", 0.5 * math.sqrt(2 / (fan_in + fan_out))),
        "xavier_uniform:gain=tanh": ("bound", 5 / 3 * math.sqrt(6 / (fan_in + fan_out))),
        "kaiming_normal": ("std", RELU / math.sqrt(fan_in)),  # leaky_relu with a=0
        "kaiming_normal:nonlinearity=relu": ("std", RELU / math.sqrt(fan_in)),
        "kaiming_normal:mode=fan_out,nonlinearity=relu": ("std", RELU / math.sqrt(fan_out)),
        "kaiming_normal:a=0.2,nonlinearity=leaky_relu": ("std", math.sqrt(2 / 1.04) / math.sqrt(fan_in)),
        "kaiming_normal:mode=fan_out,nonlinearity=linear": ("std", 1 / math.sqrt(fan_out)),
        "kaiming_uniform:nonlinearity=relu": ("bound", RELU * math.sqrt(3 / fan_in)),
        "kaiming_uniform:mode=fan_out,nonlinearity=relu": ("bound", RELU * math.sqrt(3 / fan_out)),
        "kaiming_uniform:a=0.1,mode=fan_out": ("bound", math.sqrt(2 / 1.01) * math.sqrt(3 / fan_out)),
        "rule_uniform": ("bound", 1 / math.sqrt(fan_in)),
        "rule_normal": ("std", 1 / math.sqrt(fan_in)),
        "default": ("bound", 1 / math.sqrt(fan_in)),  # kaiming_uniform(a=sqrt(5))
        "uniform:a=-0.5,b=0.5": ("bound", 0.5),
        "normal:mean=0,std=0.02": ("std", 0.02),
        "normal": ("std", 1.0),
        # N(0,1) cut at +-2 std: variance 1 - 2*2*phi(2)/(2*Phi(2)-1)
        "trunc_normal": ("std", 0.87962),
        "trunc_normal:std=0.02,a=-0.04,b=0.04": ("std", 0.02 * 0.87962),
        "orthogonal": ("std", 1 / math.sqrt(max(rows, cols))),
        "orthogonal:gain=relu": ("std", RELU / math.sqrt(max(rows, cols))),
        # sparse_ zeroes ceil(sparsity * rows) entries of each column, the rest are N(0, std^2)
        "sparse:sparsity=0.1,std=0.01": ("std", 0.01 * math.sqrt(1 - math.ceil(0.1 * rows) / rows)),
        "sparse:sparsity=0.5,std=0.1": ("std", 0.1 * math.sqrt(1 - math.ceil(0.5 * rows) / rows)),
    }


REFERENCE_SPECS = list(reference_table(1, 1, 1, 1))


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("spec", REFERENCE_SPECS)
def test_reference_formula(spec, kind):
    layer, report = init_layer(kind, spec)
    w = layer.weight.detach()
    rows = w.shape[0]
    what, expected = reference_table(*FANS[kind], rows, w.numel() // rows)[spec]
    if what == "bound":
        top = float(w.abs().max())
        assert expected * (1 - RTOL) <= top <= expected * (1 + 1e-6)
        expected = expected / math.sqrt(3)  # the std of U(-bound, bound)
    assert float(w.std()) == pytest.approx(expected, rel=RTOL)
    # the prediction is the formula itself: exact up to the 5 digits of the trunc_normal constant
    assert report.rows[0].std_predicted == pytest.approx(expected, rel=1e-5)


def test_trunc_normal_stays_in_bounds_and_sparse_zeroes_each_column():
    layer, report = init_layer("linear", "trunc_normal:mean=0.1,std=1,a=-1,b=1.5")
    assert layer.weight.min() >= -1 and layer.weight.max() <= 1.5
    expected = truncated_normal_std(0.1, 1.0, -1.0, 1.5)
    assert report.rows[0].std_predicted == pytest.approx(expected, rel=1e-6)
    assert sample_std(layer.weight) == pytest.approx(expected, rel=RTOL)
    assert truncated_normal_std(0.0, 1.0, -2.0, 2.0) == pytest.approx(0.87962, abs=1e-5)  # the table's constant
    layer, _ = init_layer("linear", "sparse:sparsity=0.25")
    zeros_per_column = (layer.weight == 0).sum(dim=0)
    num_zeros = math.ceil(0.25 * layer.weight.shape[0])
    # sparse_ zeroes exactly num_zeros rows per column; a float32 normal draw lands on exactly 0.0
    # about once in a few million samples, so allow a stray extra zero but never fewer
    assert torch.all(zeros_per_column >= num_zeros)
    assert int((zeros_per_column - num_zeros).sum()) <= 2


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_orthogonal_rows_or_columns_are_orthonormal(kind):
    layer, _ = init_layer(kind, "orthogonal:gain=relu")
    w = layer.weight.detach().flatten(1).double() / math.sqrt(2)  # (rows, cols)
    small = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    assert torch.allclose(small, torch.eye(small.shape[0], dtype=torch.double), atol=1e-4)


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("conv_type", [nn.Conv1d, nn.Conv2d])
def test_dirac_makes_a_conv_the_identity(conv_type, groups):
    conv = conv_type(16, 16, 3, padding=1, groups=groups)
    report = init_weights(conv, {"conv": "dirac"})
    x = torch.randn(2, 16, *([9] * (conv.weight.dim() - 2)))
    assert torch.allclose(conv(x), x, atol=1e-6)
    # 16 output channels, each passing one input channel through: 16 ones among 16 * 16/groups * 3^d values
    numel = 16 * (16 // groups) * 3 ** (conv.weight.dim() - 2)
    assert int((conv.weight == 1).sum()) == 16 and int((conv.weight == 0).sum()) == numel - 16
    assert report.rows[0].std_predicted == pytest.approx(std_of_ones(16, numel), rel=1e-9)
    assert report.rows[0].std_measured == pytest.approx(std_of_ones(16, numel), rel=1e-6)


def test_eye_makes_a_square_linear_the_identity():
    linear = nn.Linear(64, 64)
    report = init_weights(linear, {"linear": "eye"})
    x = torch.randn(5, 64)
    assert torch.equal(linear(x), x)
    # 64 ones on the diagonal of a 64x64 matrix
    assert report.rows[0].std_predicted == pytest.approx(std_of_ones(64, 64 * 64), rel=1e-9)
    assert report.rows[0].std_measured == pytest.approx(std_of_ones(64, 64 * 64), rel=1e-6)


def test_gain_accepts_nonlinearity_names():
    for name, gain in [("relu", math.sqrt(2)), ("tanh", 5 / 3), ("leaky_relu", math.sqrt(2 / (1 + 0.01**2))),
                       ("selu", 0.75), ("linear", 1.0)]:
        _, report = init_layer("linear", f"xavier_normal:gain={name}")
        assert report.rows[0].std_predicted == pytest.approx(gain * math.sqrt(2 / (1024 + 2048)))


# --- policies -------------------------------------------------------------------

def norm_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), make_norm("bn", 16), make_norm("gn", 16), make_norm("ln", 16),
        make_norm("in", 16), make_norm("rms", 16), nn.GroupNorm(4, 16), nn.BatchNorm1d(16),
        nn.LayerNorm(16), nn.RMSNorm(16), nn.Flatten(), nn.Linear(16, 4),
    )


@pytest.mark.parametrize("spec", ["kaiming_normal", "default", {"conv": "orthogonal"}])
def test_norm_affine_becomes_one_and_zero(spec):
    model = norm_model()
    for p in model.parameters():
        nn.init.uniform_(p, 2, 3)
    report = init_weights(model, spec)
    norm_rows = {row.path: row for row in report if row.kind == "norm"}
    assert len(norm_rows) == 16  # 7 layers with weight and bias + 2 RMSNorms with weight only
    for name, p in model.named_parameters():
        if name in norm_rows:
            is_scale = name.endswith("weight")
            assert torch.all(p == (1 if is_scale else 0)), name
            assert norm_rows[name].scheme == ("ones" if is_scale else "zeros")


def test_norm_policy_scheme_applies_to_scales_only():
    model = norm_model()
    init_weights(model, {"norm": "constant:0.5"})
    assert torch.all(model[1].weight == 0.5) and torch.all(model[1].bias == 0)
    assert torch.all(model[5].weight == 0.5)  # RMSNorm2d's inner nn.RMSNorm


def test_mapping_policy_does_what_it_says():
    model = nn.Sequential(nn.Conv2d(*CONV_SHAPE), nn.Flatten(), nn.Linear(*LINEAR_SHAPE))
    report = init_weights(model, {"conv": "kaiming_normal:mode=fan_out", "linear": "normal:std=0.01",
                                  "bias": "constant:0.1"})
    conv, linear = model[0], model[2]
    assert float(conv.weight.detach().std()) == pytest.approx(math.sqrt(2 / (256 * 9)), rel=RTOL)
    assert float(linear.weight.detach().std()) == pytest.approx(0.01, rel=RTOL)
    assert torch.all(conv.bias == 0.1) and torch.all(linear.bias == 0.1)
    assert [row.scheme for row in report] == ["kaiming_normal:mode=fan_out", "constant:0.1",
                                              "normal:std=0.01", "constant:0.1"]


def test_mapping_defaults_and_yaml_values():
    assert parse_policy("xavier_normal") == InitPolicy(conv="xavier_normal", linear="xavier_normal")
    assert parse_policy(None) == InitPolicy() == parse_policy("default")
    policy = parse_policy({"conv": "orthogonal", "bias": None, "zero_init_residual": "true"})
    assert policy == InitPolicy(conv="orthogonal", zero_init_residual=True)
    assert parse_policy(policy) is policy
    # conv gets its own scheme, linear keeps its default; biases follow their layer.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 5, 5))
    schemes = {row.path: row.scheme for row in init_weights(model, {"conv": "orthogonal"})}
    assert schemes == {"0.weight": "orthogonal", "0.bias": "zeros", "2.weight": "default", "2.bias": "default"}


# --- zero_init_residual ---------------------------------------------------------

class ToyBlock(nn.Module):
    """conv-bn-relu-conv-bn plus identity, with a timm-style zero_init_last()."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)

    def zero_init_last(self) -> None:
        if getattr(self.bn2, "weight", None) is not None:
            nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def toy_resnet() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), ToyBlock(8), ToyBlock(8),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def test_zero_init_residual_zeroes_the_last_norm_of_each_block():
    model = toy_resnet()
    report = init_weights(model, {"conv": "kaiming_normal", "zero_init_residual": True}, seed=0)
    for block in (model[2], model[3]):
        assert torch.all(block.bn2.weight == 0) and torch.all(block.bn1.weight == 1)
    assert torch.all(model[1].weight == 1)
    zeroed = [row for row in report if row.scheme == "zeros (zero_init_residual)"]
    assert [row.path for row in zeroed] == ["2.bn2.weight", "3.bn2.weight"]
    assert all(row.std_predicted == 0 and row.std_measured == 0 for row in zeroed)
    x = torch.randn(2, 8, 6, 6).relu()
    model[2].eval()
    assert torch.allclose(model[2](x), x)  # the block starts as the identity

    init_weights(model, "kaiming_normal")
    assert torch.all(model[2].bn2.weight == 1)


def test_zero_init_residual_without_blocks_is_an_error():
    # asking for it and silently getting nothing would record a run that is not the one named
    with pytest.raises(SpecError, match="zero_init_residual") as info:
        init_weights(nn.Linear(3, 3), {"zero_init_residual": True})
    assert "Linear" in str(info.value) and "zero_init_last" in str(info.value)


# --- seeds ----------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["default", "kaiming_normal", "sparse", {"conv": "orthogonal", "linear": "eye"}])
def test_same_seed_same_weights_and_global_rng_untouched(spec):
    a, b, c = toy_resnet(), toy_resnet(), toy_resnet()
    state = torch.get_rng_state()
    report = init_weights(a, spec, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    init_weights(b, spec, seed=7)
    init_weights(c, spec, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert report.seed == 7


def test_generator_gives_reproducible_seeds():
    a, b = toy_resnet(), toy_resnet()
    ra = init_weights(a, "xavier_uniform", generator=torch.Generator().manual_seed(3))
    rb = init_weights(b, "xavier_uniform", generator=torch.Generator().manual_seed(3))
    assert ra.seed == rb.seed is not None
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    with pytest.raises(SpecError, match="not both"):
        init_weights(a, seed=1, generator=torch.Generator())


# --- bad input --------------------------------------------------------------

@pytest.mark.parametrize("spec, fragments", [
    ("kaiming_nromal", ["kaiming_nromal", "kaiming_normal", "xavier_uniform"]),
    ("normal:sd=0.1", ["'sd'", "mean, std"]),
    ("kaiming_normal:mode=sideways", ["sideways", "fan_in, fan_out"]),
    ("kaiming_uniform:nonlinearity=swish", ["swish", "relu", "leaky_relu"]),
    ("normal:std=abc", ["abc", "std"]),
    ("normal:std=-1", ["-1", "positive"]),
    ("uniform:a=1,b=0", ["uniform:a=1,b=0", "a=1 must be less than b=0"]),
    ("trunc_normal:a=2,b=-2", ["a=2 must be less than b=-2"]),
    ("xavier_normal:gain=relux", ["relux", "relu", "tanh"]),
    ("sparse:sparsity=1.5", ["1.5", "[0, 1)"]),
    ("constant", ["val", "constant:"]),
    ("dirac", ["dirac", "linear weights", "eye", "kaiming_normal", "{'conv': 'dirac'}"]),
    ({"linear": "dirac"}, ["dirac", "linear weights", "kaiming_normal"]),
    ({"conv": "eye"}, ["eye", "conv weights", "dirac"]),
    ({"bias": "kaiming_normal"}, ["kaiming_normal", "biases", "zeros", "rule_uniform"]),
    ({"norm": "rule_normal"}, ["rule_normal", "norm", "ones"]),
    ({"convv": "default"}, ["convv", "conv, linear, bias, norm, zero_init_residual"]),
    ({"zero_init_residual": "maybe"}, ["maybe", "true or false"]),
    ({"conv": 3}, ["conv", "3"]),
    (["kaiming_normal"], ["mapping", "list"]),
])
def test_bad_input_names_value_and_choices(spec, fragments):
    with pytest.raises(SpecError) as info:
        init_weights(nn.Linear(4, 4), spec)
    for fragment in fragments:
        assert fragment in str(info.value)
    with pytest.raises(SpecError):
        parse_policy(spec)


# --- report -----------------------------------------------------------------------

def test_report_has_one_row_per_tensor_and_a_readable_table():
    model = nn.Sequential(toy_resnet(), nn.Embedding(10, 3))
    embedding_before = model[1].weight.detach().clone()
    report = init_weights(model, "kaiming_uniform", seed=0)
    names = [name for name, _ in model.named_parameters()]
    assert [row.path for row in report] == names and len(report) == len(names)
    assert all(isinstance(row, InitRow) for row in report)
    dicts = report.to_dicts()
    assert set(dicts[0]) == {"path", "kind", "shape", "fan_in", "fan_out", "scheme", "std_predicted",
                             "std_measured", "output_var"}
    assert dicts[0]["shape"] == [8, 3, 3, 3]
    rows = {row.path: row for row in report}
    assert rows["1.weight"].scheme == "untouched" and rows["1.weight"].std_predicted is None
    assert torch.equal(model[1].weight, embedding_before)
    assert rows["0.0.bias"].kind == "bias" and rows["0.0.bias"].fan_in is None
    assert rows["0.0.weight"].shape == (8, 3, 3, 3) and rows["0.0.weight"].fan_in == 27
    table = report.format_table()
    lines = table.splitlines()
    assert len(lines) == len(report) + 2 and "std_pred" in lines[0]
    assert all(path in table for path in names)
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule line up
    assert f"{rows['0.0.weight'].std_predicted:.4g}" in table
