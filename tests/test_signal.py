"""reslab.diagnose.signal_propagation and ``reslab signal``: signal propagation at init, checked against theory.

The theory checks run on ``plain20`` without norms (a 19-ReLU-layer plain CIFAR net:
the stem plus 18 convs, 16/32/64 channels at 32/16/8 pixels).  Each point is the
output of one conv-ReLU layer, so one step of depth is one ReLU layer of He et
al. 2015 (arXiv 1502.01852), whose Eq. (10) keeps the second moment E[x^2] of the
ReLU outputs constant iff Var(w) = 2 / fan_in (Kaiming); Xavier's
Var(w) = 2 / (fan_in + fan_out) halves it per layer of constant width.
"""

from __future__ import annotations

import csv
import math
import statistics

import pytest
import torch

from reslab.cli import main
from reslab.diagnose import (
    SIGNAL_COLUMNS,
    SignalRow,
    format_signal_table,
    signal_combos,
    signal_csv,
    signal_probes,
    signal_propagation,
    signal_unit,
)
from reslab.errors import SpecError
from reslab.inits import init_weights
from reslab.models import build_model

BATCH = 8  # small and fast; the moments still average over 8 x 16 x 32 x 32 values at the stem
SEEDS = range(8)  # the statistical checks average over 8 draws of the weights


def plain(init: str, norm: str = "none", seed: int = 0) -> list[SignalRow]:
    return signal_propagation("plain20", norm, init, batch_size=BATCH, seed=seed)


def second_moments(points: list[SignalRow]) -> list[float]:
    return [p.act_second_moment for p in points]


def _stage(name: str) -> str:
    return "layer1" if name == "stem" else name.split(".")[0]  # the stem has layer1's width


def per_layer_rms_ratio(points: list[SignalRow]) -> float:
    """Geometric mean of rms[k] / rms[k-1] over the steps that keep the width (16 of 18 in plain20),
    i.e. exp of the slope of a straight-line fit... of log rms through the stage's end points."""
    m2 = second_moments(points)
    steps = [k for k in range(1, len(points)) if _stage(points[k].name) == _stage(points[k - 1].name)]
    return math.exp(statistics.mean(0.5 * math.log(m2[k] / m2[k - 1]) for k in steps))


# --- what a block is --------------------------------------------------------------


def test_plain_net_points_are_the_stem_and_every_conv_norm_relu_pair():
    rows = plain("kaiming_normal")
    names = [r.name for r in rows]
    assert len(rows) == 19  # the stem + 9 blocks x 2 convs; with the classifier, the 20 layers of plain20
    assert names[:4] == ["stem", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1"]
    assert names[-1] == "layer3.2.conv2"
    assert [r.block for r in rows] == list(range(19))
    assert signal_unit("plain20") == "conv-norm-ReLU layer (0 = stem)"


def test_residual_points_are_the_stem_and_every_block_output():
    rows = signal_propagation("cifar_resnet20", "bn", "kaiming_normal", batch_size=4)
    assert [r.name for r in rows] == ["stem"] + [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    assert signal_unit("cifar_resnet20") == "residual block (0 = stem)"
    # the ImageNet stem includes the max-pool; any input size works through `batch`
    rows = signal_propagation("resnet18", "bn", "kaiming_normal", batch=torch.randn(2, 3, 64, 64))
    assert [r.name for r in rows][:3] == ["stem", "layer1.0", "layer1.1"] and len(rows) == 9


def test_baseline_points():
    assert [r.name for r in signal_propagation("mlp", "none", "kaiming_normal", batch_size=4)] == ["hidden1", "hidden2"]
    rows = signal_propagation("simple_cnn", "bn", "kaiming_normal", batch_size=4)
    assert [r.name for r in rows] == ["conv1", "conv2", "conv3"]  # the head's fc1 ReLU is not a conv layer


def test_moments_match_a_direct_computation():
    """act_* of the stem and grad_std at it, recomputed by hand with retain_grad."""
    row = plain("kaiming_normal")[0]
    model = build_model("plain20", norm="none")
    init_weights(model, "kaiming_normal", seed=0)
    gen = torch.Generator().manual_seed(0)  # signal_propagation draws the batch, then the labels, from this
    x = torch.randn(BATCH, 3, 32, 32, generator=gen)
    labels = torch.randint(10, (BATCH,), generator=gen)
    stem = model.relu(model.bn1(model.conv1(x)))  # (B, 16, 32, 32)
    stem.retain_grad()
    out = model.fc(torch.flatten(model.avgpool(model.layer3(model.layer2(model.layer1(stem)))), 1))
    torch.nn.functional.cross_entropy(out, labels, reduction="sum").backward()
    s = stem.detach().double()
    assert row.act_mean == pytest.approx(float(s.mean()), rel=1e-6)
    assert row.act_std == pytest.approx(float(s.std(correction=0)), rel=1e-6)
    # Brock et al. 2021's channel-wise squared mean
    assert row.act_sq_mean == pytest.approx(float(s.mean(dim=(0, 2, 3)).pow(2).mean()), rel=1e-6)
    assert row.grad_std == pytest.approx(float(stem.grad.double().std(correction=0)), rel=1e-5)
    assert row.act_second_moment == pytest.approx(float(s.pow(2).mean()), rel=1e-9)


# --- theory: plain20, no norm ------------------------------------------------------------


@pytest.mark.slow
def test_kaiming_keeps_the_second_moment_and_xavier_halves_it_per_layer():
    """He et al. 2015: Kaiming's per-layer rms ratio is ~1, Xavier's ~1/sqrt(2) on layers of constant width.

    Measured over 40 seeds (batch 8): Kaiming 0.880-1.026 per seed, mean 0.958; Xavier 0.622-0.726,
    mean 0.678.  Kaiming sits a little under 1 because zero padding loses taps at the borders
    (1/6 of them per layer on the 8x8 maps) and because in a net 16 channels wide the
    log of the layer gain drifts down (its mean is preserved, its median is not).
    Each bound is checked on the mean over 8 seeds, and each init fails the other's bound.
    """
    kaiming = statistics.mean(per_layer_rms_ratio(plain("kaiming_normal", seed=s)) for s in SEEDS)
    xavier = statistics.mean(per_layer_rms_ratio(plain("xavier_normal", seed=s)) for s in SEEDS)
    in_kaiming_band = lambda r: 0.88 <= r <= 1.05  # noqa: E731
    in_xavier_band = lambda r: 0.6 <= r <= 0.8  # noqa: E731  around 1/sqrt(2) = 0.707
    assert in_kaiming_band(kaiming) and not in_xavier_band(kaiming), kaiming
    assert in_xavier_band(xavier) and not in_kaiming_band(xavier), xavier


@pytest.mark.slow
def test_kaiming_keeps_the_last_layer_at_the_first_layers_scale():
    """Last over first second moment, geometric mean over 8 seeds: Kaiming 0.19, Xavier 3e-7.

    Single draws spread widely (0.013-1.9 over 40 seeds: a 16-wide ReLU net's gain is a
    product of 18 random factors); with circular instead of zero padding the mean is 0.40.
    A factor of 20 either way holds Kaiming with a wide margin and rejects Xavier by 10^5.
    """
    def last_over_first(init: str) -> float:
        logs = [math.log(m2[-1] / m2[0]) for m2 in (second_moments(plain(init, seed=s)) for s in SEEDS)]
        return math.exp(statistics.mean(logs))

    within = lambda r: 1 / 20 <= r <= 20  # noqa: E731
    assert within(last_over_first("kaiming_normal"))
    assert not within(last_over_first("xavier_normal"))


def test_xavier_is_kaiming_scaled_by_sqrt_of_fan_in_over_fan_in_plus_fan_out_per_layer():
    """Exact, not statistical: with one seed both draw the same N(0, 1) numbers, scaled by
    sqrt(2/(fan_in+fan_out)) and sqrt(2/fan_in); a bias-free ReLU net is positively homogeneous,
    so Xavier's rms at layer k is Kaiming's times prod_j sqrt(fan_in_j / (fan_in_j + fan_out_j)):
    1/sqrt(2) per layer of constant width, 1/sqrt(3) where the width doubles, sqrt(27/171) at the stem."""
    kaiming, xavier = second_moments(plain("kaiming_normal")), second_moments(plain("xavier_normal"))
    model = build_model("plain20", norm="none")
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == len(kaiming) == 19
    predicted = 1.0
    for k, conv in enumerate(convs):
        fan_in, fan_out = conv.weight[0].numel(), conv.weight[:, 0].numel()
        predicted *= math.sqrt(fan_in / (fan_in + fan_out))
        assert math.sqrt(xavier[k] / kaiming[k]) == pytest.approx(predicted, rel=1e-4)
    assert predicted == pytest.approx(math.sqrt(27 / 171) * 2 ** -8 / 3, rel=1e-12)  # 16 x 1/sqrt(2), 2 x 1/sqrt(3)


def test_zeros_gives_zero_activations_and_gradients():
    for norm in ("none", "bn"):
        rows = plain("zeros", norm)
        for row in rows:  # from the stem on, whose conv is zero too
            assert row.act_mean == row.act_std == row.act_sq_mean == row.grad_std == 0.0, (norm, row)


def test_ones_grows_without_bound():
    """All-ones filters sum 9 x C non-negative inputs: the scale grows ~140x per layer until float32 overflows."""
    rows = plain("ones")
    means = [r.act_mean for r in rows]
    for k in range(1, len(means)):
        assert not math.isfinite(means[k]) or means[k] > 10 * means[k - 1], (k, means[k - 1], means[k])
    assert means[-1] > 1e30  # inf for plain20: float32 overflows at block 16


def test_constant_init_gets_no_gradient_even_with_bn():
    """With ones everywhere every unit is the same, so all logits are equal and sum_i (p_i - y_i) = 0
    reaches every feature: the gradient is 0 up to rounding, while BN keeps the forward pass tame."""
    ones, kaiming = plain("ones", "bn"), plain("kaiming_normal", "bn")
    assert all(math.isfinite(r.act_std) for r in ones)
    assert max(r.grad_std for r in ones) < 1e-6 * min(r.grad_std for r in kaiming)


# --- theory: BN -------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["kaiming_normal", "xavier_normal", "ones"])
def test_bn_makes_the_forward_scale_depth_independent(init):
    """BN feeds each ReLU a unit-variance pre-activation, so E[relu(z)^2] <= E[z^2] = 1 at every depth.

    Measured act_std: 0.58-0.60 for Kaiming and Xavier (relu of a Gaussian: 0.584), 0.58-0.93 for
    ones (skewed pre-activations); without BN the same bound fails for Xavier (ratio ~1500) and ones.
    """
    def depth_independent(rows: list[SignalRow]) -> bool:
        stds = [r.act_std for r in rows]
        return all(math.isfinite(s) and s > 0 for s in stds) and max(stds) / min(stds) < 2

    rows = plain(init, "bn")
    assert depth_independent(rows)
    assert all(r.act_second_moment <= 1.0 + 1e-6 for r in rows)
    if init != "kaiming_normal":
        assert not depth_independent(plain(init, "none"))


# --- reproducibility and inputs -------------------------------------------------------------


def test_same_seed_same_numbers_and_the_global_rng_is_untouched():
    state = torch.get_rng_state()
    first = signal_propagation("cifar_resnet20", "bn,none", "kaiming_normal", batch_size=4, seed=3)
    assert torch.equal(state, torch.get_rng_state())
    torch.manual_seed(123)  # the global RNG plays no part
    assert signal_propagation("cifar_resnet20", "bn,none", "kaiming_normal", batch_size=4, seed=3) == first
    assert signal_propagation("cifar_resnet20", "bn,none", "kaiming_normal", batch_size=4, seed=4) != first


def test_every_norm_sees_the_same_weights_and_batch():
    """Combinations differ only in what they name: BN is scale invariant, so Kaiming and Xavier agree under it."""
    rows = signal_combos(plain("kaiming_normal,xavier_normal", "bn"))
    kaiming, xavier = rows[("bn", "kaiming_normal")], rows[("bn", "xavier_normal")]
    for a, b in zip(kaiming, xavier, strict=True):
        assert a.act_std == pytest.approx(b.act_std, rel=1e-3)


def test_a_real_dataset_batch_sets_the_input_shape(synthetic):
    rows = signal_propagation("mlp", "none", "kaiming_normal", dataset=synthetic, batch_size=16)
    assert [r.name for r in rows] == ["hidden1", "hidden2"]  # mlp was built for the dataset's 1x8x8 inputs
    assert all(math.isfinite(r.grad_std) and r.grad_std > 0 for r in rows)


@pytest.mark.parametrize("kwargs, message", [
    ({"norms": "bogus"}, "unknown norm 'bogus'"),
    ({"norms": "gn:5"}, "cannot split a layer of 16 channels into 5 groups"),
    ({"inits": "nope"}, "unknown init scheme 'nope'"),
    ({"inits": "kaiming_normal,kaiming_normal"}, "repeats 'kaiming_normal'"),
    ({"batch_size": 0}, "batch size must be a positive integer"),
    ({"dataset": "synthetic:train=8,test=8", "batch_size": 9}, "larger than the 8 train images"),
])
def test_bad_input_is_a_spec_error(kwargs, message):
    with pytest.raises(SpecError, match=message):
        signal_propagation("plain20", **{"norms": "none", "inits": "kaiming_normal", **kwargs})


def test_table_shows_every_point_for_two_combos_and_a_summary_for_more():
    two = format_signal_table(plain("kaiming_normal,xavier_normal"))
    assert two.splitlines()[0].split() == list(SIGNAL_COLUMNS) and len(two.splitlines()) == 2 + 2 * 19
    three = format_signal_table(plain("kaiming_normal,xavier_normal,zeros"))
    assert three.splitlines()[0].split() == ["norm", "init", "act_std@0", "act_std@9", "act_std@18",
                                             "grad_std@0", "grad_std@9", "grad_std@18"]
    assert len(three.splitlines()) == 2 + 3


# --- the command line --------------------------------------------------------------------


@pytest.mark.slow
def test_signal_command_end_to_end(capsys, tmp_path):
    out = tmp_path / "sig"
    code = main(["signal", "cifar_resnet56", "--norm", "bn,gn,none", "--init", "kaiming_normal,xavier_normal",
                 "--batch-size", "4", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0
    with open(out / "signal.csv", newline="") as f:
        table = list(csv.reader(f))
    assert tuple(table[0]) == SIGNAL_COLUMNS
    blocks = 1 + 3 * 9  # the stem + 27 residual blocks
    assert len(table) == 1 + 6 * blocks
    combos = {(r[0], r[1]) for r in table[1:]}
    assert combos == {(n, i) for n in ("bn", "gn", "none") for i in ("kaiming_normal", "xavier_normal")}
    assert [r[3] for r in table[1:1 + blocks]][:2] == ["stem", "layer1.0"]
    assert (out / "signal.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "act_std@0" in stdout and "none  kaiming_normal" in stdout and str(out / "signal.csv") in stdout


def test_csv_round_trips_the_rows():
    rows = plain("ones")  # inf and nan included
    parsed = list(csv.DictReader(signal_csv(rows).splitlines()))
    for row, line in zip(rows, parsed, strict=True):
        for column in ("act_mean", "act_std", "act_sq_mean", "grad_std"):
            value = float(line[column])
            assert value == getattr(row, column) or (math.isnan(value) and math.isnan(getattr(row, column)))


@pytest.mark.parametrize("argv", [
    ["nosuch"],
    ["plain20", "--norm", "bogus"],
    ["plain20", "--init", "bogus"],
    ["plain20", "--norm", "bn,gn:5"],
    ["plain20", "--batch-size", "0"],
    ["plain20", "--batch-size", "-3"],
    ["plain20", "--batch-size", "many"],
    ["plain20", "--dataset", "nosuch"],
    ["plain20", "-o", "width=0"],
])
def test_signal_command_bad_input_exits_2_and_writes_nothing(capsys, tmp_path, argv):
    out = tmp_path / "sig"
    code = main(["signal", *argv, "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and captured.err.startswith("reslab: error:")
    assert not out.exists()


def test_signal_and_inspect_outputs_that_cannot_be_written_are_one_line_before_any_work(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for argv in (["signal", "plain20", "--norm", "bn", "--batch-size", "4", "--out", str(blocker / "out")],
                 ["signal", "plain20", "--norm", "bn", "--batch-size", "4", "--out", str(blocker)],
                 ["inspect", "cifar_resnet20", "--plot", str(blocker / "init.png")]):
        assert main(argv) == 2, argv
        out, err = capsys.readouterr()
        assert "cannot be written" in err and len(err.strip().splitlines()) == 1 and not out, (argv, err)
    assert blocker.read_text() == ""


@pytest.mark.slow
def test_signal_default_folder_of_a_torchvision_model_has_no_colon(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["signal", "tv:resnet18", "--batch-size", "2"]) == 0
    assert (tmp_path / "signal" / "tv_resnet18" / "signal.csv").is_file()


def test_blocks_that_declare_their_branch_are_the_signal_points_of_models_reslab_did_not_write():
    # torchvision's BasicBlocks declare residual_branch(): one point per block, in forward order
    unit, probes = signal_probes(build_model("tv:resnet18", in_channels=1, input_size=32))
    names = [namer(0) for _, namer in probes]
    assert unit == "residual block (0 = the first)"
    assert names == [f"layer{stage}.{index}" for stage in range(1, 5) for index in range(2)]
    timm = pytest.importorskip("timm")  # timm's blocks zero their branch themselves (zero_init_last)
    unit, probes = signal_probes(timm.create_model("resnet18", num_classes=4))
    assert [namer(0) for _, namer in probes] == names
    rows = signal_propagation("tv:resnet18", "bn", "kaiming_normal", batch_size=2)
    assert [row.name for row in rows] == names and all(row.act_std > 0 for row in rows)
