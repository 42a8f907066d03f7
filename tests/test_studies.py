"""Studies as data: a user's YAML claim runs, is judged from its runs and reported; per-step records."""

import json

import pytest
import yaml

from reslab.cli import main
from reslab.studies import get_study, shipped_studies
from reslab.verdict import parse_check

SYNTH = "synthetic:train=192,test=64,size=8,channels=1,classes=4"


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def write_study(path, checks, **extra):
    study = {"name": "tiny-norms", "claim": "GN and BN both learn the synthetic task",
             "base": {"model": "simple_cnn", "dataset": SYNTH, "epochs": 2, "batch_size": 32, "lr": 0.05,
                      "log_every": 2, "progress": "none"},
             "grid": {"norm": ["bn", "gn"]}, "seeds": [0, 1], "verdict": {"checks": checks}, **extra}
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def test_a_users_study_file_runs_and_is_judged_from_its_runs(capsys, tmp_path):
    file = write_study(tmp_path / "mine.yaml", ['mean(norm="bn") >= 0.5', 'mean(norm="gn") >= 0.5'])
    out = tmp_path / "study"
    code, stdout, err = cli(capsys, "study", file, "--out", out)
    assert code == 0, err
    assert "verdict: supported" in stdout
    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["study"] == "tiny-norms" and verdict["verdict"] == "supported"
    assert [e["result"] for e in verdict["evidence"]] == ["holds", "holds"]
    assert verdict["evidence"][0]["terms"][0]["runs"] == 2
    md = (out / "report.md").read_text()
    assert md.index("## Verdict") < md.index("## Setup") < md.index("| norm |")  # the verdict comes first
    assert "seeds 0, 1" in md and "192 train / 64 eval images" in md and "torch" in md
    assert f"reslab study {out / 'study.yaml'} --out {out}" in md  # the one command that reruns it
    html = (out / "report.html").read_text()
    assert 'id="verdict"' in html and "supported" in html and 'id="setup"' in html

    # the study left beside its runs is a study file itself; a stricter claim, judged again by report
    study = yaml.safe_load((out / "study.yaml").read_text())
    study["verdict"]["checks"] = ['mean(norm="gn") - mean(norm="bn") >= 0.5']
    (out / "study.yaml").write_text(yaml.safe_dump(study))
    code, stdout, _ = cli(capsys, "report", out)
    assert code == 0 and "verdict: not supported" in stdout
    assert json.loads((out / "verdict.json").read_text())["verdict"] == "not supported"


def test_every_run_records_steps_and_resume_adds_no_duplicates(capsys, tmp_path):
    argv = ["train", "--model", "simple_cnn", "--norm", "gn", "--dataset", SYNTH, "--batch-size", "32",
            "--log-every", "4", "--progress", "none"]
    assert cli(capsys, *argv, "--epochs", "2", "--out", tmp_path / "straight")[0] == 0
    assert cli(capsys, *argv, "--epochs", "1", "--out", tmp_path / "split")[0] == 0
    assert cli(capsys, *argv, "--epochs", "2", "--out", tmp_path / "split", "--resume")[0] == 0
    rows = [json.loads(line) for line in (tmp_path / "straight" / "steps.jsonl").read_text().splitlines()]
    # 6 steps an epoch in intervals of 4: flushed at 4 and at the epoch's end
    assert [(r["step"], r["steps"]) for r in rows] == [(4, 4), (6, 2), (10, 4), (12, 2)]
    assert [r["epoch"] for r in rows] == pytest.approx([4 / 6, 1, 10 / 6, 2])
    assert set(rows[0]) == {"step", "epoch", "loss", "lr", "steps"} and all(r["lr"] == 0.1 for r in rows)
    resumed = [json.loads(line) for line in (tmp_path / "split" / "steps.jsonl").read_text().splitlines()]
    assert resumed == rows  # the same records, none twice
    # the interval means average to the epoch's train loss (the same images and steps)
    metrics = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    first_epoch = (rows[0]["loss"] * 4 + rows[1]["loss"] * 2) / 6
    assert first_epoch == pytest.approx(metrics[0]["train_loss"], rel=1e-6)


@pytest.mark.parametrize("change, fragment", [
    ({"colour": "red"}, "unknown key 'colour'"),
    ({"verdict": {"checks": ["mean(norm=bn) > 0.5"]}}, "quote text values"),
    ({"verdict": {"checks": ["mean(width=16) > 0.5"]}}, "'width' is not a field the study sets"),
    ({"verdict": {"checks": []}}, "non-empty list 'checks'"),
    ({"seeds": "0,1"}, "'seeds' must be a non-empty list"),
    ({"grid": {"norm": []}}, "grid axis 'norm'"),
    ({"jobs": 0}, "'jobs' must be a positive integer"),
    ({"jobs": "two"}, "'jobs' must be a positive integer"),
])
def test_bad_study_files_are_one_line_and_write_nothing(capsys, tmp_path, change, fragment):
    file = write_study(tmp_path / "bad.yaml", ['mean(norm="bn") >= 0.5'])
    study = yaml.safe_load(file.read_text())
    study.update(change)
    file.write_text(yaml.safe_dump(study))
    code, _, err = cli(capsys, "study", file, "--out", tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err
    assert not (tmp_path / "out").exists()


def test_unknown_study_names_the_shipped_ones(capsys, tmp_path):
    code, _, err = cli(capsys, "study", "depht", "--out", tmp_path / "o")
    assert code == 2 and "'depht'" in err and "batch-size, depth, inits, normfree, norms" in err
    code, _, err = cli(capsys, "study", tmp_path / "missing.yaml")
    assert code == 2 and "missing.yaml" in err


def test_shipped_studies_are_valid_data_with_budgets(capsys):
    studies = shipped_studies()
    assert {"inits", "norms", "batch-size", "depth", "normfree"} <= set(studies)
    for name, study in studies.items():
        assert study.claim and study.budget_s and study.checks, name
        for check in study.checks:
            parse_check(check, grid_fields=study.fields)
        assert get_study(str(study.path)).to_dict() == study.to_dict()
    code, out, _ = cli(capsys, "list", "studies")
    assert code == 0 and "on 2 CPU cores" in out and "inits" in out


def test_sweep_prints_one_line_per_finished_run_with_its_numbers(capsys, tmp_path):
    code, _, err = cli(capsys, "sweep", "--model", "mlp", "--dataset", SYNTH, "--epochs", "1", "--batch-size", "32",
                       "--lr", "0.01,0.02", "--progress", "none", "--out", tmp_path / "sweep")
    assert code == 0
    lines = [line for line in err.splitlines() if line.startswith("[")]
    assert [line.split(":")[0] for line in lines] == ["[1/2] lr=0.01-seed=0", "[2/2] lr=0.02-seed=0"]
    summary = json.loads((tmp_path / "sweep" / "lr=0.01-seed=0" / "summary.json").read_text())
    assert f"completed, test acc {summary['final_eval_acc']:.4f}, " in lines[0] and lines[0].endswith(" s")


def _sweep_argv(out):
    return ["sweep", "--model", "mlp", "--dataset", SYNTH, "--epochs", "2", "--batch-size", "32",
            "--lr", "0.01,0.02", "--out", str(out)]


def test_runs_in_a_sweep_print_their_epochs_only_with_verbose(capsys, tmp_path):
    code, _, err = cli(capsys, *_sweep_argv(tmp_path / "quiet"))
    assert code == 0
    assert "epoch 1/2" not in err and "data:" not in err
    assert sum(line.startswith("[") for line in err.splitlines()) == 2
    code, _, err = cli(capsys, "--verbose", *_sweep_argv(tmp_path / "loud"))
    assert code == 0
    assert err.count("epoch 1/2") == 2 and err.count("epoch 2/2") == 2 and err.count("data:") == 2
    # an explicit --progress is the user's choice and is kept
    code, _, err = cli(capsys, *_sweep_argv(tmp_path / "log"), "--progress", "log")
    assert code == 0 and err.count("epoch 2/2") == 2


def _on_a_terminal(argv, cwd):
    """Run reslab with stdout and stderr on a pseudo-terminal of 100 columns; what it printed."""
    pty, fcntl, termios = (pytest.importorskip(m) for m in ("pty", "fcntl", "termios"))
    import os
    import struct
    import subprocess
    import sys

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "reslab", *argv], stdin=follower, stdout=follower,
                            stderr=follower, cwd=cwd)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=120) == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


def test_a_sweep_on_a_terminal_shows_one_bar_for_all_its_runs(tmp_path):
    shown = _on_a_terminal(_sweep_argv(tmp_path / "s"), tmp_path)
    assert "sweep:" in shown and "/2 [" in shown and "run" in shown  # tqdm's "sweep: 50%|...| 1/2 [..., s/run]"
    assert "epoch 1/2" not in shown and "step" not in shown  # no bar or line per run
    assert "[1/2] lr=0.01-seed=0: completed" in shown and "[2/2] lr=0.02-seed=0: completed" in shown


def test_a_study_runs_with_its_own_jobs_unless_told_otherwise(capsys, tmp_path, monkeypatch):
    from reslab import sweeps as sweep_module

    seen = []
    monkeypatch.setattr(sweep_module, "run_local", lambda configs, jobs, on_done: seen.append(jobs))
    file = write_study(tmp_path / "mine.yaml", ['mean(norm="bn") >= 0.5'], jobs=2)
    cli(capsys, "study", file, "--out", tmp_path / "a")
    cli(capsys, "study", file, "--out", tmp_path / "b", "--jobs", "1")
    assert seen == [2, 1]
    code, out, _ = cli(capsys, "study", file, "--print-config")
    assert code == 0 and "jobs: 2" in out


def test_lr_base_size_scales_the_rate_with_the_batch_and_the_report_says_so(capsys, tmp_path):
    code, _, err = cli(capsys, "sweep", "--model", "mlp", "--dataset", SYNTH, "--epochs", "1", "--batch-size", "32,64",
                       "--lr", "0.1", "--lr-base-size", "256", "--log-every", "1", "--out", tmp_path / "s")
    assert code == 0, err
    for batch in (32, 64):
        steps = [json.loads(line) for line in (tmp_path / "s" / f"batch_size={batch}-seed=0" / "steps.jsonl")
                 .read_text().splitlines()]
        assert [row["lr"] for row in steps] == pytest.approx([0.1 * batch / 256] * len(steps))
    assert "lr_base_size" in (tmp_path / "s" / "report.md").read_text()
    code, _, err = cli(capsys, "train", "--lr-base-size", "0", "--out", tmp_path / "bad")
    assert code == 2 and "--lr-base-size must be at least 1, got 0" in err.replace(" (a batch size)", "")
    assert not (tmp_path / "bad").exists()


def test_narrowing_an_axis_the_checks_name_to_one_value_still_judges_the_study(capsys, tmp_path):
    """`reslab study FILE --batch-size 32`: the axis the checks select on becomes a base field."""
    file = write_study(tmp_path / "mine.yaml", ['mean(norm="bn", batch_size=32) >= 0.5',
                                                'mean(norm="gn", batch_size=16) >= 0.5'],
                       grid={"norm": ["bn", "gn"], "batch_size": [32, 16]})
    code, stdout, err = cli(capsys, "study", file, "--batch-size", "32", "--seeds", "0,1", "--out", tmp_path / "one")
    assert code == 0, err
    verdict = json.loads((tmp_path / "one" / "verdict.json").read_text())
    # the batch-32 check is judged from its runs; no run has batch 16, so that one cannot be decided
    first, second = verdict["evidence"]
    assert first["n"] == {"mean(norm='bn', batch_size=32)": 2} and first["interval"] is not None
    assert second["result"] == "inconclusive" and "no run matches" in second["value"]
    assert verdict["verdict"] != "supported" and f"verdict: {verdict['verdict']}" in stdout


def test_normfree_study_runs_every_recipe_and_judges_all_its_checks(capsys, tmp_path):
    # the shipped study shrunk to one seed, one epoch and ResNet-20: every (norm, init) cell runs
    out = tmp_path / "normfree"
    code, stdout, err = cli(capsys, "study", "normfree", "--seeds", "0", "--epochs", "1", "--model", "cifar_resnet20",
                            "--out", str(out))
    assert code in (0, 1), err
    verdict = json.loads((out / "verdict.json").read_text())
    assert len(verdict["evidence"]) == 5 and verdict["verdict"] in ("supported", "not supported", "inconclusive")
    cells = sorted(p.parent.name for p in out.glob("*/summary.json"))
    # a union of two grids: BN with He init, and every recipe without a norm
    assert cells == sorted(["norm=bn-init=kaiming_normal_mode=fan_out-seed=0",
                            *(f"norm=none-init={init}-seed=0" for init in ("kaiming_normal_mode=fan_out", "fixup",
                                                                           "skipinit", "nf"))])
