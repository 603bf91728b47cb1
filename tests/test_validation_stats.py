"""Per-model statistics of gap vs importance (analysis.stats, analysis.validation), threshold
calibration (analysis.calibration) and scaling fits (analysis.scaling): the defects of issue 12
that live there, each with a case that the code before the fix got wrong (stated per test).

Synthetic models: per-example metrics with clean / corrupt runs shared by every head and
``patched = corrupt + importance x (clean - corrupt) (+ noise)``, so a head's restoration is
its importance exactly when the noise is 0.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from scipy import stats

from analysis.calibration import calibrate
from analysis.population import estimate, holm
from analysis.validation import validate

FAST = 400  # bootstrap resamples in tests


def tables(gap, imp, *, n_examples: int = 32, noise: float = 0.0, seed: int = 0, heads_per_layer: int = 4,
           clean_mean: float = 3.0, corrupt_mean: float = 0.0):
    """(scan, per-example patch table) of a synthetic model."""
    rng = np.random.default_rng(seed)
    gap, imp = np.asarray(gap, dtype=float), np.asarray(imp, dtype=float)
    clean = rng.normal(clean_mean, 0.5, n_examples)
    corrupt = rng.normal(corrupt_mean, 0.5, n_examples)
    layer, head = np.divmod(np.arange(gap.size), heads_per_layer)
    cols = {k: [] for k in ("layer", "head", "example", "metric_patched", "metric_clean", "metric_corrupt")}
    for i in range(gap.size):
        patched = corrupt + imp[i] * (clean - corrupt) + noise * rng.standard_normal(n_examples)
        cols["layer"] += [int(layer[i])] * n_examples
        cols["head"] += [int(head[i])] * n_examples
        cols["example"] += list(range(n_examples))
        cols["metric_patched"] += patched.tolist()
        cols["metric_clean"] += clean.tolist()
        cols["metric_corrupt"] += corrupt.tolist()
    scan = pa.table({"layer": layer.astype(np.int32), "head": head.astype(np.int32), "gap": gap})
    return scan, pa.table(cols)


def rows(v) -> dict[str, dict]:
    return {r["key"]: r for r in v.statistics.to_pylist()}


def arrays(gap, imp, n_examples=32, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    gap, imp = np.asarray(gap, dtype=float), np.asarray(imp, dtype=float)
    clean = np.tile(rng.normal(3, 0.5, n_examples), (gap.size, 1))
    corrupt = np.tile(rng.normal(0, 0.5, n_examples), (gap.size, 1))
    patched = corrupt + imp[:, None] * (clean - corrupt) + noise * rng.standard_normal((gap.size, n_examples))
    return patched, clean, corrupt


# 8 heads, r(1/gap, importance) = 0.899, importances known exactly (no example noise)
GAP8 = np.array([0.3, 0.4, 0.5, 0.6, 0.8, 0.9, 1.0, 1.2])
IMP8 = np.array([0.9, 0.5, 0.7, 0.2, 0.3, 0.1, 0.25, 0.05])


# --- the statistic API (f(per_unit, per_example) -> float) ---------------------------------

def test_statistics_match_scipy_and_hand_computation():
    from analysis.stats import group_difference, group_mean, group_ratio, head_member, r_gap, r_inverse_gap, spearman_gap
    m = head_member(GAP8, *arrays(GAP8, IMP8))
    u, e = m.per_unit, m.per_example
    assert r_inverse_gap(u, e) == pytest.approx(stats.pearsonr(1 / GAP8, IMP8)[0], abs=1e-9)
    assert r_inverse_gap(u, e) == pytest.approx(0.8992104, abs=1e-6)
    assert r_gap(u, e) == pytest.approx(stats.pearsonr(GAP8, IMP8)[0], abs=1e-9)
    assert spearman_gap(u, e) == pytest.approx(stats.spearmanr(GAP8, IMP8)[0], abs=1e-9)
    # unstable (gap <= 0.77): 0.9, 0.5, 0.7, 0.2 -> 0.575; stable 0.3, 0.1, 0.25, 0.05 -> 0.175
    assert group_mean(0.77, True)(u, e) == pytest.approx(0.575)
    assert group_mean(0.77, False)(u, e) == pytest.approx(0.175)
    assert group_difference(0.77)(u, e) == pytest.approx(0.4)
    assert group_ratio(0.77)(u, e) == pytest.approx(0.575 / 0.175)
    assert math.isnan(group_difference(0.1)(u, e))  # no unstable head: undefined


def test_statistics_run_in_population_estimate_over_seeds():
    from analysis.stats import group_difference, head_member, r_inverse_gap
    members = [head_member(GAP8, *arrays(GAP8, IMP8, noise=0.05, seed=s), seed=s) for s in range(3)]
    est = estimate(members, r_inverse_gap, n_resamples=200, seed=0)
    assert est.n_seeds == 3 and est.value == pytest.approx(np.mean(est.per_seed))
    assert est.low < est.value < est.high and "heads -> examples" in est.scheme
    d = estimate(members, group_difference(0.77), n_resamples=200, seed=0)
    assert d.value == pytest.approx(0.4, abs=0.03)


def test_layer_statistic_resamples_layers_and_takes_the_max_over_heads():
    from analysis.stats import layer_max_restoration, layer_member, layer_r
    gap = np.array([0.3, 0.9, 0.5, 0.6, 0.8, 0.2, 1.1, 1.0, 0.4, 0.7, 0.95, 0.85])
    imp = np.array([0.1, 0.6, 0.2, 0.3, 0.9, 0.05, 0.0, 0.4, 0.5, 0.45, 0.2, 0.1])
    layer = np.repeat(np.arange(6), 2)
    m = layer_member(layer, gap, *arrays(gap, imp))
    np.testing.assert_allclose(m.per_unit["min_gap"], [0.3, 0.5, 0.2, 1.0, 0.4, 0.85])
    np.testing.assert_allclose(layer_max_restoration(m.per_example), [0.6, 0.3, 0.9, 0.4, 0.5, 0.2], atol=1e-9)
    assert layer_r(m.per_unit, m.per_example) == pytest.approx(
        stats.pearsonr([0.3, 0.5, 0.2, 1.0, 0.4, 0.85], [0.6, 0.3, 0.9, 0.4, 0.5, 0.2])[0], abs=1e-9)
    assert m.n_units == 6 and m.n_examples == 32


# --- defect 3: intervals hold heads fixed -------------------------------------------------

def test_correlation_interval_resamples_heads_not_only_examples():
    """Old code: importances known exactly -> example bootstrap interval [0.899, 0.899] -> PASS
    on 8 heads. Now the interval reflects which 8 heads there are: INCONCLUSIVE."""
    v = validate(*tables(GAP8, IMP8), 0.77, 0, n_resamples=FAST)
    r = rows(v)["importance_correlation"]
    assert r["name"] == "pearson r(importance, 1/gap)" and r["value"] == pytest.approx(0.8992, abs=1e-4)
    assert r["low"] < 0.7 < r["high"] <= 1.0 and r["high"] - r["low"] > 0.3
    assert r["verdict"] == "INCONCLUSIVE"
    assert r["n_units"] == 8 and "heads -> examples" in r["scheme"] and "describes this model only" in r["scheme"]


# --- defect 2: ratio verdicts invert when a denominator is <= 0 ---------------------------

SIGN_GAP = np.array([0.3, 0.4, 0.5, 0.6, 0.9, 1.0, 1.1, 1.2])
SIGN_IMP = np.array([0.25, 0.15, 0.22, 0.18, -0.02, -0.005, -0.01, -0.009])  # means +0.2 and -0.011


def test_ratio_with_negative_stable_mean_is_undefined_and_the_difference_decides():
    """Old code: ratio 0.2 / -0.011 = -18.2, interval below 2 -> FAIL. Now the ratio is undefined
    (the stable mean is not known to be > 0) and the difference +0.211 carries the verdict."""
    v = validate(*tables(SIGN_GAP, SIGN_IMP), 0.77, 0, n_resamples=FAST)
    s = rows(v)
    ratio = s["restoration_ratio"]
    assert math.isnan(ratio["value"]) and math.isnan(ratio["low"]) and "undefined" in ratio["note"]
    assert ratio["verdict"] == "INCONCLUSIVE"
    diff = s["restoration_difference"]
    assert diff["value"] == pytest.approx(0.211, abs=1e-9) and diff["low"] > 0
    assert diff["verdict"] == "PASS" and (diff["n_unstable"], diff["n_stable"]) == (4, 4)
    assert s["restoration_stable_mean"]["value"] == pytest.approx(-0.011, abs=1e-9)


def test_ratio_rule_needs_both_means_above_zero():
    from analysis.stats import Estimate, ratio_rule
    raw = Estimate(-18.2, -40.0, -10.0)
    out, note = ratio_rule(Estimate(0.2, 0.15, 0.25), Estimate(-0.011, -0.02, -0.002), raw)
    assert math.isnan(out.value) and "denominator" in note and "undefined" in note
    out, note = ratio_rule(Estimate(0.2, -0.01, 0.4), Estimate(0.1, 0.05, 0.15), Estimate(2.0, 0.5, 4.0))
    assert math.isnan(out.value) and "numerator" in note
    ok = Estimate(3.0, 2.5, 3.5)
    assert ratio_rule(Estimate(0.3, 0.2, 0.4), Estimate(0.1, 0.05, 0.15), ok) == (ok, "")


def test_ratio_defined_when_both_groups_are_positive():
    imp = np.array([0.9, 0.8, 0.85, 0.95, 0.2, 0.25, 0.22, 0.18])
    s = rows(validate(*tables(SIGN_GAP, imp, noise=0.02), 0.77, 0, n_resamples=FAST))
    ratio = s["restoration_ratio"]
    assert ratio["value"] == pytest.approx(np.mean(imp[:4]) / np.mean(imp[4:]), rel=0.05)
    assert ratio["low"] > 2 and ratio["verdict"] == "PASS" and ratio["note"] == ""


# --- defect 10: restoration's denominator near zero ----------------------------------------

def test_restoration_is_nan_with_a_reason_when_clean_equals_corrupt():
    """Old code: (patched - corrupt) / (clean - corrupt) with clean - corrupt = 1e-4 gives
    restorations of thousands. Now NaN, with the reason, in the heads table."""
    from analysis.stats import restoration, restoration_reasons
    clean = np.full((2, 16), 2.0)
    corrupt = clean - np.array([[1e-4], [1.0]])
    patched = corrupt + 0.5
    np.testing.assert_allclose(restoration(patched, clean, corrupt), [np.nan, 0.5])
    why = restoration_reasons(patched, clean, corrupt)
    assert "near zero" in why[0] and why[1] == ""
    v = validate(*tables(GAP8, IMP8, clean_mean=0.0, corrupt_mean=0.0), 0.77, 0, n_resamples=100)
    # clean and corrupt metrics drawn from one distribution: mean difference ~ 0.1 of scale ~ 0.8
    heads = v.heads.to_pylist()
    guarded = [h for h in heads if not np.isfinite(h["restoration"])]
    assert all("near zero" in h["restoration_note"] for h in guarded)
    assert all(abs(h["restoration"]) < 50 for h in heads if np.isfinite(h["restoration"]))


# --- defect 8: duplicates, group sizes, selection, multiplicity --------------------------

def test_no_duplicate_rank_correlation_group_sizes_and_exploratory_best_threshold():
    v = validate(*tables(GAP8, IMP8, noise=0.05), 0.77, 0, n_resamples=FAST)
    s = rows(v)
    names = [r["name"] for r in s.values()]
    assert "spearman rho(importance, 1/gap)" not in names  # it is -rho(importance, gap)
    assert "spearman rho(importance, gap)" in names
    for key in ("restoration_difference", "restoration_ratio", "restoration_unstable_mean", "restoration_stable_mean"):
        assert (s[key]["n_unstable"], s[key]["n_stable"]) == (4, 4), key
    for key in ("best_threshold", "restoration_difference_best"):
        r = s[key]
        assert math.isnan(r["low"]) and math.isnan(r["high"]) and r["verdict"] == "" and "exploratory" in r["note"]
    assert s["best_threshold"]["value"] == pytest.approx(0.3)
    assert {"key", "name", "value", "low", "high", "p_value", "target", "verdict", "n_units", "n_unstable",
            "n_stable", "scheme", "p_holm", "note"} <= set(v.statistics.column_names)


def test_holm_within_the_verdict_family_and_the_rule_is_printed():
    from analysis.validation import VERDICT_KEYS
    v = validate(*tables(GAP8, IMP8, noise=0.05), 0.77, 0, n_resamples=FAST)
    s = rows(v)
    family = [s[k] for k in VERDICT_KEYS]
    np.testing.assert_allclose([r["p_holm"] for r in family], holm([r["p_value"] for r in family]), equal_nan=True)
    for r in s.values():
        if r["key"] not in VERDICT_KEYS:
            assert r["verdict"] == "" and math.isnan(r["p_holm"])
    from analysis.render.markdown import validation_report

    text = validation_report(v)
    assert "Holm" in text and "Verdict rule" in text and "heads -> examples" in text


def test_decide_and_scaled_interval():
    from analysis.population import scaled_interval
    from analysis.stats import decide, welch_df
    assert decide(0.9, 0.01, 0.7) == "PASS" and decide(0.5, 0.01, 0.7) == "FAIL"
    assert decide(0.9, 0.06, 0.7) == "INCONCLUSIVE" and decide(-0.5, 0.01, 0.0, "below") == "PASS"
    assert decide(float("nan"), 0.01, 0.7) == "INCONCLUSIVE"
    b = np.random.default_rng(0).normal(1.0, 0.1, 4000)
    e = scaled_interval(1.0, b, n_units=10, df=8, target=0.0)
    half = stats.t.ppf(0.975, 8) * b.std(ddof=1) * math.sqrt(10 / 9)
    assert e.low == pytest.approx(1 - half) and e.high == pytest.approx(1 + half)
    assert e.p_value == pytest.approx(2 * stats.t.sf(1.0 / (half / stats.t.ppf(0.975, 8)), 8))
    r = scaled_interval(0.95, np.clip(np.random.default_rng(1).normal(0.95, 0.1, 1000), -1, 1), 8, 5, fisher=True)
    assert -1 <= r.low < 0.95 < r.high <= 1
    a, c = np.array([0.1, 0.4, 0.2, 0.9]), np.array([0.3, 0.35, 0.31, 0.2, 0.25])
    assert welch_df(a, c) == pytest.approx(stats.ttest_ind(a, c, equal_var=False).df)


# --- defect 7: layer-level correlations on few layers ------------------------------------

def test_layer_correlation_needs_five_layers_and_resamples_layers():
    """Old code: 3 layers got an example-bootstrap interval (0.573 [0.53, 0.61] from 3 points).
    Now: undefined below 5 layers; from 5 on, an interval over layers x examples."""
    rng = np.random.default_rng(3)
    gap3, imp3 = rng.uniform(0.2, 1.2, 12), rng.uniform(0, 1, 12)
    r3 = rows(validate(*tables(gap3, imp3, noise=0.05), 0.77, 0, n_resamples=100))["layer_correlation"]
    assert r3["n_units"] == 3 and math.isnan(r3["low"]) and math.isnan(r3["high"])
    assert "too few layers" in r3["note"] and r3["verdict"] == "INCONCLUSIVE"
    gap6, imp6 = rng.uniform(0.2, 1.2, 12), rng.uniform(0, 1, 12)
    r6 = rows(validate(*tables(gap6, imp6, noise=0.05, heads_per_layer=2), 0.77, 0, n_resamples=200))["layer_correlation"]
    assert r6["n_units"] == 6 and -1 <= r6["low"] < r6["value"] < r6["high"] <= 1
    assert "layers -> examples" in r6["scheme"] and "not a replication" in r6["note"]


# --- defect 6: threshold intervals and one-positive AUROCs --------------------------------

def test_threshold_interval_covers_a_threshold_between_observed_gaps():
    """Separable classes: positives below 0.8, negatives above; the true threshold 0.8 lies
    above every positive gap. The old percentile interval of the argmax ends at the largest
    positive gap (0.817 [0.748, 0.817]) and covered 0.8 in none of 20 samples; now every one."""
    rng = np.random.default_rng(11)
    for _ in range(20):
        gap = np.r_[rng.uniform(0.0, 0.8, 6), rng.uniform(0.8, 1.6, 10)]
        pos = np.r_[np.ones(6, bool), np.zeros(10, bool)]
        c = calibrate(gap, pos, n_resamples=FAST)
        assert c.threshold == pytest.approx(gap[:6].max())
        assert c.threshold_low <= c.threshold < c.threshold_high
        assert c.threshold_low <= 0.8 <= c.threshold_high
        assert c.threshold_high in gap and "near-optimal" in c.threshold_method  # an observed gap


def test_near_optimal_set_keeps_every_threshold_whose_j_is_within_noise():
    from analysis.calibration import near_optimal_thresholds
    pos, neg = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]), np.array([0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4])
    lo, hi, kept = near_optimal_thresholds(pos, neg, n_resamples=2000, seed=0)
    # J(0.6) = 1; dropping the top positive costs 1/6, lost in (5/6)^6 = 33 % of resamples;
    # the top two (4/6)^6 = 8.8 % (kept); the top three (1/2)^6 = 1.6 % < 5 % (dropped)
    np.testing.assert_allclose(kept[kept <= 0.6], [0.4, 0.5, 0.6])
    assert lo == 0.4 and hi > 0.6


def test_one_positive_reversed_says_too_few_units_or_reversed():
    """Old code: a perfectly reversed AUROC (0.0) with one positive read INCONCLUSIVE with no
    reason beyond 'no bootstrap interval'. Now the exact test decides, or says that these class
    sizes cannot decide."""
    gap = np.linspace(0.1, 1.0, 6)
    pos = np.zeros(6, bool)
    pos[-1] = True  # the positive has the largest gap
    c = calibrate(gap, pos, n_resamples=FAST)
    assert c.auroc == 0.0 and c.separation == "too few units"
    assert c.auroc_min_p == pytest.approx(2 / 6) and "C(n, n_small) > 40" in c.separation_note
    gap = np.linspace(0.1, 1.0, 45)
    pos = np.zeros(45, bool)
    pos[-1] = True
    c = calibrate(gap, pos, n_resamples=FAST)
    assert c.auroc == 0.0 and c.separation == "reversed" and c.auroc_p_value == pytest.approx(2 / 45)


def test_exact_auroc_test_matches_mann_whitney():
    from analysis.calibration import auroc_test
    rng = np.random.default_rng(2)
    gap, pos = rng.normal(size=12), np.r_[np.ones(4, bool), np.zeros(8, bool)]
    p, min_p = auroc_test(gap, pos)
    assert p == pytest.approx(stats.mannwhitneyu(-gap[pos], -gap[~pos], method="exact").pvalue, abs=1e-12)
    assert min_p == pytest.approx(2 / math.comb(12, 4))


# --- defect 5: scaling fits --------------------------------------------------------------

def test_leave_one_out_leaves_every_point_out():
    from analysis.scaling import leave_one_out
    x = np.array([1e6, 1e7, 1e8, 1e9, 2e9, 3e9])
    cv = leave_one_out(x, 2 * x ** -0.05, "power")
    assert cv.n == 6 and len(cv.predicted) == 6 and cv.n_refused == 0
    np.testing.assert_allclose(cv.predicted, 2 * x ** -0.05, rtol=1e-9)
    assert cv.mae < 1e-9 and cv.press_r2 == pytest.approx(1.0)
    y = np.array([1.0, 3.0, 2.0, 5.0])
    cv = leave_one_out(x[:4], y, "log_linear")
    by_hand = [np.polyval(np.polyfit(np.log10(np.delete(x[:4], i)), np.delete(y, i), 1), np.log10(x[i])) for i in range(4)]
    np.testing.assert_allclose(cv.predicted, by_hand, rtol=1e-9)
    short = leave_one_out(x[:3], y[:3], "log_linear")
    assert math.isnan(short.mae) and "needs >= 4" in short.reason


def test_bounded_quantity_predictions_are_refused_not_clipped():
    """A threshold in [0, 1] extrapolated to 1.03: refused and said so (old code: predicted 1.03)."""
    from analysis.scaling import extrapolate_largest, fit, leave_one_out, scaling_table
    x, y = np.array([1e6, 4e6, 1.6e7, 6.4e7]), np.array([0.5, 0.7, 0.85, 0.97])
    ext = extrapolate_largest(x, y, "log_linear", (0.0, 1.0))
    assert math.isnan(ext.predicted) and "1.03" in ext.reason and "outside [0, 1]" in ext.reason
    cv = leave_one_out(x, y, "log_linear", (0.0, 1.0))
    assert cv.n_refused == 1 and math.isnan(cv.predicted[3]) and np.isfinite(cv.predicted[:3]).all()
    f = fit(x, y, "log_linear", (0.0, 1.0))
    assert math.isnan(float(f.predict(1e9))) and 0 < float(f.predict(1e7)) < 1
    models = [{"model": f"m{i}", "parameters": p, "layers": 2, "heads": 4, "d_model": 64, "d_head": 16}
              for i, p in enumerate(x)]
    table = scaling_table(models, {"threshold": {f"m{i}": v for i, v in enumerate(y)}}, predictors=("parameters",),
                          bounds={"threshold": (0.0, 1.0)})
    lin = next(r for r in table if r["kind"] == "log_linear")
    assert math.isnan(lin["loo_predicted"]) and lin["cv_n_refused"] == 1 and lin["exploratory"] is True
    assert "exploratory" in lin["note"]


def test_thresholds_enter_scaling_only_where_the_gap_separates():
    from types import SimpleNamespace

    from analysis.scaling import restrict_to_separating
    rng = np.random.default_rng(0)
    sep = calibrate(np.r_[rng.uniform(0, 0.5, 8), rng.uniform(0.6, 1.2, 24)], np.r_[np.ones(8), np.zeros(24)],
                    n_resamples=FAST)
    rev = calibrate(np.r_[rng.uniform(0.6, 1.2, 8), rng.uniform(0, 0.5, 24)], np.r_[np.ones(8), np.zeros(24)],
                    n_resamples=FAST)
    assert sep.separation == "separates" and rev.separation == "reversed"
    kept, notes = restrict_to_separating({"a": 0.5, "b": 0.9, "c": 0.7, "d": 0.6},
                                         {"a": sep, "b": rev, "c": SimpleNamespace(low=0.55), "d": None})
    assert kept == {"a": 0.5, "c": 0.7}
    assert len(notes) == 2 and "b left out" in notes[0] and "d left out" in notes[1]
