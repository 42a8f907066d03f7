"""reslab sweep / study: grids, run ids, crash safety, skip-if-finished, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reslab.cli import main
from reslab.errors import SpecError
from reslab.studies import STUDIES
from reslab.sweep import expand, run_id, sweep

TINY = {"dataset": "synthetic:train=128,test=32,size=8,channels=1,classes=4", "model": "simple_cnn", "norm": "gn",
        "batch_size": 32, "optimizer": "sgd", "lr": 0.05, "progress": "none", "epochs": 2}
TINY_FLAGS = ["--dataset", TINY["dataset"], "--model", "simple_cnn", "--batch-size", "32", "--lr", "0.05",
              "--progress", "none", "--epochs", "2"]


def cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def epochs_of(run_dir):
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_expand_is_the_full_grid_with_readable_ids(tmp_path):
    runs = expand(TINY, {"norm": ["bn", "gn:4"], "init": ["zeros", "uniform:a=-0.5,b=0.5"]}, [0, 1], tmp_path)
    assert len(runs) == 8
    ids = [r.run_id for r in runs]
    assert len(set(ids)) == 8
    assert "norm=gn_4-init=uniform_a=-0.5_b=0.5-seed=1" in ids
    run = runs[ids.index("norm=gn_4-init=uniform_a=-0.5_b=0.5-seed=1")]
    assert (run.config.norm, run.config.init, run.config.seed) == ("gn:4", "uniform:a=-0.5,b=0.5", 1)
    assert run.config.out == str(tmp_path / run.run_id)
    assert run_id({}, 3) == "seed=3"


def test_a_bad_value_anywhere_in_the_grid_is_caught_before_running(tmp_path):
    with pytest.raises(SpecError, match="gn:5"):
        sweep(TINY, {"norm": ["bn", "gn:5"]}, seeds=[0], out=tmp_path / "s")
    assert not (tmp_path / "s").exists()


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


def test_every_study_is_documented_and_valid(tmp_path):
    for name, study in STUDIES.items():
        assert study.claim and study.cost, name
        runs = expand({**study.base, "progress": "none"}, study.grid, study.seeds, tmp_path / name)
        assert len(runs) == len(study.seeds) * len(list(__import__("itertools").product(*study.grid.values())))
    assert not any(Path(tmp_path).iterdir())


def test_study_print_config_shows_the_plan(capsys):
    code, out, _ = cli(capsys, "study", "inits", "--print-config")
    assert code == 0
    assert "zeros" in out and "mnist5k" in out and "seeds:" in out
    code, out, _ = cli(capsys, "study", "norms", "--dataset", "cifar10", "--norm", "bn,gn", "--print-config")
    assert "cifar10" in out and "- bn" in out and "- ln" not in out


def test_inits_study_tells_the_seeds_story(capsys, tmp_path):
    """The README's main job: constant inits at chance, uniform[0,1) poor, scaled inits best."""
    import csv

    out = tmp_path / "inits"
    code, stdout, err = cli(capsys, "study", "inits", "--progress", "none", "--out", str(out))
    assert code == 0, err
    assert "27 runs" in stdout and "report.html" in stdout
    rows = {r["init"]: r for r in csv.DictReader((out / "report.csv").open())}
    acc = {init: float(r["eval_acc_mean"]) for init, r in rows.items()}
    assert list(rows) == STUDIES["inits"].grid["init"]  # the study's order, not alphabetical
    assert all(r["n"] == "3" and r["completed"] == "3" for r in rows.values())
    assert acc["zeros"] <= 0.12 and acc["ones"] <= 0.3  # near chance (10 classes)
    assert acc["uniform:a=0,b=1"] <= 0.4
    scaled = ("rule_uniform", "rule_normal", "xavier_normal", "kaiming_normal", "default")
    assert min(acc[s] for s in scaled) >= 0.85
    assert min(acc[s] for s in scaled) > acc["uniform:a=-0.5,b=0.5"] > acc["uniform:a=0,b=1"]
