"""Every model x norm x init from the registries builds, initializes, runs forward and backward.

Parametrized over the registries themselves, so a new model, norm or scheme is
covered the moment it is registered.  The smallest member of each model family
keeps the cross product fast.
"""

import pytest
import torch

from reslab.build import build, check, init_model, model_config
from reslab.convs import ScaledStdConv2d, StdConv2d, conv_names
from reslab.errors import SpecError
from reslab.inits import init_entry, init_names, init_weights, model_init_names, needs_batch
from reslab.models import build_model, model_input, model_names, model_options
from reslab.norms import norm_names

# One representative per family: the cross product with every norm and init.
FAMILY_REPRESENTATIVES = ["resnet18", "resnet50", "cifar_resnet20", "plain20", "mlp", "simple_cnn"]

IMAGENET_WIDTH = ("resnet18", "resnet50")

# Schemes whose argument is required, or that fit only one tensor kind, get a policy that fits.
SPECS = {
    "constant": "constant:0.1",
    "dirac": {"conv": "dirac", "linear": "default"},
    "eye": {"conv": "default", "linear": "eye"},
}
# Schemes not scaled by fan-in (std or mean ~1 per weight) multiply the
# activation scale by ~sqrt(fan_in) or more per layer without normalization
# (the seeds' "ones: loss 1552"), so deep nets may overflow: there we only
# require the passes to run.
EXPLODE_WITHOUT_NORM = {"ones", "constant", "uniform", "normal", "trunc_normal"}


def _spec(name):
    return SPECS.get(name, name)


def _input(model_name, batch=2):
    channels, size = model_input(model_name)
    size = min(size, 32)  # imagenet-stem nets run on 32x32 to keep the suite fast
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(0)), size


def test_families_cover_the_registry():
    prefixes = {name.rstrip("0123456789") for name in model_names()}
    covered = {name.rstrip("0123456789") for name in FAMILY_REPRESENTATIVES}
    assert prefixes == covered


# The fast subset (pytest -m "not slow") keeps the whole norm x init product on the two smallest
# models, and on every other family each norm (with the default init) and each init (with bn);
# the rest of the product, about 80% of this file's time on 2 CPU cores, is marked slow.
FULL_PRODUCT_FAST = ("simple_cnn", "mlp")


def _model_norm_init():
    for model_name in FAMILY_REPRESENTATIVES:
        for norm in norm_names():
            for init in init_names():
                fast = model_name in FULL_PRODUCT_FAST or init == "default" or norm == "bn"
                yield pytest.param(model_name, norm, init, marks=() if fast else pytest.mark.slow)


@pytest.mark.parametrize("model_name, norm, init", list(_model_norm_init()))
def test_model_norm_init_forward_backward(model_name, norm, init):
    x, size = _input(model_name)
    channels = x.shape[1]
    # the same blocks, stem and shortcuts at a quarter of the width: 16x faster
    options = {"width": 16} if model_name in IMAGENET_WIDTH else {}
    cfg = model_config(model_name, norm=norm, init=_spec(init), model_options=options)
    if init in model_init_names() and init != "lsuv" and "branch" not in model_options(model_name):
        # fixup / skipinit / nf need residual branches: a model without them is refused, in one line
        with pytest.raises(SpecError, match=f"init '{init}' needs a model with residual branches; "
                                            f"'{model_name}' has none"):
            check(cfg)
        return
    model = build(cfg, num_classes=10, in_channels=channels, input_size=size)
    report = init_model(model, cfg, batch=x if needs_batch(cfg.init) else None)
    assert len(report) == sum(1 for _ in model.parameters())
    out = model(x)
    assert out.shape == (2, 10)
    out.float().pow(2).mean().backward()
    # EvoNorm-S0 divides an uncentred x by its group std: where such an init makes every
    # channel of a group equal (all-ones weights on a 1x1 map), that std is 0 and x/sqrt(eps)
    # grows layer by layer, as without a norm.
    has_norm = norm not in ("none", "evonorm") and model_name not in ("mlp",)
    if init in EXPLODE_WITHOUT_NORM and not has_norm:
        return
    # dirac copies the input's channels and leaves every other channel at exactly 0; FRN
    # multiplies the gradient of a zero channel by 1/sqrt(eps) = 1000 per layer (Singh &
    # Krishnan 2020, Sec. 3.1), so a 20-layer stack of them overflows: only the passes must run.
    if (norm, init) == ("frn", "dirac"):
        return
    assert torch.isfinite(out).all()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("model_name", ["resnet18", "resnet50", "cifar_resnet20"])
@pytest.mark.parametrize("norm", ["bn", "gn", "rms"])
def test_zero_init_residual_policy_on_real_models(model_name, norm):
    model = build_model(model_name, norm=norm)
    init_weights(model, {"conv": "kaiming_normal:mode=fan_out", "zero_init_residual": True}, seed=0)
    last = "bn3" if model_name == "resnet50" else "bn2"
    zeroed, ones = [], []
    for path, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not (path.split(".")[-1].startswith("bn") and isinstance(weight, torch.Tensor)):
            continue
        (zeroed if torch.all(weight == 0) else ones).append(path)
        if path not in zeroed:
            assert torch.all(weight == 1), path
    blocks = [p for p, m in model.named_modules() if hasattr(m, "zero_init_last")]
    assert sorted(zeroed) == sorted(f"{b}.{last}" for b in blocks)
    assert len(zeroed) > 0 and len(ones) > len(zeroed)


# Where each scheme applies, from what its torch.nn.init function needs: fan-based schemes
# need a layer's fan_in (weights, or a bias through its layer's weight), matrix schemes a
# weight of 2+ dims, dirac_ a conv weight, eye_ a 2-D one; constants and distributions fit
# any tensor, norm scales included.
WEIGHTS = {"conv", "linear"}
FAN = {"conv", "linear", "bias"}
ANY = {"conv", "linear", "bias", "norm"}
EXPECTED_KINDS = {
    "default": FAN, "rule_uniform": FAN, "rule_normal": FAN,
    "zeros": ANY, "ones": ANY, "constant": ANY, "uniform": ANY, "normal": ANY, "trunc_normal": ANY,
    "xavier_uniform": WEIGHTS, "xavier_normal": WEIGHTS, "kaiming_uniform": WEIGHTS, "kaiming_normal": WEIGHTS,
    "orthogonal": WEIGHTS, "sparse": WEIGHTS,
    "dirac": {"conv"}, "eye": {"linear"},
}


@pytest.mark.parametrize("conv", conv_names())
@pytest.mark.parametrize("model_name", [pytest.param(m, marks=pytest.mark.slow) if m == "resnet50" else m
                                        for m in FAMILY_REPRESENTATIVES])
def test_every_model_takes_every_conv(model_name, conv):
    x, size = _input(model_name)
    model = build_model(model_name, num_classes=10, in_channels=x.shape[1], norm="gn", input_size=size, conv=conv)
    init_weights(model, "kaiming_normal", seed=0)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    kind = {"default": torch.nn.Conv2d, "ws": StdConv2d, "sws": ScaledStdConv2d}[conv]
    assert all(type(m) is kind for m in convs), model_name
    out = model(x)
    out.float().pow(2).mean().backward()
    assert torch.isfinite(out).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", [n for n in init_names() if n not in model_init_names()])
def test_every_scheme_declares_where_it_applies(name):
    assert name in EXPECTED_KINDS, f"new scheme {name!r}: add where it applies to EXPECTED_KINDS"
    assert set(init_entry(name).kinds) == EXPECTED_KINDS[name]
    # and init_weights honours it: the scheme initializes those tensors and refuses the others
    spec = SPECS.get(name) if isinstance(SPECS.get(name), str) else name
    for kind in ("conv", "linear", "bias", "norm"):
        model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                    torch.nn.Linear(4, 4))
        if name == "default" and kind == "norm":  # a policy's norm "default" is the norms' own: ones
            assert init_weights(model, {"norm": "default"}).rows[2].scheme == "ones"
            continue
        if kind not in EXPECTED_KINDS[name]:
            with pytest.raises(SpecError, match=name):
                init_weights(model, {kind: spec})
            continue
        rows = {row.path: row.scheme for row in init_weights(model, {kind: spec}, seed=0)}
        touched = {"conv": ["0.weight"], "linear": ["3.weight"], "bias": ["0.bias", "3.bias"],
                   "norm": ["1.weight"]}[kind]
        assert [rows[path] for path in touched] == [spec] * len(touched), rows
