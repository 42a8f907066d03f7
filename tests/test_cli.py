"""End-to-end runs of the ``reslab`` command line (in-process and as a real subprocess)."""

import subprocess
import sys

import pytest
import yaml

from reslab.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("what, names", [
    ("models", ["resnet18", "cifar_resnet56", "plain20", "mlp", "simple_cnn"]),
    ("norms", ["bn", "gn", "ln", "in", "rms", "none"]),
    ("inits", ["kaiming_normal", "xavier_uniform", "rule_uniform", "rule_normal", "dirac", "default"]),
    ("datasets", ["mnist5k", "digits", "synthetic", "cifar10"]),
])
def test_list_shows_every_registry_entry(capsys, what, names):
    from reslab.cli import _list_sources

    code, out, err = run(capsys, "list", what)
    assert code == 0 and err == ""
    listed = [line.split()[0] for line in out.splitlines()]
    for name in names:
        assert name in listed
    entries = _list_sources()[what]()
    assert listed == list(entries)  # every registered entry, once, in registry order
    for line, (name, description) in zip(out.splitlines(), entries.items(), strict=True):
        assert line.split(None, 1)[1] == description, name


def test_inspect_prints_params_macs_and_init_report(capsys):
    code, out, _ = run(capsys, "inspect", "cifar_resnet20", "--norm", "gn", "--init", "kaiming_normal:mode=fan_out")
    assert code == 0
    assert "parameters  269,722" in out
    assert "MACs/image  40,551,040" in out  # 40.6M: the figure usually quoted for ResNet-20 (~41M)
    assert "layer3.2.conv2.weight" in out and "kaiming_normal:mode=fan_out" in out


def test_inspect_resnet18_matches_torchvision_macs(capsys):
    code, out, _ = run(capsys, "inspect", "resnet18", "--num-classes", "1000")
    assert code == 0
    assert "parameters  11,689,512" in out
    # torchvision documents 1.81 GFLOPS (multiply-adds) for resnet18 at 224x224
    assert "(1.81G)" in out.split("MACs/image")[1].splitlines()[0]


def test_inspect_model_options_and_input_size(capsys):
    import torch
    import torchvision
    from torch import nn
    from torch.utils.flop_counter import FlopCounterMode

    def torchvision_resnet18(cifar_stem, size):
        """(parameters, MACs per image) of torchvision's resnet18 with 10 classes, counted by torch.

        The CIFAR stem is the usual one (He et al. 2016, Sec. 4.2): a 3x3 stride-1 conv and no max-pool.
        """
        model = torchvision.models.resnet18(num_classes=10)
        if cifar_stem:
            model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
        return sum(p.numel() for p in model.parameters()), counter.get_total_flops() // 2  # 1 MAC = 2 FLOPs

    def printed(out, field):
        return int(next(line for line in out.splitlines() if line.startswith(field)).split()[1].replace(",", ""))

    code, out, _ = run(capsys, "inspect", "resnet18", "-o", "stem=cifar", "--input-size", "32")
    assert code == 0 and "3x32x32" in out
    params, macs = torchvision_resnet18(cifar_stem=True, size=32)
    assert (params, macs) == (11_173_962, 555_422_720)  # the ResNet-18 of CIFAR codebases: 11.17M, 0.56G
    assert printed(out, "parameters") == params and printed(out, "MACs/image") == macs
    # without the option the ImageNet stem (7x7 stride 2 + max-pool) shrinks the maps 4x: 1/16 of the MACs
    code, out, _ = run(capsys, "inspect", "resnet18", "--input-size", "32")
    params, macs = torchvision_resnet18(cifar_stem=False, size=32)
    assert code == 0 and printed(out, "parameters") == params and printed(out, "MACs/image") == macs
    assert macs < 555_422_720 / 10


def test_config_file_and_print_config(capsys, tmp_path):
    config = tmp_path / "inspect.yaml"
    config.write_text(yaml.safe_dump({"model": "mlp", "init": "xavier_normal", "input-size": 8, "in_channels": 1}))
    code, out, _ = run(capsys, "inspect", "--config", str(config), "--print-config")
    assert code == 0
    printed = yaml.safe_load(out)
    assert printed["model"] == "mlp" and printed["init"] == "xavier_normal" and printed["input-size"] == 8
    # the command line wins over the file
    code, out, _ = run(capsys, "inspect", "--config", str(config), "--init", "zeros", "--print-config")
    assert code == 0 and yaml.safe_load(out)["init"] == "zeros"
    code, out, _ = run(capsys, "inspect", "--config", str(config))
    assert code == 0 and "1x8x8" in out


@pytest.mark.parametrize("argv, fragments", [
    (["inspect", "resnet18", "--norm", "gn:5"], ["gn:5", "64 channels", "1, 2, 4, 8, 16, 32"]),
    (["inspect", "resnet18", "--norm", "batchnorm"], ["'batchnorm'", "bn, brn, evonorm, frn, gn, in, ln, none, rms"]),
    (["inspect", "resnet19"], ["'resnet19'", "resnet18"]),
    (["inspect", "resnet18", "--init", "zerosx"], ["'zerosx'", "kaiming_normal"]),
    (["inspect", "resnet18", "--init", "kaiming_normal:foo=1"], ["'foo'", "mode, nonlinearity"]),
    (["inspect", "resnet18", "--init", "kaiming_normal:mode=sideways"], ["'sideways'", "fan_in, fan_out"]),
    (["inspect", "resnet18", "--init", "normal:std=abc"], ["'abc'", "std"]),
    (["inspect", "resnet18", "-o", "stem=foo"], ["'foo'", "cifar, imagenet"]),
    (["inspect", "resnet18", "-o", "depth=3"], ["'depth'", "stem, shortcut, width"]),
    (["inspect", "resnet18", "--input-size", "abc"], ["'abc'", "--input-size"]),
    (["list", "foo"], ["'foo'", "models"]),
    (["frobnicate"], ["'frobnicate'", "inspect"]),
    (["inspect", "resnet18", "--config", "/nonexistent.yaml"], ["/nonexistent.yaml"]),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, fragments):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reslab: error:")
    for fragment in fragments:
        assert fragment in lines[0]


def test_bad_config_keys_are_rejected(capsys, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model: resnet18\ncolour: blue\n")
    code, _, err = run(capsys, "inspect", "--config", str(config))
    assert code == 2 and "'colour'" in err and "norm" in err


@pytest.mark.slow
def test_console_script_and_module_entry_points():
    for cmd in (["reslab"], [sys.executable, "-m", "reslab"]):
        done = subprocess.run([*cmd, "inspect", "resnet18", "--norm", "gn:5"], capture_output=True, text=True)
        assert done.returncode == 2
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
        assert "gn:5" in done.stderr
    done = subprocess.run([sys.executable, "-m", "reslab", "list", "norms"], capture_output=True, text=True)
    assert done.returncode == 0 and "rms" in done.stdout


def test_inspect_plot_writes_a_png(capsys, tmp_path):
    target = tmp_path / "init.png"
    code, out, _ = run(capsys, "inspect", "cifar_resnet20", "--init", "xavier_normal", "--plot", str(target))
    assert code == 0 and str(target) in out
    data = target.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["init.png"]  # no temp file left behind


def test_inspect_shows_the_groups_each_gn_layer_got(capsys):
    code, out, _ = run(capsys, "inspect", "cifar_resnet20", "--norm", "gn")
    assert code == 0
    section = out.split("norm layers")[1].split("\n\n")[0]
    lines = [line.strip() for line in section.strip().splitlines()]
    assert lines == [
        "GroupNorm C=16: 1 group x 16 ch (x7 layers)",
        "GroupNorm C=32: 2 groups x 16 ch (x6 layers)",
        "GroupNorm C=64: 4 groups x 16 ch (x6 layers)",
    ]
    code, out, _ = run(capsys, "inspect", "cifar_resnet20", "--norm", "ln")
    assert code == 0 and "LayerNorm2d C=16 (x7 layers)" in out and "GroupNorm" not in out
