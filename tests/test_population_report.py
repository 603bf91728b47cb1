"""The cross-model report's statistics over populations of seeds (issue 12): Cochran's Q with
1/(n - 3), null simulations of the verdict rules, Holm within families, ratios that are
undefined when their denominator is not known to be > 0, which patch runs count as importance,
population grouping. Synthetic data only (no model is trained or loaded); the null simulations
are seeded and take a few seconds each.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from analysis import crossmodel as cm
from analysis.crossmodel import (
    ModelData, Population, PopulationResult, consistency_verdict, head_rows, heterogeneity, job_verdicts, load_run,
    study,
)
from analysis.population import Member, Stat, estimate_many, from_values
from cluster.layout import safe
from jobs.report import load_cell
from spectral import tables
from tests.synthetic_runs import write


def allowed(n: int, rate: float) -> int:
    """Most PASSes of ``n`` simulations consistent with a true rate of ``rate`` (exact binomial,
    one-sided 1 %): the Monte-Carlo allowance."""
    return int(stats.binom.ppf(0.99, n, rate))


# --- Cochran's Q with SE 1/sqrt(n - 3) ---------------------------------------------------------

def test_q_matches_a_hand_computation_with_n_minus_3():
    """RESULTS' correlations on organism-xs/s/m/l: r = +0.57, -0.47, +0.16, -0.11 over 8, 12, 32,
    48 heads. With w = n - 3: Q = 5.7 (3 df, p = 0.13, I² = 0.47): INCONCLUSIVE, not the FAIL
    (Q = 265) that example-bootstrap SEs gave."""
    r, n = np.array([0.57, -0.47, 0.16, -0.11]), np.array([8, 12, 32, 48])
    z, w = np.arctanh(r), n - 3.0
    zbar = (w * z).sum() / w.sum()
    q_hand = float((w * (z - zbar) ** 2).sum())
    assert q_hand == pytest.approx(5.7, abs=0.05)
    h = heterogeneity([study(f"p{i}", [ri], [ni]) for i, (ri, ni) in enumerate(zip(r, n))])
    assert h.q == pytest.approx(q_hand, rel=1e-9) and h.df == 3 and h.test == "chi-square(3)"
    assert h.p_value == pytest.approx(stats.chi2.sf(q_hand, 3), rel=1e-9) and h.p_value == pytest.approx(0.13, abs=0.01)
    assert h.i2 == pytest.approx((q_hand - 3) / q_hand) and h.i2 == pytest.approx(0.47, abs=0.01)
    assert h.pooled == pytest.approx(math.tanh(zbar))
    assert consistency_verdict(h)[0] == "INCONCLUSIVE"


def test_steering_consistency_leaves_out_models_with_three_layers_or_fewer():
    """Layer-level r on 2, 3, 4 and 6 layers: the 2- and 3-layer models have no Fisher-z variance
    (n - 3 <= 0) and are left out; the other two give Q = 0.15, p = 0.70 (not Q = 1,052)."""
    studies = [study("xs", [0.9], [2]), study("s", [0.57], [3]), study("m", [-0.45], [4]), study("l", [-0.04], [6])]
    assert studies[0] is None and studies[1] is None
    h = heterogeneity(studies)
    assert h.n_models == 2 and h.df == 1
    assert h.q == pytest.approx(0.15, abs=0.005) and h.p_value == pytest.approx(0.70, abs=0.01)
    assert consistency_verdict(h)[0] == "INCONCLUSIVE"  # the pooled r does not differ from 0


def test_population_variance_includes_the_between_seed_spread():
    tight = study("a", [0.30, 0.31, 0.29, 0.30, 0.30], [48] * 5)
    spread = study("b", [-0.4, 0.8, 0.1, 0.6, -0.2], [48] * 5)
    assert tight.var == pytest.approx((1 / 45) / 5)  # the within-seed floor: 1/(n-3) over k seeds
    z = np.arctanh([-0.4, 0.8, 0.1, 0.6, -0.2])
    assert spread.var == pytest.approx(z.var(ddof=1) / 5) and spread.df == 4
    h = heterogeneity([tight, spread])
    assert h.test.startswith("Welch F(1, ")


# --- null simulations ------------------------------------------------------------------------

def _r(rng: np.random.Generator, n: int, rho: np.ndarray) -> np.ndarray:
    """Sample correlations over n units, one per entry of rho (vectorised)."""
    x = rng.standard_normal((rho.size, n))
    y = rho[:, None] * x + np.sqrt(1 - rho[:, None] ** 2) * rng.standard_normal((rho.size, n))
    x, y = x - x.mean(1, keepdims=True), y - y.mean(1, keepdims=True)
    return (x * y).sum(1) / np.sqrt((x * x).sum(1) * (y * y).sum(1))


@pytest.mark.parametrize("seeds, tau", [(1, 0.0), (5, 0.0), (5, 0.2)])
def test_consistency_null_passes_at_most_at_the_nominal_rate(seeds, tau):
    """No association in any population (mean rho 0; with tau, every seed's own rho varies by
    training): the consistency verdict claims a common non-zero correlation, so it must PASS in
    at most 5 % of runs. The old rule (Q's p >= 0.05 and all signs equal) passed in ~12 %."""
    rng = np.random.default_rng(12 + seeds + int(tau * 10))
    heads = (8, 12, 32, 48)
    n_sim, passes, old = 400, 0, 0
    for _ in range(n_sim):
        studies = []
        for n in heads:
            rho = np.tanh(rng.normal(0, tau, seeds)) if tau else np.zeros(seeds)
            studies.append(study("p", _r(rng, n, rho), [n] * seeds))
        h = heterogeneity(studies)
        passes += consistency_verdict(h)[0] == "PASS"
        old += h.p_value >= 0.05 and h.n_positive in (0, h.n_models)
    assert passes <= allowed(n_sim, 0.05), passes
    if seeds == 1:
        assert old > allowed(n_sim, 0.05)  # what the old rule did


def _null_model(rng: np.random.Generator, name: str, seed: int, n_heads: int, n_examples: int = 32,
                rho: float | None = None) -> ModelData:
    """A model whose importance does not depend on the gap (or, with ``rho``, whose 1/gap and
    importance have correlation rho across heads)."""
    if rho is None:
        gap = rng.uniform(0.3, 1.0, n_heads)
        imp = rng.normal(0.2, 0.3, n_heads)
    else:
        z1 = rng.standard_normal(n_heads)
        z2 = rho * z1 + math.sqrt(1 - rho ** 2) * rng.standard_normal(n_heads)
        gap, imp = 1 / (2 + 0.4 * z1), 0.3 + 0.2 * z2
    clean = 2 + 0.5 * rng.standard_normal((n_heads, n_examples))
    corrupt = 0.5 * rng.standard_normal((n_heads, n_examples))
    patched = corrupt + imp[:, None] * (clean - corrupt) + 0.3 * rng.standard_normal((n_heads, n_examples))
    ex = {"patched": patched, "clean": clean, "corrupt": corrupt}
    measured = cm.restoration(patched, clean, corrupt)
    md = ModelData(name, name.split("?")[0], seed, None, {})
    md.heads = {"layer": np.zeros(n_heads), "head": np.arange(n_heads, dtype=float), "gap": gap, "restoration": measured}
    md.examples = ex
    return md


def _verdict(pop: Population, key: str, n_resamples: int, seed: int) -> str:
    rows = head_rows(pop, PopulationResult(), n_resamples, seed)
    cm._apply_holm(rows)
    return next(r for r in rows if r["key"] == key)["verdict"]


@pytest.mark.parametrize("seeds, heads", [(5, 12), (1, 8), (1, 16)])
def test_restoration_difference_null_passes_at_most_at_the_nominal_rate(seeds, heads):
    """Gap independent of importance: 'unstable - stable > 0' is a one-sided 95 % rule and must
    PASS in at most 2.5 % of runs, for a population of 5 seeds (the t-interval over the seeds'
    values) and for one model of 8 or 16 heads (its t-scaled interval; a percentile bootstrap over
    8 heads passed in ~10 %)."""
    rng = np.random.default_rng(100 * seeds + heads)
    n_sim, passes = 300, 0
    for i in range(n_sim):
        pop = Population("organism-x", [_null_model(rng, "organism-x", s, heads) for s in range(seeds)], ["x"] * seeds)
        passes += _verdict(pop, "restoration_difference", 200, i) == "PASS"
    assert passes <= allowed(n_sim, 0.025), passes


@pytest.mark.parametrize("heads", [8, 16])
def test_one_model_correlation_at_the_target_passes_at_most_at_the_nominal_rate(heads):
    """1/gap and importance correlated with rho = 0.7 exactly (the target): 'r > 0.7' must PASS
    in at most 2.5 % of runs (with examples' noise attenuating r, fewer)."""
    rng = np.random.default_rng(7 + heads)
    n_sim, passes = 300, 0
    for i in range(n_sim):
        pop = Population("organism-x", [_null_model(rng, "organism-x", 0, heads, rho=0.7)], ["x"])
        passes += _verdict(pop, "importance_correlation", 200, i) == "PASS"
    assert passes <= allowed(n_sim, 0.025), passes


# --- the estimator -------------------------------------------------------------------------------

def test_batched_statistics_agree_with_their_plain_forms_in_the_one_estimator():
    """The report's batched statistics (analysis.stats) and plain re-implementations of them give
    the same per-seed values, and the same intervals up to Monte Carlo error, in
    analysis.population.estimate_many (the plain form is the fallback for statistics without a
    batched form; both run on the same resamples)."""
    from analysis.stats import group_contrast, pearson, r_inverse_gap, restoration

    def plain_r(pu, pe):
        return pearson(1 / pu["gap"], restoration(pe["patched"], pe["clean"], pe["corrupt"]))

    def plain_d(pu, pe):
        imp, g = restoration(pe["patched"], pe["clean"], pe["corrupt"]), pu["gap"]
        ok = np.isfinite(imp)
        u, s = imp[ok & (g <= 0.77)], imp[ok & (g > 0.77)]
        return float(u.mean() - s.mean()) if u.size and s.size else float("nan")

    rng = np.random.default_rng(3)
    mds = [_null_model(rng, "p", s, 24, rho=0.5) for s in range(4)]
    members = [Member(md.seed, {"gap": md.heads["gap"]}, md.examples) for md in mds]
    es = estimate_many(members, {"r": r_inverse_gap, "d": group_contrast(), "r plain": Stat("r", plain=plain_r, fisher=True),
                                 "d plain": Stat("d", plain=plain_d)}, n_resamples=1000, seed=1, keep_resamples=True)
    for key in ("r", "d"):
        fast, slow = es[key], es[f"{key} plain"]
        assert fast.per_seed == pytest.approx(slow.per_seed, rel=1e-9)  # the same statistic
        assert (fast.value, fast.low, fast.high) == pytest.approx((slow.value, slow.low, slow.high), rel=1e-9)
        for a, b in zip(fast.resamples, slow.resamples):  # on the same resamples
            np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-12)
        assert fast.scheme == slow.scheme
        for a, b in zip(fast.per_seed_low, slow.per_seed_low):
            assert a == pytest.approx(b, abs=1e-7)
        assert fast.hier_low == pytest.approx(slow.hier_low, abs=1e-7)


# --- ratios, Holm -------------------------------------------------------------------------------

def test_ratio_is_undefined_when_the_stable_mean_is_not_above_zero():
    """The retrained organism-xs case: stable heads restore -0.011 on average, unstable +0.2. The
    ratio (-19) would FAIL 'unstable > 2x stable'; the difference PASSes and the ratio verdict is
    undefined (INCONCLUSIVE), never FAIL."""
    rng = np.random.default_rng(4)
    mds = []
    for s in range(5):
        md = _null_model(rng, "organism-xs", s, 16)
        gap = np.r_[np.full(8, 0.5), np.full(8, 0.9)]
        imp = np.r_[rng.normal(0.21, 0.02, 8), rng.normal(-0.011, 0.02, 8)]
        ex = md.examples
        ex["patched"] = ex["corrupt"] + imp[:, None] * (ex["clean"] - ex["corrupt"])
        md.heads["gap"], md.heads["restoration"] = gap, cm.restoration(ex["patched"], ex["clean"], ex["corrupt"])
        mds.append(md)
    rows = {r["key"]: r for r in head_rows(Population("organism-xs", mds, ["x"] * 5), PopulationResult(), 400, 0)}
    cm._apply_holm(list(rows.values()))
    assert rows["restoration_difference"]["verdict"] == "PASS"
    assert rows["restoration_ratio"]["verdict"] == "INCONCLUSIVE"
    assert rows["restoration_ratio"]["note"].startswith("undefined: the stable heads' mean restoration")


def test_holm_within_a_family_turns_borderline_passes_inconclusive():
    rows = [dict(cm._row(f"p{i}", "restoration_difference"), p_pass=p, p_fail=1.0)
            for i, p in enumerate([0.001, 0.012, 0.015, 0.02])]
    cm._apply_holm(rows)
    # Holm: 0.004, 0.036, 0.036, 0.036 against 0.025
    assert [r["verdict"] for r in rows] == ["PASS", "INCONCLUSIVE", "INCONCLUSIVE", "INCONCLUSIVE"]
    assert [r["p_pass_holm"] for r in rows] == pytest.approx([0.004, 0.036, 0.036, 0.036])
    assert all(r["correction"].startswith("Holm over 4 population(s) (family: restoration_difference)") for r in rows)


# --- reading runs ---------------------------------------------------------------------------------

def test_job_verdicts_are_found_by_key_only():
    """The per-model verdicts of the jobs are matched by their stable key, never by a display label."""
    md = ModelData("organism-s?seed=1", "organism-s", 1, None, {},
                   steer={"steering_improvement": {"key": "steering_improvement", "verdict": "PASS",
                                                   "name": "effect lost by spectral vs the oracle's best layer"}})
    assert job_verdicts([md], "steering_improvement", "steer") == "steer job per model (its own rule): seed 1 PASS"
    assert job_verdicts([md], "layer_choice", "steer") == ""


def _sweep(root, models, experiments):
    root.mkdir(parents=True)
    (root / "sweep.json").write_text(json.dumps({"config": {"models": models, "experiments": experiments},
                                                 "run_id": root.name}))


def _patch_unit(unit, method: str, direction: str, n_heads: int = 6, n_examples: int = 8) -> None:
    unit.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lh = np.repeat(np.arange(n_heads), n_examples)
    clean = 2 + 0.1 * rng.standard_normal(lh.size)
    corrupt = 0.1 * rng.standard_normal(lh.size)
    cols = {"layer": np.zeros(lh.size, int), "head": lh, "example": np.tile(np.arange(n_examples), n_heads),
            "metric_patched": clean - 0.05, "metric_clean": clean, "metric_corrupt": corrupt,
            "method": [method] * lh.size, "direction": [direction] * lh.size}
    write(cols, unit / "patch_examples.parquet", tables.PATCH_EXAMPLES)
    write({"layer": np.zeros(n_heads, int), "head": np.arange(n_heads), "restoration": np.full(n_heads, 0.97),
           "method": [method] * n_heads, "direction": [direction] * n_heads, "restoration_exact": [None] * n_heads},
          unit / "patch.parquet", tables.PATCH)
    (unit / "params.json").write_text(json.dumps({"config": {"method": method, "direction": direction}}))
    (unit / "cell.json").write_text("{}")


@pytest.mark.parametrize("method, direction, read", [("exact", "denoise", True), ("exact", "noise", False),
                                                      ("ablate-mean", "denoise", False), ("attribution", "denoise", True)])
def test_patch_runs_count_as_importance_only_when_restoration_means_importance(tmp_path, method, direction, read):
    """Noise-direction patching and ablations restore ~1 for heads that do NOT matter: such a
    patch unit is not read as importance, and the report says why."""
    run = tmp_path / "run"
    _sweep(run, ["organism-s"], [{"kind": "patch", "params": {"method": method, "direction": direction}}])
    _patch_unit(run / "model=organism-s" / "experiment=0-patch", method, direction)
    data = load_run(run, load_cell)
    md = data.models[0]
    assert (md.heads is not None) == read
    if read:
        assert md.examples is not None and md.importance_source == f"patch ({method}, {direction})"
    else:
        assert any("not read as importance" in m for m in data.missing)
        assert md.notes and f"method {method}, direction {direction}" in md.notes[0]


def test_models_are_grouped_into_populations_by_seed(tmp_path):
    run = tmp_path / "run"
    models = ["organism-s", "organism-s?seed=2", "organism-s?seed=0", "organism-m?seed=1", "EleutherAI/pythia-14m"]
    _sweep(run, models, [{"kind": "patch", "params": {}}])
    for m in models:
        _patch_unit(run / f"model={safe(m)}" / "experiment=0-patch", "exact", "denoise")
    data = load_run(run, load_cell)
    pops = {p.name: p for p in data.populations}
    assert list(pops) == ["organism-s", "organism-m", "EleutherAI/pythia-14m"]
    assert pops["organism-s"].seeds == [0, 2] and pops["organism-s"].listed == models[:3]
    assert not pops["organism-s"].one_model and pops["organism-m"].one_model and pops["EleutherAI/pythia-14m"].one_model
    assert pops["EleutherAI/pythia-14m"].seeds == [None]
    assert "organism-s?seed=0: the same model as organism-s (population organism-s, seed 0): counted once" in data.missing


def test_scaling_fits_thresholds_only_of_populations_whose_gap_separates():
    """A population whose AUROC interval does not lie above 0.5 is left out of the threshold fits
    (with a note); the other quantities keep every population; its quantity is the seeds' mean."""
    pops, results, per_pop = [], {}, {}
    for i, (name, params, low) in enumerate([("organism-xs", 1e6, 0.6), ("organism-s", 2e6, 0.3),
                                             ("organism-m", 4e6, 0.7), ("organism-l", 8e6, 0.8)]):
        md = ModelData(name, name, 0, {"parameters": params, "layers": 2 + i, "heads": 4, "d_model": 64, "d_head": 16}, {})
        pops.append(Population(name, [md, md], [name, name]))
        v = low + 0.1  # mean AUROC over 5 seeds, interval about ± 0.01
        est = from_values([v - 0.01, v, v + 0.01, v, v], list(range(5)), [8] * 5, what="test")
        results[name] = PopulationResult(estimates={"auroc_heads": est, "auroc_layers": est})
        per_pop[name] = dict.fromkeys(cm.SCALING_QUANTITIES, 0.5 + 0.01 * i)
    run = cm.RunData(None, "r", {}, [p.members[0] for p in pops], pops, [], [])
    facts, rows, reason, quantities, excluded = cm.scaling(run, results, per_pop)
    assert reason == "" and rows and all(r["exploratory"] for r in rows)
    assert set(quantities["threshold_heads"]) == {"organism-xs", "organism-m", "organism-l"}  # organism-s: AUROC 0.4
    assert set(quantities["min_gap"]) == {p.name for p in pops}
    assert "calibrated threshold (important heads): organism-s left out (AUROC interval low 0.391 not above 0.5: the " \
           "gap does not separate, so its threshold means nothing)" in excluded
    assert {r["quantity"] for r in rows} == set(cm.SCALING_QUANTITIES)  # keys, not labels
