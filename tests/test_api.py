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
from reslab.diagnose import signal_propagation


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


def test_train_load_and_evaluate_a_run_from_python(tmp_path, tiny_config, synthetic):
    out = tmp_path / "run"
    result = reslab.train(tiny_config(out))
    assert result.status == "completed" and result.out == out
    (epoch,) = result.metrics  # one epoch: one metrics row, the one the summary quotes
    assert result.summary["epochs_completed"] == 1 and result.summary["final_eval_acc"] == epoch["eval_acc"]
    run = reslab.load_run(out)
    assert run.config == result.config and run.summary == result.summary and run.metrics == result.metrics
    # the loaded model is the trained one: on the test split it scores what training measured
    data = reslab.load_dataset(synthetic)
    assert data.num_classes == 4
    correct = 0
    with torch.no_grad():
        for x, y in data.eval_batches(32, channels_last=run.channels_last):
            logits = run.model(x)
            assert logits.shape == (len(y), 4)
            correct += int((logits.argmax(1) == y).sum())
    assert correct / data.num_eval == pytest.approx(epoch["eval_acc"], abs=1e-12)
    evaluation = reslab.evaluate_run(out)
    assert evaluation.acc == pytest.approx(epoch["eval_acc"], abs=1e-12) and evaluation.images == data.num_eval
    assert evaluation.loss == pytest.approx(epoch["eval_loss"], rel=1e-5)


@pytest.mark.slow
def test_sweep_report_and_study_from_python(tmp_path, tiny_config):
    base = tiny_config()
    swept = reslab.sweep(base, {"norm": ["bn", "gn"]}, seeds=[0], out=tmp_path / "sweep", write_report=False)
    assert swept.statuses == {"norm=bn-seed=0": "completed", "norm=gn-seed=0": "completed"}
    table = reslab.report(tmp_path / "sweep")
    assert table.fields == ["norm"] and {row["norm"] for row in table.groups} == {"bn", "gn"}
    for row in table.groups:  # one run per group: its mean is that run's accuracy
        (run,) = [r for r in swept.runs if r.config.norm == row["norm"]]
        assert row["n"] == row["completed"] == 1 and row["eval_acc_mean"] == run.summary["final_eval_acc"]
    file = tmp_path / "claim.yaml"
    file.write_text(yaml.safe_dump({"name": "tiny", "claim": "BN beats chance (4 classes)", "base": base,
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
    # plain20's points: the stem and its 18 conv-norm-ReLU layers, in forward order
    assert [r.name for r in rows][:3] == ["stem", "layer1.0.conv1", "layer1.0.conv2"] and len(rows) == 19
    assert {(r.norm, r.init) for r in rows} == {("bn", "default")}
    # BN feeds each ReLU a unit-variance input: E[relu(z)^2] <= 1 at every depth, and gradients reach the stem
    assert all(0 < r.act_second_moment <= 1 + 1e-6 for r in rows) and rows[0].grad_std > 0
    assert rows == signal_propagation("plain20", "bn", "default", batch_size=4)  # the same seed, the same numbers
