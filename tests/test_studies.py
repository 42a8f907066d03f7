"""Studies as data: a user's YAML claim runs, is judged from its runs and reported; per-step records."""

import json

import pytest
import yaml

from reslab.cli import main
from reslab.studies import get_study, shipped_studies
from reslab.verdict import parse_check


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def write_study(tiny_config):
    """``write_study(path, checks, **extra)``: a study of the tiny run, two epochs, BN against GN over seeds 0 and
    1, as a YAML file at ``path``; ``extra`` replaces or adds its keys."""

    def write(path, checks, **extra):
        base = tiny_config(epochs=2, log_every=2)
        study = {"name": "tiny-norms", "claim": "GN and BN both learn the synthetic task", "base": base,
                 "grid": {"norm": ["bn", "gn"]}, "seeds": [0, 1], "verdict": {"checks": checks}, **extra}
        path.write_text(yaml.safe_dump(study, sort_keys=False))
        return path

    return write


@pytest.mark.slow
def test_a_users_study_file_runs_and_is_judged_from_its_runs(capsys, tmp_path, write_study):
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


@pytest.mark.slow
def test_every_run_records_steps_and_resume_adds_no_duplicates(capsys, tmp_path, synthetic):
    argv = ["train", "--model", "simple_cnn", "--norm", "gn", "--dataset", synthetic, "--batch-size", "32",
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
    ({"confidence": 1.5}, "'confidence' must be a number between 0.5 and 1"),
    ({"confidence": "high"}, "'confidence' must be a number between 0.5 and 1"),
    ({"verdict": {"checks": ['mean(norm="bn") >= 0.5'], "paired": "yes"}}, "'verdict.paired' must be true or false"),
    ({"reference": {"groups": [{"norm": "ln", "value": 0.9}]}}, "reference group {'norm': 'ln'} is not a group"),
    ({"reference": {"groups": [{"norm": "bn", "value": "high"}]}}, "must be a number or [low, high]"),
    ({"reference": {"groups": [{"norm": "bn", "value": 0.9}], "colour": 1}}, "unknown reference key 'colour'"),
    ({"measure": ["bn_hist"]}, "unknown measurement 'bn_hist'; valid: bn_running_var"),
    ({"grid": [{"norm": ["bn"]}, "gn"]}, "'grid' must be a mapping"),
])
def test_bad_study_files_are_one_line_and_write_nothing(capsys, tmp_path, write_study, change, fragment):
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


def test_sweep_prints_one_line_per_finished_run_with_its_numbers(capsys, tmp_path, synthetic):
    code, _, err = cli(capsys, "sweep", "--model", "mlp", "--dataset", synthetic, "--epochs", "1", "--batch-size", "32",
                       "--lr", "0.01,0.02", "--progress", "none", "--out", tmp_path / "sweep")
    assert code == 0
    lines = [line for line in err.splitlines() if line.startswith("[")]
    assert [line.split(":")[0] for line in lines] == ["[1/2] lr=0.01-seed=0", "[2/2] lr=0.02-seed=0"]
    summary = json.loads((tmp_path / "sweep" / "lr=0.01-seed=0" / "summary.json").read_text())
    assert f"completed, test acc {summary['final_eval_acc']:.4f}, " in lines[0] and lines[0].endswith(" s")


def _sweep_argv(out, dataset):
    return ["sweep", "--model", "mlp", "--dataset", dataset, "--epochs", "2", "--batch-size", "32",
            "--lr", "0.01,0.02", "--out", str(out)]


@pytest.mark.slow
def test_runs_in_a_sweep_print_their_epochs_only_with_verbose(capsys, tmp_path, synthetic):
    code, _, err = cli(capsys, *_sweep_argv(tmp_path / "quiet", synthetic))
    assert code == 0
    assert "epoch 1/2" not in err and "data:" not in err
    assert sum(line.startswith("[") for line in err.splitlines()) == 2
    code, _, err = cli(capsys, "--verbose", *_sweep_argv(tmp_path / "loud", synthetic))
    assert code == 0
    assert err.count("epoch 1/2") == 2 and err.count("epoch 2/2") == 2 and err.count("data:") == 2
    # an explicit --progress is the user's choice and is kept
    code, _, err = cli(capsys, *_sweep_argv(tmp_path / "log", synthetic), "--progress", "log")
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


@pytest.mark.slow
def test_a_sweep_on_a_terminal_shows_one_bar_for_all_its_runs(tmp_path, synthetic):
    shown = _on_a_terminal(_sweep_argv(tmp_path / "s", synthetic), tmp_path)
    assert "sweep:" in shown and "/2 [" in shown and "run" in shown  # tqdm's "sweep: 50%|...| 1/2 [..., s/run]"
    assert "epoch 1/2" not in shown and "step" not in shown  # no bar or line per run
    assert "[1/2] lr=0.01-seed=0: completed" in shown and "[2/2] lr=0.02-seed=0: completed" in shown


def test_a_study_runs_with_its_own_jobs_unless_told_otherwise(capsys, tmp_path, write_study, monkeypatch):
    from reslab import sweeps as sweep_module

    seen = []
    monkeypatch.setattr(sweep_module, "run_local", lambda configs, jobs, on_done: seen.append(jobs))
    file = write_study(tmp_path / "mine.yaml", ['mean(norm="bn") >= 0.5'], jobs=2)
    cli(capsys, "study", file, "--out", tmp_path / "a")
    cli(capsys, "study", file, "--out", tmp_path / "b", "--jobs", "1")
    assert seen == [2, 1]
    code, out, _ = cli(capsys, "study", file, "--print-config")
    assert code == 0 and "jobs: 2" in out


def test_lr_base_size_scales_the_rate_with_the_batch_and_the_report_says_so(capsys, tmp_path, synthetic):
    code, _, err = cli(capsys, "sweep", "--model", "mlp", "--dataset", synthetic, "--epochs", "1",
                       "--batch-size", "32,64", "--lr", "0.1", "--lr-base-size", "256", "--log-every", "1",
                       "--out", tmp_path / "s")
    assert code == 0, err
    for batch in (32, 64):
        steps = [json.loads(line) for line in (tmp_path / "s" / f"batch_size={batch}-seed=0" / "steps.jsonl")
                 .read_text().splitlines()]
        assert [row["lr"] for row in steps] == pytest.approx([0.1 * batch / 256] * len(steps))
    assert "lr_base_size" in (tmp_path / "s" / "report.md").read_text()
    code, _, err = cli(capsys, "train", "--lr-base-size", "0", "--out", tmp_path / "bad")
    assert code == 2 and "--lr-base-size must be at least 1, got 0" in err.replace(" (a batch size)", "")
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_narrowing_an_axis_the_checks_name_to_one_value_still_judges_the_study(capsys, tmp_path, write_study):
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


@pytest.mark.slow
def test_normfree_study_runs_every_recipe_and_judges_all_its_checks(capsys, tmp_path):
    # the shipped study shrunk to one seed, one epoch and ResNet-20: every (norm, init) cell runs
    out = tmp_path / "normfree"
    code, stdout, err = cli(capsys, "study", "normfree", "--seeds", "0", "--epochs", "1", "--model", "cifar_resnet20",
                            "--out", str(out))
    assert code in (0, 1), err
    verdict = json.loads((out / "verdict.json").read_text())
    assert len(verdict["evidence"]) == 4 and verdict["verdict"] in ("supported", "not supported", "inconclusive")
    cells = sorted(p.parent.name for p in out.glob("*/summary.json"))
    # a union of two grids: BN with He init, and every recipe without a norm
    assert cells == sorted(["norm=bn-init=kaiming_normal_mode=fan_out-seed=0",
                            *(f"norm=none-init={init}-seed=0" for init in ("kaiming_normal_mode=fan_out", "fixup",
                                                                           "skipinit", "nf"))])


@pytest.mark.parametrize("argv, fragment", [
    (["--seeds", "3-1"], "bad range '3-1' in --seeds: it runs backwards; write 1-3"),
    (["--seeds", "0-x"], "expected integers and ranges"),
    (["--seeds", "0-2,2"], "repeats a seed"),
    (["--confidence", "1.5"], "--confidence must be a number between 0.5 and 1"),
    (["--confidence", "0.3"], "--confidence must be a number between 0.5 and 1"),
])
def test_bad_study_flags_are_one_line_and_write_nothing(capsys, tmp_path, write_study, argv, fragment):
    file = write_study(tmp_path / "mine.yaml", ['mean(norm="bn") >= 0.5'])
    code, _, err = cli(capsys, "study", file, *argv, "--out", tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_verdict_rejudges_a_finished_study_and_added_seeds_reuse_its_runs(capsys, tmp_path, write_study):
    file = write_study(tmp_path / "mine.yaml", ['mean(norm="bn") >= 0.3', 'mean(norm="gn") >= 0.3'])
    out = tmp_path / "study"
    code, stdout, err = cli(capsys, "study", file, "--seeds", "0-2", "--out", out)
    assert code == 0, err
    assert "study tiny-norms took" in stdout
    runs = sorted(p.parent.name for p in out.glob("*/summary.json"))
    assert runs == [f"norm={n}-seed={s}" for n in ("bn", "gn") for s in range(3)]
    first = json.loads((out / "verdict.json").read_text())
    assert first["confidence"] == 0.95 and all(e["interval"] for e in first["evidence"])
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoint.pt")}

    # the same runs judged at another confidence: no training, a wider interval
    code, stdout, err = cli(capsys, "verdict", out, "--confidence", "0.999")
    assert code == 0, err
    assert "at 99.9% confidence" in stdout and {p: p.stat().st_mtime_ns for p in stamps} == stamps
    again = json.loads((out / "verdict.json").read_text())
    assert again["confidence"] == 0.999
    # (a group whose seeds agree has no width)
    for before, after in zip(first["evidence"], again["evidence"], strict=True):
        assert after["interval"][0] <= before["interval"][0] and after["interval"][1] >= before["interval"][1]
    assert "99.9% confidence" in (out / "report.md").read_text()

    # two more seeds: only their runs train
    code, _, err = cli(capsys, "study", file, "--seeds", "0-4", "--out", out)
    assert code == 0, err
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert len(list(out.glob("*/summary.json"))) == 10
    assert all(e["n"] == {k: 5 for k in e["n"]} for e in json.loads((out / "verdict.json").read_text())["evidence"])


def test_verdict_on_a_folder_without_a_study_is_one_line(capsys, tmp_path):
    code, _, err = cli(capsys, "verdict", tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "holds no study.yaml" in err
    assert list(tmp_path.iterdir()) == []
    code, _, err = cli(capsys, "verdict", tmp_path / "nowhere")
    assert code == 2 and "is not a directory" in err
    code, _, err = cli(capsys, "verdict", tmp_path, "--confidence", "2")
    assert code == 2 and "--confidence must be a number between 0.5 and 1" in err


@pytest.mark.slow
def test_a_union_grid_runs_each_point_once_and_reports_references_and_measurements(capsys, tmp_path, write_study):
    file = write_study(tmp_path / "union.yaml", ['mean(norm="bn", batch_size=32) >= 0.3'],
                       grid=[{"norm": ["bn", "gn"], "batch_size": [32]}, {"norm": ["bn"], "batch_size": [32, 64]}],
                       reference={"source": "a paper", "dataset": "CIFAR-10",
                                  "groups": [{"norm": "bn", "batch_size": 64, "value": 0.9}]},
                       measure=["bn_running_var"])
    out = tmp_path / "union"
    code, stdout, err = cli(capsys, "study", file, "--out", out)
    assert code == 0, err
    runs = sorted(p.parent.name for p in out.glob("*/summary.json"))
    assert runs == sorted(f"norm={n}-batch_size={b}-seed={s}" for n, b in (("bn", 32), ("gn", 32), ("bn", 64))
                          for s in (0, 1))
    measured = json.loads((out / "measurements.json").read_text())
    assert [row[:2] for row in measured[0]["rows"]] == [["bn", 32], ["bn", 64]]
    md = (out / "report.md").read_text()
    assert md.startswith("# reslab report: study tiny-norms") and "## Measurements" in md
    assert "source %" in md and "90" in md and "CIFAR-10" in md
    # narrowing the study to batch 32 leaves no referenced group: the reference goes with it
    code, _, err = cli(capsys, "study", file, "--batch-size", "32", "--out", tmp_path / "narrow")
    assert code == 0, err
    assert "reference" not in yaml.safe_load((tmp_path / "narrow" / "study.yaml").read_text())


def test_shipped_studies_judge_with_inference_and_carry_their_sources_numbers():
    studies = shipped_studies()
    inits = studies["inits"].reference
    assert inits["dataset"] == "FashionMNIST"
    by_init = {g["where"]["init"]: g["value"] for g in inits["groups"]}
    assert by_init["zeros"] == 0.09625 and by_init["rule_uniform"] == [0.85208, 0.85775]
    for study in studies.values():
        assert study.confidence == 0.95
        assert len(study.seeds) >= 3, study.name  # two seeds cannot give a t interval worth the name
    assert "frac(" in " ".join(studies["normfree"].checks)
