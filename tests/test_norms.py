"""reslab.norms: every spec builds the layer PRODUCT.md promises, with the maths it promises."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reslab
from reslab.errors import SpecError
from reslab.norms import (
    RMS_EPS,
    InstanceNorm2dAffine,
    LayerNorm2d,
    RMSNorm2d,
    describe_norm_layers,
    gn_groups,
    list_norms,
    make_norm,
    norm_factory,
    norm_names,
)

C = 64


def _x(n=6, c=C, h=5, w=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g) * 3 + 1.5


def _perturb_affine(*modules):
    """Give matching layers identical non-trivial affine params."""
    g = torch.Generator().manual_seed(1)
    weight = torch.rand(C, generator=g) + 0.5
    bias = torch.randn(C, generator=g)
    for m in modules:
        with torch.no_grad():
            m.weight.copy_(weight)
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(bias)


def test_registry_lists_every_spec_with_description():
    assert set(norm_names()) == {"bn", "brn", "gn", "ln", "in", "rms", "frn", "evonorm", "none"}
    for name, description in list_norms().items():
        assert description and "\n" not in description, name


@pytest.mark.parametrize("spec", norm_names())
def test_affine_starts_at_one_and_zero(spec):
    layer = make_norm(spec, C)
    weight = getattr(layer, "weight", None)
    bias = getattr(layer, "bias", None)
    if spec == "none":
        assert isinstance(layer, nn.Identity)
        return
    assert torch.equal(weight, torch.ones(C))
    if bias is not None:
        assert torch.equal(bias, torch.zeros(C))
    assert make_norm(spec, C)(_x()).shape == _x().shape


def test_bn_options_reach_the_layer():
    layer = make_norm("bn:momentum=0.01,eps=0.001", C)
    assert isinstance(layer, nn.BatchNorm2d)
    assert layer.momentum == pytest.approx(0.01) and layer.eps == pytest.approx(0.001)


# --- gn: groups per width ------------------------------------------------------

# The documented rule: the largest divisor G of C with G <= 32 and C/G >= 16 (1 group below 16 channels).
GN_DEFAULT_GROUPS = [
    (16, 1), (32, 2), (48, 3), (64, 4), (128, 8), (256, 16), (512, 32), (1024, 32), (2048, 32),
    (3, 1), (1, 1), (24, 1), (100, 5), (96, 6), (4096, 32),
]


@pytest.mark.parametrize("channels, groups", GN_DEFAULT_GROUPS)
def test_gn_default_groups_per_width(channels, groups):
    assert gn_groups(channels) == groups
    layer = make_norm("gn", channels)
    assert type(layer) is nn.GroupNorm and layer.num_groups == groups


def test_gn_default_rule_holds_for_every_width():
    for c in range(1, 2049):
        g = gn_groups(c)
        assert c % g == 0 and 1 <= g <= 32, c
        assert c // g >= 16 or g == 1, c  # never fewer than 16 channels per group unless C < 16...
        assert not any(c % d == 0 and c // d >= 16 for d in range(g + 1, 33)), c  # ...and the most groups that allow


def test_gn_keeps_32_groups_of_wu_he_on_wide_layers():
    for c in (512, 1024, 2048, 4096):
        assert make_norm("gn", c).num_groups == 32


def test_gn_default_never_degenerates_to_instance_norm_on_cifar_resnet():
    model = reslab.build_model("cifar_resnet20", norm="gn", num_classes=10)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 19
    assert all(m.num_channels // m.num_groups >= 16 for m in norms)
    assert {m.num_channels: m.num_groups for m in norms} == {16: 1, 32: 2, 64: 4}


def test_gn_on_resnet50_widths():
    model = reslab.build_model("resnet50", norm="gn", num_classes=10)
    groups = {m.num_channels: m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)}
    assert groups == {64: 4, 128: 8, 256: 16, 512: 32, 1024: 32, 2048: 32}
    fixed = reslab.build_model("resnet50", norm="gn:32", num_classes=10)  # Wu & He's setup exactly
    assert {m.num_groups for m in fixed.modules() if isinstance(m, nn.GroupNorm)} == {32}


def test_gn_explicit_groups():
    assert make_norm("gn:8", C).num_groups == 8
    assert make_norm("gn:groups=4", C).num_groups == 4
    assert make_norm("gn:32", 32).num_groups == 32  # asked for: one channel per group is allowed


@pytest.mark.parametrize("spec, channels, groups", [
    ("gn:cpg=16", 64, 4), ("gn:cpg=16", 2048, 128), ("gn:cpg=8", 16, 2), ("gn:cpg=1", 16, 16),
    ("gn:cpg=16", 16, 1), ("gn:cpg=16,eps=1e-3", 48, 3),
])
def test_gn_channels_per_group(spec, channels, groups):
    layer = make_norm(spec, channels)
    assert layer.num_groups == groups and layer.num_channels == channels


def test_gn_channels_per_group_factory_and_eps():
    factory = norm_factory("gn:cpg=16,eps=0.001")
    assert [factory(c).num_groups for c in (16, 32, 64, 2048)] == [1, 2, 4, 128]
    assert factory(64).eps == pytest.approx(1e-3)


@pytest.mark.parametrize("spec", ["gn:groups=4,cpg=8", "gn:4,cpg=8", "gn:4,8"])
def test_gn_groups_and_channels_per_group_conflict(spec):
    with pytest.raises(SpecError) as info:
        norm_factory(spec)  # refused when the spec is resolved, before any layer is built
    message = str(info.value)
    assert "\n" not in message and spec in message
    assert "groups=4" in message and "cpg=8" in message


def _group_norm_by_hand(x, groups, weight, bias, eps=1e-5):
    n, c, h, w = x.shape
    grouped = x.reshape(n, groups, (c // groups) * h * w)  # (N, G, C/G*H*W)
    mean = grouped.mean(-1, keepdim=True)
    var = grouped.var(-1, unbiased=False, keepdim=True)
    normed = ((grouped - mean) / torch.sqrt(var + eps)).reshape(n, c, h, w)
    return normed * weight.view(1, c, 1, 1) + bias.view(1, c, 1, 1)


@pytest.mark.parametrize("spec, channels, groups", [
    ("gn", 48, 3), ("gn", 64, 4), ("gn", 16, 1), ("gn:8", 64, 8), ("gn:cpg=4", 32, 8),
])
def test_gn_matches_the_per_sample_per_group_formula(spec, channels, groups):
    layer = make_norm(spec, channels)
    assert layer.num_groups == groups
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(channels, generator=g) + 0.5)
        layer.bias.copy_(torch.randn(channels, generator=g))
    x = _x(c=channels)
    expected = _group_norm_by_hand(x, groups, layer.weight.detach(), layer.bias.detach())
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_ln_is_groupnorm_1():
    ln, ref = make_norm("ln", C), nn.GroupNorm(1, C)
    _perturb_affine(ln, ref)
    torch.testing.assert_close(ln(_x()), ref(_x()))


def test_ln_normalizes_over_chw_of_each_sample():
    out = make_norm("ln", C)(_x())
    flat = out.flatten(1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.var(1, unbiased=False), torch.ones(6), atol=1e-3, rtol=0)


def test_in_is_groupnorm_c():
    layer, ref = make_norm("in", C), nn.GroupNorm(C, C)
    _perturb_affine(layer, ref)
    torch.testing.assert_close(layer(_x()), ref(_x()))
    # and plain instance norm maths: every (sample, channel) plane standardized
    plain = make_norm("in", C)(_x())
    torch.testing.assert_close(plain.mean((2, 3)), torch.zeros(6, C), atol=1e-5, rtol=0)


def _rms_by_hand(x, weight, eps):
    rms = x.pow(2).mean(dim=1, keepdim=True).add(eps).sqrt()  # (N, 1, H, W)
    return x / rms * weight.view(1, -1, 1, 1)


def test_rms_normalizes_channels_at_each_position():
    layer = make_norm("rms", C)
    _perturb_affine(layer)
    x = _x()
    expected = _rms_by_hand(x, layer.weight, RMS_EPS)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert layer.bias is None


def test_rms_eps_is_pinned_not_left_to_the_dtype():
    layer = make_norm("rms", C)
    assert RMS_EPS == 1e-6
    assert layer.norm.eps == RMS_EPS and layer.eps == RMS_EPS  # nn.RMSNorm(eps=None) would vary by dtype
    assert make_norm("rms:eps=1e-3", C).norm.eps == pytest.approx(1e-3)
    assert make_norm("rms:1e-4", C).norm.eps == pytest.approx(1e-4)
    assert RMSNorm2d(C).norm.eps == RMS_EPS


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
@pytest.mark.parametrize("spec, eps", [("rms", 1e-6), ("rms:eps=1e-3", 1e-3)])
def test_rms_uses_its_eps_under_bf16_autocast(spec, eps):
    layer = make_norm(spec, 16)
    conv = nn.Conv2d(16, 16, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(16).view(16, 16, 1, 1))
    # activations with a mean square ~eps, where eps decides the output
    x = torch.randn(4, 16, 3, 3, generator=torch.Generator().manual_seed(0)) * eps ** 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        assert h.dtype == torch.bfloat16
        out = layer(h)
    h32 = h.float()
    expected = _rms_by_hand(h32, torch.ones(16), eps)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    # the eps a dtype-dependent default would take gives a clearly different answer
    for other in (torch.finfo(torch.float32).eps, torch.finfo(torch.bfloat16).eps):
        assert (_rms_by_hand(h32, torch.ones(16), other) - out.float()).abs().max() > 0.1


@pytest.mark.parametrize("spec", ["gn", "gn:8", "ln", "in", "rms", "none"])
def test_per_sample_norms_ignore_the_rest_of_the_batch(spec):
    layer = make_norm(spec, C).train()
    x = _x()
    other = _x(seed=3)
    other[0] = x[0]
    torch.testing.assert_close(layer(x)[0], layer(other)[0])


def test_bn_in_train_mode_depends_on_the_batch():
    layer = make_norm("bn", C).train()
    x = _x()
    other = _x(seed=3)
    other[0] = x[0]
    assert not torch.allclose(layer(x)[0], layer(other)[0], atol=1e-3)


def test_factory_resolves_once_and_builds_many():
    factory = norm_factory("gn:4")
    assert [factory(c).num_groups for c in (8, 16, 64)] == [4, 4, 4]


@pytest.mark.parametrize(
    "spec, channels, fragments",
    [
        ("gn:5", 64, ["gn:5", "64 channels", "1, 2, 4, 8, 16, 32, 64"]),
        ("gn:groups=48", 32, ["48", "32 channels", "1, 2, 4, 8, 16, 32"]),
        ("gn:cpg=24", 64, ["cpg=24", "64 channels", "1, 2, 4, 8, 16, 32, 64"]),
        ("gn:cpg=32", 16, ["cpg=32", "16 channels", "1, 2, 4, 8, 16"]),
        ("gn:cpg=0", 64, ["'0'", "cpg", "positive integer"]),
        ("gn:cpg=x", 64, ["'x'", "cpg"]),
        ("gn:min=16", 64, ["'min'", "groups, cpg, eps"]),
        ("rms:eps=0", 64, ["'0'", "eps", "positive"]),
        ("batchnorm", 64, ["'batchnorm'", "bn, brn, evonorm, frn, gn, in, ln, none, rms"]),
        ("gn:groups=x", 64, ["'x'", "groups"]),
        ("bn:mom=0.1", 64, ["'mom'", "momentum, eps"]),
        ("bn:momentum=2", 64, ["'2'", "[0, 1]"]),
        ("gn:", 64, ["'gn:'"]),
        ("ln:1e-5", 64, []),  # positional fills the first argument: valid
    ],
)
def test_bad_specs_name_the_value_and_the_choices(spec, channels, fragments):
    if not fragments:
        make_norm(spec, channels)
        return
    with pytest.raises(SpecError) as info:
        make_norm(spec, channels)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_describe_norm_layers_names_each_kind_and_its_groups():
    model = nn.Sequential(make_norm("gn", 16), make_norm("gn", 16), make_norm("gn", 64), make_norm("ln", 16),
                          make_norm("in", 16), make_norm("rms", 16), make_norm("bn", 16), make_norm("none", 16))
    assert describe_norm_layers(model) == [
        "GroupNorm C=16: 1 group x 16 ch (x2 layers)",
        "GroupNorm C=64: 4 groups x 16 ch (x1 layer)",
        "LayerNorm2d C=16 (x1 layer)",
        "InstanceNorm2dAffine C=16 (x1 layer)",
        "RMSNorm2d C=16, eps=1e-06 (x1 layer)",
        "BatchNorm2d C=16 (x1 layer)",
    ]
    assert isinstance(model[3], LayerNorm2d) and isinstance(model[4], InstanceNorm2dAffine)
    assert describe_norm_layers(nn.Sequential(nn.Linear(2, 2))) == []


# --- ghost BatchNorm (Hoffer et al. 2017) ----------------------------------------------


def _paired(ghost, channels=6):
    torch.manual_seed(0)
    layer = make_norm(f"bn:ghost={ghost}", channels)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    return layer


def test_ghost_bn_with_the_whole_batch_is_batchnorm2d():
    x = torch.randn(8, 6, 5, 5) * 3 + 1
    ghost = _paired(8)
    bn = nn.BatchNorm2d(6)
    bn.load_state_dict(ghost.state_dict())  # the same parameter and buffer names
    for _ in range(3):
        assert torch.allclose(ghost(x), bn(x), atol=1e-6)
    assert torch.allclose(ghost.running_mean, bn.running_mean, atol=1e-6)
    assert torch.allclose(ghost.running_var, bn.running_var, atol=1e-5)
    assert int(ghost.num_batches_tracked) == int(bn.num_batches_tracked) == 3


def test_ghost_bn_normalizes_each_group_by_its_own_statistics():
    x = torch.randn(8, 6, 4, 4) * 2 + 3
    ghost = _paired(2)
    y = ghost(x)
    for start in range(0, 8, 2):
        pair = x[start:start + 2]
        mean = pair.mean(dim=(0, 2, 3), keepdim=True)
        var = pair.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        expected = (pair - mean) / torch.sqrt(var + ghost.eps) * ghost.weight.view(1, -1, 1, 1) \
            + ghost.bias.view(1, -1, 1, 1)
        assert torch.allclose(y[start:start + 2], expected, atol=1e-5)
    # running stats: momentum 0.1 towards the mean of the groups' means and unbiased variances
    groups = x.view(4, 2, 6, 4, 4)
    means = groups.mean(dim=(1, 3, 4)).mean(0)
    variances = groups.transpose(1, 2).reshape(4, 6, -1).var(dim=2, unbiased=True).mean(0)
    assert torch.allclose(ghost.running_mean, 0.1 * means, atol=1e-6)
    assert torch.allclose(ghost.running_var, 0.9 + 0.1 * variances, atol=1e-5)
    # gradients flow through every group; channels_last input gives the same output
    assert torch.allclose(_paired(2)(x.contiguous(memory_format=torch.channels_last)), y, atol=1e-6)


def test_ghost_bn_eval_uses_running_statistics():
    ghost = _paired(2)
    x = torch.randn(8, 6, 3, 3)
    ghost(x)
    ghost.eval()
    expected = F.batch_norm(x, ghost.running_mean, ghost.running_var, ghost.weight, ghost.bias, False, 0.0, ghost.eps)
    assert torch.allclose(ghost(torch.randn(3, 6, 3, 3) * 0 + x[:3]), expected[:3], atol=1e-6)  # any batch size


def test_ghost_bn_bad_values_are_clear_errors():
    with pytest.raises(SpecError, match="'0'.*ghost"):
        make_norm("bn:ghost=0", 8)
    layer = make_norm("bn:ghost=4", 8)
    with pytest.raises(SpecError, match="batch of 6 samples.*groups of 4"):
        layer(torch.randn(6, 8, 2, 2))
    layer.eval()
    assert layer(torch.randn(6, 8, 2, 2)).shape == (6, 8, 2, 2)  # eval takes any batch


def _split_layer(spec, channels=6):
    """The norm ``spec`` over ``channels`` with a seeded, non-trivial affine."""
    torch.manual_seed(0)
    layer = make_norm(spec, channels)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    return layer


def _normalized(part, layer):
    mean = part.mean(dim=(0, 2, 3), keepdim=True)
    var = part.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (part - mean) / torch.sqrt(var + layer.eps) * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)


def test_bn_splits_shares_each_batch_out_as_devices_would():
    x = torch.randn(8, 6, 4, 4) * 2 + 3
    by_size, by_count = _split_layer("bn:ghost=2"), _split_layer("bn:splits=4")
    assert torch.allclose(by_count(x), by_size(x), atol=1e-6)  # 4 parts of a batch of 8 = parts of 2
    assert torch.allclose(by_count.running_var, by_size.running_var, atol=1e-6)
    whole, bn = _split_layer("bn:splits=1"), nn.BatchNorm2d(6)
    bn.load_state_dict(whole.state_dict())
    assert torch.allclose(whole(x), bn(x), atol=1e-6) and torch.allclose(whole.running_var, bn.running_var, atol=1e-5)
    # a batch that K does not divide (the short last batch of an epoch): near-equal parts, as tensor_split cuts it
    layer = _split_layer("bn:splits=3")
    x = torch.randn(7, 6, 3, 3) * 2 + 1
    y = layer(x)
    parts = [x[0:3], x[3:5], x[5:7]]
    assert torch.allclose(y, torch.cat([_normalized(p, layer) for p in parts]), atol=1e-5)
    variances = torch.stack([p.transpose(0, 1).reshape(6, -1).var(dim=1, unbiased=True) for p in parts]).mean(0)
    assert torch.allclose(layer.running_var, 0.9 + 0.1 * variances, atol=1e-5)
    y.sum().backward()  # gradients reach the affine parameters through every part
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert "splits=3" in repr(layer)


def test_bn_ghost_and_splits_are_one_or_the_other():
    with pytest.raises(SpecError, match="both ghost=2 and splits=4"):
        make_norm("bn:ghost=2,splits=4", 8)
    with pytest.raises(SpecError, match="'0'.*splits"):
        make_norm("bn:splits=0", 8)


# --- Batch Renormalization (Ioffe 2017) ------------------------------------------------


def test_brn_with_r_max_1_and_d_max_0_is_batchnorm2d():
    brn, bn = _split_layer("brn:r_max=1,d_max=0"), nn.BatchNorm2d(6)
    bn.load_state_dict(brn.state_dict())
    for step in range(3):
        x = (torch.randn(8, 6, 4, 4) * 3 + step).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        y, y2 = brn(x), bn(x2)
        assert torch.allclose(y, y2, atol=1e-5)
        (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
        (y2 * torch.arange(y2.numel()).view_as(y2).sin()).sum().backward()
        assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    assert torch.allclose(brn.running_mean, bn.running_mean, atol=1e-5)
    assert torch.allclose(brn.running_var, bn.running_var, atol=1e-5)
    brn.eval(), bn.eval()
    x = torch.randn(5, 6, 4, 4)
    assert torch.allclose(brn(x), bn(x), atol=1e-5)


def test_brn_follows_the_papers_formula_and_stops_the_gradient_through_r_and_d():
    layer = _split_layer("brn:r_max=2,d_max=0.5")
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.2, 4)
    mu, sigma = layer.running_mean.clone(), (layer.running_var + layer.eps).sqrt()
    x = (torch.randn(8, 6, 3, 3) * 2 + 0.5).requires_grad_()
    y = layer(x)
    # a direct computation: batch statistics, r and d clipped and detached
    xd = x.detach().clone().requires_grad_()
    mean = xd.mean(dim=(0, 2, 3))
    std = (xd.var(dim=(0, 2, 3), unbiased=False) + layer.eps).sqrt()
    r = (std / sigma).clamp(1 / 2, 2).detach()
    d = ((mean - mu) / sigma).clamp(-0.5, 0.5).detach()
    v = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    expected = ((xd - v(mean)) / v(std) * v(r) + v(d)) * v(layer.weight) + v(layer.bias)
    assert torch.allclose(y, expected, atol=1e-5)
    y.pow(2).sum().backward()
    expected.pow(2).sum().backward()
    assert torch.allclose(x.grad, xd.grad, atol=1e-4)
    # where the clips do not bind, training normalizes with the running statistics, as eval does
    wide = _split_layer("brn:r_max=100,d_max=100")
    with torch.no_grad():
        wide.running_mean.copy_(mu)
        wide.running_var.copy_(layer.running_var * 0 + sigma.square() - wide.eps)
    x = torch.randn(8, 6, 3, 3)
    trained = wide(x)
    direct = (x - v(mu)) / v(sigma) * v(wide.weight) + v(wide.bias)
    assert torch.allclose(trained, direct, atol=1e-4)


@pytest.mark.parametrize("spec, fragment", [("brn:r_max=0.5", "r_max must be at least 1"),
                                            ("brn:d_max=-1", "'-1' for argument 'd_max'"),
                                            ("brn:r_max=x", "'x' for argument 'r_max'")])
def test_brn_bad_arguments_are_one_line_before_any_layer(capsys, tmp_path, spec, fragment):
    from reslab.cli import main

    with pytest.raises(SpecError, match=fragment.replace("(", r"\(")):
        norm_factory(spec)
    assert main(["train", "--norm", spec, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
