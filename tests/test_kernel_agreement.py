"""Kernel agreement, pre- vs post-softmax (``analysis.kernel_agreement``): per-model Spearman of
the gaps and Cohen's kappa of the instability flags (at 0.77 and at each kernel's calibrated
threshold) against hand-computed values, scipy and scikit-learn; across seeds on Fisher's z; the
verdict ``key_captures_presoftmax`` PASSes for kernels that agree and FAILs for kernels that do
not; null simulations put each part of the verdict exactly at its bar (the finite-sample mean of
the per-model statistic, measured once with 40,000 draws per head count) and bound the PASS rate
by the nominal 2.5 % (exact binomial test at 0.01); bad input is one UsageError."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from scipy import stats
from sklearn.metrics import cohen_kappa_score

from analysis.calibration import calibrate, important
from analysis.kernel_agreement import (
    BAR_KAPPA, BAR_SPEARMAN, KERNEL_PAIRS, PAIR_COLUMNS, POPULATION_COLUMNS, THRESHOLD_COLUMNS, VERDICT_COLUMNS,
    VERDICT_KEY, VERDICT_PAIR, ModelGaps, agreement, kappa, model_gaps, pair_rows,
)
from spectral.errors import UsageError
from spectral.features.names import FEATURE_KERNELS

HEADS = {"organism-xs": 16, "organism-s": 12, "organism-m": 32, "organism-l": 48}
NOMINAL = 0.025


def within_nominal(k: int, n: int, rate: float = NOMINAL) -> bool:
    return stats.binomtest(k, n, rate, alternative="greater").pvalue >= 0.01


def gaps_model(name, pop, seed, key, scores, rng, restoration=None) -> ModelGaps:
    """A model whose key_rotated gaps are ``key`` and scores gaps ``scores``; other kernels noise."""
    n = key.size
    gaps = {k: rng.uniform(0.5, 1.0, n) for k in FEATURE_KERNELS}
    gaps["key_rotated"], gaps["scores"] = key, scores
    return ModelGaps(name, pop, seed, gaps, restoration)


def test_one_models_spearman_and_kappa_are_the_hand_computed_values():
    """Gaps a = (0.5, 0.6, 0.8, 0.9), b = (0.7, 0.9, 0.75, 0.95): ranks 1234 vs 1324, rho = 1 - 6 x 2 / 60
    = 0.8; flags at 0.77: TTFF vs TFTF, observed agreement 1/2 = chance: kappa 0."""
    m = ModelGaps("m", "p", 0, {"key_rotated": np.array([0.5, 0.6, 0.8, 0.9]),
                                "scores": np.array([0.7, 0.9, 0.75, 0.95])})
    (row,) = pair_rows(m, {}, [VERDICT_PAIR])
    assert row["spearman"] == pytest.approx(0.8) and row["kappa_reference"] == pytest.approx(0.0)
    assert (row["flagged_a"], row["flagged_b"], row["n_heads"]) == (2, 2, 4)
    assert np.isnan(row["kappa_calibrated"]) and row["note"] == "no calibrated threshold for both kernels"
    assert tuple(row) == PAIR_COLUMNS


def test_kappa_matches_sklearn_and_is_undefined_without_variation():
    rng = np.random.default_rng(0)
    for n, pa_, pb in ((30, 0.3, 0.5), (12, 0.2, 0.2), (48, 0.5, 0.9)):
        a, b = rng.random(n) < pa_, rng.random(n) < pb
        assert kappa(a, b) == pytest.approx(cohen_kappa_score(a, b), abs=1e-12)
    assert np.isnan(kappa(np.ones(5, bool), np.ones(5, bool))) and kappa(np.ones(4, bool), np.arange(4) < 2) == 0.0


def test_calibrated_thresholds_are_calibrations_own_and_drive_the_calibrated_kappa():
    rng = np.random.default_rng(1)
    restoration = rng.beta(0.5, 2.0, 32)
    key = 0.9 - 0.5 * restoration + 0.05 * rng.normal(size=32)
    scores = 0.95 - 0.3 * restoration + 0.05 * rng.normal(size=32)
    m = gaps_model("m", "p", 0, key, scores, rng, restoration)
    res = agreement([m], [VERDICT_PAIR, ("key_raw", "probs")], n_resamples=50)
    t = {r["kernel"]: r for r in res.thresholds}
    expected = calibrate(key, important(restoration), n_resamples=50)
    assert t["key_rotated"]["threshold"] == expected.threshold
    assert t["key_rotated"]["n_important"] == expected.n_positive
    assert t["key_rotated"]["calibrated_against"].startswith("importance")
    row = next(r for r in res.pairs if (r["kernel_a"], r["kernel_b"]) == VERDICT_PAIR)
    ta, tb = t["key_rotated"]["threshold"], t["scores"]["threshold"]
    assert (row["threshold_a"], row["threshold_b"]) == (ta, tb)
    assert row["kappa_calibrated"] == pytest.approx(cohen_kappa_score(key <= ta, scores <= tb))
    assert all(tuple(r) == THRESHOLD_COLUMNS for r in res.thresholds)


def test_across_seeds_correlations_are_averaged_on_fishers_z():
    rng = np.random.default_rng(2)
    models = []
    for s in range(3):
        key = rng.uniform(0.5, 1.0, 20)
        models.append(gaps_model(f"p?seed={s}", "p", s, key, key + rng.normal(0, 0.1 * (s + 1), 20), rng))
    res = agreement(models, [VERDICT_PAIR], n_resamples=10)
    rhos = [stats.spearmanr(m.gaps["key_rotated"], m.gaps["scores"]).statistic for m in models]
    z = np.arctanh(rhos)
    half = stats.t.ppf(0.975, 2) * z.std(ddof=1) / np.sqrt(3)
    (row,) = res.populations
    assert row["spearman"] == pytest.approx(np.tanh(z.mean()))
    assert (row["spearman_low"], row["spearman_high"]) == pytest.approx(
        (np.tanh(z.mean() - half), np.tanh(z.mean() + half)))
    assert row["n_seeds"] == 3 and tuple(row) == POPULATION_COLUMNS


def test_agreeing_kernels_pass_and_unrelated_ones_fail():
    rng = np.random.default_rng(3)
    agree, unrelated = [], []
    for pop, n in HEADS.items():
        for s in range(5):
            key = rng.uniform(0.5, 1.0, n)
            agree.append(gaps_model(f"{pop}?seed={s}", pop, s, key, key + rng.normal(0, 0.01, n), rng))
            unrelated.append(gaps_model(f"{pop}?seed={s}", pop, s, key, rng.uniform(0.5, 1.0, n), rng))
    res = agreement(agree, n_resamples=10)
    assert [r["verdict"] for r in res.verdicts] == ["PASS"] * 4
    assert all(r["flags"] == "gap <= 0.77" and r["correction"].startswith("Holm over 4 population(s)")
               for r in res.verdicts)
    assert {(r["kernel_a"], r["kernel_b"]) for r in res.populations} == set(KERNEL_PAIRS)
    assert len(res.pairs) == 20 * len(KERNEL_PAIRS)
    res = agreement(unrelated, [VERDICT_PAIR], n_resamples=10)
    assert [r["verdict"] for r in res.verdicts] == ["FAIL"] * 4
    assert all(tuple(r) == VERDICT_COLUMNS and r["key"] == VERDICT_KEY for r in res.verdicts)
    assert all(isinstance(v, (str, float, int, bool)) for r in res.verdicts for v in r.values())


# --- null simulations: each part of the verdict at its bar --------------------------------------

RHO_AT_BAR = {12: 0.108, 16: 0.049, 32: 0.069, 48: 0.075}
"""Gaussian-copula correlation of the within-class gaps that puts the mean per-model Fisher z of
the Spearman at atanh(0.5) (``spearman_at_bar``; 40,000 draws per head count)."""
P_AT_BAR = {12: 0.205, 16: 0.204, 32: 0.202, 48: 0.201}
"""Base rate of the scores' flags that puts the mean per-model kappa at 0.4 (``kappa_at_bar``)."""


def spearman_at_bar(n, rng):
    """20 % of heads unstable in both kernels (gap below 0.77: kappa 1); within each class the two
    kernels' gaps are Gaussian-copula correlated at RHO_AT_BAR[n]: Spearman at its bar 0.5."""
    f = np.where(np.arange(n) < n // 5, -1.0, 1.0)
    r = RHO_AT_BAR[n]
    x = rng.normal(size=n)
    y = r * x + np.sqrt(1 - r * r) * rng.normal(size=n)
    return 0.77 + 0.1 * f * (1 + stats.norm.cdf(x)), 0.77 + 0.1 * f * (1 + stats.norm.cdf(y))


def kappa_at_bar(n, rng):
    """The same ordering of heads in both kernels (Spearman 1); the key flags half the heads, the
    scores the lowest P_AT_BAR[n]: kappa at its bar 0.4 (2 x 0.2 in the population)."""
    a = rng.normal(size=n)
    return 0.77 + 0.1 * a, 0.77 + 0.1 * (a - stats.norm.ppf(P_AT_BAR[n]))


@pytest.mark.parametrize("make,measured", [(spearman_at_bar, (2, 2)), (kappa_at_bar, (5, 5))])
def test_null_each_part_at_its_bar_does_not_pass_above_nominal(make, measured):
    """200 simulations of 4 populations x 5 seeds, every population at the bar. Holm across the
    populations bounds the chance that ANY population PASSes (the family) by 2.5 %. Measured:
    Spearman at its bar: 2 of 200 families with a PASS (2 of 800 rows); kappa at its bar: 5 of 200
    (5 of 800 rows)."""
    rng = np.random.default_rng(4)
    families = rows = 0
    for _ in range(200):
        models = []
        for pop, n in HEADS.items():
            for s in range(5):
                key, scores = make(n, rng)
                models.append(ModelGaps(f"{pop}?seed={s}", pop, s, {"key_rotated": key, "scores": scores}))
        passed = sum(r["verdict"] == "PASS" for r in agreement(models, [VERDICT_PAIR]).verdicts)
        families += passed > 0
        rows += passed
    assert (families, rows) == measured and within_nominal(families, 200)


def test_the_null_constructions_sit_at_the_bars():
    rng = np.random.default_rng(5)
    z = [np.arctanh(stats.spearmanr(*spearman_at_bar(48, rng)).statistic) for _ in range(1500)]
    assert np.tanh(np.mean(z)) == pytest.approx(BAR_SPEARMAN, abs=0.01)
    k = [kappa(*(g <= 0.77 for g in kappa_at_bar(48, rng))) for _ in range(1500)]
    assert np.nanmean(k) == pytest.approx(BAR_KAPPA, abs=0.01)


# --- input ----------------------------------------------------------------------------------------

def test_model_gaps_reads_the_feature_table_and_joins_restoration():
    t = pa.table({"model": ["m"] * 3, "layer": [0, 0, 1], "head": [0, 1, 0],
                  **{f"{k}.gap": [0.5, 0.6, 0.7] for k in FEATURE_KERNELS}})
    m = model_gaps(t, pa.table({"layer": [0, 1], "head": [1, 0], "restoration": [0.2, 0.3]}), population="p", seed=2)
    assert m.model == "m" and set(m.gaps) == set(FEATURE_KERNELS)
    np.testing.assert_array_equal(m.restoration, [np.nan, 0.2, 0.3])


def test_bad_input_is_one_usage_error():
    t = pa.table({"model": ["m"], "layer": [0], "head": [0], "key_raw.gap": [0.5]})
    with pytest.raises(UsageError, match="features table lacks column.*'key_rotated.gap'"):
        model_gaps(t, population="p")
    with pytest.raises(UsageError, match="unknown kernel 'keys'"):
        model_gaps(t, population="p", kernels=["keys"])
    with pytest.raises(UsageError, match="heads table lacks column.*'restoration'"):
        model_gaps(t, pa.table({"layer": [0], "head": [0]}), population="p", kernels=["key_raw"])
    m = ModelGaps("m", "p", 0, {"key_raw": np.ones(3)})
    with pytest.raises(UsageError, match="has no gaps of kernel"):
        agreement([m])
    with pytest.raises(UsageError, match="unknown kernel 'scorez'"):
        agreement([m], [("key_raw", "scorez")])
