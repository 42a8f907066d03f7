"""Norm-free residual nets (Fixup, SkipInit, NF-ResNet), LSUV and fused norms inside the ResNets."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reslab
from reslab.build import build, init_model, model_config
from reslab.cli import main
from reslab.convs import RELU_GAMMA, ScaledStdConv2d
from reslab.errors import SpecError
from reslab.inits import init_weights
from reslab.models import build_model
from reslab.models.resnet import BasicBlock, Bottleneck

BLOCKS = (BasicBlock, Bottleneck)


def _built(name, init, norm="none", in_channels=3, **options):
    cfg = model_config(name, norm=norm, init=init, model_options=options)
    model = build(cfg, num_classes=10, in_channels=in_channels)
    return model, init_model(model, cfg)


def _x(shape=(4, 3, 32, 32), seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _block_inputs(model, x):
    """Each residual block with the input it receives in a forward pass of ``x``."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0].detach())))
             for m in model.modules() if isinstance(m, BLOCKS)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


# --- Fixup and SkipInit start every block as its shortcut --------------------------------------

RESIDUAL_NETS = [
    ("cifar_resnet20", {}),                       # basic blocks, CIFAR stem, shortcut A
    ("cifar_resnet20", {"shortcut": "B"}),        # basic blocks, projection shortcuts
    ("resnet18", {"stem": "cifar"}),              # basic blocks, ImageNet widths
    ("resnet50", {}),                             # bottlenecks, ImageNet stem, shortcut B
    ("resnet50", {"shortcut": "A", "stem": "cifar"}),
]


@pytest.mark.parametrize("init", ["fixup", "skipinit"])
@pytest.mark.parametrize("name, options", RESIDUAL_NETS)
def test_every_block_computes_its_shortcut_exactly_at_init(name, options, init):
    model, _ = _built(name, init, **options)
    kinds = set()
    for block, inp in _block_inputs(model, _x()):
        kinds.add(type(block))
        with torch.no_grad():
            branch = block.branch(inp)
            assert torch.count_nonzero(branch) == 0, "the residual branch must output exactly zero"
            assert torch.equal(block(inp), torch.relu(block.shortcut(inp)))
    assert kinds == {Bottleneck if name == "resnet50" else BasicBlock}


def test_fixup_scale_is_l_to_the_minus_one_over_2m_minus_2():
    # ResNet-56: L = 27 basic blocks (m = 2): the scaled convs are He x 27^(-1/2);
    # ResNet-50: L = 16 bottlenecks (m = 3): He x 16^(-1/4) = 0.5.
    for name, branches, m in (("cifar_resnet56", 27, 2), ("resnet50", 16, 3)):
        model, report = _built(name, "fixup")
        factor = branches ** (-1 / (2 * m - 2))
        rows = {row.path: row for row in report}
        ratios = []
        for path, block in model.named_modules():
            if not isinstance(block, BLOCKS):
                continue
            convs = [getattr(block, c) for c in block._convs]
            assert torch.count_nonzero(convs[-1].weight) == 0  # the branch's last conv at zero
            for conv in convs[:-1]:
                fan_out = conv.weight.shape[0] * conv.weight[0, 0].numel()
                he = math.sqrt(2 / fan_out)  # kaiming_normal, fan_out, ReLU
                ratios.append((conv.weight.std().item() / he, conv.weight.numel()))
            row = rows[f"{path}.conv1.weight"]
            fan_out = convs[0].weight.shape[0] * convs[0].weight[0, 0].numel()
            assert row.std_predicted == pytest.approx(math.sqrt(2 / fan_out) * factor)
            assert f"x {factor:.4g}" in row.scheme
        pooled = sum(r * n for r, n in ratios) / sum(n for _, n in ratios)
        assert pooled == pytest.approx(factor, rel=0.02), name
        assert torch.count_nonzero(model.fc.weight) == 0 and torch.count_nonzero(model.fc.bias) == 0


def test_fixup_block_matches_the_papers_forward():
    """Zhang et al. 2019, Fig. 1 (right), written out by hand, with non-trivial scalars."""
    model, _ = _built("cifar_resnet20", "fixup", shortcut="B")
    block = model.layer2[0]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = _x((2, 16, 8, 8), seed=1)
    b = block
    out = F.conv2d(x + b.bias1a, b.conv1.weight, stride=2, padding=1)
    out = F.relu(out + b.bias1b)
    out = F.conv2d(out + b.bias2a, b.conv2.weight, padding=1)
    out = out * b.scale + b.bias2b
    shortcut = F.conv2d(x + b.bias1a, b.downsample[0].weight, stride=2)
    torch.testing.assert_close(block(x), F.relu(out + shortcut))
    names = [n for n, _ in block.named_parameters(recurse=False)]
    assert names == ["bias1a", "bias1b", "bias2a", "scale", "bias2b"]  # the block's own, in forward order
    assert {"bias1", "bias2"} <= {n for n, _ in model.named_parameters(recurse=False)}


def test_skipinit_gain_scales_the_branch():
    model, report = _built("cifar_resnet20", "skipinit")
    block = model.layer1[1]
    assert block.skipinit_gain.item() == 0
    with torch.no_grad():
        block.skipinit_gain.fill_(0.7)
    x = _x((2, 16, 8, 8))
    expected = F.relu(0.7 * block.bn2(block.conv2(F.relu(block.conv1(x)))) + x)
    torch.testing.assert_close(block(x), expected)
    assert {r.scheme for r in report if r.path.endswith("skipinit_gain")} == {"zeros (skipinit gain)"}


# --- NF-ResNet ----------------------------------------------------------------------------------

def test_nf_betas_track_the_expected_variance():
    """beta_i = sqrt(Var(h_i)), Var growing by alpha^2 per block and reset after a shortcut of relu(x)/beta."""
    alpha = 0.2
    model, _ = _built("cifar_resnet20", "nf")  # downsampling blocks: layer2.0 and layer3.0
    expected_var, betas = 1.0, []
    for stage in (model.layer1, model.layer2, model.layer3):
        for block in stage:
            betas.append(block.beta)
            assert block.beta == pytest.approx(math.sqrt(expected_var))
            assert block.alpha == alpha
            if block.downsample is not None:
                expected_var = 1.0
            expected_var += alpha ** 2
    assert betas[:4] == pytest.approx([1, math.sqrt(1.04), math.sqrt(1.08), math.sqrt(1.12)])
    assert all(isinstance(m, ScaledStdConv2d) for m in model.modules() if isinstance(m, nn.Conv2d))
    assert model.conv1.gamma == 1.0 and model.layer1[0].conv1.gamma == pytest.approx(RELU_GAMMA)


def test_nf_block_matches_the_papers_forward():
    """h + alpha * f(relu(h) / beta) with Scaled-WS convs (Brock et al. 2021, Sec. 4), no ReLU after."""
    model, _ = _built("cifar_resnet20", "nf:alpha=0.3", shortcut="B")
    block = model.layer2[0]
    assert block.alpha == 0.3

    def sws(conv):
        w = conv.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, correction=0)
        return conv.gain * RELU_GAMMA * (w - mean) / torch.sqrt((var + conv.eps) * w[0].numel())

    x = _x((2, 16, 8, 8), seed=2)
    pre = F.relu(x) / block.beta
    out = F.conv2d(pre, sws(block.conv1), stride=2, padding=1)
    out = F.conv2d(F.relu(out), sws(block.conv2), padding=1)
    shortcut = F.conv2d(pre, sws(block.downsample[0]), stride=2)
    torch.testing.assert_close(block(x), shortcut + 0.3 * out)


@pytest.mark.slow
def test_signal_is_flat_with_depth_for_the_normfree_recipes_and_grows_for_he():
    rows = reslab.signal("cifar_resnet56", norms="none", inits="kaiming_normal,fixup,skipinit,nf", batch_size=32)
    by = {}
    for row in rows:
        by.setdefault(row.init, []).append(row.act_std)
    # He init without a norm: each of the 27 blocks adds a branch as large as its input
    assert by["kaiming_normal"][-1] / by["kaiming_normal"][0] > 100
    for init in ("fixup", "skipinit"):  # every block is its shortcut: flat
        assert max(by[init]) / min(by[init]) < 2, init
    # NF with projection shortcuts: Var(h) = 1 + k alpha^2 after k blocks of a stage, reset to
    # 1 + alpha^2 by each projection of relu(h) / beta (Brock et al. 2021, Fig. 2)
    nf = reslab.signal("cifar_resnet56", norms="none", inits="nf", batch_size=64, options={"shortcut": "B"})
    expected = [1.0] + [1 + (k % 9 + 1) * 0.2 ** 2 for k in range(27)]
    measured = [row.act_std ** 2 for row in nf]
    assert measured == pytest.approx(expected, rel=0.08)


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["fixup", "skipinit", "nf"])
@pytest.mark.parametrize("model", ["plain20", "mlp", "simple_cnn"])
def test_normfree_inits_refuse_models_without_residual_branches(model, init, capsys, tmp_path):
    code = main(["train", "--model", model, "--norm", "none", "--init", init, "--dataset", "digits",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and f"'{model}' has none" in err and "cifar_resnet56" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("init", ["fixup", "skipinit"])
def test_fixup_and_skipinit_reach_torchvision_resnet_blocks(init):
    # torchvision's blocks declare their branch (residual_branch()), so the scalars are attached to them
    cfg = model_config("tv:resnet18", norm="none", init=init)
    model = build(cfg, num_classes=10, in_channels=1, input_size=32)
    init_model(model, cfg)
    blocks = [m for m in model.modules() if type(m).__name__ == "BasicBlock"]
    assert len(blocks) == 8
    if init == "skipinit":
        assert all(b.skipinit_gain.item() == 0 for b in blocks)
    else:
        assert all(torch.all(b.conv2.weight == 0) and b.scale.item() == 1 for b in blocks)
    x = torch.randn(2, 1, 32, 32)
    assert model(x).shape == (2, 10)


def test_nf_on_a_torchvision_resnet_is_refused_before_anything_is_written(capsys, tmp_path):
    code = main(["train", "--model", "tv:resnet18", "--norm", "none", "--init", "nf", "--dataset", "digits",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "it needs reslab's pre-activation blocks" in err, err
    assert not (tmp_path / "run").exists()


def test_normfree_init_on_a_model_built_without_its_branch_says_how():
    model = build_model("cifar_resnet20", norm="none")
    with pytest.raises(SpecError, match="branch='fixup'"):
        init_weights(model, "fixup")


def test_evonorm_groups_error_names_the_layer_width():
    with pytest.raises(SpecError, match="evonorm:5.*64 channels"):
        build_model("resnet18", norm="evonorm:5", stem="cifar", width=64)


# --- fused norms inside the ResNets -------------------------------------------------------------

@pytest.mark.parametrize("norm", ["frn", "evonorm"])
def test_resnet_blocks_ask_the_norm_and_skip_their_own_relu(norm):
    model = build_model("cifar_resnet20", norm=norm, in_channels=1)
    block = model.layer1[0]
    assert block.bn1.activates and not block.bn2.activates  # bn2 meets the shortcut: no activation there
    assert isinstance(block.act1, nn.Identity) and isinstance(model.stem_act, nn.Identity)
    x = _x((2, 16, 8, 8))
    expected = F.relu(block.bn2(block.conv2(block.bn1(block.conv1(x)))) + x)  # no ReLU after bn1
    torch.testing.assert_close(block(x), expected)
    bottleneck = build_model("resnet50", norm=norm).layer1[0]
    assert bottleneck.bn1.activates and bottleneck.bn2.activates and not bottleneck.bn3.activates
    assert not bottleneck.downsample[1].activates


def test_bn_resnets_keep_torchvision_state_dict():
    import torchvision

    for name in ("resnet18", "resnet50"):
        ours = build_model(name, norm="bn", num_classes=1000)
        theirs = getattr(torchvision.models, name)()
        assert list(ours.state_dict()) == list(theirs.state_dict())
        ours.load_state_dict(theirs.state_dict(), strict=True)


# --- LSUV through init_weights and the CLI ------------------------------------------------------

def test_lsuv_via_init_weights_reports_each_layers_final_variance():
    model = build_model("cifar_resnet20", norm="none", in_channels=1)
    batch = _x((64, 1, 8, 8))
    report = init_weights(model, "lsuv:tol=0.05", seed=0, batch=batch)
    rows = [r for r in report if r.kind in ("conv", "linear")]
    assert len(rows) == 20 and all(r.output_var is not None for r in rows)
    assert all(abs(r.output_var - 1) <= 0.05 for r in rows), [r.output_var for r in rows]
    measured = reslab.lsuv.lsuv_variances(model, batch)
    assert measured == pytest.approx({r.path.removesuffix(".weight"): r.output_var for r in rows})
    assert "out_var" in report.format_table()
    with pytest.raises(SpecError, match="needs a batch"):
        init_weights(build_model("cifar_resnet20", norm="none"), "lsuv")


def test_train_with_lsuv_uses_the_first_training_batch(tmp_path):
    from reslab.build import build_for, first_batch
    from reslab.config import TrainConfig
    from reslab.lsuv import lsuv_variances
    from reslab.training import run_dataset

    cfg = TrainConfig(model="cifar_resnet20", norm="none", init="lsuv", dataset="digits", batch_size=32)
    data = run_dataset(cfg)
    model = build_for(cfg, data)
    variances = lsuv_variances(model, first_batch(cfg, data))
    assert all(abs(v - 1) <= 0.1 for v in variances.values()), variances
    result = reslab.train({**cfg.__dict__, "epochs": 1, "out": str(tmp_path / "run"), "progress": "none"})
    assert result.status == "completed"


@pytest.mark.parametrize("init", ["fixup", "skipinit", "nf"])
def test_cli_trains_normfree_resnets(init, tmp_path, capsys):
    out = tmp_path / init
    code = main(["train", "--model", "cifar_resnet20", "--norm", "none", "--init", init, "--dataset", "digits",
                 "--epochs", "1", "--batch-size", "64", "--out", str(out), "--progress", "none"])
    assert code == 0, capsys.readouterr().err
    loaded = reslab.load_run(out)
    assert loaded.model.layer1[0].branch_kind == init
    assert loaded.summary["final_eval_acc"] > 0.2  # chance is 0.1; one epoch at lr 0.1
