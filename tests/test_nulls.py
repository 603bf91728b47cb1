"""Null simulations: under "gap independent of importance", how often does each verdict family
of validate (one model) and of a population of seeds declare PASS? It must be at most the
nominal level: a PASS is a one-sided claim from a two-sided 95 % rule, so <= 2.5 %.

The null model: a model of 8 heads (2 layers x 4; 6 layers x 2 for the layer-level family, 32
heads for threshold calibration) and 32 examples; each head's true importance ~ Beta(0.5, 2)
(skewed, like real restorations), its gap ~ U(0.3, 1.3) independently; per-example metrics
clean ~ N(3, 1), corrupt ~ N(0, 1) shared by the heads, ``patched = corrupt + importance x
(clean - corrupt) + N(0, 0.5)``.

Each family's PASS count k over n simulations is tested against the nominal rate with an exact
binomial test: the test fails when P(X >= k | n, 0.025) < 0.01 (Monte Carlo error allowed for
explicitly: k <= 14 of 300 passes, k = 15 fails). The counts measured with these seeds are
written next to each assertion. Resamples are few (150 per model; 100 across seeds) to keep the
file fast.

The one-model families replay validate()'s rule exactly (``analysis.validation.head_estimates``:
one ``analysis.population.estimate_many`` call resampling heads and examples jointly, every
statistic on the same resamples, t-scaled with validate's degrees of freedom; then
``analysis.population.p_value`` and ``decide``); ``test_validate_itself_on_nulls`` runs
validate() on a few nulls. The population families compare the verdict interval across seeds
(the t-interval over the seeds' values) with the hierarchical bootstrap computed beside it, for
nominal level and for power.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from scipy import stats

from analysis.calibration import calibrate, important
from analysis.population import estimate, estimate_many, p_value
from analysis.stats import decide, group_difference, group_ratio, head_member, layer_member, layer_r, r_inverse_gap, ratio_rule
from analysis.validation import as_estimate, head_estimates

N_SIMS = 300
B = 150
B_POPULATION = 100
N_POPULATION_R = 100
NOMINAL = 0.025
THRESHOLD = 0.77


def within_nominal(k: int, n: int, rate: float = NOMINAL) -> bool:
    """Exact binomial test of "PASS rate <= rate" at level 0.01."""
    return stats.binomtest(k, n, rate, alternative="greater").pvalue >= 0.01


def test_within_nominal_allows_monte_carlo_error_only():
    assert within_nominal(14, 300) and not within_nominal(15, 300)
    assert within_nominal(0, 300) and not within_nominal(30, 300)


def null_model(rng: np.random.Generator, n_heads: int = 8, n_examples: int = 32, effect: float = 0.0):
    """The null model (with ``effect``: the unstable heads' true importance raised by it)."""
    gap = rng.uniform(0.3, 1.3, n_heads)
    imp = rng.beta(0.5, 2.0, n_heads) + effect * (gap <= THRESHOLD)
    clean = np.tile(rng.normal(3, 1, n_examples), (n_heads, 1))
    corrupt = np.tile(rng.normal(0, 1, n_examples), (n_heads, 1))
    patched = corrupt + imp[:, None] * (clean - corrupt) + rng.normal(0, 0.5, (n_heads, n_examples))
    return gap, patched, clean, corrupt


def old_example_bootstrap_passes(gap, patched, clean, corrupt, rng, n_resamples=200) -> bool:
    """The code before issue 12: r(importance, 1/gap) with a percentile bootstrap over examples
    only (heads held fixed); PASS when the interval's low end is above 0.7. Vectorised."""
    m = patched.shape[1]
    idx = rng.integers(0, m, (n_resamples, m))
    c, k, p = clean[:, idx].mean(-1), corrupt[:, idx].mean(-1), patched[:, idx].mean(-1)  # (heads, B)
    y = ((p - k) / (c - k)).T
    x = 1 / gap
    xc, yc = x - x.mean(), y - y.mean(1, keepdims=True)
    r = (yc @ xc) / np.sqrt((xc ** 2).sum() * (yc ** 2).sum(1))
    return bool(np.quantile(r, 0.025) > 0.7)


@pytest.fixture(scope="module")
def one_model_nulls() -> dict[str, int]:
    """validate()'s one-model verdicts over N_SIMS null models of 8 heads x 32 examples."""
    rng, rng_old = np.random.default_rng(20261126), np.random.default_rng(1)
    counts = dict.fromkeys(("r>0.7", "r>0.7 old", "difference>0", "difference<0", "ratio>2", "ratio defined"), 0)
    for i in range(N_SIMS):
        gap, patched, clean, corrupt = null_model(rng)
        counts["r>0.7 old"] += old_example_bootstrap_passes(gap, patched, clean, corrupt, rng_old)
        member = head_member(gap, patched, clean, corrupt)
        es = head_estimates(member, THRESHOLD, n_resamples=B, seed=i)
        r = as_estimate(es["importance_correlation"], 0.7)
        counts["r>0.7"] += decide(r.value, r.p_value, 0.7) == "PASS"
        d = as_estimate(es["restoration_difference"], 0.0)
        counts["difference>0"] += decide(d.value, d.p_value, 0.0) == "PASS"
        counts["difference<0"] += decide(d.value, d.p_value, 0.0) == "FAIL"
        mu, ms = as_estimate(es["restoration_unstable_mean"]), as_estimate(es["restoration_stable_mean"])
        ratio, note = ratio_rule(mu, ms, as_estimate(es["restoration_ratio"], 2.0))
        if not note:  # analysis.stats.ratio_rule: the ratio exists only where both means' intervals lie above 0
            counts["ratio defined"] += 1
            assert ratio.value == pytest.approx(group_ratio(THRESHOLD)(member.per_unit, member.per_example))
            counts["ratio>2"] += decide(ratio.value, ratio.p_value, 2.0) == "PASS"
    return counts


def test_correlation_above_0_7_is_not_declared_on_nulls(one_model_nulls):
    """The issue's case: 8 heads, gap independent of importance. The example-only bootstrap
    declared "r > 0.7: PASS" in 8 of 300 runs in the issue; on these nulls in 5 of 300 (1.7 %,
    32 examples, example noise 0.5, 200 resamples). Resampling heads and examples: 0 of 300."""
    assert one_model_nulls["r>0.7 old"] >= 3  # measured: 5
    assert one_model_nulls["r>0.7"] == 0


def test_group_difference_pass_rate_within_nominal(one_model_nulls):
    # measured: PASS 2 / 300 (0.7 %), FAIL 4 / 300; the percentile interval of the same
    # bootstrap gave 66 / 1000 (6.6 %) PASS: see analysis.population.scaled_interval
    assert within_nominal(one_model_nulls["difference>0"], N_SIMS)
    assert within_nominal(one_model_nulls["difference<0"], N_SIMS)


def test_ratio_rule_pass_rate_within_nominal(one_model_nulls):
    # measured: the ratio is defined (both group means known > 0) in 3 of 300 nulls, PASS 0
    assert within_nominal(one_model_nulls["ratio>2"], N_SIMS)


def test_layer_correlation_pass_rate_within_nominal():
    """Layer-level r(min gap, max importance) < 0 (the hypothesis' direction) on 6 layers x 2
    heads: an interval resampling layers and examples, Fisher z, t(n_layers - 3)."""
    rng = np.random.default_rng(7)
    below = above = 0
    for i in range(N_SIMS):
        gap, patched, clean, corrupt = null_model(rng, n_heads=12)
        member = layer_member(np.repeat(np.arange(6), 2), gap, patched, clean, corrupt)
        e = estimate([member], layer_r, n_resamples=B, seed=i, unit_name="layers")  # df 6 - 3
        assert e.df == 3 and e.on_z
        p = p_value(e, 0.0)
        below += decide(e.value, p, 0.0, "below") == "PASS"
        above += decide(e.value, p, 0.0, "above") == "PASS"
    # measured: 0 / 300 each way (the percentile interval: 35 / 1000 below 0, 36 / 1000 above)
    assert within_nominal(below, N_SIMS) and within_nominal(above, N_SIMS)


def test_threshold_calibration_separation_within_nominal():
    """A calibrated threshold counts only where the gap separates important heads (exact AUROC
    test): on nulls of 32 heads (labels: the importance rule, about 8 positives) that happens at
    most at the nominal rate, and the band rule's PASS (interval inside 0.77 ± 0.05 and
    separating) never."""
    rng = np.random.default_rng(5)
    separates = reversed_ = band = n = 0
    for i in range(N_SIMS):
        gap, imp = rng.uniform(0.3, 1.3, 32), rng.beta(0.5, 2.0, 32)
        c = calibrate(gap, important(imp), n_resamples=B, seed=i)
        n += 1
        separates += c.separation == "separates"
        reversed_ += c.separation == "reversed"
        band += c.separation == "separates" and 0.72 <= c.threshold_low and c.threshold_high <= 0.82
    # measured: separates 9 / 300, reversed 9 / 300, band 0 / 300 (the bootstrap AUROC interval
    # above 0.5, which the exact test replaces for decisions: 17 / 500 at 32 heads, 34 / 500 at 8)
    assert within_nominal(separates, n) and within_nominal(reversed_, n)
    assert band == 0


def _population_counts(n_sims: int, heads: int, effect: float, seed: int, with_r: int = 0) -> dict[str, int]:
    """Over ``n_sims`` populations of 5 seeds (models of ``heads`` heads, ``effect`` as in
    ``null_model``): how often "unstable - stable > 0" (and, for the first ``with_r``, "r > 0.7")
    is declared (PASS) or its opposite (FAIL) by the verdict interval (the t-interval over the
    seeds' values) and by the hierarchical bootstrap interval beside it."""
    rng = np.random.default_rng(seed)
    c = dict.fromkeys(("t pass", "t fail", "hier pass", "hier fail", "r t pass", "r hier pass"), 0)
    for i in range(n_sims):
        members = [head_member(*null_model(rng, heads, effect=effect), seed=s) for s in range(5)]
        stats_ = {"d": group_difference(THRESHOLD), **({"r": r_inverse_gap} if i < with_r else {})}
        es = estimate_many(members, stats_, n_resamples=B_POPULATION, seed=i)
        d = es["d"]
        assert d.scheme.startswith("5 seeds: mean ± t(") or d.k < 5
        c["t pass"] += d.low > 0
        c["t fail"] += d.high < 0
        c["hier pass"] += d.hier_low > 0
        c["hier fail"] += d.hier_high < 0
        if "r" in es:
            c["r t pass"] += es["r"].low > 0.7
            c["r hier pass"] += es["r"].hier_low > 0.7
    return c


def test_population_verdicts_within_nominal():
    """Five seeds (populations of 8-head models), ``analysis.population.estimate_many``'s verdict
    interval across seeds (mean ± t(4) x SD/sqrt(5) of the seeds' values): PASS rates of
    difference > 0 and < 0 (300 nulls) and of r > 0.7 (the first 100: the mean of five null r's
    near 0.7 is out of reach) at most nominal; the hierarchical bootstrap beside it as well."""
    c = _population_counts(N_SIMS, 8, 0.0, 99, with_r=N_POPULATION_R)
    # measured: t-interval PASS 5 / 300, FAIL 7 / 300; hierarchical PASS 1 / 300, FAIL 0 / 300;
    # r > 0.7: 0 / 100 for both. Over 2,000 nulls each (40 resamples) the t-interval's one-sided
    # rates were 2.55 % / 2.40 % at 8 heads and 2.20 % / 3.15 % at 12 heads (8,000 tails: 2.6 %,
    # nominal 2.5 %); the hierarchical bootstrap's 0.10 % / 0.05 % and 0.05 % / 0.00 %.
    assert c["r t pass"] == 0 and c["r hier pass"] == 0
    assert within_nominal(c["t pass"], N_SIMS) and within_nominal(c["t fail"], N_SIMS)
    assert within_nominal(c["hier pass"], N_SIMS) and within_nominal(c["hier fail"], N_SIMS)


def test_t_interval_over_seeds_has_the_power_the_hierarchical_bootstrap_lacks():
    """Why the verdict interval across seeds is the t-interval over the seeds' values: each
    seed's value already carries its heads' and examples' noise, so resampling heads and examples
    again inside each seed (the hierarchical bootstrap) counts that noise twice. At nominal level
    it passes far below 2.5 % (previous test), and it misses real effects: 5 seeds x 12 heads,
    unstable heads' importance raised by 0.2 (about one SD of importance across heads).

    Measured with these seeds (200 populations, 100 resamples per seed): PASS t-interval 145 /
    200 (72.5 %), hierarchical 57 / 200 (28.5 %); with an effect of 0.1 (300 populations, seed
    2027) 76 / 300 (25.3 %) vs 4 / 300 (1.3 %); no FAIL with either. (Two engineers' earlier
    simulations at 5 seeds x 12 heads and an effect of 0.2 found 37 % vs 6.7 % with their models.)"""
    c = _population_counts(200, 12, 0.2, 2026)
    t_power, h_power = c["t pass"] / 200, c["hier pass"] / 200
    assert t_power >= 0.6 and h_power <= 0.45 and t_power - h_power >= 0.25, (t_power, h_power)
    assert c["t fail"] == 0 and c["hier fail"] == 0


def test_validate_itself_on_nulls():
    """validate() end to end on a few null models: no PASS of r > 0.7, every verdict from its
    Holm-adjusted p."""
    from analysis.validation import VERDICT_KEYS, validate
    rng = np.random.default_rng(3)
    for _ in range(4):
        gap, patched, clean, corrupt = null_model(rng)
        heads, examples = patched.shape
        h, e = np.divmod(np.arange(heads * examples), examples)
        per_example = pa.table({"layer": h // 4, "head": h % 4, "example": e, "metric_patched": patched.ravel(),
                                "metric_clean": clean.ravel(), "metric_corrupt": corrupt.ravel()})
        scan = pa.table({"layer": np.arange(heads) // 4, "head": np.arange(heads) % 4, "gap": gap})
        s = {r["key"]: r for r in validate(scan, per_example, THRESHOLD, 0, n_resamples=B).statistics.to_pylist()}
        assert s["importance_correlation"]["verdict"] != "PASS"
        for key in VERDICT_KEYS:
            r = s[key]
            assert r["verdict"] == decide(r["value"], r["p_holm"], r["target"], r["direction"])
