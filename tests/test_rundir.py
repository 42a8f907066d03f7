"""The run directory: one module owns its layout, no import cycles, load_run and `reslab eval`."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch

import reslab
from reslab.cli import main
from reslab.config import TrainConfig
from reslab.errors import SpecError
from reslab.evaluate import load_run
from reslab.rundir import CHECKPOINT_FILE, CONFIG_FILE, MODEL_STATE, Run, RunDir, read_summary, run_status
from reslab.training import train

DATASET = "synthetic:train=192,test=64,size=8,channels=1,classes=4,noise=120"
TINY = {"model": "simple_cnn", "dataset": DATASET, "epochs": 1, "batch_size": 32, "progress": "none"}


# --- import cycles -------------------------------------------------------------------------------


def _module_names(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package in ``root``: dotted name -> file."""
    names = {}
    for file in sorted(root.rglob("*.py")):
        parts = [package, *file.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = file
    return names


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The longest module name that ``name`` (a module or a name inside one) starts with."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, file: Path, modules: dict[str, Path], package: str) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its file (top level, functions, relative or
    absolute)."""
    is_package = file.name == "__init__.py"
    here = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            # `from pkg import name`: the submodule pkg.name where there is one, else pkg itself
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            owner = _owner(target, modules) if target.split(".")[0] == package else None
            if owner is None or owner == module:
                continue
            if is_package and owner.startswith(module + "."):
                continue  # a package loading its own submodules (registration, re-exports): no dependency back
            found.add(owner)
    return found


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """module -> the package's modules it imports, for every module of the package in ``root``."""
    modules = _module_names(root, package)
    return {name: _imports(name, file, modules, package) for name, file in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that starts and ends at the same module, or None if there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_no_reslab_module_imports_one_that_imports_it_back():
    graph = import_graph(Path(reslab.__file__).parent, "reslab")
    assert {"reslab.rundir", "reslab.reporting", "reslab.sweeps", "reslab.training"} <= graph.keys()
    assert "reslab.rundir" in graph["reslab.reporting"] and "reslab.rundir" in graph["reslab.sweeps"]
    assert "reslab.reporting" in graph["reslab.sweeps"]  # the sweep writes its report: the one direction left
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import a\n")
    (pkg / "a.py").write_text("from .sub.b import thing\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    import pkg.c\n")
    (pkg / "c.py").write_text("def g():\n    from . import a\n")
    graph = import_graph(pkg, "pkg")
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg"] == set()
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    (pkg / "c.py").write_text("import os\n")
    assert find_cycle(import_graph(pkg, "pkg")) is None


def test_old_module_names_still_import():
    from reslab import reporting as report
    from reslab import rundir
    from reslab import sweeps as sweep
    from reslab import training as train_module

    for name in ("CONFIG_FILE", "METRICS_FILE", "CHECKPOINT_FILE", "SUMMARY_FILE", "STEPS_FILE", "read_summary"):
        assert getattr(train_module, name) is getattr(rundir, name)
    assert sweep.run_status is rundir.run_status and report.CONFIG_FILE == rundir.CONFIG_FILE


# --- one object writes and reads a run directory -------------------------------------------------


def test_run_dir_writes_the_records_it_reads_back(tmp_path, tiny_config):
    run_dir = RunDir(tmp_path / "run")
    cfg = TrainConfig(**tiny_config(run_dir.path))
    assert not run_dir.is_run() and not run_dir.holds_files() and run_dir.missing() == [CONFIG_FILE, CHECKPOINT_FILE]
    run_dir.write_config(cfg, {"world_size": 2})
    assert run_dir.read_config() == cfg and "# world_size: 2\n" in run_dir.file(CONFIG_FILE).read_text()
    run_dir.append_metrics({"epoch": 1}, {"epoch": 2})
    run_dir.append_steps(*[{"step": s} for s in (5, 10, 15)])
    run_dir.append_steps()  # an epoch that logged nothing leaves the file as it is
    run_dir.save_checkpoint({MODEL_STATE: {"w": torch.ones(2)}, "epoch": 1})
    assert run_dir.read_checkpoint()["epoch"] == 1 and run_dir.missing() == []
    planned = run_dir.read()
    assert planned.summary is None and planned.status == "incomplete" and planned.run_id == "run"
    # a resume from the checkpoint after epoch 1, step 10: what came later is about to be redone
    assert run_dir.keep_records_until(1, 10) == ([{"epoch": 1}], [{"step": 5}, {"step": 10}])
    run_dir.write_summary({"status": "completed", "final_eval_acc": 0.5, "eval_split": "test", "wall_time_s": 2.0})
    assert run_dir.status() == run_status(run_dir.path) == "completed"
    assert run_dir.numbers() == ", test acc 0.5000, 2.0 s"
    assert Run.read(run_dir.path) == run_dir.read() == Run(path=run_dir.path, config=cfg, summary=read_summary(
        run_dir.path), metrics=[{"epoch": 1}], steps=[{"step": 5}, {"step": 10}])
    assert sorted(p.name for p in run_dir.path.iterdir()) == sorted(
        [CONFIG_FILE, CHECKPOINT_FILE, "metrics.jsonl", "steps.jsonl", "summary.json"])  # no temp files left


# --- load_run and reslab eval -------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    cfg = TrainConfig(**TINY, out=str(out))
    return cfg, train(cfg)


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "val"
    return train(TrainConfig(**TINY, val_split=0.25, out=str(out)))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _eval(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["eval", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_load_run_gives_the_config_records_and_checkpoint_weights(finished):
    cfg, result = finished
    run = load_run(result.out)
    assert run.path == result.out and run.config == cfg
    assert run.summary == json.loads(json.dumps(result.summary)) == read_summary(result.out)
    assert [row["epoch"] for row in run.metrics] == [1] and run.steps and run.steps[-1]["step"] == 6
    state = torch.load(result.out / CHECKPOINT_FILE, weights_only=True)[MODEL_STATE]
    loaded = run.model.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert not run.model.training and all(p.device.type == "cpu" for p in run.model.parameters())
    assert run.channels_last is result.channels_last is result.summary["channels_last"]
    # one record of a run: what train returned is what load_run reads back, less the model
    assert type(result) is Run and type(run) is Run and result.model is None and reslab.LoadedRun is Run
    assert (result.status, result.metrics, result.steps) == (run.status, run.metrics, run.steps)


def test_load_run_refuses_a_directory_that_is_not_a_run(tmp_path, finished):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match=r"'.*empty' is not a run directory: no config.yaml and no checkpoint.pt$"):
        load_run(tmp_path / "empty")
    started = tmp_path / "started"
    started.mkdir()
    (started / CONFIG_FILE).write_bytes((finished[1].out / CONFIG_FILE).read_bytes())
    with pytest.raises(SpecError, match=r"no checkpoint.pt \(the run has not completed an epoch\)"):
        load_run(started)
    (started / CHECKPOINT_FILE).write_bytes(b"torn")
    with pytest.raises(SpecError, match=r"checkpoint.pt' is unreadable"):
        load_run(started)


def test_eval_reproduces_the_runs_final_numbers_and_writes_nothing_into_it(finished, tmp_path, capsys):
    _, result = finished
    before = _snapshot(result.out)
    code, out, err = _eval(capsys, str(result.out), "--device", "cpu", "--out", str(tmp_path / "eval.json"))
    assert code == 0 and err == ""
    numbers = json.loads((tmp_path / "eval.json").read_text())
    final = json.loads((result.out / "metrics.jsonl").read_text().splitlines()[-1])
    assert numbers["acc"] == result.summary["final_eval_acc"] == final["eval_acc"]  # exactly
    assert 0 < numbers["acc"] < 1 and numbers["loss"] == pytest.approx(final["eval_loss"], rel=1e-9)
    assert numbers["images"] == 64 and numbers["split"] == "test" and numbers["dataset"] == DATASET
    assert out == (f"loss {numbers['loss']:.4f}  acc {numbers['acc']:.4f}  "
                   f"(64 images, split test, dataset {DATASET})\n")
    assert _snapshot(result.out) == before and run_status(result.out) == "completed"


def test_eval_on_train_split_uses_the_unaugmented_train_images(finished, capsys):
    _, result = finished
    code, out, _ = _eval(capsys, str(result.out), "--split", "train", "--eval-batch-size", "50", "--device", "cpu")
    assert code == 0 and out.endswith(f"(192 images, split train, dataset {DATASET})\n")


@pytest.mark.parametrize("argv, message", [
    ([], "is not a run directory: no config.yaml and no checkpoint.pt"),
    (["--split", "val"], "--split val: the run in .* was trained without --val-split"),
    (["--split", "holdout"], "unknown --split 'holdout'; valid choices: test, train, val"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be a positive integer, got 0"),
    (["--dataset", DATASET.replace("channels=1", "channels=3")], "has 3x8x8 images in 4 classes; the run's model "
                                                                "takes 1x8x8 images in 4 classes"),
    (["--out", CONFIG_FILE], "would overwrite the run's own config.yaml"),
])
def test_eval_bad_input_is_one_line_and_exit_2(finished, tmp_path, capsys, monkeypatch, argv, message):
    _, result = finished
    directory = tmp_path if not argv else result.out
    if argv[:1] == ["--out"]:
        monkeypatch.chdir(result.out)
        directory = "."
    before = _snapshot(result.out)
    code, out, err = _eval(capsys, str(directory), "--device", "cpu", *argv)
    assert code == 2 and out == "" and err.count("\n") == 1 and re.search(message, err), err
    assert _snapshot(result.out) == before


def test_eval_on_the_held_out_split_reproduces_the_validation_accuracy(validated, tmp_path, capsys):
    result = validated
    assert result.summary["eval_split"] == "val" and result.summary["num_eval"] == 48
    for argv in ([], ["--split", "val"]):
        code, _, err = _eval(capsys, str(result.out), *argv, "--device", "cpu", "--out", str(tmp_path / "val.json"))
        numbers = json.loads((tmp_path / "val.json").read_text())
        assert code == 0 and err == "" and numbers["split"] == "val" and numbers["images"] == 48
        assert numbers["acc"] == result.summary["final_eval_acc"] == result.summary["best_eval_acc"]
    code, out, _ = _eval(capsys, str(result.out), "--split", "test", "--device", "cpu")
    assert code == 0 and "(64 images, split test," in out
    code, out, _ = _eval(capsys, str(result.out), "--split", "train", "--device", "cpu")
    assert code == 0 and "(144 images, split train," in out  # the 192 - 48 the run trained on

