"""reslab sweep / study: grids, run ids, crash safety, skip-if-finished, bad input."""

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reslab import sweeps as sweep_module
from reslab.cli import main
from reslab.errors import SpecError
from reslab.studies import shipped_studies
from reslab.sweeps import expand, run_id, sweep

TINY_FLAGS = ["--dataset", "synthetic:train=128,test=32,size=8,channels=1,classes=4", "--model", "simple_cnn",
              "--batch-size", "32", "--lr", "0.05",
              "--progress", "none", "--epochs", "2"]


def cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def epochs_of(run_dir):
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_expand_is_the_full_grid_with_readable_ids(tmp_path, tiny_config):
    runs = expand(tiny_config(), {"norm": ["bn", "gn:4"], "init": ["zeros", "uniform:a=-0.5,b=0.5"]}, [0, 1], tmp_path)
    assert len(runs) == 8
    ids = [r.run_id for r in runs]
    assert len(set(ids)) == 8
    assert "norm=gn_4-init=uniform_a=-0.5_b=0.5-seed=1" in ids
    run = runs[ids.index("norm=gn_4-init=uniform_a=-0.5_b=0.5-seed=1")]
    assert (run.config.norm, run.config.init, run.config.seed) == ("gn:4", "uniform:a=-0.5,b=0.5", 1)
    assert run.config.out == str(tmp_path / run.run_id) and run.path == tmp_path / run.run_id
    assert run.summary is None and run.status == "incomplete"  # a planned run
    assert run_id({}, 3) == "seed=3"


def test_a_bad_value_anywhere_in_the_grid_is_caught_before_running(tmp_path, tiny_config):
    with pytest.raises(SpecError, match="gn:5"):
        sweep(tiny_config(), {"norm": ["bn", "gn:5"]}, seeds=[0], out=tmp_path / "s")
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_sweep_cli_runs_grid_skips_finished_and_reports(capsys, tmp_path):
    out = tmp_path / "s"
    code, stdout, err = cli(capsys, "sweep", *TINY_FLAGS, "--norm", "bn,gn", "--seeds", "0,1", "--out", str(out))
    assert code == 0, err
    run_dirs = sorted(p for p in out.iterdir() if p.is_dir())
    assert [p.name for p in run_dirs] == ["norm=bn-seed=0", "norm=bn-seed=1", "norm=gn-seed=0", "norm=gn-seed=1"]
    for run_dir in run_dirs:
        assert epochs_of(run_dir) == [1, 2]
    assert (out / "report.csv").is_file() and "norm" in (out / "report.csv").read_text().splitlines()[0]
    assert "4 runs" in stdout and "0 already finished" in stdout
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.parent != out}
    code, stdout, _ = cli(capsys, "sweep", *TINY_FLAGS, "--norm", "bn,gn", "--seeds", "0,1", "--out", str(out))
    assert code == 0 and "4 already finished" in stdout
    assert mtimes == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.parent != out}


@pytest.mark.slow
def test_sweep_with_parallel_jobs(capsys, tmp_path):
    out = tmp_path / "s"
    code, stdout, err = cli(capsys, "sweep", *TINY_FLAGS, "--init", "zeros,kaiming_normal", "--jobs", "2",
                            "--out", str(out))
    assert code == 0, err
    for name in ("init=zeros-seed=0", "init=kaiming_normal-seed=0"):
        assert json.loads((out / name / "summary.json").read_text())["status"] == "completed"


def test_diverged_run_does_not_stop_the_sweep(capsys, tmp_path):
    out = tmp_path / "s"
    flags = [f for f in TINY_FLAGS]
    code, stdout, err = cli(capsys, "sweep", *flags, "--model", "mlp", "--init", "ones,default", "--lr", "1e4",
                            "--out", str(out))
    assert code == 0, err
    statuses = {p.name: json.loads((p / "summary.json").read_text())["status"] for p in out.iterdir() if p.is_dir()}
    assert statuses["init=ones-seed=0"] == "diverged" and len(statuses) == 2


@pytest.mark.slow
def test_sigkill_part_way_then_rerun_completes_each_run_exactly_once(tmp_path):
    out = tmp_path / "s"
    argv = [sys.executable, "-m", "reslab", "sweep", "--model", "cifar_resnet20", "--norm", "gn",
            "--dataset", "synthetic:train=512,test=64,size=16,channels=3,classes=4", "--batch-size", "64",
            "--epochs", "3", "--init", "kaiming_normal,xavier_normal,default", "--progress", "none",
            "--out", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        # kill once the first run has finished and the second has written at least one epoch
        while True:
            assert proc.poll() is None, "the sweep ended before it could be interrupted"
            assert time.time() < deadline
            done = list(out.glob("*/summary.json"))
            partial = [m for m in out.glob("*/metrics.jsonl") if not (m.parent / "summary.json").exists()
                       and m.read_text().strip()]
            if done and partial:
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert len(list(out.glob("*/summary.json"))) < 3
    second = subprocess.run(argv, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    run_dirs = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(run_dirs) == 3
    for run_dir in run_dirs:
        assert epochs_of(run_dir) == [1, 2, 3], run_dir.name  # one row per epoch, no duplicates
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    snapshot = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.parent != out}
    third = subprocess.run(argv, capture_output=True, text=True)
    assert third.returncode == 0 and "3 already finished" in third.stdout
    assert snapshot == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.parent != out}


@pytest.mark.parametrize("argv, fragment", [
    (["sweep", "--norm", "bn,gn:5"], "gn:5"),
    (["sweep", "--norm", "bn,,gn"], "empty item"),
    (["sweep", "--seeds", "0,x"], "'0,x'"),
    (["sweep", "--seeds", "1,1"], "repeats"),
    (["sweep", "--jobs", "0"], "--jobs"),
    (["sweep", "--launcher", "slurmish"], "'slurmish'"),
    (["sweep", "--lr", "0.1,fast"], "'fast'"),
    (["sweep", "--init", "zeros,kaiming_normal:mode=up"], "'up'"),
    (["study", "colours"], "'colours'"),
    (["study", "inits", "--init", "zeros,bogus"], "'bogus'"),
    (["report", "{tmp}/nothing-here"], "nothing-here"),
])
def test_sweep_study_report_bad_input(capsys, tmp_path, argv, fragment):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[0] in ("sweep", "study"):
        argv += ["--out", str(tmp_path / "out")]
    code, stdout, err = cli(capsys, *argv)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reslab: error:") and fragment in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_every_study_is_documented_and_valid(tmp_path):
    for name, study in shipped_studies().items():
        assert study.claim and study.cost, name
        runs = expand({**study.base, "progress": "none"}, study.grid, study.seeds, tmp_path / name)
        points = {tuple(sorted(zip(grid, values, strict=True))) for grid in study.grids
                  for values in itertools.product(*grid.values())}  # a union of grids: each point once
        assert len(runs) == len(study.seeds) * len(points)
    assert not any(Path(tmp_path).iterdir())


def test_study_print_config_shows_the_plan(capsys):
    code, out, _ = cli(capsys, "study", "inits", "--print-config")
    assert code == 0
    assert "zeros" in out and "mnist5k" in out and "seeds:" in out
    code, out, _ = cli(capsys, "study", "norms", "--dataset", "cifar10", "--norm", "bn,gn", "--print-config")
    assert "cifar10" in out and "- bn" in out and "- ln" not in out


@pytest.mark.slow
def test_inits_study_tells_the_seeds_story(capsys, tmp_path):
    """The README's main job: constant inits at chance, uniform[0,1) poor, scaled inits best."""
    import csv

    out = tmp_path / "inits"
    code, stdout, err = cli(capsys, "study", "inits", "--progress", "none", "--out", str(out))
    assert code == 0, err
    assert "27 runs" in stdout and "report.html" in stdout
    rows = {r["init"]: r for r in csv.DictReader((out / "report.csv").open())}
    acc = {init: float(r["eval_acc_mean"]) for init, r in rows.items()}
    assert list(rows) == shipped_studies()["inits"].grid["init"]  # the study's order, not alphabetical
    assert all(r["n"] == "3" and r["completed"] == "3" for r in rows.values())
    assert acc["zeros"] <= 0.12 and acc["ones"] <= 0.3  # near chance (10 classes)
    assert acc["uniform:a=0,b=1"] <= 0.4
    scaled = ("rule_uniform", "rule_normal", "xavier_normal", "kaiming_normal", "default")
    assert min(acc[s] for s in scaled) >= 0.85
    assert min(acc[s] for s in scaled) > acc["uniform:a=-0.5,b=0.5"] > acc["uniform:a=0,b=1"]


# --- reusing run directories only when they hold the run asked for -------------------------------

ONE_EPOCH_FLAGS = ["--dataset", "synthetic:train=128,test=64,size=8,channels=1,classes=4", "--model", "simple_cnn",
                   "--batch-size", "32", "--progress", "none", "--seeds", "0"]


@pytest.fixture
def one_epoch(tiny_config):
    """The base config of the sweeps below: the shared tiny run, on the MLP."""
    return tiny_config(model="mlp")


def snapshot(root):
    """Every file below ``root``: its bytes and its mtime."""
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(Path(root).rglob("*")) if p.is_file()}


def summary_of(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_study_rerun_with_other_settings_is_refused_until_restart(capsys, tmp_path):
    out = tmp_path / "norms"
    study = ["study", "norms", *ONE_EPOCH_FLAGS, "--norm", "bn,gn", "--warmup-epochs", "0", "--out", str(out)]
    code, stdout, err = cli(capsys, *study, "--epochs", "1")
    assert code == 0, err
    names = ["norm=bn-seed=0", "norm=gn-seed=0"]
    assert all(summary_of(out / n)["epochs_completed"] == 1 for n in names)
    before = snapshot(out)

    code, stdout, err = cli(capsys, *study, "--epochs", "2")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reslab: error:"), err
    assert "norm=bn-seed=0" in lines[0] and "--epochs 1 -> 2" in lines[0] and "1 other run" in lines[0]
    assert "--restart" in lines[0]
    assert snapshot(out) == before  # nothing written, nothing deleted, not even sweep.yaml or the report

    code, stdout, err = cli(capsys, *study, "--epochs", "2", "--restart")
    assert code == 0, err
    assert "0 already finished" in stdout
    for name in names:
        summary = summary_of(out / name)
        assert (summary["status"], summary["epochs"], summary["epochs_completed"]) == ("completed", 2, 2)
        assert epochs_of(out / name) == [1, 2]

    restarted = snapshot(out)
    code, stdout, err = cli(capsys, *study, "--epochs", "2")  # the same settings: nothing reruns
    assert code == 0, err
    assert "2 already finished" in stdout
    now = snapshot(out)
    assert {p: v for p, v in now.items() if p.parent != out} == {p: v for p, v in restarted.items() if p.parent != out}


def test_partial_run_with_other_settings_is_refused_and_restart_keeps_matching_runs(tmp_path, one_epoch):
    out = tmp_path / "s"
    grid = {"lr": [0.05, 0.1]}
    sweep(one_epoch, grid, seeds=[0], out=out, write_report=False)
    partial, finished = out / "lr=0.05-seed=0", out / "lr=0.1-seed=0"
    (partial / "summary.json").unlink()  # config.yaml and checkpoint.pt, no summary: a run cut short
    assert (partial / "checkpoint.pt").is_file() and (partial / "config.yaml").is_file()
    before = snapshot(out)
    with pytest.raises(SpecError) as caught:  # a resume would quietly train it on to 2 epochs
        sweep({**one_epoch, "epochs": 2}, grid, seeds=[0], out=out, write_report=False)
    message = str(caught.value)
    assert "\n" not in message and "'lr=0.05-seed=0'" in message and "--epochs 1 -> 2" in message
    assert "1 other run" in message
    assert snapshot(out) == before

    # Only the partial run differs now (it was made with another momentum): --restart reruns it alone.
    import yaml

    saved = yaml.safe_load((partial / "config.yaml").read_text())
    (partial / "config.yaml").write_text(yaml.safe_dump({**saved, "momentum": 0.5}))
    before = snapshot(out)
    with pytest.raises(SpecError, match=r"'lr=0.05-seed=0'.*--momentum 0.5 -> 0.9"):
        sweep(one_epoch, grid, seeds=[0], out=out, write_report=False)
    assert snapshot(out) == before
    result = sweep(one_epoch, grid, seeds=[0], out=out, write_report=False, restart=True)
    assert result.restarted == ["lr=0.05-seed=0"] and result.skipped == ["lr=0.1-seed=0"]
    assert yaml.safe_load((partial / "config.yaml").read_text())["momentum"] == 0.9
    assert summary_of(partial)["status"] == "completed"
    assert {p: v for p, v in snapshot(out).items() if p.parent == finished} == \
        {p: v for p, v in before.items() if p.parent == finished}  # the matching run is untouched


def test_restart_deletes_nothing_when_anything_else_is_bad(tmp_path, one_epoch):
    out = tmp_path / "s"
    sweep(one_epoch, {"lr": [0.05]}, seeds=[0], out=out, write_report=False)
    before = snapshot(out)
    with pytest.raises(SpecError, match="gn:5"):  # lr=0.05 differs (norm), but the grid is bad
        sweep({**one_epoch, "model": "simple_cnn"}, {"lr": [0.05], "norm": ["bn", "gn:5"]}, seeds=[0], out=out,
              restart=True)
    with pytest.raises(SpecError, match="launcher-option"):
        sweep({**one_epoch, "epochs": 2}, {"lr": [0.05]}, seeds=[0], out=out, restart=True,
              launcher_options={"slurm_partition": "gpu"})
    assert snapshot(out) == before


def test_unreadable_or_foreign_run_directory_counts_as_differing(tmp_path, one_epoch):
    out = tmp_path / "s"
    (out / "lr=0.05-seed=0").mkdir(parents=True)
    (out / "lr=0.05-seed=0" / "config.yaml").write_text("model: [unclosed\n")
    (out / "lr=0.1-seed=0").mkdir()
    (out / "lr=0.1-seed=0" / "notes.txt").write_text("not a run")
    (out / "old-run").mkdir()  # not in the grid: not part of this sweep, left alone
    (out / "old-run" / "config.yaml").write_text("model: resnet50\n")
    with pytest.raises(SpecError, match=r"'lr=0.05-seed=0'.*unreadable config.yaml.*1 other run"):
        sweep(one_epoch, {"lr": [0.05, 0.1]}, seeds=[0], out=out)
    result = sweep(one_epoch, {"lr": [0.05, 0.1]}, seeds=[0], out=out, write_report=False, restart=True)
    assert sorted(result.restarted) == ["lr=0.05-seed=0", "lr=0.1-seed=0"]
    assert set(result.statuses.values()) == {"completed"}
    assert not (out / "lr=0.1-seed=0" / "notes.txt").exists()
    assert (out / "old-run" / "config.yaml").read_text() == "model: resnet50\n"


def test_policy_mapping_in_the_grid_runs_with_readable_ids_and_is_reused(tmp_path, one_epoch):
    out = tmp_path / "s"
    policy = {"conv": "kaiming_normal:mode=fan_out", "linear": "normal:std=0.01"}
    grid = {"init": ["kaiming_normal", policy]}
    result = sweep(one_epoch, grid, seeds=[0], out=out, write_report=False)
    ids = [run.run_id for run in result.runs]
    assert ids == ["init=kaiming_normal-seed=0", "init=conv_kaiming_normal_mode=fan_out+linear_normal_std=0.01-seed=0"]
    assert set(result.statuses.values()) == {"completed"}
    import yaml

    assert yaml.safe_load((out / ids[1] / "config.yaml").read_text())["init"] == policy
    before = snapshot(out)
    again = sweep(one_epoch, grid, seeds=[0], out=out, write_report=False)
    assert again.skipped == ids
    assert {p: v for p, v in snapshot(out).items() if p.parent != out} == \
        {p: v for p, v in before.items() if p.parent != out}


def test_sweep_config_file_with_a_policy_mapping_and_lists(capsys, tmp_path, synthetic):
    import yaml

    policy = {"conv": "kaiming_normal:mode=fan_out", "linear": "normal:std=0.01"}
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "model": "simple_cnn", "dataset": synthetic, "batch_size": 32, "epochs": 1, "lr": 0.05,
        "progress": "none", "init": policy, "norm": ["bn", "gn"],
    }))
    out = tmp_path / "s"
    code, stdout, err = cli(capsys, "sweep", "--config", str(config), "--out", str(out))
    assert code == 0, err
    plan = yaml.safe_load((out / "sweep.yaml").read_text())
    assert plan["base"]["init"] == policy and plan["base"]["epochs"] == 1 and plan["grid"] == {"norm": ["bn", "gn"]}
    assert plan["runs"] == ["norm=bn-seed=0", "norm=gn-seed=0"]
    for name in plan["runs"]:
        saved = yaml.safe_load((out / name / "config.yaml").read_text())
        assert saved["init"] == policy and saved["epochs"] == 1 and saved["lr"] == 0.05


# --- a run that breaks while it is being built ---------------------------------------------------


@pytest.mark.slow
def test_out_of_memory_while_building_a_run_fails_that_run_only(capsys, tmp_path, monkeypatch):
    import torch

    import reslab.training

    original = reslab.training.Trainer.__init__

    def build(self, cfg, *args, **kwargs):
        if cfg.norm == "gn":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        original(self, cfg, *args, **kwargs)

    monkeypatch.setattr(reslab.training.Trainer, "__init__", build)
    out = tmp_path / "s"
    argv = ["sweep", *ONE_EPOCH_FLAGS, "--epochs", "1", "--norm", "gn,bn", "--out", str(out)]
    code, stdout, err = cli(capsys, *argv)
    assert code == 1, err  # a run failed; the sweep went on
    failed, done = summary_of(out / "norm=gn-seed=0"), summary_of(out / "norm=bn-seed=0")
    assert failed["status"] == "failed" and failed["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert (failed["epochs_completed"], failed["epochs"], failed["final_eval_acc"]) == (0, 1, None)
    assert done["status"] == "completed"
    assert "1 completed, 1 failed" in stdout and (out / "report.md").is_file()
    assert f"run {out / 'norm=gn-seed=0'} failed: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n" \
        in err and "Traceback" not in err
    report_md = (out / "report.md").read_text()
    assert "| gn | 1 | 0 | 0 |" in report_md and "1 run failed" in report_md  # listed, out of the means

    monkeypatch.setattr(reslab.training.Trainer, "__init__", original)  # the memory is back: rerun retries it
    code, stdout, err = cli(capsys, *argv)
    assert code == 0, err
    assert summary_of(out / "norm=gn-seed=0")["status"] == "completed" and "1 already finished" in stdout


# --- worker processes -----------------------------------------------------------------------------


@pytest.fixture
def reslab_logger():
    """Put the ``reslab`` logger back as it was after a test that configures it."""
    import logging

    logger = logging.getLogger("reslab")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    root = (list(logging.getLogger().handlers), logging.getLogger().level)
    yield logger
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]
    assert (list(logging.getLogger().handlers), logging.getLogger().level) == root  # the root logger untouched


def test_workers_bind_their_own_gpu_and_keep_an_explicit_one(monkeypatch, reslab_logger):
    import queue

    import torch

    bound, ran = [], []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: bound.append(str(device)))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(sweep_module, "_WORKER_DEVICE", None)
    monkeypatch.setattr(sweep_module, "_execute", lambda cfg_dict: ran.append(cfg_dict["device"]) or ("x", "ok"))

    devices = queue.Queue()
    devices.put("cuda:1")
    sweep_module._init_worker(devices, 1)
    assert bound == ["cuda:1"] and sweep_module._WORKER_DEVICE == "cuda:1"  # bound once the worker starts

    for requested, used in [("auto", "cuda:1"), ("cuda", "cuda:1"), ("cuda:0", "cuda:0"), ("auto", "cuda:1")]:
        bound.clear()
        sweep_module._execute_in_worker({"device": requested})
        assert ran[-1] == used and bound == [used], requested
    bound.clear()
    sweep_module._execute_in_worker({"device": "cpu"})
    assert ran[-1] == "cpu" and bound == []

    monkeypatch.setattr(sweep_module, "_WORKER_DEVICE", None)
    sweep_module._init_worker(None, 1)  # one GPU or none: every run on its config's device, nothing bound
    sweep_module._execute_in_worker({"device": "auto"})
    assert ran[-1] == "auto" and bound == []

    # What run_local puts in the queue: round-robin over several GPUs, nothing for one or none.
    assert sweep_module.worker_devices(3, 2) == ["cuda:0", "cuda:1", "cuda:0"]
    assert sweep_module.worker_devices(2, 1) is None and sweep_module.worker_devices(2, 0) is None


def test_workers_configure_only_the_reslab_logger(reslab_logger, monkeypatch):
    import logging

    import torch

    monkeypatch.setattr(sweep_module, "_WORKER_DEVICE", None)

    def ours():
        return [h for h in reslab_logger.handlers if isinstance(h, logging.StreamHandler)
                and h.formatter is not None and h.formatter._fmt == "%(message)s" and h not in handlers_before]

    handlers_before = list(reslab_logger.handlers)
    sweep_module._execute_chunk([])  # a submitit job: the reslab logger, not the root logger (checked by the fixture)
    assert len(ours()) == 1 and reslab_logger.propagate is False and reslab_logger.level == logging.INFO
    sweep_module._init_worker(None, torch.get_num_threads())  # a local worker, in the same process: no second handler
    sweep_module.configure_worker_logging()
    assert len(ours()) == 1 and reslab_logger.propagate is False


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_sweep_out_that_cannot_be_created_is_one_line_before_any_work(capsys, tmp_path, where):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = str(blocker / "sweep") if where == "under_a_file" else "/proc/reslab-no-such-dir/sweep"
    code, _, err = cli(capsys, "sweep", "--model", "mlp", "--dataset", "digits", "--epochs", "1", "--lr", "0.1,0.2",
                       "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cannot be written" in err, err
    assert "Traceback" not in err and blocker.read_text() == ""
