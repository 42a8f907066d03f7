"""reslab.models: the registry, torchvision parity, He et al.'s CIFAR nets, every model x every norm."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import reslab.models as models
from reslab.errors import SpecError
from reslab.models import (
    BasicBlock,
    Bottleneck,
    ResNet,
    build_model,
    list_models,
    model_input,
    model_names,
    model_options,
    register_model,
)
from reslab.norms import norm_names
from reslab.registry import Registry

MODELS_DIR = Path(models.__file__).parent


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weight_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


# --- torchvision parity ------------------------------------------------------

TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}


def slow_for(names, slow):
    """``names`` as parameters, those in ``slow`` (several seconds each on a CPU) marked slow."""
    return [pytest.param(name, marks=pytest.mark.slow) if name in slow else name for name in names]


@pytest.mark.parametrize("name", slow_for(TORCHVISION_PARAMS, ("resnet101", "resnet152")))
def test_matches_torchvision(name):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)().eval()
    model = build_model(name, num_classes=1000, norm="bn").eval()

    assert n_params(model) == n_params(reference) == TORCHVISION_PARAMS[name]
    assert list(model.state_dict()) == list(reference.state_dict())
    model.load_state_dict(reference.state_dict(), strict=True)

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, actual = reference(x), model(x)
    assert actual.shape == (2, 1000)
    assert (actual - expected).abs().max() <= 1e-5 * expected.abs().max()


# --- He et al. 2015's CIFAR nets --------------------------------------------

# He et al. 2015 Table 6: parameter counts of the CIFAR-10 ResNets (option A shortcuts).
CIFAR_PARAMS = {20: 0.27e6, 32: 0.46e6, 44: 0.66e6, 56: 0.85e6, 110: 1.7e6}


@pytest.mark.parametrize("depth", list(CIFAR_PARAMS))
def test_cifar_resnet_matches_paper(depth):
    model = build_model(f"cifar_resnet{depth}")
    plain = build_model(f"plain{depth}")
    assert abs(n_params(model) - CIFAR_PARAMS[depth]) <= 0.02 * CIFAR_PARAMS[depth]
    # Option A shortcuts are parameter-free, so the plain net has the very same tensors.
    assert [p.shape for p in plain.parameters()] == [p.shape for p in model.parameters()]
    # 6n+2 weight layers: the stem conv, 2 convs in each of 3n blocks, the fc.
    assert len(weight_layers(model)) == len(weight_layers(plain)) == depth
    assert plain(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_shortcut_b_adds_projections_a_none():
    a = build_model("cifar_resnet20", shortcut="A")
    b = build_model("cifar_resnet20", shortcut="B")
    assert not any("downsample" in name for name, _ in a.named_parameters())
    # Two projections where the stage changes: 16->32 and 32->64 (1x1 conv + bn weight and bias).
    assert n_params(b) - n_params(a) == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    assert [k for k in b.state_dict() if "downsample" in k and k.endswith("weight")] == [
        "layer2.0.downsample.0.weight", "layer2.0.downsample.1.weight",
        "layer3.0.downsample.0.weight", "layer3.0.downsample.1.weight",
    ]
    x = torch.randn(2, 3, 32, 32)
    assert a(x).shape == b(x).shape == (2, 10)


def test_imagenet_resnet_with_shortcut_a_has_no_projections():
    model = build_model("resnet50", shortcut="A")
    assert not any("downsample" in name for name, _ in model.named_parameters())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_plain_nets_have_no_shortcut():
    plain = build_model("plain20")
    assert all(not block.residual and block.downsample is None for block in plain.modules()
               if isinstance(block, BasicBlock))
    assert "shortcut" not in model_options("plain20")


@pytest.mark.parametrize(("name", "stem", "size", "stem_out", "features_out"), [
    ("resnet18", "imagenet", 64, 16, 2),  # 7x7/2 conv + 3x3/2 max-pool: 4x before layer1, 32x in all
    ("resnet18", "cifar", 32, 32, 4),  # no stem downsampling, 3 stride-2 stages
    ("cifar_resnet20", "cifar", 32, 32, 8),
    ("cifar_resnet20", "imagenet", 32, 8, 2),
])
def test_stem_resolution(name, stem, size, stem_out, features_out):
    model = build_model(name, stem=stem)
    seen = []
    model.layer1.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    features = model.forward_features(torch.randn(2, 3, size, size))
    assert seen[0][-2:] == (stem_out, stem_out)
    assert features.shape[-2:] == (features_out, features_out)


def test_width_option_is_base_channels():
    assert build_model("resnet18", width=32).fc.in_features == 256  # 8 x 32
    assert build_model("resnet50", width=16).fc.in_features == 512  # 8 x 16 x expansion 4
    assert build_model("cifar_resnet20", width=32).fc.in_features == 128  # 4 x 32
    # the seeds' flatten head: 4w channels x 7 x 7 on 28x28 MNIST; global pooling leaves 4w
    assert build_model("simple_cnn", width=8).fc1.in_features == 32 * 7 * 7
    assert build_model("simple_cnn", width=8, head="gap").fc1.in_features == 32


# --- zero_init_residual (Goyal et al. 2017) ---------------------------------

@pytest.mark.parametrize("norm", ["bn", "gn", "rms"])
@pytest.mark.parametrize(("name", "last"), [("resnet18", "bn2"), ("resnet50", "bn3"), ("cifar_resnet20", "bn2")])
def test_zero_init_residual_zeroes_exactly_the_last_norm(name, last, norm):
    torch.manual_seed(0)
    plain_init = build_model(name, norm=norm).state_dict()
    torch.manual_seed(0)
    zeroed = build_model(name, norm=norm, zero_init_residual=True).state_dict()

    changed = {key for key in plain_init if not torch.equal(plain_init[key], zeroed[key])}
    last_norm = re.compile(rf"^layer\d+\.\d+\.{last}\.(norm\.)?weight$")
    expected = {key for key in plain_init if last_norm.match(key)}
    n_blocks = sum(isinstance(m, (BasicBlock, Bottleneck)) for m in build_model(name, norm="none").modules())
    assert len(expected) == n_blocks > 0
    assert changed == expected
    assert all(torch.count_nonzero(zeroed[key]) == 0 for key in expected)


def test_zero_init_residual_with_norm_none_is_an_error_not_a_silent_no_op():
    # no norm scale ends the branches: asking for zero-init residuals would record a run that did not happen
    with pytest.raises(SpecError, match="zero_init_residual.*norm"):
        build_model("resnet18", norm="none", zero_init_residual=True)


def test_zero_init_last_is_a_no_op_on_plain_blocks():
    block = BasicBlock(16, 16, residual=False)
    block.zero_init_last()
    assert torch.all(block.bn2.weight == 1)
    with pytest.raises(SpecError, match="plain net"):
        ResNet(BasicBlock, (1, 1, 1), widths=(16, 32, 64), stem="cifar", residual=False, zero_init_residual=True)


# --- every model x every norm --------------------------------------------------

# The smallest member of each family gets the full norm cross product; the
# deeper ones a single bn build + forward (depth changes nothing norm-specific).
FULL_NORM_MODELS = ["resnet18", "resnet50", "cifar_resnet20", "plain20", "mlp", "simple_cnn"]


def example_input(name: str, batch: int) -> tuple[dict, torch.Tensor]:
    if name == "mlp":
        return {"in_channels": 1, "input_size": 28}, torch.randn(batch, 1, 28, 28)
    return {"in_channels": 3, "input_size": 32}, torch.randn(batch, 3, 32, 32)


def test_every_family_is_covered():
    families = {re.sub(r"\d+$", "", name) for name in model_names()}
    assert families == {re.sub(r"\d+$", "", name) for name in FULL_NORM_MODELS}


@pytest.mark.parametrize("norm", norm_names())
@pytest.mark.parametrize("name", slow_for(FULL_NORM_MODELS, ("resnet50",)))  # tests/test_registries.py: narrower
def test_forward_backward_every_norm(name, norm):
    torch.manual_seed(0)
    common, x = example_input(name, batch=4)
    model = build_model(name, norm=norm, num_classes=7, **common).train()
    out = model(x)
    assert out.shape == (4, 7)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", slow_for([n for n in model_names() if n not in FULL_NORM_MODELS], ("resnet152",)))
def test_builds_and_runs(name):
    common, x = example_input(name, batch=2)
    model = build_model(name, **common).eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_no_concrete_norm_class_in_models():
    pattern = re.compile(r"BatchNorm|GroupNorm|LayerNorm|RMSNorm|InstanceNorm")
    offenders = [f"{path.name}:{i}" for path in sorted(MODELS_DIR.glob("*.py"))
                 for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_norm_none_has_no_norm_parameters():
    model = build_model("cifar_resnet20", norm="none")
    assert {type(m) for m in model.modules() if list(m.parameters(recurse=False))} == {nn.Conv2d, nn.Linear}


# --- baselines ---------------------------------------------------------------

def test_mlp_default_is_the_seed_recipe():
    model = build_model("mlp", in_channels=1)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 256), (256, 128), (128, 10)]
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.2, 0.2]


def test_mlp_options_and_input_size():
    model = build_model("mlp", in_channels=3, input_size=32, hidden="64, 32", dropout="0")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3072, 64), (64, 32), (32, 10)]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    logistic = build_model("mlp", in_channels=1, hidden=())
    assert [type(m) for m in logistic.modules()][-1] is nn.Linear and n_params(logistic) == 784 * 10 + 10
    with pytest.raises(ValueError, match="784 values per sample"):
        build_model("mlp", in_channels=1)(torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("size", [4, 8, 28, 30, 64])
def test_simple_cnn_is_built_for_its_input_size(size):
    model = build_model("simple_cnn", in_channels=1, input_size=size, norm="gn")
    assert model.fc1.in_features == 64 * (size // 4) ** 2  # 64 x 7 x 7 = 3136 on MNIST, as in the seeds
    assert model(torch.randn(2, 1, size, size)).shape == (2, 10)
    gap = build_model("simple_cnn", in_channels=1, input_size=size, norm="gn", head="gap")
    assert gap(torch.randn(2, 1, 2 * size, 2 * size)).shape == (2, 10)  # any size with global pooling


def test_simple_cnn_flatten_head_refuses_another_input_size_and_bad_heads():
    with pytest.raises(ValueError, match="built for 3136 features"):
        build_model("simple_cnn", in_channels=1)(torch.randn(2, 1, 32, 32))
    with pytest.raises(SpecError, match="'dense'.*flatten, gap"):
        build_model("simple_cnn", head="dense")


@pytest.mark.slow
def test_seeds_cnn_with_bn_reaches_94_percent_on_mnist5k_in_two_epochs(tmp_path):
    """The seeds' CNN (flatten head) with BN: SGD 0.01, momentum 0.9, batch 32, 2 epochs."""
    from reslab.config import TrainConfig
    from reslab.training import train

    result = train(TrainConfig(model="simple_cnn", norm="bn", dataset="mnist5k", epochs=2, batch_size=32,
                               optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, progress="none",
                               out=str(tmp_path / "cnn")))
    assert result.status == "completed" and result.summary["final_eval_acc"] >= 0.94


# --- bad input ---------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"name": "resnet19"}, [r"'resnet19'", "resnet18", "cifar_resnet20", "mlp"]),
    ({"name": "resnet18", "depth": 3}, [r"'depth'", "'resnet18'", "stem, shortcut, width, zero_init_residual"]),
    ({"name": "plain20", "shortcut": "B"}, [r"'shortcut'", "'plain20'", "stem, width"]),
    ({"name": "mlp", "width": 3}, [r"'width'", "hidden, dropout"]),
    ({"name": "resnet18", "stem": "foo"}, [r"stem 'foo'", "cifar, imagenet"]),
    ({"name": "cifar_resnet20", "shortcut": "C"}, [r"shortcut 'C'", "A, B"]),
    ({"name": "resnet18", "width": 0}, ["width", "positive integer", "0"]),
    ({"name": "resnet18", "width": "wide"}, [r"'wide'", "width"]),
    ({"name": "resnet18", "zero_init_residual": "maybe"}, [r"'maybe'", "true or false"]),
    ({"name": "resnet18", "norm": "batchnorm"}, [r"'batchnorm'", "bn, brn, evonorm, frn, gn, in, ln, none, rms"]),
    ({"name": "mlp", "norm": "batchnorm"}, [r"'batchnorm'", "bn, brn, evonorm, frn, gn"]),
    ({"name": "mlp", "hidden": "256,x"}, [r"'x'", "hidden"]),
    ({"name": "mlp", "dropout": 1.5}, ["dropout", r"\[0, 1\)", "1.5"]),
    ({"name": "simple_cnn", "input_size": 2}, ["at least 4x4", "2"]),
    ({"name": "cifar_resnet20", "num_classes": 0}, ["num_classes", "0"]),
    ({"name": "cifar_resnet20", "norm": "gn:32"}, ["16 channels", r"in bn1\)"]),
])
def test_bad_input_names_value_and_choices(kwargs, expected):
    with pytest.raises(SpecError) as info:
        build_model(**kwargs)
    for fragment in expected:
        assert re.search(fragment, str(info.value)), (fragment, str(info.value))


def test_group_count_error_names_the_layer():
    with pytest.raises(SpecError, match=r"24 channels.*\(in layer2\.0\)"):
        ResNet(BasicBlock, (1, 1), widths=(16, 24), stem="cifar", norm="gn:16")


def test_string_options_are_converted():
    model = build_model("cifar_resnet20", width="8", zero_init_residual="true", shortcut="b", num_classes="5")
    assert model.fc.out_features == 5 and model.fc.in_features == 32 and model.shortcut_kind == "B"
    assert torch.count_nonzero(model.layer1[0].bn2.weight) == 0


# --- the registry ------------------------------------------------------------

def test_list_models_and_options():
    described = list_models()
    assert list(described) == model_names()
    assert {"resnet18", "resnet152", "cifar_resnet110", "plain56", "mlp", "simple_cnn"} <= set(described)
    assert all(text and "\n" not in text for text in described.values())
    assert model_options("resnet50") == {"stem": "imagenet", "shortcut": "B", "width": 64, "zero_init_residual": False,
                                         "branch": "standard", "alpha": 0.2}
    assert model_options("cifar_resnet56") == {"stem": "cifar", "shortcut": "A", "width": 16,
                                               "zero_init_residual": False, "branch": "standard", "alpha": 0.2}
    assert model_options("mlp") == {"hidden": (256, 128), "dropout": 0.2}


@pytest.mark.parametrize(("name", "expected"), [
    ("resnet18", (3, 224)), ("resnet152", (3, 224)), ("cifar_resnet20", (3, 32)), ("plain110", (3, 32)),
    ("mlp", (1, 28)), ("simple_cnn", (1, 28)),
])
def test_model_input(name, expected):
    assert model_input(name) == expected


def test_registry_refuses_duplicates_and_registers_new(monkeypatch):
    registry = Registry("model")
    registry.update(models._REGISTRY)
    monkeypatch.setattr(models, "_REGISTRY", registry)

    def resnet18(*, num_classes):
        """Impostor."""
        return nn.Linear(1, num_classes)

    with pytest.raises(ValueError, match="'resnet18' is already registered"):
        register_model(resnet18)

    @register_model
    def tiny_linear(*, num_classes, in_channels, input_size, bias=True):
        """A linear classifier on 4x4 inputs."""
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 16, num_classes, bias=bias))

    assert list_models()["tiny_linear"] == "A linear classifier on 4x4 inputs. (args: bias=True)"
    model = build_model("tiny_linear", num_classes=3, in_channels=2, norm="gn", bias="false")
    assert model[1].bias is None and model(torch.randn(5, 2, 4, 4)).shape == (5, 3)
    assert model_input("tiny_linear") == (3, 32)

    @register_model(default_input=(1, 4))
    def tiny_gray(*, num_classes):
        """A linear classifier on 1x4x4 inputs."""
        return nn.Sequential(nn.Flatten(), nn.Linear(16, num_classes))

    assert model_input("tiny_gray") == (1, 4)
    assert model_options("tiny_gray") == {}
    with pytest.raises(SpecError, match="unknown option 'bias' for model 'tiny_gray'; valid options: none"):
        build_model("tiny_gray", bias=False)
    with pytest.raises(TypeError, match="keyword-only"):
        register_model(lambda num_classes: nn.Identity())


def test_monkeypatched_registry_is_restored():
    assert "tiny_linear" not in list_models()
