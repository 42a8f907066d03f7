"""Scale: torchrun DistributedDataParallel on gloo, and sweeps through submitit."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from reslab.cli import main
from reslab.config import TrainConfig
from reslab.distributed import Dist, check_world_size
from reslab.errors import SpecError

GN_RUN = ["--model", "cifar_resnet20", "--norm", "gn", "--dataset", "mnist5k", "--epochs", "3", "--batch-size", "100",
          "--optimizer", "adam", "--lr", "3e-3", "--schedule", "cosine", "--progress", "none"]


def torchrun(*args, nproc=2, launcher=()):
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *launcher,
         "-m", "reslab", *args],
        capture_output=True, text=True, timeout=600,
    )


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_plain_process_is_rank_0_of_1_and_joins_no_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    dist = Dist.from_env()
    assert (dist.rank, dist.world_size, dist.local_rank, dist.is_main) == (0, 1, 0, True)
    cpu = torch.device("cpu")
    with dist.process_group(cpu):
        assert not torch.distributed.is_initialized()
        assert dist.device_for(cpu) == cpu
        assert torch.equal(dist.all_sum(torch.ones(2)), torch.ones(2)) and dist.all_min(torch.ones(1)).item() == 1
    monkeypatch.setenv("RANK", "first")
    with pytest.raises(SpecError, match="RANK, WORLD_SIZE and LOCAL_RANK must be integers"):
        Dist.from_env()


def test_a_global_batch_that_does_not_split_over_the_ranks_names_one_that_does():
    check_world_size(TrainConfig(batch_size=32, eval_batch_size=64), Dist(rank=1, world_size=4))
    with pytest.raises(SpecError, match=r"--eval-batch-size 33 is a global batch .* 2 processes .* "
                                         r"e.g. --eval-batch-size 34$"):
        check_world_size(TrainConfig(batch_size=32, eval_batch_size=33), Dist(world_size=2))


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    done = torchrun("train", *GN_RUN, "--out", str(ddp))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("completed") == 1  # only rank 0 prints
    assert main(["train", *GN_RUN, "--out", str(single)]) == 0

    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "single"]  # one run directory
    a = json.loads((ddp / "summary.json").read_text())
    b = json.loads((single / "summary.json").read_text())
    assert (a["world_size"], a["per_device_batch"]) == (2, 50)
    assert (b["world_size"], b["per_device_batch"]) == (1, 100)
    assert "# world_size: 2" in (ddp / "config.yaml").read_text()
    assert [r["epoch"] for r in rows(ddp)] == [1, 2, 3]  # one metrics row per epoch
    # each rank takes its half of every global batch: the first step sees the same
    # 100 images as the single process, so the loss at initialization agrees
    assert abs(a["first_step_loss"] - b["first_step_loss"]) < 1e-5
    assert abs(a["final_eval_acc"] - b["final_eval_acc"]) <= 0.01
    # metrics are reduced over ranks: the first epoch's mean train loss agrees too
    assert abs(rows(ddp)[0]["train_loss"] - rows(single)[0]["train_loss"]) < 1e-2


@pytest.mark.slow
def test_resume_under_torchrun_equals_an_uninterrupted_run(tmp_path):
    """1 epoch, then --resume to 2, under torchrun: the same metrics and weights as 2 straight.

    The MLP drops units (p=0.2) from each rank's own generator, so this holds only because
    the checkpoint keeps every rank's RNG state, not just rank 0's."""
    import torch

    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    tiny = ["--model", "mlp", "--dataset", "synthetic:train=256,test=64,size=8,channels=1,classes=4",
            "--batch-size", "64", "--optimizer", "adam", "--lr", "1e-2", "--progress", "none"]
    assert torchrun("train", *tiny, "--epochs", "1", "--out", str(resumed)).returncode == 0
    done = torchrun("train", *tiny, "--epochs", "2", "--resume", "--out", str(resumed))
    assert done.returncode == 0, done.stderr[-2000:]
    assert torchrun("train", *tiny, "--epochs", "2", "--out", str(straight)).returncode == 0

    timing = ("epoch_time_s", "images_per_s")
    strip = lambda run: [{k: v for k, v in r.items() if k not in timing} for r in rows(run)]  # noqa: E731
    assert [r["epoch"] for r in rows(resumed)] == [1, 2]
    assert strip(resumed) == strip(straight)
    a = torch.load(resumed / "checkpoint.pt", weights_only=True)
    b = torch.load(straight / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert len(a["rng"]["per_rank"]) == 2
    assert not torch.equal(a["rng"]["per_rank"][0]["torch"], a["rng"]["per_rank"][1]["torch"])
    assert json.loads((resumed / "summary.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_sync_bn_is_refused_on_cpu_under_torchrun(tmp_path):
    # torchrun's agent ends the other ranks once one has exited: polling every second (not 0.1 s) lets the
    # second rank, which reaches the same check a moment later, print its line first
    done = torchrun("train", "--model", "simple_cnn", "--dataset", "synthetic:train=64,test=16,size=8,channels=1",
                    "--batch-size", "32", "--epochs", "1", "--sync-bn", "--out", str(tmp_path / "run"),
                    launcher=("--monitor-interval", "1"))
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("reslab: error:")]
    assert len(ours) == 2 and all("--sync-bn" in line for line in ours)  # one line from each rank
    assert "reslab/" not in done.stderr.split("reslab: error:")[-1]  # torchrun reports the exit, no reslab frames
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("srun") is not None, reason="on a Slurm cluster this would submit real jobs")
def test_submitit_launcher_runs_a_two_run_sweep_locally(capsys, tmp_path):
    pytest.importorskip("submitit")
    out = tmp_path / "sweep"
    code = main(["sweep", "--dataset", "synthetic:train=128,test=32,size=8,channels=1,classes=4",
                 "--model", "simple_cnn", "--epochs", "1", "--batch-size", "32", "--progress", "none",
                 "--init", "zeros,default", "--launcher", "submitit", "--jobs", "2", "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert (out / ".submitit").is_dir()  # the jobs really went through submitit
    report_rows = (out / "report.csv").read_text().splitlines()
    assert report_rows[0].startswith("init,n,completed,diverged")
    assert [r.split(",")[0] for r in report_rows[1:]] == ["zeros", "default"]
    assert "2 runs (2 completed" in stdout


def test_launcher_option_needs_submitit(capsys, tmp_path):
    code = main(["sweep", "--launcher-option", "slurm_partition=gpu", "--out", str(tmp_path / "s"),
                 "--dataset", "synthetic:train=64,test=16,size=8,channels=1", "--model", "mlp"])
    _, err = capsys.readouterr()
    assert code == 2 and "--launcher-option" in err
