"""The verdict as inference: t intervals, exact rules for min/max/abs, proportions, Holm, seeds needed.

Reference values come from scipy.stats (Welch's t-test, the binomial test) and
from the textbook formulas; the Monte Carlo tests check the error rates the
verdict promises at its confidence.
"""

import dataclasses
import functools
import math
import random
from pathlib import Path

import pytest
from scipy import stats

from reslab.config import TrainConfig
from reslab.errors import SpecError
from reslab.rundir import Run
from reslab.verdict import (
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    NOT_SUPPORTED,
    SUPPORTED,
    UNKNOWN,
    evaluate,
    evaluate_check,
    parse_check,
)

BATCH_CLAIM = [
    'mean(norm="bn", batch_size=32) - mean(norm="bn", batch_size=2) >= 0.10',
    'abs(mean(norm="gn", batch_size=32) - mean(norm="gn", batch_size=2)) < 0.03',
]


BASE = TrainConfig()


@functools.cache
def config(**fields):
    """A run's config: the defaults with ``fields`` (one object per set of values: the verdict only reads it)."""
    return dataclasses.replace(BASE, **fields)


def run(status, summary, **fields):
    """A finished run as the verdict reads it: its config and its summary.json."""
    return Run(path=Path("-".join(f"{k}={v}" for k, v in fields.items())), config=config(**fields),
               summary={"status": status, **summary})


def runs(table, metric="final_eval_acc"):
    """{(norm, batch): [acc or 'diverged', ...]} -> runs, seeds 0, 1, ... within each group."""
    out = []
    for (norm, batch), values in table.items():
        for seed, value in enumerate(values):
            if value in ("diverged", "failed"):
                out.append(run(value, {metric: None}, norm=norm, batch_size=batch, seed=seed))
            else:
                out.append(run("completed", {metric: value}, norm=norm, batch_size=batch, seed=seed))
    return out


def groups(**samples):
    """norm=[values] -> runs (batch 32)."""
    return runs({(norm, 32): values for norm, values in samples.items()})


# --- the statistics against scipy -------------------------------------------------------------


def test_a_difference_of_means_is_welchs_t_test():
    a, b = [0.95, 0.96, 0.94, 0.97], [0.90, 0.93, 0.89]
    check = evaluate_check('mean(norm="a") - mean(norm="b") > 0', groups(a=a, b=b))
    welch = stats.ttest_ind(a, b, equal_var=False, alternative="greater")
    cmp = check.comparisons[0]
    assert cmp.p_holds == pytest.approx(welch.pvalue, rel=1e-9)
    assert cmp.df == pytest.approx(welch.df, rel=1e-9)
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert cmp.interval == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert check.result == HOLDS and check.n == {"mean(norm='a')": 4, "mean(norm='b')": 3}


def test_a_threshold_shifts_the_test_and_the_interval_is_shown_against_it():
    a, b = [0.95, 0.96, 0.94, 0.97], [0.90, 0.93, 0.89]
    check = evaluate_check('mean(norm="a") - mean(norm="b") >= 0.10', groups(a=a, b=b))
    welch = stats.ttest_ind([x - 0.10 for x in a], b, equal_var=False, alternative="greater")
    assert check.comparisons[0].p_fails == pytest.approx(1 - welch.pvalue, rel=1e-9)
    assert check.result == FAILS  # the whole interval is below 0.10
    assert check.value.startswith("mean(norm='a') - mean(norm='b') = 0.04833 [") and check.value.endswith("vs 0.1")


def test_a_single_group_mean_is_a_one_sample_t_interval():
    values = [0.91, 0.95, 0.93]
    check = evaluate_check('mean(norm="a") >= 0.9', groups(a=values))
    ci = stats.ttest_1samp(values, 0.9).confidence_interval(0.95)
    lo, hi = check.comparisons[0].interval
    assert (lo + 0.9, hi + 0.9) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert check.result == UNKNOWN  # 0.93 with this spread on 3 seeds is not surely above 0.9


def test_paired_comparisons_use_per_seed_differences():
    a, b = [0.90, 0.80, 0.95, 0.85], [0.88, 0.79, 0.93, 0.84]  # seeds vary a lot, b trails a by ~1.5 points each
    rows = groups(a=a, b=b)
    unpaired = evaluate("s", "c", ['mean(norm="a") - mean(norm="b") > 0'], rows)
    paired = evaluate("s", "c", ['mean(norm="a") - mean(norm="b") > 0'], rows, paired=True)
    assert unpaired.verdict == INCONCLUSIVE and paired.verdict == SUPPORTED
    assert paired.evidence[0].comparisons[0].p_holds == pytest.approx(
        stats.ttest_rel(a, b, alternative="greater").pvalue, rel=1e-9)
    assert paired.evidence[0].comparisons[0].method.startswith("paired t")


def test_a_ratio_of_means_uses_the_delta_method():
    a, b = [0.30, 0.33, 0.36, 0.31], [0.10, 0.11, 0.09, 0.10]
    check = evaluate_check('mean(norm="a") / mean(norm="b") >= 2', groups(a=a, b=b))
    ma, mb = sum(a) / 4, sum(b) / 4
    va, vb = stats.tstd(a) ** 2 / 4, stats.tstd(b) ** 2 / 4
    se = math.sqrt(va / mb ** 2 + ma ** 2 * vb / mb ** 4)
    cmp = check.comparisons[0]
    assert cmp.estimate == pytest.approx(ma / mb - 2)
    assert (cmp.interval[1] - cmp.interval[0]) / 2 == pytest.approx(stats.t.ppf(0.975, cmp.df) * se, rel=1e-9)
    assert cmp.method == "delta method, Welch t" and check.result == HOLDS


def test_a_proportion_is_an_exact_binomial_test_with_a_clopper_pearson_interval():
    rows = groups(none=["diverged"] * 5 + [0.08, 0.09, 0.85])
    check = evaluate_check('frac(norm="none", below=0.5, diverged=True) > 0.5', rows)
    cmp = check.comparisons[0]
    assert cmp.p_holds == pytest.approx(stats.binomtest(7, 8, 0.5, alternative="greater").pvalue)
    ci = stats.binomtest(7, 8).proportion_ci(0.95, method="exact")
    assert cmp.interval == pytest.approx((ci.low - 0.5, ci.high - 0.5))
    assert check.result == UNKNOWN and check.seeds_needed and check.seeds_needed > 8
    # 9 of 9 decides it; diverged=False counts only the runs that completed below the threshold
    assert evaluate_check('frac(norm="none", status="diverged") >= 0.5',
                          groups(none=["diverged"] * 9)).result == HOLDS
    assert evaluate_check('frac(norm="none", below=0.5) < 0.5', rows).result == UNKNOWN


def test_min_max_and_abs_are_exact_rules_over_comparisons():
    rows = groups(a=[0.90, 0.91, 0.92], b=[0.50, 0.52, 0.51], c=[0.10, 0.11, 0.10])
    both = evaluate_check('min(mean(norm="a"), mean(norm="b")) - mean(norm="c") >= 0.3', rows)
    assert both.result == HOLDS and len(both.comparisons) == 2  # a - c >= 0.3 and b - c >= 0.3
    assert both.p_holds == max(c.p_holds for c in both.comparisons)  # intersection-union: no correction
    either = evaluate_check('max(mean(norm="b"), mean(norm="c")) > 0.8', rows)
    assert either.result == FAILS and len(either.comparisons) == 2
    # equivalence: |a - b| < d is two one-sided tests
    tost = evaluate_check('abs(mean(norm="a") - mean(norm="a")) < 0.05', rows)
    assert len(tost.comparisons) == 2 and tost.result == HOLDS
    far = evaluate_check('abs(mean(norm="a") - mean(norm="b")) < 0.05', rows)
    assert far.result == FAILS


def test_no_check_has_a_dash_for_its_value():
    rows = groups(a=[0.9, 0.92], none=["diverged", "diverged"])
    for check in ('diverged(norm="none") >= 1 or mean(norm="a") >= 0.5', 'mean(norm="a") < 2 < 3',
                  'not mean(norm="a") < 0.5'):
        assert evaluate_check(check, rows).value not in ("", "-")


# --- what decides and what does not ------------------------------------------------------------


def test_supported_when_every_check_holds_at_the_confidence():
    v = evaluate("batch-size", "BN degrades, GN does not", BATCH_CLAIM, runs({
        ("bn", 32): [0.95, 0.96, 0.955], ("bn", 2): [0.70, 0.72, 0.71], ("gn", 32): [0.93, 0.94, 0.935],
        ("gn", 2): [0.93, 0.935, 0.94]}))
    assert v.verdict == SUPPORTED and [e.result for e in v.evidence] == [HOLDS, HOLDS]
    data = v.to_dict()
    assert data["confidence"] == 0.95 and data["correction"] == "holm"
    first = data["evidence"][0]
    assert first["check"] == BATCH_CLAIM[0] and first["interval"][0] > 0.10 and first["p_value"] < 0.025
    assert first["n"] == {"mean(norm='bn', batch_size=32)": 3, "mean(norm='bn', batch_size=2)": 3}


def test_a_single_run_per_group_never_decides_a_comparison():
    v = evaluate("s", "c", ['mean(norm="a") - mean(norm="b") > 0.01'], groups(a=[0.99], b=[0.10]))
    assert v.verdict == INCONCLUSIVE
    assert "no spread" in v.evidence[0].value
    assert v.evidence[0].seeds_needed is None or v.evidence[0].seeds_needed >= 2


def test_the_two_seed_heuristic_no_longer_decides_a_small_gap():
    # mean +- std interval arithmetic called this "holds" (0.245 - 0.021 > 0.10); t with 1-2 df does not
    v = evaluate("s", "c", [BATCH_CLAIM[0]], runs({("bn", 32): [0.95, 0.96], ("bn", 2): [0.80, 0.84]}))
    assert v.verdict == INCONCLUSIVE and v.evidence[0].seeds_needed >= 3
    assert v.to_dict()["evidence"][0]["seeds_needed"] == v.evidence[0].seeds_needed
    assert isinstance(v.to_dict()["seeds_needed"], int)


def test_unfinished_runs_leave_a_mean_undefined_and_counts_stay_exact():
    table = {("bn", 32): [0.95, 0.96], ("none", 32): [0.5, "diverged"]}
    v = evaluate("norms", "claim", ['mean(norm="bn") - mean(norm="none") >= 0.1'], runs(table))
    assert v.verdict == INCONCLUSIVE and "did not finish" in v.evidence[0].terms[1]["value"]
    check = 'diverged(norm="none") >= 1 or mean(norm="bn") - mean(norm="none") >= 0.1'
    assert evaluate("norms", "claim", [check], runs(table)).verdict == SUPPORTED
    all_done = {("bn", 32): [0.95, 0.96, 0.955], ("none", 32): [0.94, 0.95, 0.945]}
    assert evaluate("norms", "claim", [check], runs(all_done)).verdict == NOT_SUPPORTED


def test_holm_correction_across_checks():
    # three checks that each fail alone (one-sided p 0.0085-0.019 < 0.025); Holm keeps only the smallest
    checks = ['mean(norm="a") > 0.5', 'mean(norm="b") > 0.5', 'mean(norm="c") > 0.5']
    rows = groups(a=[0.40, 0.45, 0.43], b=[0.41, 0.45, 0.43], c=[0.42, 0.45, 0.43])
    alone = [evaluate("s", "c", [check], rows).evidence[0] for check in checks]
    assert [e.result for e in alone] == [FAILS] * 3
    evidence = evaluate("s", "c", checks, rows).evidence
    raw = [e.p_fails for e in evidence]
    assert raw == pytest.approx([stats.ttest_1samp(v, 0.5, alternative="less").pvalue
                                 for v in ([0.40, 0.45, 0.43], [0.41, 0.45, 0.43], [0.42, 0.45, 0.43])])
    # the smallest, 0.0085, times 3 is above 0.025: together none of them is a failure any more
    assert [e.result for e in evidence] == [UNKNOWN] * 3
    ordered = sorted(raw)
    expected = [min(1, 3 * ordered[0])]
    expected.append(max(expected[0], min(1, 2 * ordered[1])))
    expected.append(max(expected[1], ordered[2]))
    assert sorted(e.p_fails_holm for e in evidence) == pytest.approx(expected)


def test_other_metrics_and_confidence():
    rows = [run("completed", {"final_train_loss": loss, "final_eval_acc": 0.9}, model=m, seed=s)
            for m, s, loss in [("p20", 0, 0.10), ("p20", 1, 0.12), ("p20", 2, 0.11),
                               ("p56", 0, 0.50), ("p56", 1, 0.55), ("p56", 2, 0.52)]]
    checks = ['mean(model="p56", metric="final_train_loss") > mean(model="p20", metric="final_train_loss") + 0.2']
    assert evaluate("depth", "claim", checks, rows).verdict == SUPPORTED
    assert evaluate("depth", "claim", checks, rows, confidence=0.999999).verdict == INCONCLUSIVE
    with pytest.raises(SpecError, match="between 0.5 and 1"):
        evaluate("depth", "claim", checks, rows, confidence=1.5)


def test_a_group_is_selected_by_the_runs_config_fields():
    rows = runs({("bn", 32): [0.90, 0.92], ("bn", 2): [0.70, 0.72]})
    check = evaluate_check('mean(norm="bn", batch_size="32") > 0.5', rows)  # text "32" selects batch_size 32
    assert check.n == {"mean(norm='bn', batch_size='32')": 2} and check.terms[0]["value"].startswith("0.91 ")
    assert evaluate_check('n(norm="bn") >= 4', rows).result == HOLDS  # batch_size left out: pooled
    nowhere = evaluate_check('mean(colour="red") > 0.5', rows)  # no config has the field: no run matches
    assert nowhere.result == UNKNOWN and "no run matches" in nowhere.value


# --- calibration: Monte Carlo over synthetic studies -----------------------------------------------

REPEATS = 800
# a 95% claim: the MC error of a rate near 2.5-5% over 800 repeats is about 0.8 points; allow 3 of them
SLACK = 3 * math.sqrt(0.05 * 0.95 / REPEATS)

SHAPES = {
    "difference": ('mean(norm="a") - mean(norm="b") >= 0.05', {"a": 0.05, "b": 0.0}),
    "threshold": ('mean(norm="a") >= 0.9', {"a": 0.9}),
    "equivalence": ('abs(mean(norm="a") - mean(norm="b")) < 0.05', {"a": 0.05, "b": 0.0}),
    "min of two": ('min(mean(norm="a"), mean(norm="b")) - mean(norm="c") >= 0.1', {"a": 0.1, "b": 0.3, "c": 0.0}),
    "ratio": ('mean(norm="a") / mean(norm="b") >= 1.3', {"a": 0.13, "b": 0.10}),
}


def simulate(means, seeds, rng, sd=0.02):
    return groups(**{g: [rng.gauss(m, sd) for _ in range(seeds)] for g, m in means.items()})


@pytest.mark.slow
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("seeds", [2, 3, 5, 10])
def test_false_support_stays_below_one_minus_confidence_at_the_threshold(shape, seeds):
    """With the true effect exactly at the threshold, "supported" comes out at most 1 - C of the time."""
    check, means = SHAPES[shape]
    rng = random.Random(1234 + seeds)
    sd = 0.005 if shape == "ratio" else 0.02  # (a ratio's delta method wants a well-measured denominator)
    wrong = sum(evaluate("mc", "c", [check], simulate(means, seeds, rng, sd)).verdict == SUPPORTED
                for _ in range(REPEATS))
    assert wrong / REPEATS <= 0.05 + SLACK


@pytest.mark.slow
@pytest.mark.parametrize("seeds", [2, 3, 5])
def test_false_rejection_of_a_true_claim_stays_below_one_minus_confidence_with_several_checks(seeds):
    """Three true checks at their thresholds: Holm keeps "not supported" at most 1 - C of the time."""
    checks = ['mean(norm="a") >= 0.9', 'mean(norm="b") >= 0.9', 'mean(norm="c") - mean(norm="a") <= 0.0']
    rng = random.Random(99 + seeds)
    wrong = sum(evaluate("mc", "c", checks, simulate({"a": 0.9, "b": 0.9, "c": 0.9}, seeds, rng)).verdict
                == NOT_SUPPORTED for _ in range(REPEATS))
    assert wrong / REPEATS <= 0.05 + SLACK


@pytest.mark.slow
def test_false_support_of_a_proportion_claim_stays_below_one_minus_confidence():
    rng = random.Random(7)
    wrong = 0
    for _ in range(REPEATS):
        outcome = ["diverged" if rng.random() < 0.5 else 0.9 for _ in range(10)]
        wrong += evaluate("mc", "c", ['frac(norm="a", status="diverged") > 0.5'],
                          groups(a=outcome)).verdict == SUPPORTED
    assert wrong / REPEATS <= 0.05 + SLACK


def test_one_run_groups_never_decide():
    rng = random.Random(3)
    for _ in range(200):
        v = evaluate("mc", "c", ['mean(norm="a") - mean(norm="b") > 0.0'],
                     simulate({"a": rng.uniform(0, 1), "b": rng.uniform(0, 1)}, 1, rng))
        assert v.verdict == INCONCLUSIVE


@pytest.mark.slow
def test_power_grows_with_seeds_and_seeds_needed_predicts_it():
    """A true effect one spread above the threshold: more seeds decide it more often."""
    rng = random.Random(5)
    check = 'mean(norm="a") - mean(norm="b") >= 0.05'
    power = {}
    for seeds in (2, 4, 8, 16):
        power[seeds] = sum(evaluate("mc", "c", [check], simulate({"a": 0.07, "b": 0.0}, seeds, rng)).verdict
                           == SUPPORTED for _ in range(300)) / 300
    assert power[2] < power[4] < power[8] < power[16] and power[16] > 0.7
    # seeds_needed from the true effect and spread: about 18 per group decide d=1 at 80% power (z test: 15.7)
    exact = groups(a=[0.07 + 0.02 * z for z in (-1, 0, 1)], b=[0.02 * z for z in (-1, 0, 1)])  # sd 0.02 each
    needed = evaluate("s", "c", [check], exact).evidence[0].seeds_needed
    assert 16 <= needed <= 22


# --- parsing ----------------------------------------------------------------------------------------


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
    ("frac(norm='bn') > 0.5", "exactly one of below"),
    ("frac(norm='bn', below='x') > 0.5", "takes a number"),
    ("frac(norm='bn', status='exploded') > 0.5", "valid: completed, diverged, failed"),
    ("min(mean(norm='bn'), 1) * mean(norm='gn') > 0.5", "product or quotient"),
    ("1 / max(mean(norm='bn'), 1) > 0.5", "product or quotient"),
    ("abs(1, 2) > 0", "one"),
])
def test_bad_checks_are_spec_errors(text, fragment):
    with pytest.raises(SpecError, match=fragment.replace("(", r"\(").replace("*", r"\*")):
        parse_check(text, grid_fields=["norm", "batch_size"])
