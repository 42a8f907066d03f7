"""reslab.convs: Weight Standardization and Scaled WS, their specs, and the swap into any model."""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from reslab.convs import (
    RELU_GAMMA,
    ScaledStdConv2d,
    StdConv2d,
    conv_factory,
    conv_names,
    list_convs,
    resolve_conv,
    standardize_convs,
)
from reslab.errors import SpecError

RELU_VAR = (1 - 1 / math.pi) / 2  # Var(relu(z)), z ~ N(0, 1)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _ws(w, eps):
    """Weight Standardization written out: per output channel, population variance."""
    flat = w.reshape(w.shape[0], -1)
    mean = flat.mean(1, keepdim=True)
    var = ((flat - mean) ** 2).mean(1, keepdim=True)
    return ((flat - mean) / torch.sqrt(var + eps)).reshape(w.shape)


def _shift_weight(conv, seed=0):
    """An arbitrary raw weight: uniform, shifted and scaled, nothing like zero-mean unit-variance."""
    with torch.no_grad():
        conv.weight.copy_(torch.rand(conv.weight.shape, generator=_gen(seed), dtype=conv.weight.dtype) * 5 + 3)
    return conv


def _channel_stats(w):
    flat = w.reshape(w.shape[0], -1)
    return flat.mean(1), flat.std(1, correction=0)


# --- StdConv2d ---------------------------------------------------------------

def test_std_conv_weight_is_standardized_per_output_channel():
    conv = _shift_weight(StdConv2d(8, 16, 3, eps=1e-10).double())  # fan_in 72: sample std would be 0.7% off
    mean, std = _channel_stats(conv.standardized_weight())
    assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-5)
    assert torch.allclose(std, torch.ones_like(std), atol=1e-5)
    assert conv.eps == 1e-10 and StdConv2d(2, 2, 1).eps == 1e-6


@pytest.mark.parametrize("kw", [
    dict(),
    dict(stride=2, padding=1),
    dict(padding=2, dilation=2, bias=False),
    dict(groups=4, padding=1, stride=(1, 2)),
    dict(padding=1, padding_mode="reflect"),
])
def test_std_conv_forward_equals_conv_with_the_standardized_weight(kw):
    conv = _shift_weight(StdConv2d(8, 12, 3, **kw).double())
    if conv.bias is not None:
        with torch.no_grad():
            conv.bias.normal_(generator=_gen(3))
    x = torch.randn(2, 8, 9, 11, generator=_gen(1), dtype=torch.float64)
    w = _ws(conv.weight, 1e-6)
    if kw.get("padding_mode") == "reflect":
        ref = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), w, conv.bias)
    else:
        ref = F.conv2d(x, w, conv.bias, kw.get("stride", 1), kw.get("padding", 0), kw.get("dilation", 1),
                       kw.get("groups", 1))
    torch.testing.assert_close(conv(x), ref, rtol=1e-10, atol=1e-10)


def test_std_conv_state_dict_is_conv2d_s_and_loads_both_ways():
    plain = nn.Conv2d(4, 6, 3)
    std = StdConv2d(4, 6, 3)
    assert list(std.state_dict()) == list(plain.state_dict()) == ["weight", "bias"]
    assert [n for n, _ in std.named_parameters()] == ["weight", "bias"]
    std.load_state_dict(plain.state_dict())
    assert torch.equal(std.weight, plain.weight)


# --- ScaledStdConv2d ---------------------------------------------------------

@pytest.mark.parametrize("gamma", [1.0, RELU_GAMMA, 0.3])
def test_scaled_std_conv_weight_has_std_gamma_gain_over_sqrt_fan_in(gamma):
    conv = _shift_weight(ScaledStdConv2d(6, 10, (3, 5), groups=2, gamma=gamma, eps=1e-12).double())
    gain = torch.rand(10, generator=_gen(2), dtype=torch.float64) * 2 + 0.25
    with torch.no_grad():
        conv.gain.copy_(gain.view(10, 1, 1, 1))
    fan_in = 3 * 3 * 5
    assert conv.fan_in == fan_in
    mean, std = _channel_stats(conv.standardized_weight())
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-7, rtol=0)
    torch.testing.assert_close(std, gamma * gain / math.sqrt(fan_in), atol=1e-7, rtol=1e-7)


def test_scaled_std_conv_forward_matches_the_formula():
    conv = _shift_weight(ScaledStdConv2d(4, 6, 3, stride=2, padding=1, gamma=1.5, eps=1e-4).double())
    with torch.no_grad():
        conv.gain.uniform_(0.5, 2.0, generator=_gen(4))
        conv.bias.normal_(generator=_gen(5))
    x = torch.randn(3, 4, 8, 8, generator=_gen(6), dtype=torch.float64)
    w = conv.gain * 1.5 * _ws(conv.weight, 1e-4) / math.sqrt(4 * 9)
    torch.testing.assert_close(conv(x), F.conv2d(x, w, conv.bias, 2, 1), rtol=1e-10, atol=1e-10)


def test_scaled_std_conv_state_dict_reset_and_repr():
    conv = ScaledStdConv2d(4, 6, 3, bias=False, gamma=2.0)
    assert list(conv.state_dict()) == [*nn.Conv2d(4, 6, 3, bias=False).state_dict(), "gain"]
    assert conv.gain.shape == (6, 1, 1, 1) and torch.equal(conv.gain, torch.ones(6, 1, 1, 1))
    assert not isinstance(conv.gamma, torch.Tensor) and "gamma=2" in repr(conv)
    with torch.no_grad():
        conv.gain.mul_(3)
    conv.reset_parameters()
    assert torch.equal(conv.gain, torch.ones(6, 1, 1, 1))


def test_constructors_refuse_nonpositive_gamma_and_eps():
    with pytest.raises(SpecError, match="gamma"):
        ScaledStdConv2d(2, 2, 1, gamma=0.0)
    with pytest.raises(SpecError, match="eps"):
        StdConv2d(2, 2, 1, eps=-1e-6)


def test_gradients_reach_weight_and_gain_as_the_formula_s():
    conv = _shift_weight(ScaledStdConv2d(3, 5, 3, padding=1, gamma=RELU_GAMMA).double())
    with torch.no_grad():
        conv.gain.uniform_(0.5, 2.0, generator=_gen(7))
    x = torch.randn(2, 3, 6, 6, generator=_gen(8), dtype=torch.float64)
    target = torch.randn(2, 5, 6, 6, generator=_gen(9), dtype=torch.float64)
    (conv(x) * target).sum().backward()

    w = conv.weight.detach().clone().requires_grad_()
    gain = conv.gain.detach().clone().requires_grad_()
    ref = F.conv2d(x, gain * RELU_GAMMA * _ws(w, 1e-6) / math.sqrt(27), conv.bias.detach(), padding=1)
    (ref * target).sum().backward()
    assert conv.weight.grad.abs().sum() > 0 and conv.gain.grad.abs().sum() > 0
    torch.testing.assert_close(conv.weight.grad, w.grad)
    torch.testing.assert_close(conv.gain.grad, gain.grad)


def test_gradients_reach_std_conv_weight_through_the_standardization():
    conv = _shift_weight(StdConv2d(3, 5, 3, stride=2).double())
    x = torch.randn(2, 3, 7, 7, generator=_gen(13), dtype=torch.float64)
    target = torch.randn(2, 5, 3, 3, generator=_gen(14), dtype=torch.float64)
    (conv(x) * target).sum().backward()
    w = conv.weight.detach().clone().requires_grad_()
    (F.conv2d(x, _ws(w, 1e-6), conv.bias.detach(), stride=2) * target).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    torch.testing.assert_close(conv.weight.grad, w.grad)


# --- signal propagation ------------------------------------------------------

@pytest.mark.parametrize("gamma, expected", [(RELU_GAMMA, 1.0), (1.0, RELU_VAR)])
def test_relu_then_scaled_ws_conv_variance(gamma, expected):
    """Var(conv(relu(x))) = gamma^2 * Var(relu(z)) = gamma^2 (1 - 1/pi) / 2 for any raw weight.

    Measured on the interior 6x6 positions, where no zero padding enters the window
    (at the border the zeros break the zero-sum of the weights the prediction rests on).
    """
    assert RELU_GAMMA ** 2 * RELU_VAR == pytest.approx(1.0)
    x = torch.randn(512, 64, 8, 8, generator=_gen(10))
    conv = _shift_weight(ScaledStdConv2d(64, 64, 3, padding=1, gamma=gamma), seed=11)
    with torch.no_grad():
        conv.bias.zero_()
        y = conv(F.relu(x))[:, :, 1:-1, 1:-1]
    assert y.mean().item() == pytest.approx(0.0, abs=0.02)
    assert y.var().item() == pytest.approx(expected, abs=0.03 * expected)
    assert RELU_GAMMA == pytest.approx(1.7129, abs=1e-4)


# --- specs -------------------------------------------------------------------

def test_registry_names_and_descriptions():
    assert conv_names() == ["default", "ws", "sws"]
    assert set(list_convs()) == set(conv_names())
    assert all(text and "\n" not in text for text in list_convs().values())


def test_resolve_fills_defaults_and_named_gammas():
    assert resolve_conv("ws").kwargs == {"eps": 1e-6}
    assert resolve_conv("ws:eps=1e-3").kwargs == {"eps": 1e-3}
    assert resolve_conv("sws").kwargs == {"gamma": RELU_GAMMA, "eps": 1e-6}
    assert resolve_conv("sws:gamma=linear").kwargs["gamma"] == 1.0
    assert resolve_conv("sws:relu,eps=1e-5").kwargs == {"gamma": RELU_GAMMA, "eps": 1e-5}
    assert resolve_conv("sws:gamma=2.5").kwargs["gamma"] == 2.5
    assert resolve_conv("default").is_default and resolve_conv("default").kwargs == {}


@pytest.mark.parametrize("spec, value", [
    ("sws:gamma=0", "'0'"),
    ("sws:gamma=-1", "'-1'"),
    ("sws:gamma=tanhh", "'tanhh'"),
    ("sws:gamma=nan", "'nan'"),
    ("ws:eps=0", "'0'"),
    ("ws:eps=-1e-6", "'-1e-6'"),
    ("wx", "'wx'"),
    ("ws:gamma=2", "'gamma'"),
    ("ws:", "'ws:'"),
])
def test_bad_specs_are_one_line_spec_errors_naming_the_value(spec, value):
    with pytest.raises(SpecError) as info:
        resolve_conv(spec)
    message = str(info.value)
    assert "\n" not in message and value in message
    if spec == "wx":
        assert message == "unknown conv 'wx'; valid choices: default, sws, ws"
    if "gamma=" in spec and spec.startswith("sws"):
        assert "relu" in message and "linear" in message


def test_conv_factory_has_conv2d_s_signature():
    assert conv_factory("default") is nn.Conv2d
    conv = conv_factory("sws:gamma=linear,eps=1e-5")(8, 16, 3, 2, 1, 1, 2, False)
    assert type(conv) is ScaledStdConv2d and (conv.gamma, conv.eps) == (1.0, 1e-5)
    assert (conv.stride, conv.padding, conv.groups, conv.bias) == ((2, 2), (1, 1), 2, None)
    conv = conv_factory("ws")(3, 4, kernel_size=1, bias=True, dtype=torch.float64)
    assert type(conv) is StdConv2d and conv.weight.dtype == torch.float64 and conv.eps == 1e-6
    with pytest.raises(SpecError):
        conv_factory("sws:gamma=0")


# --- standardize_convs ---------------------------------------------------------

def _resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def test_standardize_torchvision_resnet18_with_ws():
    model = _resnet18().eval()
    old = {name: (type(m), m.weight.detach().clone()) for name, m in model.named_modules()
           if isinstance(m, nn.Conv2d)}
    model2, count = standardize_convs(model, "ws")
    assert model2 is model and count == 20 == len(old)
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert set(convs) == set(old)
    for name, m in convs.items():
        assert type(m) is StdConv2d and not m.training
        assert torch.equal(m.weight, old[name][1])
    assert (convs["conv1"].stride, convs["conv1"].padding, convs["conv1"].bias) == ((2, 2), (3, 3), None)
    assert convs["layer2.0.downsample.0"].kernel_size == (1, 1)
    out = model(torch.randn(2, 3, 32, 32, generator=_gen(12)))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert standardize_convs(model, "ws") == (model, 0)  # already standardized
    assert standardize_convs(model, "ws:eps=1e-4")[1] == 20
    assert all(m.eps == 1e-4 for m in model.modules() if isinstance(m, StdConv2d))


def test_bad_spec_or_default_leaves_the_model_untouched():
    model = _resnet18()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = list(model.modules())
    for bad in ("wx", "sws:gamma=tanhh", "ws:eps=0"):
        with pytest.raises(SpecError) as info:
            standardize_convs(model, bad)
        assert "\n" not in str(info.value)
        assert list(model.modules()) == modules
    assert standardize_convs(model, "default") == (model, 0)
    assert list(model.modules()) == modules
    assert all(type(m) is nn.Conv2d for m in model.modules() if isinstance(m, nn.Conv2d))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_conv_that_cannot_be_swapped_fails_before_any_swap():
    class SamePadConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(F.pad(x, (1, 1, 1, 1)))

    first = nn.Conv2d(3, 4, 3)
    model = nn.Sequential(first, nn.ReLU(), SamePadConv(4, 4, 3))
    with pytest.raises(SpecError, match=r"cannot standardize 2 \(SamePadConv\)") as info:
        standardize_convs(model, "sws")
    assert "\n" not in str(info.value)
    assert model[0] is first

    hooked = nn.Sequential(nn.Conv2d(3, 4, 3))
    hooked[0].register_forward_hook(lambda *a: None)
    with pytest.raises(SpecError, match="hooks"):
        standardize_convs(hooked, "ws")
    lazy = nn.Sequential(nn.LazyConv2d(4, 3))
    with pytest.raises(SpecError, match="lazy"):
        standardize_convs(lazy, "ws")
    with pytest.raises(SpecError, match="wrap it first"):
        standardize_convs(nn.Conv2d(3, 4, 3), "ws")


def test_sws_swap_keeps_dtype_mode_requires_grad_and_shares_shared_convs():
    shared = nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular")
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, dilation=1, groups=1), shared, nn.ReLU(), shared,
        nn.Conv1d(4, 4, 3), nn.Conv3d(4, 4, 1), nn.ConvTranspose2d(4, 4, 2),
    ).double()
    model[0].train(False)
    model[0].bias.requires_grad_(False)
    old_shared_weight = shared.weight.detach().clone()
    _, count = standardize_convs(model, "sws:gamma=linear")
    assert count == 2
    assert type(model[0]) is ScaledStdConv2d and model[0].gamma == 1.0 and not model[0].training
    assert model[1] is model[3] and type(model[1]) is ScaledStdConv2d and model[1].training
    assert model[1].padding_mode == "circular" and model[1].padding == (1, 1)
    assert torch.equal(model[1].weight, old_shared_weight)
    assert not model[0].bias.requires_grad and model[0].weight.requires_grad
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert type(model[4]) is nn.Conv1d and type(model[5]) is nn.Conv3d and type(model[6]) is nn.ConvTranspose2d
    # sws -> sws with another gamma keeps the learned gain; sws -> ws drops it.
    with torch.no_grad():
        model[1].gain.fill_(0.5)
    assert standardize_convs(model, "sws:gamma=linear")[1] == 0
    assert standardize_convs(model, "sws")[1] == 2
    assert model[1].gamma == RELU_GAMMA and torch.all(model[1].gain == 0.5)
    assert standardize_convs(model, "ws")[1] == 2
    assert type(model[3]) is StdConv2d and "gain" not in dict(model.named_parameters())
