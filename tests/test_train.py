"""reslab train: learning, exact resume, crash safety, run records, bad input."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from reslab.cli import main
from reslab.config import TrainConfig, named_configs
from reslab.optim import make_scheduler
from reslab.training import Trainer, train

TINY = ["--dataset", "synthetic:train=192,test=64,size=8,channels=1,classes=4", "--model", "simple_cnn",
        "--norm", "gn", "--batch-size", "32", "--optimizer", "sgd", "--lr", "0.05", "--progress", "none"]
TIMING = {"epoch_time_s", "images_per_s"}


def cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(rows):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


@pytest.fixture
def tiny(tiny_config):
    """``tiny(out, **overrides)``: the shared tiny run as a TrainConfig, with GroupNorm, for three epochs."""

    def make(out, **overrides):
        return TrainConfig(**tiny_config(out, **{"norm": "gn", "epochs": 3, **overrides}))

    return make


@pytest.mark.slow
def test_mlp_on_mnist5k_reaches_90_percent(capsys, tmp_path):
    out = tmp_path / "run"
    code, stdout, _ = cli(capsys, "train", "--model", "mlp", "--dataset", "mnist5k", "--epochs", "3",
                          "--optimizer", "adam", "--lr", "1e-3", "--batch-size", "64", "--out", str(out))
    assert code == 0 and "completed" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_completed"] == 3
    assert summary["final_eval_acc"] >= 0.90
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for key in ("train_loss", "train_acc", "eval_loss", "eval_acc", "lr", "epoch_time_s", "images_per_s"):
        assert all(key in r for r in rows), key
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_run_directory_records(tmp_path, tiny):
    out = tmp_path / "run"
    result = train(tiny(out, epochs=2))
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.yaml", "metrics.jsonl", "steps.jsonl",
                                                     "summary.json"]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"] == "simple_cnn" and saved["epochs"] == 2 and saved["out"] == str(out)
    summary = result.summary
    for key in ("status", "epochs_completed", "final_eval_acc", "best_eval_acc", "final_train_loss", "wall_time_s",
                "train_images_per_s", "num_params", "world_size", "device", "versions"):
        assert key in summary, key
    assert 0 <= summary["final_eval_acc"] <= 1 and summary["world_size"] == 1 and summary["device"] == "cpu"
    state = torch.load(out / "checkpoint.pt", weights_only=True)  # plain tensors, numbers, strings only
    assert state["epoch"] == 2 and state["config"]["model"] == "simple_cnn"


def test_train_epoch_can_stop_after_a_number_of_steps(tmp_path, tiny):
    """A benchmark times N steps: train_epoch(max_steps=N) takes exactly N (or the epoch, if shorter)."""
    trainer = Trainer(tiny(tmp_path / "run", log_every=3), tmp_path / "run", torch.device("cpu"))
    stats = trainer.train_epoch(max_steps=4)
    assert (stats.steps, stats.images, trainer.step, trainer.epoch) == (4, 128, 4, 0)
    assert [(r["step"], r["steps"]) for r in stats.step_rows] == [(3, 3), (4, 1)]  # every step taken is logged
    assert stats.diverged_at is None and 0 < stats.train_acc <= 1 and stats.images_per_s > 0
    trainer.epoch += 1
    assert trainer.train_epoch(max_steps=100).steps == trainer.steps_per_epoch == 6
    assert not (tmp_path / "run").exists()  # a bare Trainer writes nothing: fit() keeps the records


@pytest.mark.parametrize("model, extra", [("simple_cnn", {}), ("mlp", {"optimizer": "adam", "lr": 1e-3})])
def test_resume_equals_uninterrupted(tmp_path, tiny, model, extra):
    """1 epoch, then --resume to 3 == 3 straight: same metrics and same weights (dropout RNG included for mlp)."""
    straight = train(tiny(tmp_path / "straight", model=model, **extra))
    train(tiny(tmp_path / "split", model=model, epochs=1, **extra))
    resumed = train(tiny(tmp_path / "split", model=model, resume=True, **extra))
    assert straight.status == resumed.status == "completed"
    assert without_timing(metrics(tmp_path / "straight")) == without_timing(metrics(tmp_path / "split"))
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_sigkill_mid_epoch_leaves_a_loadable_checkpoint_and_resumes(tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "reslab", "train", "--model", "cifar_resnet20", "--norm", "gn",
            "--dataset", "synthetic:train=1024,test=64,size=16,channels=3,classes=4",
            "--batch-size", "64", "--epochs", "4", "--progress", "none", "--out", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.time() < deadline
            time.sleep(0.05)
        time.sleep(0.3)  # well inside epoch 2
        assert proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] >= 1
    assert not (out / "summary.json").exists()
    done = subprocess.run([*argv, "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert [r["epoch"] for r in metrics(out)] == [1, 2, 3, 4]
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_non_finite_loss_ends_as_diverged(capsys, tmp_path):
    out = tmp_path / "run"
    # all-ones weights and a huge step: the seeds' "ones" failure pushed to overflow
    code, stdout, err = cli(capsys, "train", *TINY, "--model", "mlp", "--init", "ones", "--lr", "1e4",
                            "--epochs", "2", "--out", str(out))
    assert code == 0 and "diverged" in stdout and "Traceback" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and 1 <= summary["diverged_at_step"] <= 6
    assert summary["epochs_completed"] == 0 and not (out / "metrics.jsonl").read_text()


def test_config_file_print_config_and_shipped_recipes(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": "mlp", "batch-size": 50, "schedule": "cosine"}))
    code, out, _ = cli(capsys, "train", "--config", str(config), "--lr", "0.01", "--print-config")
    printed = yaml.safe_load(out)
    assert code == 0 and printed["model"] == "mlp" and printed["batch_size"] == 50 and printed["lr"] == 0.01
    assert set(printed) == {f for f in TrainConfig.__dataclass_fields__}
    assert {"resnet34_cifar10_seed", "he2015_cifar"} <= set(named_configs())
    code, out, _ = cli(capsys, "train", "--config", "he2015_cifar", "--print-config")
    he = yaml.safe_load(out)
    recipe = (he["optimizer"], he["lr"], he["momentum"], he["weight_decay"], he["batch_size"])
    assert recipe == ("sgd", 0.1, 0.9, 1e-4, 128)
    code, out, _ = cli(capsys, "train", "--config", "resnet34_cifar10_seed", "--print-config")
    seed = yaml.safe_load(out)
    assert (seed["model"], seed["optimizer"], seed["schedule"]) == ("resnet34", "adamw", "step:every=20,gamma=0.3333")


def _lrs(spec, epochs=6, steps=2, warmup=0.0):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, spec, epochs=epochs, steps_per_epoch=steps, warmup_epochs=warmup)
    lrs = []
    for _ in range(epochs * steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_schedules():
    assert _lrs("constant") == [1.0] * 12
    # the seeds' recipe: divide by 3 every 20 epochs
    lrs = _lrs("step:every=20,gamma=0.3333", epochs=80, steps=1)
    assert lrs[0] == 1 and lrs[19] == 1 and math.isclose(lrs[20], 0.3333) and math.isclose(lrs[79], 0.3333 ** 3)
    # He et al.: x0.1 at 50% and 75%
    lrs = _lrs("multistep", epochs=8, steps=1)
    assert [round(v, 6) for v in lrs] == [1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01]
    cos = _lrs("cosine", epochs=4, steps=1)
    assert cos[0] == 1 and math.isclose(cos[2], 0.5) and cos[3] < cos[2]
    one = _lrs("onecycle", epochs=10, steps=1)
    assert one[0] < one[3] and max(one) == pytest.approx(1.0) and one[-1] < 0.1
    warm = _lrs("constant", epochs=4, steps=2, warmup=1.0)
    assert warm[:3] == [0.5, 1.0, 1.0]


BAD_FLAGS = [
    (["--model", "resnet19"], "'resnet19'"),
    (["--norm", "gn:5"], "gn:5"),
    (["--norm", "batchnorm"], "'batchnorm'"),
    (["--init", "kaiming_normal:mode=sideways"], "'sideways'"),
    (["--dataset", "imagenet"], "'imagenet'"),
    (["--dataset", "synthetic:size=abc"], "'abc'"),
    (["--dataset", "cifar10", "--data-dir", "{tmp}/nodata"], "--download"),
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "three"], "'three'"),
    (["--batch-size", "-4"], "--batch-size"),
    (["--optimizer", "lion"], "'lion'"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "fast"], "'fast'"),
    (["--momentum", "1.5"], "--momentum"),
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--schedule", "linear"], "'linear'"),
    (["--schedule", "step:every=abc"], "'abc'"),
    (["--warmup-epochs", "-1"], "--warmup-epochs"),
    (["--label-smoothing", "1.5"], "--label-smoothing"),
    (["--grad-clip", "-1"], "--grad-clip"),
    (["--seed", "x"], "'x'"),
    (["--device", "gpu"], "'gpu'"),
    (["--device", "cuda:7"], "cuda:7"),
    (["--device", "mps"], "'mps'"),
    (["--precision", "fp8"], "'fp8'"),
    (["--precision", "bf16", "--device", "cpu"], "bf16"),
    (["--val-split", "1.5"], "--val-split"),
    (["--progress", "loud"], "'loud'"),
    (["--stem", "big"], "'big'"),
    (["--shortcut", "C"], "'C'"),
    (["--sync-bn"], "--sync-bn"),
    (["--nesterov", "--momentum", "0"], "--nesterov"),
    (["--resume"], "--resume"),
    (["--frobnicate", "3"], "--frobnicate"),
    (["--config", "{tmp}/missing.yaml"], "missing.yaml"),
    # norm-free nets, weight standardization, LSUV and the norms that came with them
    (["--init", "lsuv:tol=0"], "tol"),
    (["--init", "lsuv:tol=1.5"], "tol"),
    (["--init", "lsuv:max_iter=0"], "max_iter"),
    (["--init", "lsuv:max_iter=2.5"], "max_iter"),
    (["--init", "nf:alpha=0", "--model", "cifar_resnet20"], "alpha"),
    (["--init", "nf:alpha=2", "--model", "cifar_resnet20"], "alpha"),
    (["--init", "fixup"], "'simple_cnn' has none"),
    (["--norm", "brn:r_max=0.5"], "r_max"),
    (["--norm", "evonorm:5", "--model", "resnet18"], "evonorm:5"),
    (["--conv", "wsx"], "wsx"),
    (["--conv", "ws", "--init", "nf", "--model", "cifar_resnet20"], "ScaledStdConv2d"),
    (["--init", "lsuv", "--conv", "sws"], "lsuv"),
    (["--init", "{conv: fixup}"], "whole model"),
]


@pytest.mark.parametrize("flags, fragment", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flag_values_are_one_line_exit_2_and_write_nothing(capsys, tmp_path, flags, fragment):
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, "train", *TINY, "--epochs", "1", *flags, "--out", str(out))
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reslab: error:"), err
    assert fragment.replace("{tmp}", str(tmp_path)) in lines[0]
    assert not out.exists()


def test_existing_run_dir_needs_resume_and_corrupt_checkpoint_is_reported(capsys, tmp_path, tiny):
    out = tmp_path / "run"
    train(tiny(out, epochs=1))
    before = sorted(p.name for p in out.iterdir())
    code, _, err = cli(capsys, "train", *TINY, "--epochs", "1", "--out", str(out))
    assert code == 2 and "--resume" in err and sorted(p.name for p in out.iterdir()) == before
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    code, _, err = cli(capsys, "train", *TINY, "--epochs", "2", "--out", str(out), "--resume")
    assert code == 2 and "corrupted" in err and len(err.strip().splitlines()) == 1
    # a resume that changes what the run computes names each change, whatever the checkpoint holds
    train(tiny(tmp_path / "other", epochs=1))
    code, _, err = cli(capsys, "train", *TINY, "--epochs", "1", "--lr", "0.1", "--model", "mlp",
                       "--out", str(tmp_path / "other"), "--resume")
    assert code == 2 and "--model 'simple_cnn' -> 'mlp'" in err and "--lr 0.05 -> 0.1" in err


def test_unwritable_out_is_bad_input(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = cli(capsys, "train", *TINY, "--epochs", "1", "--out", str(blocker / "run"))
    assert code == 2 and "not writable" in err


def test_out_on_a_file_system_that_refuses_new_entries_is_bad_input(capsys):
    """/proc looks writable to root (os.access says yes) but refuses mkdir: probed, not guessed."""
    code, _, err = cli(capsys, "train", *TINY, "--epochs", "1", "--out", "/proc/reslab-no-such-dir/run")
    assert code == 2 and "not writable" in err and len(err.strip().splitlines()) == 1, err
