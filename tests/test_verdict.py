"""The verdict logic on synthetic study results: supported, not supported, inconclusive, diverged."""

import pytest

from reslab.errors import SpecError
from reslab.verdict import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, Interval, RunResult, evaluate, parse_check

BATCH_CLAIM = [
    'mean(norm="bn", batch_size=32) - mean(norm="bn", batch_size=2) >= 0.10',
    'abs(mean(norm="gn", batch_size=32) - mean(norm="gn", batch_size=2)) < 0.03',
]


def runs(table, metric="final_eval_acc"):
    """{(norm, batch): [acc or 'diverged', ...]} -> RunResults."""
    out = []
    for (norm, batch), values in table.items():
        for value in values:
            if value in ("diverged", "failed"):
                out.append(RunResult({"norm": norm, "batch_size": batch}, value, {metric: None}))
            else:
                out.append(RunResult({"norm": norm, "batch_size": batch}, "completed", {metric: value}))
    return out


def test_supported_when_every_check_holds_beyond_the_seeds_spread():
    v = evaluate("batch-size", "BN degrades, GN does not", BATCH_CLAIM, runs({
        ("bn", 32): [0.95, 0.96], ("bn", 2): [0.70, 0.72], ("gn", 32): [0.93, 0.94], ("gn", 2): [0.93, 0.935]}))
    assert v.verdict == SUPPORTED
    first, second = v.evidence
    assert first.result == second.result == "holds"
    # the numbers that decided it: 0.955 - 0.71, with the two stds (0.00707, 0.01414) added up
    assert first.value == "0.245 ± 0.02121 vs 0.1"
    assert [t["term"] for t in first.terms] == ["mean(norm='bn', batch_size=32)", "mean(norm='bn', batch_size=2)"]
    assert v.to_dict()["evidence"][0]["check"] == BATCH_CLAIM[0]


def test_not_supported_when_a_check_fails_beyond_the_spread():
    v = evaluate("batch-size", "claim", BATCH_CLAIM, runs({
        ("bn", 32): [0.95, 0.95], ("bn", 2): [0.94, 0.94], ("gn", 32): [0.93, 0.93], ("gn", 2): [0.93, 0.93]}))
    assert v.verdict == NOT_SUPPORTED and v.evidence[0].result == "fails" and v.evidence[1].result == "holds"


def test_inconclusive_when_the_gap_is_inside_the_seeds_spread():
    # BN's drop is 0.11 on average but the seeds scatter by ~0.05 each: the interval straddles 0.10
    v = evaluate("batch-size", "claim", BATCH_CLAIM, runs({
        ("bn", 32): [0.90, 0.97], ("bn", 2): [0.80, 0.85], ("gn", 32): [0.93, 0.93], ("gn", 2): [0.93, 0.93]}))
    assert v.verdict == INCONCLUSIVE and v.evidence[0].result == "inconclusive"


def test_a_failing_check_outweighs_an_inconclusive_one():
    v = evaluate("batch-size", "claim", BATCH_CLAIM, runs({
        ("bn", 32): [0.90, 0.97], ("bn", 2): [0.80, 0.85], ("gn", 32): [0.95, 0.95], ("gn", 2): [0.60, 0.60]}))
    assert v.verdict == NOT_SUPPORTED


def test_diverged_runs_make_a_mean_undefined_and_can_be_claimed_directly():
    table = {("bn", 32): [0.95, 0.96], ("none", 32): [0.5, "diverged"]}
    v = evaluate("norms", "claim", ['mean(norm="bn") - mean(norm="none") >= 0.1'], runs(table))
    assert v.verdict == INCONCLUSIVE and "did not finish" in v.evidence[0].terms[1]["value"]
    # a claim that expects divergence counts it exactly, and 'or' is three-valued
    check = 'diverged(norm="none") >= 1 or mean(norm="bn") - mean(norm="none") >= 0.1'
    assert evaluate("norms", "claim", [check], runs(table)).verdict == SUPPORTED
    all_done = {("bn", 32): [0.95, 0.96], ("none", 32): [0.94, 0.95]}
    assert evaluate("norms", "claim", [check], runs(all_done)).verdict == NOT_SUPPORTED
    assert evaluate("norms", "claim", ['diverged(norm="none") <= 0'], runs(all_done)).verdict == SUPPORTED


def test_other_metrics_counts_and_pooled_groups():
    rows = [RunResult({"model": m, "seed": s}, "completed", {"final_train_loss": loss, "final_eval_acc": 0.9})
            for m, s, loss in [("plain20", 0, 0.10), ("plain20", 1, 0.12), ("plain56", 0, 0.50), ("plain56", 1, 0.55)]]
    v = evaluate("depth", "claim", ['mean(model="plain56", metric="final_train_loss") > '
                                    'mean(model="plain20", metric="final_train_loss") + 0.2',
                                    'n(model="plain20") >= 2', 'completed() >= 4'], rows)
    assert v.verdict == SUPPORTED
    assert evaluate("depth", "claim", ["mean() >= 0.95"], rows).verdict == NOT_SUPPORTED


def test_interval_arithmetic():
    a, b = Interval(1, 2), Interval(3, 5)
    assert (a - b) == Interval(-4, -1) and (a + b) == Interval(4, 7) and abs(Interval(-1, 3)) == Interval(0, 3)
    assert (a * Interval(-1, 1)) == Interval(-2, 2)
    assert not (a / Interval(-1, 1)).defined


@pytest.mark.parametrize("text, fragment", [
    ("mean(norm=bn) > 0.9", "quote"),
    ("mean(norm='bn')", "compares nothing"),
    ("median(norm='bn') > 0.5", "unknown function 'median'"),
    ("mean(norm='bn') == 0.5", "only < <= > >="),
    ("__import__('os').system('x') > 0", "unknown function"),
    ("mean('bn') > 0.5", "keywords"),
    ("mean(width='64') > 0.5", "'width' is not a field"),
    ("mean(norm='bn') >", "not a valid expression"),
    ("\ud800", "not a valid expression"),          # a lone surrogate: ast.parse raised UnicodeEncodeError
    ("mean(norm='b\x00n') > 0", "not a valid expression"),
])
def test_bad_checks_are_spec_errors(text, fragment):
    with pytest.raises(SpecError, match=fragment.replace("(", r"\(")):
        parse_check(text, grid_fields=["norm", "batch_size"])
