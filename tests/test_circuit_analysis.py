"""Circuits against spectra: known answers of each statistic, verdicts on planted effects in
both directions, and a null simulation showing the rule does not PASS more often than its
nominal level."""

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from analysis.circuits import CircuitModel, analyse, auroc, auroc_interval, gap_difference, signature

FAST = {"n_resamples": 300, "n_permutations": 300}


def test_gap_difference_known_answer():
    gap = np.array([0.2, 0.22, 0.25, 0.3, 0.32, 0.35, 0.7, 0.75, 0.8, 0.82, 0.85, 0.9, 0.92, 0.95, 0.97, 0.99])
    member = np.arange(16) < 6
    r = gap_difference(gap, member, **FAST)
    assert r.value == pytest.approx(np.median(gap[:6]) - np.median(gap[6:]))
    assert r.high < 0 and r.p_value < 0.01  # the most extreme of C(16, 6) = 8008 assignments
    same = gap_difference(np.full(16, 0.5), member, **FAST)
    assert same.value == 0.0 and same.p_value == 1.0


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    score = np.round(rng.normal(size=40), 1)
    pos = rng.random(40) < 0.3
    assert auroc(score, pos) == pytest.approx(roc_auc_score(pos, score))
    r = auroc_interval(score, pos, n_resamples=200)
    assert r.low <= r.value <= r.high


def _models(effect: float, n_seeds: int = 5, n_heads: int = 48, n_circuit: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    models = []
    for s in range(n_seeds):
        member = np.zeros(n_heads, bool)
        member[rng.choice(n_heads, n_circuit, replace=False)] = True
        gap = np.clip(rng.normal(0.6, 0.15, n_heads) - effect * member, 0.01, 0.99)
        label = np.where(member, "induction", "other")
        models.append(CircuitModel(f"pop?seed={s}", "pop", s, {
            "gap": gap, "in_circuit": member, "label": label, "induction": member + rng.normal(0, 0.5, n_heads),
            "entropy": rng.normal(2, 0.1, n_heads), "effective_rank": rng.normal(5, 1, n_heads),
            "condition_number": np.exp(rng.normal(3, 1, n_heads)), "lambda1": np.exp(rng.normal(0, 1, n_heads))},
            bottleneck=(0.5 + effect + rng.normal(0, 0.2), 0.5 + rng.normal(0, 0.2))))
    return models


def _row(result, key):
    return next(r for r in result.rows if r["key"] == key)


def test_planted_effects_pass_and_reversed_effects_fail():
    planted = analyse(_models(0.3), **FAST)
    assert _row(planted, "circuit_gap_difference")["verdict"] == "PASS"
    assert _row(planted, "gap_auroc/induction")["verdict"] == "PASS"
    assert np.isfinite(_row(planted, "gap_auroc/induction")["pattern_auroc"])
    reversed_ = analyse(_models(-0.3), **FAST)
    assert _row(reversed_, "circuit_gap_difference")["verdict"] == "FAIL"
    assert _row(reversed_, "gap_auroc/induction")["verdict"] == "FAIL"
    assert all(r["correction"].startswith("Holm over") for r in planted.rows if r["verdict"])


def test_null_simulation_does_not_pass_above_its_level():
    """Gaps independent of circuit membership and class, bottleneck ablations alike: the
    across-seed rule (5 seeds) PASSes the 'circuits route through unstable heads', 'the gap
    detects the class' and 'the lowest-gap node is a bottleneck' claims at most at their
    one-sided 2.5 % level (exact binomial allowance, one-sided 99 %)."""
    n_sims = 200
    results = [analyse(_models(0.0, seed=1000 + i), n_resamples=100, n_permutations=100) for i in range(n_sims)]
    allowance = stats.binom.ppf(0.99, n_sims, 0.025)
    for key in ("circuit_gap_difference", "gap_auroc/induction", "bottleneck"):
        passes = sum(_row(r, key)["verdict"] == "PASS" for r in results)
        assert passes <= allowance, f"{key}: {passes} of {n_sims} null runs PASS (allowed {allowance:.0f})"


def test_signature_leave_one_population_out():
    models = []
    for p in range(3):
        for m in _models(0.4, n_seeds=2, seed=10 + p):
            m.population = f"pop{p}"
            models.append(m)
    sig = signature(models)
    assert set(sig["profile"]) == {"induction", "other"}
    assert len(sig["folds"]) == 3 and all(0 <= f["accuracy"] <= 1 for f in sig["folds"])
    assert sig["mean_gain"] == pytest.approx(np.mean([f["accuracy"] - f["baseline"] for f in sig["folds"]]))


def test_exploratory_metrics_carry_no_verdict():
    result = analyse(_models(0.3), **FAST)
    rows = [r for r in result.rows if r["key"].startswith("circuit_difference/")]
    assert {r["key"] for r in rows} == {f"circuit_difference/{m}" for m in
                                        ("entropy", "effective_rank", "condition_number", "lambda1")}
    assert all(r["verdict"] == "" and r["correction"].startswith("exploratory") for r in rows)


def test_signature_null_simulation():
    """Spectral metrics independent of the class: the leave-one-population-out rule PASSes 'the
    spectral metrics predict the class' at most at its one-sided 2.5 % level."""
    n_sims = 60
    passes = 0
    for i in range(n_sims):
        models = []
        for p in range(4):
            for m in _models(0.0, n_seeds=1, n_heads=40, n_circuit=10, seed=5000 + 10 * i + p):
                m.population = f"pop{p}"
                models.append(m)
        passes += signature(models)["verdict"] == "PASS"
    assert passes <= stats.binom.ppf(0.99, n_sims, 0.025), f"{passes} of {n_sims} null runs PASS"
