"""reslab.norms: frn and evonorm, batch-independent norms that fuse their activation, and the act protocol."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reslab
from reslab.convert import convert_norms
from reslab.errors import SpecError
from reslab.models.baselines import SimpleCNN
from reslab.norms import (
    EvoNorm2dS0,
    FilterResponseNorm2d,
    build_norm,
    describe_norm_layers,
    has_affine_weight,
    list_norms,
    make_norm,
    norm_activates,
    norm_factory,
)

C = 16


def _x(n=3, c=C, h=4, w=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, h, w, generator=g) * 2 + 0.7).to(dtype)


def _randomize(layer, seed=1):
    """Non-trivial per-channel parameters (weight, bias, tau, v), float64."""
    layer.double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.8 + (1.0 if name in ("weight", "v") else 0.0)).double())
    return layer


def _col(t):
    return t.view(1, -1, 1, 1)


# --- FRN ---------------------------------------------------------------------------

def _frn_by_hand(x, weight, bias, tau=None, eps=1e-6):
    nu2 = (x * x).sum(dim=(2, 3), keepdim=True) / (x.shape[2] * x.shape[3])
    y = _col(weight) * x / torch.sqrt(nu2 + eps) + _col(bias)
    return y if tau is None else torch.where(y > _col(tau), y, _col(tau).expand_as(y))


@pytest.mark.parametrize("spec, eps", [("frn", 1e-6), ("frn:eps=0.01", 0.01)])
@pytest.mark.parametrize("act", [True, False])
def test_frn_matches_the_paper(spec, eps, act):
    layer = _randomize(make_norm(spec, C, act=act))
    assert isinstance(layer, FilterResponseNorm2d) and layer.eps == eps
    assert norm_activates(layer) is act and (layer.tau is not None) is act
    x = _x() * 0.05  # small values: eps matters
    expected = _frn_by_hand(x, layer.weight, layer.bias, layer.tau if act else None, eps)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    if act:  # the TLU binds somewhere and not everywhere
        plain = _frn_by_hand(x, layer.weight, layer.bias, None, eps)
        assert (plain < _col(layer.tau)).any() and (plain > _col(layer.tau)).any()


def test_frn_tlu_is_max_with_tau():
    layer = _randomize(make_norm("frn", C, act=True))
    bare = FilterResponseNorm2d(C, act=False).double()
    with torch.no_grad():
        bare.weight.copy_(layer.weight)
        bare.bias.copy_(layer.bias)
    x = _x()
    torch.testing.assert_close(layer(x), torch.maximum(bare(x), _col(layer.tau)), rtol=0, atol=0)


# --- EvoNorm-S0 --------------------------------------------------------------------

def _evonorm_by_hand(x, groups, weight, bias, v=None, eps=1e-5):
    n, c, h, w = x.shape
    flat = x.reshape(n, groups, c // groups * h * w)
    mean = flat.mean(dim=-1, keepdim=True)
    var = ((flat - mean) ** 2).mean(dim=-1, keepdim=True)  # population variance
    std = torch.sqrt(var + eps).expand_as(flat).reshape(n, c, h, w)
    numerator = x if v is None else x * torch.sigmoid(_col(v) * x)
    return numerator / std * _col(weight) + _col(bias)


@pytest.mark.parametrize("spec, channels, groups", [
    ("evonorm", 16, 1), ("evonorm", 64, 4), ("evonorm:8", 16, 8), ("evonorm:groups=2", 16, 2),
    ("evonorm:cpg=4", 16, 4), ("evonorm:cpg=4,eps=0.1", 16, 4),
])
@pytest.mark.parametrize("act", [True, False])
def test_evonorm_s0_matches_the_paper(spec, channels, groups, act):
    layer = _randomize(make_norm(spec, channels, act=act))
    assert isinstance(layer, EvoNorm2dS0) and layer.groups == groups
    assert norm_activates(layer) is act and (layer.v is not None) is act
    x = _x(c=channels)
    expected = _evonorm_by_hand(x, groups, layer.weight, layer.bias, layer.v if act else None, layer.eps)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_evonorm_eps_reaches_the_layer():
    x = _x() * 0.01
    small, large = make_norm("evonorm", C, act=True).double(), make_norm("evonorm:eps=1", C, act=True).double()
    assert large.eps == 1.0 and small.eps == 1e-5
    assert not torch.allclose(small(x), large(x))


# --- shared properties ---------------------------------------------------------------

@pytest.mark.parametrize("spec", ["frn", "evonorm", "evonorm:cpg=4"])
@pytest.mark.parametrize("act", [True, False])
def test_batch_independent(spec, act):
    layer = _randomize(make_norm(spec, C, act=act)).train()
    x = _x(n=4)
    together = layer(x)
    for i in range(4):
        torch.testing.assert_close(layer(x[i:i + 1]), together[i:i + 1], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(layer.eval()(x), together, rtol=0, atol=0)  # no running statistics


@pytest.mark.parametrize("spec, extra", [("frn", "tau"), ("evonorm", "v")])
def test_gradients_reach_every_parameter(spec, extra):
    layer = _randomize(make_norm(spec, C, act=True))
    names = {name for name, _ in layer.named_parameters()}
    assert names == {"weight", "bias", extra}
    layer(_x()).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert has_affine_weight(layer)
    bare = make_norm(spec, C)
    assert {name for name, _ in bare.named_parameters()} == {"weight", "bias"}


def test_affine_starts_at_one_and_zero():
    for layer in (make_norm("frn", C, act=True), make_norm("evonorm", C, act=True)):
        for name, p in layer.named_parameters():
            assert torch.equal(p, torch.zeros(C) if name in ("bias", "tau") else torch.ones(C)), name


def test_norm_activates_only_for_fused_norms_asked_to():
    assert norm_activates(make_norm("frn", 8, act=True)) and norm_activates(make_norm("evonorm", 8, act=True))
    assert not norm_activates(make_norm("frn", 8)) and not norm_activates(make_norm("evonorm", 8, act=False))
    assert not norm_activates(FilterResponseNorm2d(8, act=False))
    assert norm_activates(FilterResponseNorm2d(8)) and norm_activates(EvoNorm2dS0(8, 2))  # classes default to act
    for spec in ("bn", "gn", "ln", "in", "rms", "brn", "none"):
        layer = make_norm(spec, 8, act=True)
        assert not norm_activates(layer), spec
        assert type(layer) is type(make_norm(spec, 8)), spec
    bn = make_norm("bn", 8, act=True)
    assert type(bn) is nn.BatchNorm2d
    assert not norm_activates(nn.ReLU()) and not norm_activates(nn.Identity())


def test_factory_protocol():
    factory = norm_factory("evonorm:cpg=4")
    assert factory(8).groups == 2 and not factory(8).activates and factory(8, act=True).activates
    assert norm_factory("gn:2")(8).num_groups == 2 and norm_factory("gn:2")(8, act=True).num_groups == 2
    # a user's own callable without act is called without it
    assert isinstance(build_norm(lambda c: nn.GroupNorm(2, c), 8, act=True), nn.GroupNorm)
    assert build_norm(norm_factory("frn"), 8, act=True).activates
    assert not build_norm(norm_factory("frn"), 8).activates


# --- spec errors ---------------------------------------------------------------------

def _one_line_error(spec, channels=64):
    with pytest.raises(SpecError) as info:
        make_norm(spec, channels)
    message = str(info.value)
    assert message.strip() and "\n" not in message
    return message


def test_evonorm_groups_that_do_not_divide_are_one_clear_line():
    message = _one_line_error("evonorm:5")
    assert "evonorm:5" in message and "5 groups" in message and "64 channels" in message
    assert "1, 2, 4, 8, 16, 32, 64" in message
    message = _one_line_error("evonorm:cpg=5")
    assert "evonorm:cpg=5" in message and "1, 2, 4, 8, 16, 32, 64" in message


@pytest.mark.parametrize("spec, words", [
    ("evonorm:4,cpg=16", ("groups=4", "cpg=16")),
    ("evonorm:groups=4,cpg=16", ("groups=4", "cpg=16")),
    ("frn:eps=0", ("eps",)), ("frn:eps=-1", ("eps",)), ("evonorm:eps=0", ("eps",)),
    ("frn:groups=2", ("groups",)), ("evonorm:tau=1", ("tau",)), ("frn:1e-6,2", ("argument",)),
    ("evonorm:0", ("groups",)),
])
def test_bad_specs_are_refused(spec, words):
    with pytest.raises(SpecError) as info:
        norm_factory(spec)  # refused when resolved, before any layer is built
    message = str(info.value)
    assert "\n" not in message and all(word in message for word in words), message


def test_registry_and_descriptions():
    norms = list_norms()
    assert "frn" in norms and "evonorm" in norms
    assert "Filter Response" in norms["frn"] and "EvoNorm-S0" in norms["evonorm"]
    model = nn.Sequential(make_norm("frn", 64, act=True), make_norm("frn", 64), make_norm("evonorm", 64, act=True),
                          make_norm("evonorm:cpg=32", 64))
    assert describe_norm_layers(model) == [
        "FilterResponseNorm2d C=64 +TLU (x1 layer)",
        "FilterResponseNorm2d C=64 (x1 layer)",
        "EvoNorm2dS0 C=64: 4 groups x 16 ch +sigmoid gate (x1 layer)",
        "EvoNorm2dS0 C=64: 2 groups x 32 ch (x1 layer)",
    ]
    for name in ("FilterResponseNorm2d", "EvoNorm2dS0", "norm_activates"):
        assert name in reslab.norms.__all__


# --- simple_cnn: a fused norm replaces the ReLU after it ----------------------------------

def _cnn_by_hand(model, x, relu_after_norm):
    act = F.relu if relu_after_norm else (lambda t: t)
    x = act(model.bn1(model.conv1(x)))
    x = F.max_pool2d(act(model.bn2(model.conv2(x))), 2)
    x = F.max_pool2d(act(model.bn3(model.conv3(x))), 2)
    x = torch.flatten(model.avgpool(x), 1)
    return model.fc2(F.relu(model.fc1(x)))


def _cnn(norm):
    torch.manual_seed(0)
    model = SimpleCNN(in_channels=1, norm=norm, width=4, hidden=8, input_size=(8, 8)).double()
    for module in model.modules():
        if module is not model and any(p.dim() == 1 for p in module.parameters(recurse=False)):
            _randomize(module, seed=len(list(module.parameters())))
    return model


@pytest.mark.parametrize("norm", ["frn", "evonorm"])
def test_simple_cnn_skips_its_relu_after_a_fused_norm(norm):
    model = _cnn(norm)
    assert all(norm_activates(getattr(model, name)) for name in ("bn1", "bn2", "bn3"))
    x = _x(n=2, c=1, h=8, w=8)
    out = model(x)
    torch.testing.assert_close(out, _cnn_by_hand(model, x, relu_after_norm=False), rtol=0, atol=0)
    # the ReLU would change the output: the test can tell one from the other
    assert not torch.allclose(out, _cnn_by_hand(model, x, relu_after_norm=True))
    assert not any(isinstance(m, nn.Identity) and n.startswith("bn") for n, m in model.named_modules())


@pytest.mark.parametrize("norm", ["bn", "gn", "none"])
def test_simple_cnn_keeps_its_relu_after_other_norms(norm):
    model = _cnn(norm).eval()
    x = _x(n=2, c=1, h=8, w=8)
    torch.testing.assert_close(model(x), _cnn_by_hand(model, x, relu_after_norm=True), rtol=0, atol=0)


def test_simple_cnn_takes_a_callable_without_act():
    model = SimpleCNN(in_channels=1, norm=lambda c: nn.GroupNorm(2, c), width=4, hidden=8, input_size=(8, 8))
    assert isinstance(model.bn3, nn.GroupNorm) and model.bn3.num_groups == 2
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    fused = SimpleCNN(in_channels=1, norm=norm_factory("frn"), width=4, hidden=8, input_size=(8, 8))
    assert norm_activates(fused.bn1)


def test_build_model_simple_cnn_frn_trains():
    model = reslab.build_model("simple_cnn", norm="frn", num_classes=3, in_channels=1, input_size=8)
    model(torch.randn(2, 1, 8, 8)).square().mean().backward()
    taus = [m.tau for m in model.modules() if isinstance(m, FilterResponseNorm2d)]
    assert len(taus) == 3 and all(t.grad is not None and t.grad.abs().sum() > 0 for t in taus)


# --- convert_norms -----------------------------------------------------------------------

def _small_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU())
    with torch.no_grad():
        for norm in (model[1], model[4]):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-1, 1)
    return model


@pytest.mark.parametrize("spec, cls", [("frn", FilterResponseNorm2d), ("evonorm:cpg=8", EvoNorm2dS0)])
def test_convert_to_fused_norm_and_back(spec, cls):
    model = _small_model()
    weights = [model[i].weight.detach().clone() for i in (1, 4)]
    biases = [model[i].bias.detach().clone() for i in (1, 4)]
    model, report = convert_norms(model, spec)
    assert len(report) == 2 and all(row.copied == ("weight", "bias") for row in report)
    for i, w, b in zip((1, 4), weights, biases, strict=True):
        assert type(model[i]) is cls and not norm_activates(model[i])  # the model's ReLU stays
        assert torch.equal(model[i].weight, w) and torch.equal(model[i].bias, b)
        assert isinstance(model[i + 1], nn.ReLU)
    if cls is EvoNorm2dS0:
        assert model[1].groups == 2 and model[1].v is None
    x = torch.randn(2, 3, 6, 6)
    assert model(x).shape == (2, 16, 6, 6)

    model, report = convert_norms(model, "gn:2")
    assert len(report) == 2 and report.counts == {cls.__name__: 2}
    for i, w, b in zip((1, 4), weights, biases, strict=True):
        assert type(model[i]) is nn.GroupNorm and model[i].num_groups == 2
        assert torch.equal(model[i].weight, w) and torch.equal(model[i].bias, b)


def test_convert_frn_to_evonorm_copies_affine_and_computes_evonorm():
    model = nn.Sequential(_randomize(make_norm("frn", C)))
    weight, bias = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    model, report = convert_norms(model, "evonorm:4")
    assert report.rows[0].copied == ("weight", "bias") and report.rows[0].new == "EvoNorm2dS0(16, groups=4)"
    x = _x()
    torch.testing.assert_close(model(x), _evonorm_by_hand(x, 4, weight, bias), rtol=1e-12, atol=1e-12)


def test_convert_refuses_a_norm_that_applies_its_activation():
    model = nn.Sequential(nn.Conv2d(3, C, 1), make_norm("frn", C, act=True))
    before = model[1]
    with pytest.raises(SpecError) as info:
        convert_norms(model, "bn")
    message = str(info.value)
    assert "\n" not in message and "activation" in message and "FilterResponseNorm2d(16, +TLU)" in message
    assert model[1] is before  # untouched


def test_convert_error_names_the_evonorm_groups():
    model = nn.Sequential(nn.BatchNorm2d(64))
    with pytest.raises(SpecError) as info:
        convert_norms(model, "evonorm:5")
    message = str(info.value)
    assert "\n" not in message and "evonorm:5" in message and "64" in message and "1, 2, 4, 8, 16, 32, 64" in message
