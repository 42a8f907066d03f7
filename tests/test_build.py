"""The one path from names to an initialized model (reslab.build), and the model flags every command shares."""

import json

import pytest
import torch
import yaml

import reslab
from reslab.build import MODEL_FIELDS, build, build_for, check, init_model, model_config, model_options
from reslab.cli import build_parser, main
from reslab.diagnose import count_params
from reslab.errors import SpecError
from reslab.models.resnet import BasicBlock


def _count(model_name, **options):
    return count_params(reslab.build_model(model_name, num_classes=4, in_channels=1, **options))


@pytest.mark.slow
def test_train_takes_model_options_and_load_run_rebuilds_them(tmp_path, synthetic, capsys):
    out = tmp_path / "narrow"
    code = main(["train", "--model", "cifar_resnet20", "-o", "width=8", "--dataset", synthetic, "--epochs", "1",
                 "--batch-size", "32", "--device", "cpu", "--progress", "none", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    # the narrower net: 8/16/32 channels, about a quarter of the parameters of the default 16/32/64
    assert summary["num_params"] == _count("cifar_resnet20", width=8) < _count("cifar_resnet20") / 3
    assert yaml.safe_load((out / "config.yaml").read_text())["model_options"] == {"width": 8}
    run = reslab.load_run(out)
    assert run.model.fc.in_features == 32 and run.config.model_options == {"width": 8}
    assert reslab.evaluate_run(out).acc == summary["final_eval_acc"]


def test_model_options_from_python_and_yaml_reach_the_model(tmp_path, tiny_config):
    result = reslab.train(tiny_config(tmp_path / "run", model="mlp", model_options={"hidden": "32"}))
    assert result.summary["num_params"] == count_params(reslab.build_model("mlp", num_classes=4, in_channels=1,
                                                                           input_size=8, hidden=(32,)))


def _option_strings(command):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {s for action in sub._actions for s in action.option_strings}


@pytest.mark.parametrize("command", ["inspect", "signal"])
def test_inspect_and_signal_take_every_model_flag_train_takes(command):
    train_flags = _option_strings("train")
    model_flags = {"--norm", "--conv", "--init", "--stem", "--shortcut", "--zero-init-residual", "-o", "--option"}
    assert model_flags <= train_flags
    assert model_flags <= _option_strings(command)
    assert len(MODEL_FIELDS) == 8  # model (positional in inspect and signal) and the seven flags above


def test_inspect_builds_what_the_flags_say(capsys):
    code = main(["inspect", "cifar_resnet20", "--stem", "imagenet", "--shortcut", "B", "--zero-init-residual",
                 "-o", "width=8", "--in-channels", "1", "--num-classes", "4"])
    out = capsys.readouterr().out
    assert code == 0
    expected = _count("cifar_resnet20", stem="imagenet", shortcut="B", width=8)
    assert f"parameters  {expected:,}" in out
    # zero_init_residual: the last norm of every residual branch starts at 0
    assert "layer1.0.bn2.weight" in out and "zeros (zero_init_residual)" in out


@pytest.mark.slow
def test_signal_takes_the_model_flags(tmp_path, capsys):
    code = main(["signal", "cifar_resnet20", "-o", "width=8", "--shortcut", "B", "--norm", "bn", "--init",
                 "kaiming_normal", "--batch-size", "4", "--out", str(tmp_path / "sig")])
    assert code == 0, capsys.readouterr().err
    rows = (tmp_path / "sig" / "signal.csv").read_text().splitlines()
    assert len(rows) == 1 + 10  # the header, the stem and nine residual blocks


@pytest.mark.parametrize(("argv", "message"), [
    (["-o", "width"], "malformed model option 'width': expected KEY=VALUE"),
    (["-o", "depth=3"], "unknown option 'depth' for model 'cifar_resnet20'; valid options: stem, shortcut"),
    (["--stem", "cifar", "-o", "stem=imagenet"], "--stem cifar contradicts -o stem=imagenet"),
    (["--init", "fixup", "-o", "branch=nf"], "init 'fixup' builds the model with branch=fixup, but the model "
                                             "options say branch=nf"),
])
def test_bad_model_options_are_one_line_and_write_nothing(tmp_path, synthetic, capsys, argv, message):
    out = tmp_path / "run"
    code = main(["train", "--model", "cifar_resnet20", "--dataset", synthetic, "--device", "cpu",
                 "--out", str(out), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow
def test_sweep_applies_model_options_to_every_run(tmp_path, synthetic, capsys):
    code = main(["sweep", "--model", "cifar_resnet20", "-o", "width=4", "--norm", "bn,gn", "--dataset", synthetic,
                 "--epochs", "1", "--batch-size", "32", "--device", "cpu", "--progress", "none",
                 "--out", str(tmp_path / "sweep")])
    assert code == 0, capsys.readouterr().err
    params = {json.loads(p.read_text())["num_params"] for p in (tmp_path / "sweep").glob("*/summary.json")}
    assert params == {_count("cifar_resnet20", width=4)}


def test_build_is_the_path_from_names_to_a_model():
    cfg = model_config("cifar_resnet20", norm="none", init="nf:alpha=0.5", model_options={"width": 8}, seed=3)
    assert model_options(cfg) == {"width": 8, "branch": "nf", "alpha": 0.5}
    model = build(cfg, num_classes=4, in_channels=1, input_size=8)
    report = init_model(model, cfg)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert blocks and all(b.alpha == 0.5 and b.branch_kind == "nf" for b in blocks)
    again = build(cfg, num_classes=4, in_channels=1, input_size=8)
    assert [r.std_measured for r in init_model(again, cfg)] == [r.std_measured for r in report]  # seeded by cfg


def test_whole_model_inits_build_with_a_norm_as_their_descriptions_say():
    inits = reslab.list_inits()
    for name in ("fixup", "skipinit", "nf"):
        assert "with a norm it" in inits[name] and inits[name].startswith("[whole model]")
        cfg = model_config("cifar_resnet20", norm="bn", init=name)
        model = build(cfg, num_classes=4, in_channels=1, input_size=8)
        init_model(model, cfg)
        assert torch.isfinite(model(torch.randn(2, 1, 8, 8))).all()


def test_an_init_that_needs_residual_branches_is_refused_on_a_plain_net():
    with pytest.raises(SpecError, match="init 'skipinit' needs a model with residual branches; 'plain20' has none"):
        check(model_config("plain20", norm="none", init="skipinit"))


def test_build_for_sizes_the_model_for_the_data_and_lsuv_sees_the_first_batch(tiny_config):
    from reslab.config import config_from_dict
    from reslab.datasets import load_dataset

    cfg = config_from_dict(tiny_config(model="cifar_resnet20", norm="none", init="lsuv"))
    data = load_dataset(cfg.dataset)
    model = build_for(cfg, data)
    assert model.fc.out_features == data.num_classes == 4 and model.conv1.in_channels == 1
    again = build_for(cfg, data)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(),
                                                  strict=True))
