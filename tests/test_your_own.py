"""A user's model file and image folder, end to end: train, load, eval, sweep, study, resume, registrations."""

import json
import shutil
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from torch import nn

import reslab
from conftest import RESIDUAL_NET
from reslab.cli import main
from reslab.errors import SpecError
from reslab.training import shows_bars

MODEL = RESIDUAL_NET

CLASSES = ["zero", "one", "two", "three"]  # digits 0-3, named


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A working directory holding ``nets.py`` and ``pics/{train,test}/<name>/*.png`` (digits 0-3)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RESLAB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "nets.py").write_text(MODEL)
    digits = load_digits()
    keep = np.flatnonzero(digits.target < 4)
    for n, i in enumerate(keep):
        folder = tmp_path / "pics" / ("test" if n % 5 == 0 else "train") / CLASSES[digits.target[i]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 255 / 16).astype("uint8")).save(folder / f"{i:04d}.png")
    return tmp_path


def _run(out, **overrides):
    return {"model": "nets.py:TinyResNet", "model_options": {"width": 8}, "dataset": "folder:pics",
            "optimizer": "adam", "lr": 0.003, "batch_size": 32, "epochs": 3, "device": "cpu", "progress": "none",
            "out": str(out), **overrides}


def test_a_model_file_on_an_image_folder_trains_loads_and_evaluates(project, capsys):
    result = reslab.train(_run(project / "runs/gn", norm="gn"))
    assert result.status == "completed"
    assert result.summary["final_eval_acc"] > 0.6  # 4 classes: chance is 0.25
    run = reslab.load_run(project / "runs/gn")
    kinds = {type(m) for m in run.model.modules()}
    assert nn.GroupNorm in kinds and not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds)
    assert json.loads((project / "runs/gn/classes.json").read_text()) == sorted(CLASSES)  # ImageFolder order
    assert main(["eval", str(project / "runs/gn")]) == 0
    assert f"acc {result.summary['final_eval_acc']:.4f}" in capsys.readouterr().out


@pytest.mark.slow
def test_a_sweep_over_norms_and_a_resume_of_a_model_file_on_an_image_folder(project):
    swept = reslab.sweep(_run(project / "unused", epochs=1), {"norm": ["bn", "gn", "none"]}, out=project / "sweep")
    assert set(swept.statuses.values()) == {"completed"} and len(swept.runs) == 3
    report = (project / "sweep/report.md").read_text()
    assert "Classes (4): `one`, `three`, `two`, `zero`." in report
    first = reslab.train(_run(project / "runs/r", epochs=1))
    assert first.summary["epochs_completed"] == 1
    resumed = reslab.train(_run(project / "runs/r", epochs=2, resume=True))
    assert resumed.status == "completed" and [m["epoch"] for m in resumed.metrics] == [1, 2]
    (project / "nets.py").write_text(MODEL + "\n# changed\n")
    with pytest.raises(SpecError, match=r"its model source .*nets.py changed since it was trained"):
        reslab.train(_run(project / "runs/r", epochs=3, resume=True))


@pytest.mark.slow
def test_a_study_over_a_model_file_and_an_image_folder_prints_its_table_and_verdict(project, capsys):
    claim = {"name": "mine", "claim": "SmallNet beats chance on four digits",
             "base": {k: v for k, v in _run(project / "x").items() if k != "out"},
             "grid": {"norm": ["bn", "gn"]}, "seeds": [0, 1, 2],
             "verdict": {"checks": ['min(mean(norm="bn"), mean(norm="gn")) > 0.25']}}
    (project / "claim.yaml").write_text(json.dumps(claim))
    judged = reslab.study("claim.yaml", out=project / "study")
    out = capsys.readouterr().out
    assert judged.verdict.verdict == "supported", out
    assert "supported" in out and "norm" in out and "bn" in out and "gn" in out  # the table, then the verdict
    reslab.study("claim.yaml", out=project / "study", quiet=True)  # every run reused; nothing printed
    assert capsys.readouterr().out == ""


REGISTRATION = '''
import numpy as np
import reslab


@reslab.register_dataset
def noisy_bars(*, n: int = 96):
    """Vertical against horizontal bars, 8x8."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 60, size=(n, 8, 8)).astype("uint8")
    y = np.arange(n) % 2
    x[y == 0, :, 3:5] = 255
    x[y == 1, 3:5, :] = 255
    return {"x_train": x[: n * 3 // 4], "y_train": y[: n * 3 // 4], "x_test": x[n * 3 // 4:],
            "y_test": y[n * 3 // 4:], "classes": ["vertical", "horizontal"]}
'''


@pytest.mark.slow
def test_a_run_on_a_registered_dataset_is_evaluated_from_a_fresh_process(project):
    (project / "mydata.py").write_text(REGISTRATION)
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(project)!r})
        import mydata, reslab
        reslab.train({json.dumps(_run(project / "runs/bars", dataset="noisy_bars:n=64", epochs=2))})
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=project, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    sources = json.loads((project / "runs/bars/sources.json").read_text())
    assert sources["dataset"]["module"] == "mydata" and sources["model"]["spec"] == "nets.py:TinyResNet"
    summary = json.loads((project / "runs/bars/summary.json").read_text())
    # a fresh shell: mydata is importable from the working directory, and eval imports it again
    evaluated = subprocess.run([sys.executable, "-m", "reslab", "eval", str(project / "runs/bars")], cwd=project,
                               capture_output=True, text=True)
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"acc {summary['final_eval_acc']:.4f}" in evaluated.stdout
    # a registration made in a script cannot be imported again: one line says so
    (project / "script.py").write_text(REGISTRATION.replace("noisy_bars", "script_bars") + textwrap.dedent(f"""
        reslab.train({json.dumps(_run(project / "runs/script", dataset="script_bars", epochs=1))})
    """))
    assert subprocess.run([sys.executable, "script.py"], cwd=project, capture_output=True).returncode == 0
    refused = subprocess.run([sys.executable, "-m", "reslab", "eval", str(project / "runs/script")], cwd=project,
                             capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert "dataset 'script_bars' was registered by the script" in refused.stderr
    assert "register it in a module" in refused.stderr


def test_bars_show_on_a_terminal_and_in_a_notebook_only(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    assert not shows_bars()

    class ZMQInteractiveShell:  # the shell a Jupyter kernel runs
        pass

    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=ZMQInteractiveShell))
    assert shows_bars()

    class TerminalInteractiveShell:  # plain IPython in a pipe: no bars
        pass

    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=TerminalInteractiveShell))
    assert not shows_bars()


def test_a_single_class_tree_trains_with_val_split_and_eval_names_the_splits_it_has(project, capsys):
    for folder in (project / "pics/train").iterdir():  # one <class>/ tree: no train/ and test/
        folder.rename(project / "pics" / folder.name)
    (project / "pics/train").rmdir()
    shutil.rmtree(project / "pics/test")
    result = reslab.train(_run(project / "runs/tree", epochs=1, val_split=0.25))
    assert result.status == "completed" and result.summary["num_eval"] > 0
    assert main(["eval", str(project / "runs/tree"), "--split", "test"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--split test: dataset 'folder:pics' has no test split" in err and "valid choices for it: val, train" in err
    assert err.count("\n") == 0
    assert main(["eval", str(project / "runs/tree")]) == 0  # its own split: the held-out images
    assert f"acc {result.summary['final_eval_acc']:.4f}" in capsys.readouterr().out
