"""reslab.norms: every spec builds the layer PRODUCT.md promises, with the maths it promises."""

import pytest
import torch
from torch import nn

from reslab.errors import SpecError
from reslab.norms import gn_groups, list_norms, make_norm, norm_factory, norm_names

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
    assert set(norm_names()) == {"bn", "gn", "ln", "in", "rms", "none"}
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


def test_gn_defaults_to_32_groups_wu_he():
    layer = make_norm("gn", 256)
    assert isinstance(layer, nn.GroupNorm) and layer.num_groups == 32


@pytest.mark.parametrize(
    "channels, groups",
    [(64, 32), (32, 32), (16, 16), (48, 24), (3, 3), (100, 25), (1, 1)],
)
def test_gn_fallback_is_largest_divisor_up_to_32(channels, groups):
    assert gn_groups(channels) == groups
    assert make_norm("gn", channels).num_groups == groups


def test_gn_explicit_groups():
    assert make_norm("gn:8", C).num_groups == 8
    assert make_norm("gn:groups=4", C).num_groups == 4


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


def test_rms_normalizes_channels_at_each_position():
    layer = make_norm("rms", C)
    _perturb_affine(layer)
    x = _x()
    eps = torch.finfo(x.dtype).eps  # nn.RMSNorm's default when eps=None
    rms = x.pow(2).mean(dim=1, keepdim=True).add(eps).sqrt()  # (N, 1, H, W)
    expected = x / rms * layer.weight.view(1, C, 1, 1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert layer.bias is None


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
        ("gn:5", 64, ["gn:5", "64 channels", "1, 2, 4, 8, 16, 32"]),
        ("batchnorm", 64, ["'batchnorm'", "bn, gn, in, ln, none, rms"]),
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
