"""``tv:NAME``: any torchvision classification model, built by name and adapted to reslab's arguments."""

import json

import pytest
import torch
import torchvision
from torch import nn

from reslab.cli import main
from reslab.errors import SpecError
from reslab.inits import init_weights
from reslab.models import build_model, list_models, model_input, model_options


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def batchnorms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_resnet18_for_one_channel_with_groupnorm():
    model = build_model("tv:resnet18", num_classes=10, in_channels=1, norm="gn", input_size=28)
    assert batchnorms(model) == []
    assert sum(isinstance(m, nn.GroupNorm) for m in model.modules()) == 20
    stem = model.conv1
    assert (stem.in_channels, stem.out_channels, stem.kernel_size, stem.stride, stem.padding, stem.bias) == (
        1, 64, (7, 7), (2, 2), (3, 3), None)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    reference = torchvision.models.resnet18(num_classes=10)
    stem_difference = 64 * (3 - 1) * 7 * 7  # the 7x7 stem sees 1 input channel instead of 3
    assert sum(p.numel() for p in model.parameters()) == (
        sum(p.numel() for p in reference.parameters()) - stem_difference) == 11_175_370


@pytest.mark.slow
def test_bn_keeps_torchvision_batchnorm_and_none_removes_it():
    model = build_model("tv:mobilenet_v3_small", num_classes=4, norm="bn")
    layers = batchnorms(model)
    assert layers and all(type(m) is nn.BatchNorm2d and (m.eps, m.momentum) == (0.001, 0.01) for m in layers)
    changed = build_model("tv:mobilenet_v3_small", num_classes=4, norm="bn:momentum=0.2")
    assert {m.momentum for m in batchnorms(changed)} == {0.2}
    bare = build_model("tv:resnet18", norm="none")
    assert batchnorms(bare) == [] and isinstance(bare.bn1, nn.Identity)
    # ViT's LayerNorms become the spec's norm too, so --norm says what the model has
    vit = build_model("tv:vit_b_32", num_classes=3, norm="bn", input_size=32)
    assert not any(isinstance(m, nn.LayerNorm) for m in vit.modules()) and len(batchnorms(vit)) == 25
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_mobilenet_v3_small_with_layernorm_trains():
    torch.manual_seed(0)
    model = build_model("tv:mobilenet_v3_small", num_classes=5, norm="ln", input_size=32)
    assert batchnorms(model) == []
    out = model(torch.randn(4, 3, 32, 32))
    loss = nn.functional.cross_entropy(out, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert out.shape == (4, 5) and torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.slow
def test_first_convolution_found_by_forward_order():
    model = build_model("tv:inception_v3", num_classes=3, in_channels=1, norm="gn:cpg=16", input_size=75)
    assert model.Conv2d_1a_3x3.conv.in_channels == 1 and not model.aux_logits
    model.train()
    assert model(torch.randn(2, 1, 75, 75)).shape == (2, 3)  # a tensor, no auxiliary outputs
    vit = build_model("tv:vit_b_16", num_classes=2, in_channels=2, norm="ln", input_size=16)
    assert vit.conv_proj.in_channels == 2 and vit(torch.randn(2, 2, 16, 16)).shape == (2, 2)


@pytest.mark.parametrize(("name", "side", "smallest"), [
    ("tv:inception_v3", 32, 75), ("tv:alexnet", 28, 63), ("tv:googlenet", 8, 15), ("tv:squeezenet1_1", 16, 17),
])
def test_too_small_input_names_the_smallest(name, side, smallest):
    with pytest.raises(SpecError, match=rf"{name}' needs inputs of at least {smallest}x{smallest}, got {side}x{side}"):
        build_model(name, input_size=side)
    assert build_model(name, input_size=smallest, norm="none") is not None  # and that size builds


def test_size_fixed_at_construction_is_a_spec_error():
    with pytest.raises(SpecError, match=r"tv:vit_b_16' cannot be built for 28x28 inputs: .*patch size"):
        build_model("tv:vit_b_16", input_size=28)


def test_builds_on_the_meta_device_as_preflight_does():
    with torch.device("meta"):
        model = build_model("tv:regnet_x_400mf", in_channels=1, norm="gn:8", input_size=28)
    assert model.stem[0].in_channels == 1 and next(model.parameters()).is_meta


def test_zero_init_residual_survives_init_weights():
    model = build_model("tv:resnet18", norm="gn", zero_init_residual="true", input_size=32)
    assert model_options("tv:resnet18") == {"zero_init_residual": False}
    assert model_options("tv:vgg11") == {}
    init_weights(model, "kaiming_normal", seed=0)
    assert torch.count_nonzero(model.layer1[0].bn2.weight) == 0
    assert torch.count_nonzero(model.layer1[0].bn1.weight) == 64
    with pytest.raises(SpecError, match="zero_init_residual"):
        build_model("tv:resnet18", norm="none", zero_init_residual=True)


def test_listing_and_natural_input():
    everything = list_models(torchvision=True)
    assert list(everything)[: len(list_models())] == list(list_models())
    assert {"tv:resnet50", "tv:vit_b_16", "tv:inception_v3"} <= set(everything)
    assert not any(name.startswith("tv:") for name in list_models())
    assert model_input("tv:resnet18") == (3, 224) and model_input("tv:inception_v3") == (3, 299)


def test_list_models_all(capsys):
    code, out, err = run(capsys, "list", "models", "--all")
    listed = [line.split()[0] for line in out.splitlines()]
    assert code == 0 and err == ""
    assert "tv:resnet50" in listed and "tv:vit_b_16" in listed and "cifar_resnet20" in listed
    assert listed.index("cifar_resnet20") < listed.index("tv:alexnet")
    code, out, err = run(capsys, "list", "models")
    listed = [line.split()[0] for line in out.splitlines()]
    assert code == 0 and "tv:resnet50" not in listed and "tv:vit_b_16" not in listed
    assert sum("--all" in line for line in out.splitlines()) == 1


@pytest.mark.parametrize(("argv", "fragments"), [
    (["inspect", "tv:resnet19"], ["'resnet19'", "tv:resnet18", "reslab list models --all"]),
    (["inspect", "tv:"], ["'tv:'", "reslab list models --all"]),
    (["inspect", "tv:fasterrcnn_resnet50_fpn"], ["detection", "classification"]),
    (["inspect", "tv:resnet18", "-o", "stem=cifar"], ["'stem'", "reslab's own ResNets"]),
    (["inspect", "tv:resnet18", "-o", "shortcut=A"], ["'shortcut'"]),
    (["inspect", "tv:vgg11", "-o", "zero_init_residual=true"], ["'zero_init_residual'", "'tv:vgg11'"]),
    (["inspect", "tv:resnet18", "-o", "depth=3"], ["'depth'", "zero_init_residual"]),
    (["inspect", "tv:inception_v3", "--input-size", "32"], ["tv:inception_v3", "75x75"]),
    (["inspect", "tv:resnet18", "--norm", "gn:5"], ["gn:5", "64 channels"]),
    (["list", "norms", "--all"], ["--all", "models"]),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, fragments):
    code, out, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and out == ""
    assert len(lines) == 1 and lines[0].startswith("reslab: error:")
    for fragment in fragments:
        assert fragment in lines[0]


def test_train_refuses_options_for_torchvision_models(capsys, tmp_path):
    code, _, err = run(capsys, "train", "--model", "tv:resnet18", "--stem", "cifar", "--dataset",
                       "synthetic:train=8,test=4,size=8", "--out", str(tmp_path / "r"))
    assert code == 2 and "'stem'" in err and len(err.strip().splitlines()) == 1


def test_inspect_torchvision_resnet18(capsys):
    code, out, _ = run(capsys, "inspect", "tv:resnet18", "--norm", "gn", "--input-size", "32")
    assert code == 0 and "input       3x32x32" in out
    assert "parameters  11,181,642" in out  # torchvision's resnet18 with 10 classes: GroupNorm has BN's parameters
    assert "GroupNorm C=512" in out and "BatchNorm" not in out


def test_train_end_to_end(tmp_path):
    out = tmp_path / "r"
    code = main(["train", "--model", "tv:resnet18", "--norm", "gn", "--dataset",
                 "synthetic:train=64,test=32,size=32,channels=1,classes=4", "--epochs", "1", "--batch-size", "32",
                 "--progress", "none", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
