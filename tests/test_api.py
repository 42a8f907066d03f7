"""The Python API mirrors the CLI: reslab.train, sweep, study, report, signal, load_run, convert_norms."""

import importlib
import pkgutil

import torch
import yaml

import reslab

SYNTH = "synthetic:train=96,test=32,size=8,channels=1,classes=4"
TINY = {"model": "simple_cnn", "dataset": SYNTH, "epochs": 1, "batch_size": 32, "lr": 0.05, "progress": "none"}


def test_the_api_names_stay_functions_after_every_submodule_is_imported():
    # a submodule named like a function (reslab/train.py) would replace reslab.train on import
    for info in pkgutil.walk_packages(reslab.__path__, "reslab."):
        importlib.import_module(info.name)
    for name in ("train", "sweep", "study", "report", "signal", "load_run", "convert_norms", "build_model",
                 "init_weights", "load_dataset", "evaluate_run"):
        value = getattr(reslab, name)
        assert callable(value) and not isinstance(value, type(reslab)), name
        assert value.__doc__, name
    assert set(reslab.__all__) >= {"train", "sweep", "study", "report", "signal", "load_run", "convert_norms",
                                   "standardize_convs", "lsuv_init", "norm_activates"}


def test_train_load_and_evaluate_a_run_from_python(tmp_path):
    result = reslab.train({**TINY, "out": str(tmp_path / "run")})
    assert result.status == "completed"
    run = reslab.load_run(tmp_path / "run")
    assert run.config.model == "simple_cnn" and run.summary == result.summary
    x = torch.zeros(2, 1, 8, 8)
    assert run.model(x).shape == (2, 4)
    assert reslab.evaluate_run(tmp_path / "run").acc == result.summary["final_eval_acc"]


def test_sweep_report_and_study_from_python(tmp_path):
    swept = reslab.sweep(TINY, {"norm": ["bn", "gn"]}, seeds=[0], out=tmp_path / "sweep", write_report=False)
    assert sorted(swept.statuses) == ["norm=bn-seed=0", "norm=gn-seed=0"]
    table = reslab.report(tmp_path / "sweep")
    assert table.fields == ["norm"] and {row["norm"] for row in table.groups} == {"bn", "gn"}
    file = tmp_path / "claim.yaml"
    file.write_text(yaml.safe_dump({"name": "tiny", "claim": "both norms beat chance", "base": TINY,
                                    "grid": {"norm": ["bn", "gn"]}, "seeds": [0],
                                    "verdict": {"checks": ['mean(norm="bn") >= 0', 'mean(norm="gn") >= 0']}}))
    judged = reslab.study(file, out=tmp_path / "study")
    assert judged.verdict.verdict == "supported" and (tmp_path / "study" / "verdict.json").is_file()
    narrowed = reslab.study(file, out=tmp_path / "narrow", base={"norm": "gn"})
    assert narrowed.study.grid == {} and narrowed.study.base["norm"] == "gn"


def test_signal_from_python():
    rows = reslab.signal("plain20", "bn", "default", batch_size=4)
    assert {(r.norm, r.init) for r in rows} == {("bn", "default")} and len(rows) >= 9  # one row per block
