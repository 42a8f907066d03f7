"""--tensorboard: RUN/tb/ event files that match the run's records, across resumes and sweeps."""

import importlib.util
import json
import math
import subprocess
import sys

import pytest

import reslab.training as train_module
from reslab.cli import main
from reslab.config import TrainConfig
from reslab.tblog import TensorBoardLog
from reslab.training import train

needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason="the tensorboard package is not installed")

SYNTH = "synthetic:train=192,test=64,size=8,channels=1,classes=4"  # 6 steps an epoch at batch 32
STEP_TAGS = ("train/loss", "train/lr")
EPOCH_TAGS = {"train/epoch_loss": "train_loss", "train/acc": "train_acc", "eval/loss": "eval_loss",
              "eval/acc": "eval_acc"}
CURVES = (*STEP_TAGS, *EPOCH_TAGS)


def tiny(out, **overrides):
    values = dict(model="simple_cnn", dataset=SYNTH, epochs=2, batch_size=32, lr=0.05, log_every=4,
                  progress="none", tensorboard=True, out=str(out))
    return TrainConfig(**{**values, **overrides})


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def accumulator(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return acc


def server_steps(run_dir, tag):
    """The steps of ``tag`` as TensorBoard's Python server loader keeps them."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return [e.step for e in acc.Tensors(tag)]


def points(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def hparams(acc):
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    content = acc.PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    end = HParamsPluginData.FromString(content["_hparams_/session_end_info"]).session_end_info
    assert "_hparams_/experiment" in content
    return start.hparams, end.status


def raw_events(path):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return list(EventFileLoader(str(path)).Load())


def assert_same_curves(a, b):
    for tag in CURVES:
        steps_a, values_a = zip(*points(a, tag), strict=True)
        steps_b, values_b = zip(*points(b, tag), strict=True)
        assert steps_a == steps_b, tag
        assert values_a == pytest.approx(values_b, rel=1e-6), tag


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 2-epoch run with --tensorboard."""
    if importlib.util.find_spec("tensorboard") is None:
        pytest.skip("the tensorboard package is not installed")
    out = tmp_path_factory.mktemp("tb") / "straight"
    assert train(tiny(out)).status == "completed"
    return out


@pytest.mark.slow
@needs_tensorboard
def test_event_files_hold_the_runs_records_and_its_config(straight):
    assert [p.is_file() for p in (straight / "tb").iterdir()] == [True]  # one file, no timestamped subfolder
    acc = accumulator(straight)
    assert set(acc.Tags()["scalars"]) == {*CURVES, "hparam/final_eval_acc"}
    # 6 steps an epoch in intervals of 4: one point per steps.jsonl row, at its step
    steps = jsonl(straight / "steps.jsonl")
    assert [r["step"] for r in steps] == [4, 6, 10, 12]
    loss = points(acc, "train/loss")
    assert [s for s, _ in loss] == [r["step"] for r in steps]
    assert [v for _, v in loss] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    assert points(acc, "train/lr") == [(r["step"], pytest.approx(r["lr"])) for r in steps]
    # per epoch, at the epoch number
    metrics = jsonl(straight / "metrics.jsonl")
    for tag, key in EPOCH_TAGS.items():
        assert points(acc, tag) == [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in metrics], tag
    summary = json.loads((straight / "summary.json").read_text())
    assert points(acc, "hparam/final_eval_acc") == [(2, pytest.approx(summary["final_eval_acc"]))]
    values, status = hparams(acc)
    assert values["lr"].number_value == pytest.approx(0.05) and values["model"].string_value == "simple_cnn"
    assert values["norm"].string_value == "bn" and values["stem"].string_value == "default"
    assert "out" not in values and "tensorboard" not in values  # how a run executes is no hparam
    from tensorboard.plugins.hparams.api_pb2 import Status

    assert status == Status.Value("STATUS_SUCCESS")


@needs_tensorboard
def test_a_resume_drops_what_the_interrupted_session_wrote_past_the_checkpoint(straight, tmp_path, monkeypatch):
    out = tmp_path / "split"
    evaluate = train_module.Trainer.evaluate

    def evaluate_once(self):  # the session breaks after training epoch 2, before its checkpoint
        if self.epoch == 2:
            raise RuntimeError("injected fault")
        return evaluate(self)

    closed = []
    close = TensorBoardLog.close
    monkeypatch.setattr(train_module.Trainer, "evaluate", evaluate_once)
    monkeypatch.setattr(TensorBoardLog, "close", lambda self: (closed.append(self), close(self)))
    assert train(tiny(out)).status == "failed"
    assert len(closed) == 1  # flushed and closed although the run failed
    monkeypatch.setattr(train_module.Trainer, "evaluate", evaluate)
    [first] = (out / "tb").iterdir()
    # the points of the epoch it could not finish are on disk, and no hparams (the run did not end)
    written = [(e.step, v.tag) for e in raw_events(first) for v in e.summary.value]
    assert (10, "train/loss") in written and (12, "train/loss") in written
    assert "_hparams_/experiment" not in {tag for _, tag in written}

    assert train(tiny(out, resume=True)).status == "completed"
    files = sorted((out / "tb").iterdir())
    assert files[0] == first and len(files) == 2  # the resumed session's file is read after the first
    # each session starts at its first step; the restart at 7 (the first after epoch 1) drops later points
    assert [[e.step for e in raw_events(f) if e.HasField("session_log")] for f in files] == [[1], [7]]
    acc = accumulator(out)
    assert [s for s, _ in points(acc, "train/loss")] == [4, 6, 10, 12]  # one value per logged step
    assert_same_curves(acc, accumulator(straight))
    assert server_steps(out, "train/loss") == [4, 6, 10, 12]  # as `tensorboard --load_fast=false` reads it
    assert server_steps(out, "eval/acc") == [1, 2]


@needs_tensorboard
def test_extending_a_finished_run_continues_its_curves(straight, tmp_path):
    out = tmp_path / "split"
    train(tiny(out, epochs=1))
    assert [s for s, _ in points(accumulator(out), "hparam/final_eval_acc")] == [1]
    train(tiny(out, resume=True))
    acc = accumulator(out)
    assert_same_curves(acc, accumulator(straight))
    final = json.loads((out / "summary.json").read_text())["final_eval_acc"]
    assert points(acc, "hparam/final_eval_acc")[-1] == (2, pytest.approx(final))


@needs_tensorboard
def test_a_resume_may_turn_it_on_and_gets_the_whole_curve(straight, tmp_path):
    out = tmp_path / "late"
    train(tiny(out, epochs=1, tensorboard=False))
    assert not (out / "tb").exists()  # without --tensorboard nothing is written
    train(tiny(out, resume=True))  # an execution setting: the resume is allowed
    assert_same_curves(accumulator(out), accumulator(straight))


@needs_tensorboard
def test_a_diverged_run_records_its_non_finite_loss_and_ends_its_session_in_failure(tmp_path):
    out = tmp_path / "run"
    result = train(tiny(out, model="mlp", init="ones", lr=1e4, log_every=1))
    assert result.status == "diverged"
    acc = accumulator(out)
    loss = points(acc, "train/loss")
    assert [s for s, _ in loss] == [r["step"] for r in jsonl(out / "steps.jsonl")]
    assert math.isnan(loss[-1][1])
    from tensorboard.plugins.hparams.api_pb2 import Status

    assert hparams(acc)[1] == Status.Value("STATUS_FAILURE")
    assert "hparam/final_eval_acc" not in acc.Tags()["scalars"]  # no epoch was completed


@pytest.mark.slow
@needs_tensorboard
def test_every_run_of_a_sweep_has_its_own_tb(capsys, tmp_path):
    out = tmp_path / "sweep"
    code = main(["sweep", "--model", "simple_cnn", "--dataset", SYNTH, "--batch-size", "32", "--epochs", "1",
                 "--progress", "none", "--tensorboard", "true", "--lr", "0.01,0.02", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    for lr in (0.01, 0.02):
        acc = accumulator(out / f"lr={lr}-seed=0")
        assert hparams(acc)[0]["lr"].number_value == pytest.approx(lr)
        assert [s for s, _ in points(acc, "eval/acc")] == [1]


def test_without_the_package_it_is_one_line_before_any_work(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # importing it fails
    out = tmp_path / "run"
    code = main(["train", "--model", "simple_cnn", "--dataset", SYNTH, "--epochs", "1", "--progress", "none",
                 "--tensorboard", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0 and "pip install tensorboard" in err and "reslab[tensorboard]" in err
    assert not out.exists()


@pytest.mark.slow
def test_tensorboard_is_imported_only_when_asked_for():
    code = ("import sys, reslab, reslab.training, reslab.cli; "
            "print(sorted(m for m in sys.modules if 'tensorboard' in m))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
