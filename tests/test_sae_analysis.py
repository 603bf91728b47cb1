"""Stable vs unstable heads under SAE metrics (``analysis.saes``): one model's difference of medians,
exact permutation p and Spearman against hand-computed values; the bootstrap interval against a
plain per-resample reference (heads, and whole key groups); the calibrated threshold is
calibration's own, on importance; across seeds the t-interval and Fisher's z; a planted effect
PASSes and the opposite one FAILs over 4 populations x 5 seeds; null simulations bound the PASS
rate by the nominal 2.5 % (exact binomial test at 0.01); bad input is one UsageError."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from analysis.calibration import calibrate, important
from analysis.saes import (
    IMPORTANCE_SOURCE, MODEL_COLUMNS, POPULATION_COLUMNS, THRESHOLD_COLUMNS, VERDICT_COLUMNS, VERDICT_KEY,
    HeadMetrics, compare, median_difference, model_rows,
)
from spectral.errors import UsageError

HEADS = {"organism-xs": 16, "organism-s": 12, "organism-m": 32, "organism-l": 48}
NOMINAL = 0.025
SI = "superposition_index"


def within_nominal(k: int, n: int, rate: float = NOMINAL) -> bool:
    return stats.binomtest(k, n, rate, alternative="greater").pvalue >= 0.01


def tiny() -> HeadMetrics:
    """Gaps (0.5, 0.6, 0.7, 0.9, 1.0): heads 0-2 unstable at 0.77. superposition (3, 1, 2, 0, 0.5):
    medians 2 and 0.25, difference 1.75. Of the C(5, 3) = 10 labellings, |d| >= 1.75 for the observed
    one and {1, 0, 0.5} | {3, 2} (d = 0.5 - 2.5 = -2): p = 2/10. Ranks of the metric (5, 3, 4, 1, 2)
    against the gap's (1..5): sum d^2 = 36, rho = 1 - 6 x 36 / 120 = -0.8."""
    return HeadMetrics("tiny", "p", 0, np.array([0.5, 0.6, 0.7, 0.9, 1.0]),
                       {SI: np.array([3.0, 1.0, 2.0, 0.0, 0.5]), "l0": np.array([1.0, np.nan, 1.0, 2.0, 2.0])})


def test_one_models_difference_permutation_p_and_spearman_are_the_hand_computed_values():
    rows = model_rows(tiny(), [SI, "l0"], n_resamples=200)
    ref = next(r for r in rows if (r["metric"], r["threshold_kind"]) == (SI, "reference"))
    assert (ref["median_unstable"], ref["median_stable"], ref["difference"]) == (2.0, 0.25, 1.75)
    assert ref["p_permutation"] == pytest.approx(0.2) and ref["permutation"] == "exact over 10 labellings of heads"
    assert ref["spearman"] == pytest.approx(-0.8) and (ref["n_unstable"], ref["n_stable"]) == (3, 2)
    assert ref["difference_low"] < 1.75 < ref["difference_high"] and ref["note"] == ""
    cal = next(r for r in rows if (r["metric"], r["threshold_kind"]) == (SI, "calibrated"))
    assert np.isnan(cal["difference"]) and cal["note"] == "no calibrated threshold"
    l0 = next(r for r in rows if (r["metric"], r["threshold_kind"]) == ("l0", "reference"))
    # head 1 dropped: unstable (1, 1), stable (2, 2): difference -1, every labelling of 4 heads
    # into 2 + 2 gives |d| <= 1 -> only the observed and its mirror reach 1: p = 2 / 6
    assert l0["difference"] == -1.0 and l0["p_permutation"] == pytest.approx(2 / 6)
    assert l0["note"] == "1 heads without a finite gap and l0" and l0["n_heads"] == 4
    assert all(tuple(r) == MODEL_COLUMNS for r in rows)


def test_a_group_of_one_head_is_nan_with_the_reason():
    m = HeadMetrics("m", "p", 0, np.array([0.5, 0.9, 0.95, 1.0]), {SI: np.arange(4.0)})
    (row, _) = model_rows(m, [SI])
    assert np.isnan(row["difference"]) and np.isnan(row["p_permutation"])
    assert row["note"] == "fewer than 2 heads in a group (1 unstable, 3 stable)"


def reference_median_difference(xu, xs, uu, us, rng, b):
    """Plain reference: per group, b resamples of its units drawn one by one, the median of each."""
    terms = []
    for x, units in ((xu, uu), (xs, us)):
        n = len(units)
        draws = rng.integers(0, n, (b, n))
        med = [np.median(np.concatenate([x[units[c]] for c in row])) for row in draws]
        terms.append(np.var(med, ddof=1) * n / (n - 1))
    se = math.sqrt(sum(terms))
    df = sum(terms) ** 2 / (terms[0] ** 2 / (len(uu) - 1) + terms[1] ** 2 / (len(us) - 1))
    d = np.median(xu) - np.median(xs)
    return d, d - stats.t.ppf(0.975, df) * se, d + stats.t.ppf(0.975, df) * se, df


@pytest.mark.parametrize("grouped", [False, True])
def test_the_bootstrap_interval_matches_a_plain_reference(grouped):
    rng = np.random.default_rng(0)
    xu, xs = rng.normal(1, 1, 9), rng.normal(0, 1, 12)
    if grouped:  # key groups of 3 heads, 2 of them only partly in this group
        uu, us = [np.arange(0, 3), np.arange(3, 6), np.arange(6, 9)], [np.arange(0, 4), np.arange(4, 8),
                                                                     np.arange(8, 10), np.arange(10, 12)]
    else:
        uu, us = [np.array([i]) for i in range(9)], [np.array([i]) for i in range(12)]
    got = median_difference(xu, xs, uu, us, np.random.default_rng(7), 300)
    want = reference_median_difference(xu, xs, uu, us, np.random.default_rng(7), 300)
    assert got == pytest.approx(want, rel=1e-12)


def test_grouped_query_heads_are_permuted_and_counted_as_key_groups():
    """8 query heads in 4 key groups sharing their gap: the labels are shuffled over key groups,
    C(4, 2) = 6 labellings; unstable groups hold (5, 6) and (4, 7), stable (0, 1) and (2, 3): median
    5.5 vs 1.5, d = 4, reached only by the observed labelling and its mirror: p = 2/6."""
    gap = np.repeat([0.6, 0.7, 0.9, 1.0], 2)
    m = HeadMetrics("gqa", "p", 0, gap, {SI: np.array([5, 6, 4, 7, 0, 1, 2, 3.0])}, kv_head=np.repeat([0, 1, 2, 3], 2))
    row = model_rows(m, [SI], n_resamples=100)[0]
    assert (row["n_unstable"], row["n_units_unstable"], row["n_units_stable"]) == (4, 2, 2)
    assert row["difference"] == 4.0 and row["p_permutation"] == pytest.approx(2 / 6)
    assert row["permutation"] == "exact over 6 labellings of key groups"


def test_the_calibrated_threshold_is_calibrations_own_on_importance():
    rng = np.random.default_rng(1)
    restoration = rng.beta(0.5, 2.0, 32)
    gap = 0.9 - 0.5 * restoration + 0.05 * rng.normal(size=32)
    m = HeadMetrics("m", "p", 0, gap, {SI: rng.normal(size=32)}, importance=restoration)
    res = compare([m], n_resamples=50, n_permutations=50, calibration_resamples=50)
    (t,) = res.thresholds
    assert t["threshold"] == calibrate(gap, important(restoration), n_resamples=50).threshold
    assert t["calibrated_against"] == IMPORTANCE_SOURCE and tuple(t) == THRESHOLD_COLUMNS
    cal = next(r for r in res.models if r["threshold_kind"] == "calibrated")
    assert cal["threshold"] == t["threshold"] and cal["calibrated_against"].startswith("importance")
    assert cal["n_unstable"] == int((gap <= t["threshold"]).sum())
    assert cal["difference"] == pytest.approx(np.median(m.metrics[SI][gap <= t["threshold"]])
                                              - np.median(m.metrics[SI][gap > t["threshold"]]))
    res = compare([m], verdict_threshold="calibrated", n_resamples=50, n_permutations=50, calibration_resamples=50)
    (v,) = [r for r in res.verdicts if r["key"] == VERDICT_KEY]
    assert v["threshold_kind"] == "calibrated" and "calibrated against importance (not the SAE metric)" in v["rule"]
    assert v["verdict"] == "INCONCLUSIVE" and np.isnan(v["p_pass"]) and v["k"] == 1  # one seed: no t over seeds


def test_across_seeds_the_t_interval_and_fishers_z():
    rng = np.random.default_rng(2)
    models = [HeadMetrics(f"p?seed={s}", "p", s, rng.uniform(0.5, 1, 20), {SI: rng.normal(size=20)})
              for s in range(3)]
    res = compare(models, n_resamples=20, n_permutations=20)
    d = [r["difference"] for r in res.models if r["threshold_kind"] == "reference"]
    z = np.arctanh([stats.spearmanr(m.gap, m.metrics[SI]).statistic for m in models])
    half = stats.t.ppf(0.975, 2) * np.std(d, ddof=1) / np.sqrt(3)
    pop = next(r for r in res.populations if r["threshold_kind"] == "reference")
    assert pop["difference"] == pytest.approx(np.mean(d))
    assert (pop["difference_low"], pop["difference_high"]) == pytest.approx((np.mean(d) - half, np.mean(d) + half))
    assert pop["spearman"] == pytest.approx(np.tanh(z.mean()))
    assert pop["p_above"] == pytest.approx(stats.ttest_1samp(d, 0, alternative="greater").pvalue)
    cal = next(r for r in res.populations if r["threshold_kind"] == "calibrated")
    assert cal["k_difference"] == 0 and cal["note"] == "difference: 0 of 3 seeds with a value"
    assert all(tuple(r) == POPULATION_COLUMNS for r in res.populations)


def population(effect: float, rng, metric=lambda n, rng: rng.normal(0, 0.5, n)) -> list[HeadMetrics]:
    """4 populations x 5 seeds; unstable heads (gap <= 0.77) get ``effect`` added to superposition;
    l0 is noise."""
    out = []
    for pop, n in HEADS.items():
        for s in range(5):
            gap = rng.uniform(0.5, 1.0, n)
            si = metric(n, rng) + effect * (gap <= 0.77)
            out.append(HeadMetrics(f"{pop}?seed={s}", pop, s, gap, {SI: si, "l0": rng.normal(size=n)}))
    return out


def test_a_planted_effect_passes_and_the_opposite_fails():
    rng = np.random.default_rng(3)
    res = compare(population(1.0, rng), n_resamples=50, n_permutations=50)
    verdicts = [r for r in res.verdicts if r["key"] == VERDICT_KEY]
    assert [r["verdict"] for r in verdicts] == ["PASS"] * 4
    assert all(r["correction"].startswith("Holm over 4 population(s)") and r["direction"] == "unstable higher"
               and "gap <= 0.77" in r["rule"] for r in verdicts)
    explo = [r for r in res.verdicts if r["exploratory"]]
    assert len(explo) == 4 * 3 and all(r["verdict"] == "" for r in explo)
    assert {r["correction"][:28] for r in explo} == {"Holm over 1 metric(s) of thi", "Holm over 0 metric(s) of thi"}
    assert all(tuple(r) == VERDICT_COLUMNS for r in res.verdicts)
    assert all(isinstance(v, (str, float, int, bool)) or v is None for t in (res.models, res.populations,
                                                                           res.verdicts) for r in t for v in r.values())
    res = compare(population(-1.0, rng), n_resamples=50, n_permutations=50)
    assert [r["verdict"] for r in res.verdicts if r["key"] == VERDICT_KEY] == ["FAIL"] * 4


@pytest.mark.parametrize("metric,measured", [
    (lambda n, rng: rng.normal(0, 1, n), (3, 3)),
    (lambda n, rng: rng.exponential(1, n), (8, 8)),
])
def test_null_without_an_effect_does_not_pass_above_nominal(metric, measured):
    """200 simulations of 4 populations x 5 seeds, superposition independent of the gap (normal,
    and skewed: exponential). Holm across the populations bounds the chance that ANY population
    PASSes (the family) by 2.5 %. Measured here: normal 3 of 200 families with a PASS (3 of 800
    rows); exponential 8 of 200 (8 of 800 rows; binomial p 0.13 against 2.5 %). Once with 1,000
    simulations (seed 11): normal 27 of 1,000 families (2.7 %), uncorrected one-sided p < 0.025 in
    2.2 % of 4,000 rows; exponential 24 of 1,000 (2.4 %), 2.6 % of rows."""
    rng = np.random.default_rng(4)
    families = rows = 0
    for _ in range(200):
        res = compare(population(0.0, rng, metric), [SI], n_resamples=10, n_permutations=10)
        passed = sum(r["verdict"] == "PASS" for r in res.verdicts)
        families += passed > 0
        rows += passed
    assert (families, rows) == measured and within_nominal(families, 200)


def test_bad_input_is_one_usage_error():
    with pytest.raises(UsageError, match="metric 'l0' has shape \\(3,\\), gap \\(4,\\)"):
        HeadMetrics("m", "p", 0, np.ones(4), {SI: np.ones(4), "l0": np.ones(3)})
    with pytest.raises(UsageError, match="importance has shape"):
        HeadMetrics("m", "p", 0, np.ones(4), {SI: np.ones(4)}, importance=np.ones(5))
    a = HeadMetrics("a", "p", 0, np.ones(4), {SI: np.ones(4), "l0": np.ones(4)})
    b = HeadMetrics("b", "p", 1, np.ones(4), {SI: np.ones(4)})
    with pytest.raises(UsageError, match="model 'b' has no metric\\(s\\) 'l0'"):
        compare([a, b])
    with pytest.raises(UsageError, match="the verdict's metric 'superposition_index' is not among"):
        compare([a], ["l0"])
    with pytest.raises(UsageError, match="verdict_threshold must be one of"):
        compare([a], verdict_threshold="best")
    with pytest.raises(UsageError, match="needs at least one model"):
        compare([])
