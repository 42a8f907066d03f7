"""Every model x norm x init from the registries builds, initializes, runs forward and backward.

Parametrized over the registries themselves, so a new model, norm or scheme is
covered the moment it is registered.  The smallest member of each model family
keeps the cross product fast.
"""

import pytest
import torch

from reslab.errors import SpecError
from reslab.inits import init_entry, init_names, init_weights
from reslab.models import build_model, model_input, model_names
from reslab.norms import norm_names

# One representative per family: the cross product with every norm and init.
FAMILY_REPRESENTATIVES = ["resnet18", "resnet50", "cifar_resnet20", "plain20", "mlp", "simple_cnn"]

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


@pytest.mark.parametrize("init", init_names())
@pytest.mark.parametrize("norm", norm_names())
@pytest.mark.parametrize("model_name", FAMILY_REPRESENTATIVES)
def test_model_norm_init_forward_backward(model_name, norm, init):
    x, size = _input(model_name)
    channels = x.shape[1]
    model = build_model(model_name, num_classes=10, in_channels=channels, norm=norm, input_size=size)
    report = init_weights(model, _spec(init), seed=0)
    assert len(report) == sum(1 for _ in model.parameters())
    out = model(x)
    assert out.shape == (2, 10)
    out.float().pow(2).mean().backward()
    has_norm = norm != "none" and model_name not in ("mlp",)
    if init in EXPLODE_WITHOUT_NORM and not has_norm:
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


@pytest.mark.parametrize("name", init_names())
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
