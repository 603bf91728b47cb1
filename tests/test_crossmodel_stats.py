"""Cross-model statistics: threshold calibration, scaling fits, mutual information.

Every test states the value it expects; fast statistics are checked against plain loops.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from analysis.calibration import (
    calibrate,
    calibrate_layers,
    important,
    layer_min_gap,
    steerable,
    youden_auroc,
)
from analysis.information import entropy_by_stability, mutual_information
from analysis.scaling import extrapolate_largest, fit_log_linear, fit_power_law, scaling_table

FAST = 400  # bootstrap resamples in tests


# --- reference implementations (plain loops) ---------------------------------------------

def brute_youden(gap: np.ndarray, pos: np.ndarray) -> tuple[float, float]:
    """Loop over the observed gaps; keep the first (smallest) threshold of maximal J."""
    best_t, best_j = math.nan, -math.inf
    for t in sorted(set(gap.tolist())):
        tp = sum(1 for g, p in zip(gap, pos) if p and g <= t)
        fp = sum(1 for g, p in zip(gap, pos) if not p and g <= t)
        j = tp / pos.sum() - fp / (~pos).sum()
        if j > best_j:
            best_t, best_j = t, j
    return best_t, best_j


def brute_auroc(gap: np.ndarray, pos: np.ndarray) -> float:
    """P(gap of a positive < gap of a negative) + half the ties."""
    wins = [(gp < gn) + 0.5 * (gp == gn) for gp in gap[pos] for gn in gap[~pos]]
    return float(np.mean(wins))


# --- calibration --------------------------------------------------------------------------

def test_separable_data_gives_perfect_threshold():
    rng = np.random.default_rng(0)
    gap = np.r_[rng.uniform(0.3, 0.5, 20), 0.5, rng.uniform(0.6, 0.9, 40)]
    pos = np.r_[np.ones(21, bool), np.zeros(40, bool)]
    c = calibrate(gap, pos, n_resamples=FAST)
    assert 0.5 <= c.threshold < 0.6
    assert c.threshold == 0.5  # the largest positive gap
    assert c.youden_j == 1.0 and c.auroc == 1.0
    assert c.auroc_low == 1.0 and c.youden_j_low == 1.0
    assert c.j_at_reference == pytest.approx(1 - np.mean(gap[~pos] <= 0.77))
    assert (c.n, c.n_positive, c.n_dropped, c.reason) == (61, 21, 0, "")


def test_random_labels_auroc_near_half():
    """With labels independent of gap, AUROC ~ 0.5 and its 95 % interval holds 0.5 in about
    95 % of data sets (38 of 40 expected; fewer than 34 has probability < 1 %)."""
    covered = []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        gap = rng.uniform(0.5, 1.0, 200)
        pos = rng.random(200) < 0.3
        c = calibrate(gap, pos, n_resamples=200, seed=seed)
        assert abs(c.auroc - 0.5) < 0.15
        assert c.threshold_low <= c.threshold <= c.threshold_high
        covered.append(c.auroc_low <= 0.5 <= c.auroc_high)
    assert sum(covered) >= 34, sum(covered)


@pytest.mark.parametrize("seed", range(5))
def test_youden_matches_brute_force_and_sklearn(seed):
    rng = np.random.default_rng(seed)
    gap = np.round(rng.uniform(0.5, 1.0, 60), 2)  # rounding makes ties
    pos = rng.random(60) < 0.4 + 0.2 * (gap < 0.75)
    t, j = brute_youden(gap, pos)
    c = calibrate(gap, pos, n_resamples=50)  # sklearn roc_curve / roc_auc_score
    assert c.threshold == t and c.youden_j == pytest.approx(j, abs=1e-12)
    assert c.auroc == pytest.approx(brute_auroc(gap, pos), abs=1e-12)
    fast = youden_auroc(gap[pos], gap[~pos])  # the bootstrap statistic
    np.testing.assert_allclose(fast, [t, j, c.auroc], atol=1e-12)


def test_one_class_is_nan_with_reason():
    c = calibrate(np.array([0.6, 0.7, 0.8]), np.array([True, True, True]), n_resamples=FAST)
    assert math.isnan(c.threshold) and math.isnan(c.auroc) and math.isnan(c.youden_j_low)
    assert "one class" in c.reason and c.n == 3 and c.n_positive == 3


def test_single_unit_class_gives_point_estimates_without_interval():
    c = calibrate(np.array([0.5, 0.8, 0.9]), np.array([True, False, False]), n_resamples=FAST)
    assert (c.threshold, c.youden_j, c.auroc, c.j_at_reference) == (0.5, 1.0, 1.0, 1.0)
    assert math.isnan(c.auroc_low) and "1 unit" in c.reason


def test_non_finite_units_are_dropped_and_counted():
    gap = np.array([0.5, np.nan, 0.6, np.inf, 0.9, 0.95, 0.4])
    pos = np.array([1.0, 1.0, 1.0, 0.0, np.nan, 0.0, 0.0])
    c = calibrate(gap, pos, n_resamples=FAST)
    assert (c.n, c.n_dropped, c.n_positive) == (4, 3, 2)
    # kept: 0.5+ 0.6+ 0.95- 0.4-  -> best "gap <= 0.6": TPR 1, FPR 0.5
    assert c.threshold == 0.6 and c.youden_j == 0.5


def test_importance_rule():
    r = np.arange(8) / 10  # 0.0 .. 0.7; 75 % quantile = 0.525
    np.testing.assert_array_equal(important(r), r >= 0.6)
    small = np.array([0.01, 0.02, 0.05, 0.08])  # top quartile, but below the 0.1 floor
    assert not important(small).any()
    with pytest.raises(ValueError, match="non-finite"):
        important(np.array([0.2, np.nan]))


def test_steerable_rule():
    np.testing.assert_array_equal(steerable(np.array([1, 2, 3]), np.array([-0.1, 0.0, 0.2])), [False, False, True])
    np.testing.assert_array_equal(steerable(np.array([1.0, 2.0, 3.0, 4.0])), [False, False, True, True])


def test_layer_calibration_on_min_gap():
    gap = np.array([0.9, 0.7, 0.8, 0.85, 0.6, np.nan, 0.95, 0.88])
    layer = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    layers, mins = layer_min_gap(gap, layer)
    np.testing.assert_array_equal(layers, [0, 1, 2, 3])
    np.testing.assert_array_equal(mins, [0.7, 0.8, 0.6, 0.88])
    effect = np.array([0.03, 0.01, 0.04, 0.02])  # steerable (>= median 0.025): layers 0 and 2
    c = calibrate_layers(mins, effect, n_resamples=FAST)
    assert c.threshold == 0.7 and c.youden_j == 1.0 and c.auroc == 1.0 and c.n_positive == 2


# --- scaling ------------------------------------------------------------------------------

X = np.array([1e6, 1e7, 1e8, 4e8, 1e9, 3e9])


def test_exact_power_law():
    f = fit_power_law(X, 2 * X ** -0.5)
    assert abs(f.b - -0.5) < 1e-9 and f.a == pytest.approx(2, rel=1e-9)
    assert f.r2 == pytest.approx(1, abs=1e-12) and f.rmse < 1e-12 and f.reason == ""
    np.testing.assert_allclose(f.predict([1e10]), 2 * 1e10 ** -0.5, rtol=1e-9)


def test_exact_log_linear():
    f = fit_log_linear(X, 0.8 - 0.02 * np.log10(X))
    assert f.a == pytest.approx(0.8, abs=1e-12) and f.b == pytest.approx(-0.02, abs=1e-12)
    assert f.r2 == pytest.approx(1, abs=1e-12)


def test_noisy_intervals_cover_truth_at_nominal_rate():
    """t-intervals are exact for Gaussian residuals: coverage of 0.95 within sampling error."""
    rng = np.random.default_rng(2)
    x = np.logspace(6, 10, 8)
    hits = []
    for _ in range(400):
        fp = fit_power_law(x, 2 * x ** -0.5 * np.exp(rng.normal(0, 0.1, x.size)))
        fl = fit_log_linear(x, 0.8 - 0.02 * np.log10(x) + rng.normal(0, 0.01, x.size))
        hits.append([fp.b_low <= -0.5 <= fp.b_high, fp.a_low <= 2 <= fp.a_high,
                     fl.b_low <= -0.02 <= fl.b_high, fl.a_low <= 0.8 <= fl.a_high])
    coverage = np.mean(hits, axis=0)
    assert ((coverage > 0.92) & (coverage < 0.98)).all(), coverage


def test_extrapolation_on_exact_power_law_predicts_exactly():
    loo = extrapolate_largest(X, 2 * X ** -0.5, "power")
    assert loo.x_held_out == 3e9 and loo.n_train == 5 and loo.n_held_out == 1
    assert loo.predicted == pytest.approx(loo.observed, rel=1e-9) and loo.rel_error < 1e-9


def test_two_points_give_params_and_nan_intervals():
    f = fit_power_law([1.0, 100.0], [2.0, 0.2])
    assert f.b == pytest.approx(-0.5) and f.a == pytest.approx(2.0)
    assert math.isnan(f.b_low) and math.isnan(f.r2) and "2 points" in f.reason
    one = fit_log_linear([10.0], [1.0])
    assert math.isnan(one.a) and math.isnan(one.b) and "at least 2" in one.reason


def test_fit_domain_and_non_finite():
    f = fit_power_law(X, np.array([0.5, -0.1, 0.3, 0.2, 0.1, 0.05]))
    assert math.isnan(f.b) and "y > 0" in f.reason
    g = fit_log_linear(np.r_[X, np.nan, 1e5], np.r_[0.8 - 0.02 * np.log10(X), 0.7, np.inf])
    assert (g.n, g.n_dropped) == (6, 2) and g.b == pytest.approx(-0.02)


def test_extrapolation_needs_three_training_points():
    loo = extrapolate_largest([1.0, 10.0, 100.0], [1.0, 2.0, 3.0], "log_linear")
    assert math.isnan(loo.predicted) and loo.observed == 3.0 and "needs >= 3" in loo.reason


MODELS = [
    {"model": "organism-s", "parameters": 680_000, "layers": 3, "heads": 4, "d_model": 128, "d_head": 32},
    {"model": "pythia-410m", "parameters": 405e6, "layers": 24, "heads": 16, "d_model": 1024, "d_head": 64},
    {"model": "pythia-1b", "parameters": 1.01e9, "layers": 16, "heads": 8, "d_model": 2048, "d_head": 256},
    {"model": "pythia-2.8b", "parameters": 2.78e9, "layers": 32, "heads": 32, "d_model": 2560, "d_head": 80},
    {"model": "llama-2-7b", "parameters": 6.74e9, "layers": 32, "heads": 32, "d_model": 4096, "d_head": 128},
]


def test_scaling_table_rows_and_total_heads():
    total = {m["model"]: m["layers"] * m["heads"] for m in MODELS}
    quantities = {
        "threshold": {k: 3 * v ** 0.25 for k, v in total.items()},  # exact power law in total heads
        "correlation_r": {"organism-s": -0.2, "pythia-410m": 0.1, "pythia-1b": 0.3, "pythia-2.8b": 0.2},
    }
    rows = scaling_table(MODELS, quantities)
    assert len(rows) == 2 * 4 * 2
    heads = next(r for r in rows if (r["quantity"], r["predictor"], r["kind"]) == ("threshold", "heads", "power"))
    assert heads["b"] == pytest.approx(0.25, abs=1e-9) and heads["a"] == pytest.approx(3, rel=1e-9)
    # two models share the largest total (1024 heads): both held out, 3 left to train on
    assert heads["loo_predicted"] == pytest.approx(3 * 1024 ** 0.25, rel=1e-9) and heads["n"] == 5
    neg = next(r for r in rows if (r["quantity"], r["predictor"], r["kind"]) == ("correlation_r", "d_head", "power"))
    assert math.isnan(neg["b"]) and "y > 0" in neg["reason"] and neg["n"] == 4
    lin = next(r for r in rows if (r["quantity"], r["predictor"], r["kind"]) == ("correlation_r", "d_head", "log_linear"))
    assert np.isfinite(lin["b"]) and np.isfinite(lin["b_low"])
    with pytest.raises(ValueError, match="not in models"):
        scaling_table(MODELS, {"threshold": {"gpt-2": 0.77}})


# --- information --------------------------------------------------------------------------

def test_mi_of_independent_data_is_near_zero():
    rng = np.random.default_rng(3)
    m = mutual_information(rng.normal(size=300), rng.normal(size=300))
    assert abs(m.corrected) < 0.05 and m.p_value > 0.05 and m.reason == ""


def test_mi_of_dependent_data_is_large():
    rng = np.random.default_rng(4)
    x = rng.normal(size=300)
    m = mutual_information(x, x + 0.1 * rng.normal(size=300))
    # Gaussian MI = -0.5 log(1 - rho^2) = 0.5 log(1 + 1/0.01) = 2.31 nats
    assert m.value == pytest.approx(0.5 * np.log(101), abs=0.3)
    assert m.corrected > 1.5 and m.p_value < 0.01 and m.null_p95 < 0.2


def test_mi_small_n_constant_and_non_finite():
    few = mutual_information(np.arange(4.0), np.arange(4.0))
    assert math.isnan(few.value) and "n_neighbors + 2" in few.reason
    const = mutual_information(np.ones(20), np.arange(20.0))
    assert math.isnan(const.p_value) and "constant" in const.reason
    rng = np.random.default_rng(5)
    x = rng.normal(size=50)
    m = mutual_information(np.r_[x, np.nan, 1.0], np.r_[x, 0.0, np.inf], n_permutations=20)
    assert (m.n, m.n_dropped) == (50, 2)


def test_entropy_by_stability():
    gap = np.array([0.6, 0.65, 0.7, 0.75, 0.77, 0.8, 0.85, 0.9, 0.95, 0.99, np.nan])
    ent = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 3.0])
    s = entropy_by_stability(gap, ent, n_resamples=FAST)
    assert (s.unstable.n, s.stable.n, s.n_dropped) == (5, 5, 1)
    assert (s.unstable.median, s.unstable.q1, s.unstable.q3, s.stable.median) == (3, 2, 4, 8)
    assert s.median_diff == -5 and s.median_diff_low <= -5 <= s.median_diff_high < 0
    assert s.p_value == pytest.approx(stats.mannwhitneyu([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]).pvalue)
    assert s.p_value == pytest.approx(2 / 252)  # exact: 2 extreme orderings of C(10, 5)
    empty = entropy_by_stability(gap[5:], ent[5:], n_resamples=FAST)
    assert math.isnan(empty.p_value) and "no unstable" in empty.reason


# --- information: unclipped KSG, stratified permutations (issue 12, defect 10) ---------------------

def test_ksg_equals_sklearn_where_sklearn_is_not_clipped_and_goes_below_zero_otherwise():
    from sklearn.feature_selection import mutual_info_regression

    from analysis.information import ksg

    rng = np.random.default_rng(6)
    below = 0
    for i in range(30):
        x, y = rng.normal(size=40), rng.normal(size=40)
        if i % 2:
            y = y + x
        ours = ksg(x, y, 3, seed=i)
        theirs = float(mutual_info_regression(x[:, None], y, n_neighbors=3, random_state=i)[0])
        assert theirs == pytest.approx(max(ours, 0.0), abs=1e-12)
        below += ours < 0
    assert below > 0  # independent samples: the raw estimate is often negative, sklearn's reads 0


def test_mi_excess_over_the_null_is_unbiased_without_dependence():
    """Independent data: the mean raw estimate minus the null mean is ~0 (clipping both at 0,
    as before, biases it upward); the null has the default >= 1000 shuffles and the p-value its
    Monte-Carlo error."""
    from analysis.information import N_PERMUTATIONS

    assert N_PERMUTATIONS >= 1000
    rng = np.random.default_rng(7)
    excess = [mutual_information(rng.normal(size=30), rng.normal(size=30), n_permutations=200, seed=i).corrected
              for i in range(40)]
    assert abs(np.mean(excess)) < 3 * np.std(excess) / np.sqrt(len(excess)) + 0.01
    m = mutual_information(rng.normal(size=30), rng.normal(size=30), seed=1)
    assert m.n_permutations == N_PERMUTATIONS
    assert m.mc_error == pytest.approx(np.sqrt(m.p_value * (1 - m.p_value) / N_PERMUTATIONS))


def test_pooled_mi_permutes_within_each_model():
    """Two models whose x and y differ in level but are independent inside each model: pooled
    over both, x and y look dependent (the levels go together). Shuffling y across models finds
    'information' (tiny p); shuffling within each model does not."""
    from analysis.information import _shuffles

    rng = np.random.default_rng(8)
    n = 60
    model = np.repeat([0, 1], n)
    x = rng.normal(size=2 * n) + 3 * model
    y = rng.normal(size=2 * n) + 3 * model
    naive = mutual_information(x, y, n_permutations=300, seed=0)
    strat = mutual_information(x, y, n_permutations=300, seed=0, strata=model)
    assert naive.p_value < 0.01 and strat.p_value > 0.05 and strat.n_strata == 2
    assert strat.value == pytest.approx(naive.value)  # the same estimate, another null
    perms = _shuffles(model, 50, np.random.default_rng(0))
    assert (model[perms] == model).all()  # every shuffle keeps each unit's model
    assert all(sorted(p[:n]) == list(range(n)) for p in perms)


def test_large_n_null_uses_the_same_estimator():
    """Above the dense limit the null runs a KD-tree per shuffle: the same KSG values."""
    from sklearn.neighbors import KDTree

    from analysis.information import _ksg_batch, _ksg_tree, _prepare

    rng = np.random.default_rng(9)
    x, y = rng.normal(size=120), rng.normal(size=120)
    rs = np.random.RandomState(0)
    xs, ys = _prepare(x, rs), _prepare(y, rs)
    dense = _ksg_batch(np.abs(xs[:, None] - xs[None]), np.abs(ys[:, None] - ys[None])[None], 3)[0]
    assert _ksg_tree(xs, ys, KDTree(xs[:, None], metric="chebyshev"), 3) == pytest.approx(dense, rel=1e-12)
