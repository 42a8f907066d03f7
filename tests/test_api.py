"""The Python API mirrors the CLI: reslab.train, sweep, study, report, signal, load_run, convert_norms."""

import importlib
import json
import pkgutil
import statistics

import pytest
import torch
import yaml
from scipy import stats

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
    file.write_text(yaml.safe_dump({"name": "tiny", "claim": "BN beats chance (4 classes)", "base": TINY,
                                    "grid": {"norm": ["bn", "gn"]}, "seeds": [0, 1, 2],
                                    "verdict": {"checks": ['mean(norm="bn") > 0.25']}}))
    judged = reslab.study(file, out=tmp_path / "study", confidence=0.9)
    # the verdict is the one its evidence implies, from the three BN runs, at the confidence asked for
    saved = json.loads((tmp_path / "study" / "verdict.json").read_text())
    (check,) = saved["evidence"]
    accs = [json.loads((tmp_path / "study" / f"norm=bn-seed={s}" / "summary.json").read_text())["final_eval_acc"]
            for s in range(3)]
    low = stats.ttest_1samp(accs, 0.25).confidence_interval(0.9).low
    assert saved["confidence"] == 0.9 and check["n"] == {"mean(norm='bn')": 3}
    assert check["interval"][0] + 0.25 == pytest.approx(low) or statistics.stdev(accs) == 0
    assert judged.verdict.verdict == ("supported" if low > 0.25 else "inconclusive")
    narrowed = reslab.study(file, out=tmp_path / "narrow", base={"norm": "gn"})
    assert narrowed.study.grid == {} and narrowed.study.base["norm"] == "gn"


def test_signal_from_python():
    rows = reslab.signal("plain20", "bn", "default", batch_size=4)
    assert {(r.norm, r.init) for r in rows} == {("bn", "default")} and len(rows) >= 9  # one row per block
