"""Your own model by import path: ``py:package.module:Name`` and ``path/to/file.py:Name``."""

import json
import sys

import pytest
import torch
from torch import nn

import reslab
from conftest import RESIDUAL_NET
from reslab.build import build, init_model, model_config
from reslab.cli import main
from reslab.convs import StdConv2d
from reslab.errors import SpecError
from reslab.models import build_model, model_options
from reslab.registry import REQUIRED

NETS = RESIDUAL_NET + '''

def gray_net(num_classes, depth, **extra):
    """A factory: a required argument, and **kwargs read as YAML."""
    net = TinyResNet(num_classes=num_classes, in_channels=1, width=4, blocks=depth)
    net.extra = extra
    return net


def not_a_model():
    return 42


instance = TinyResNet()
'''


@pytest.fixture
def nets(tmp_path, monkeypatch):
    """A model file ``nets.py`` in a fresh working directory; returns its path."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "nets.py"
    path.write_text(NETS)
    return path


def test_a_class_in_a_file_is_built_with_the_data_sizes_and_typed_options(nets):
    model = build_model("nets.py:TinyResNet", num_classes=4, in_channels=1, input_size=8, width="8", blocks=3)
    assert type(model).__name__ == "TinyResNet" and len(model.blocks) == 3
    assert model.stem[0].in_channels == 1 and model.head.out_features == 4 and model.head.in_features == 8
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 4)
    # the options are the constructor's arguments but the ones reslab sets from the data
    assert model_options("nets.py:TinyResNet") == {"width": 16, "blocks": 2, "dropout": None}
    assert model_options("nets.py:gray_net") == {"depth": REQUIRED}
    # an Optional[float] annotation types the string
    assert build_model("nets.py:TinyResNet", input_size=8, dropout="0.25").drop.p == 0.25


def test_norm_conv_and_init_apply_as_for_every_model(nets):
    model = build_model("nets.py:TinyResNet", num_classes=4, in_channels=1, input_size=8, norm="gn:2", conv="ws")
    kinds = {type(m) for m in model.modules()}
    assert nn.BatchNorm2d not in kinds and nn.GroupNorm in kinds
    assert all(m.num_groups == 2 for m in model.modules() if isinstance(m, nn.GroupNorm))
    assert sum(isinstance(m, StdConv2d) for m in model.modules()) == 5  # stem + 2 per block
    cfg = model_config("nets.py:TinyResNet", norm="bn", init="kaiming_normal:mode=fan_out", seed=3)
    net = build(cfg, num_classes=4, in_channels=1, input_size=8)
    init_model(net, cfg)
    w = net.blocks[0].conv1.weight  # kaiming_normal, fan_out = 16*9: std sqrt(2/144)
    assert w.std().item() == pytest.approx((2 / (16 * 9)) ** 0.5, rel=0.1)


def test_a_package_module_by_import_path_and_from_the_working_directory(tmp_path, monkeypatch):
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(NETS)
    monkeypatch.chdir(tmp_path)  # not on sys.path: the working directory is tried next, as python -m does
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "mypkg", raising=False)
    monkeypatch.delitem(sys.modules, "mypkg.nets", raising=False)
    model = build_model("py:mypkg.nets:gray_net", num_classes=3, in_channels=1, input_size=8, depth="2",
                        scale="0.5", tags="[1, 2]", label="wide")
    assert len(model.blocks) == 2 and model.head.out_features == 3
    assert model.extra == {"scale": 0.5, "tags": [1, 2], "label": "wide"}  # **kwargs values read as YAML


@pytest.mark.parametrize("name, options, message", [
    ("nets.py:Nope", {}, "nets.py has no 'Nope'; it defines Block, TinyResNet, gray_net, not_a_model"),
    ("missing.py:Net", {}, "no such file 'missing.py'"),
    ("py:no_such_package.nets:Net", {}, "cannot import module 'no_such_package.nets': ModuleNotFoundError: "
                                        "No module named 'no_such_package'"),
    ("py:nets", {}, "malformed model 'py:nets'"),
    ("nets.py:instance", {}, "is an instance of TinyResNet, not a class or a factory"),
    ("nets.py:not_a_model", {}, "returned a int, not an nn.Module"),
    ("nets.py:TinyResNet", {"depth": 3}, "unknown option 'depth' for model 'nets.py:TinyResNet'; valid options: "
                                         "width, blocks, dropout"),
    ("nets.py:TinyResNet", {"width": "wide"}, "bad value 'wide' for option 'width'"),
    ("nets.py:gray_net", {}, "model 'nets.py:gray_net' needs option 'depth': pass -o depth=VALUE"),
    ("nets.py:TinyResNet", {"stem": "cifar"}, "--stem applies to reslab's own ResNets"),
])
def test_bad_models_are_one_line_errors(nets, name, options, message):
    with pytest.raises(SpecError) as info:
        build_model(name, num_classes=4, in_channels=3, input_size=8, **options)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_options_reslab_sets_are_refused(nets):
    for key in ("num_classes", "in_channels", "norm"):
        with pytest.raises(SpecError, match=f"option '{key}' of model 'nets.py:TinyResNet' is set by reslab from "
                                            f"the data and the flags; drop -o {key}"):
            build(model_config("nets.py:TinyResNet", model_options={key: 3}))


def test_import_failures_quote_the_error_and_models_that_do_not_fit_say_why(nets, tmp_path):
    (tmp_path / "broken.py").write_text("import torch\nx = = 1\n")
    (tmp_path / "needs.py").write_text("import not_installed_anywhere\n")
    for name, message in [("broken.py:Net", "SyntaxError: invalid syntax"),
                          ("needs.py:Net", "ModuleNotFoundError: No module named 'not_installed_anywhere'")]:
        with pytest.raises(SpecError, match=message):
            build_model(name)
    # a factory fixed at 1 input channel, given 3-channel data
    with pytest.raises(SpecError, match=r"cannot take 3x8x8 inputs \(its constructor takes no in_channels"):
        build_model("nets.py:gray_net", in_channels=3, input_size=8, depth=1)
    (tmp_path / "fixed.py").write_text(NETS + "\ndef thousand():\n    return TinyResNet(num_classes=1000)\n")
    with pytest.raises(SpecError, match=r"returns \(2, 1000\) for 2 images, not \(2, 4\) logits"):
        build_model("fixed.py:thousand", num_classes=4, input_size=8)


def test_an_edited_file_is_imported_again(nets):
    assert build_model("nets.py:TinyResNet", input_size=8, width=8).head.in_features == 8
    nets.write_text(NETS.replace("self.head = nn.Linear(width, num_classes)",
                                 "self.head = nn.Linear(width, num_classes, bias=False)"))
    assert build_model("nets.py:TinyResNet", input_size=8, width=8).head.bias is None


def test_zero_init_residual_reaches_declared_blocks_and_timm_blocks(nets):
    cfg = model_config("nets.py:TinyResNet", zero_init_residual=True)
    model = build(cfg, num_classes=4, in_channels=1, input_size=8)
    init_model(model, cfg)
    assert all(torch.all(block.bn2.weight == 0) for block in model.blocks)
    assert torch.all(model.stem[1].weight == 1)
    pytest.importorskip("timm")
    cfg = model_config("py:timm.models.resnet:resnet18", zero_init_residual=True, model_options={"in_chans": 1})
    timm_net = build(cfg, num_classes=4, in_channels=1, input_size=32)
    init_model(timm_net, cfg)
    blocks = [m for m in timm_net.modules() if type(m).__name__ == "BasicBlock"]
    assert len(blocks) == 8 and all(torch.all(b.bn2.weight == 0) for b in blocks)
    assert timm_net.conv1.in_channels == 1 and timm_net.fc.out_features == 4


# --- runs of your own model -----------------------------------------------------------------------


SYNTH = "synthetic:train=192,test=64,size=8,channels=1,classes=4"


def _config(out, **overrides):
    return {"model": "nets.py:TinyResNet", "model_options": {"width": 8}, "dataset": SYNTH, "epochs": 1,
            "batch_size": 32, "lr": 0.05, "device": "cpu", "progress": "none", "out": str(out), **overrides}


def test_a_run_records_its_model_source_and_is_rebuilt_by_load_run_and_eval(nets, tmp_path, capsys):
    out = tmp_path / "run"
    result = reslab.train(_config(out, norm="gn"))
    assert result.status == "completed"
    sources = json.loads((out / "sources.json").read_text())
    digest = __import__("hashlib").sha256(nets.read_bytes()).hexdigest()
    assert sources["model"] == {"spec": "nets.py:TinyResNet", "file": str(nets.resolve()), "sha256": digest}
    run = reslab.load_run(out)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in run.model.modules())
    assert run.model.head.in_features == 8
    assert reslab.evaluate_run(out).acc == pytest.approx(result.summary["final_eval_acc"], abs=1e-12)
    assert main(["eval", str(out)]) == 0
    assert f"{result.summary['final_eval_acc']:.4f}" in capsys.readouterr().out


def test_resume_and_sweep_reuse_refuse_a_run_whose_model_file_changed(nets, tmp_path, capsys):
    out = tmp_path / "run"
    reslab.train(_config(out))
    nets.write_text(NETS + "\n# edited\n")
    code = main(["train", "--model", "nets.py:TinyResNet", "-o", "width=8", "--dataset", SYNTH, "--epochs", "2",
                 "--batch-size", "32", "--lr", "0.05", "--progress", "none", "--out", str(out), "--resume"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err
    assert f"its model source {nets.resolve()} changed since it was trained" in err
    base = {k: v for k, v in _config(out).items() if k != "out"}
    first = reslab.sweep(base, {"norm": ["bn"]}, out=tmp_path / "sweep", write_report=False)
    assert first.statuses == {"norm=bn-seed=0": "completed"}
    reused = reslab.sweep(base, {"norm": ["bn"]}, out=tmp_path / "sweep", write_report=False)
    assert reused.skipped == ["norm=bn-seed=0"]
    nets.write_text(NETS + "\n# edited again\n")
    with pytest.raises(SpecError, match=r"run 'norm=bn-seed=0' .* was trained with other code: its model source "
                                        r".*nets.py changed since it was trained; pass --restart"):
        reslab.sweep(base, {"norm": ["bn"]}, out=tmp_path / "sweep", write_report=False)
    again = reslab.sweep(base, {"norm": ["bn"]}, out=tmp_path / "sweep", write_report=False, restart=True)
    assert again.restarted == ["norm=bn-seed=0"] and again.statuses == {"norm=bn-seed=0": "completed"}


def test_the_cli_refuses_a_bad_model_in_one_line_and_writes_nothing(nets, tmp_path, capsys):
    out = tmp_path / "never"
    code = main(["train", "--model", "nets.py:Missing", "--dataset", SYNTH, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "nets.py has no 'Missing'" in err and not out.exists()
    assert main(["inspect", "nets.py:TinyResNet", "--norm", "gn:2", "-o", "width=8"]) == 0
    assert "GroupNorm" in capsys.readouterr().out


def test_signal_measures_each_declared_block_of_a_model_file(nets, tmp_path):
    assert main(["signal", "nets.py:TinyResNet", "-o", "width=4", "--norm", "bn,none", "--batch-size", "4",
                 "--out", str(tmp_path / "signal")]) == 0
    rows = (tmp_path / "signal/signal.csv").read_text().splitlines()[1:]
    assert [row.split(",")[3] for row in rows] == ["blocks.0", "blocks.1"] * 4  # name, per (norm, init)
