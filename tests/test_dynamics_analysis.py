"""Lags of the heads' change-points to the ICL score's and the verdict across training seeds
(``analysis.dynamics``): a planted lead gives PASS, a planted lag FAIL, independent change-points
pass at most at the nominal rate, missing change-points are counted, bad input is one line."""

import math

import numpy as np
import pytest
from scipy import stats

from analysis import dynamics as dyn
from spectral import tables
from spectral.errors import UsageError

STEPS = np.unique(np.round(np.logspace(1, 5, 40)))  # 40 log-spaced steps, 10 .. 100,000
X = np.log10(1 + STEPS)


def step_series(rng, at: int | None, n: int = len(STEPS), shift: float = 4.0) -> np.ndarray:
    """(n,) unit Gaussian noise with a mean shift of ``shift`` from checkpoint ``at`` (None: none)."""
    y = rng.normal(size=n)
    if at is not None:
        y[at:] += shift
    return y


def seeds_with_lead(lead: int, n_seeds: int = 4, n_heads: int = 6, population: str = "organism-s",
                    seed0: int = 0, flat_heads: int = 0, flat_icl: int = 0) -> list[dyn.SeedDynamics]:
    """Seeds whose ICL score shifts at a random checkpoint in 16..24 and whose heads' gaps shift
    ``lead`` checkpoints earlier (negative: later); ``flat_heads`` heads per seed and the ICL score
    of the first ``flat_icl`` seeds without a change."""
    out = []
    for s in range(n_seeds):
        rng = np.random.default_rng(seed0 + s)
        t = int(rng.integers(16, 25))
        gaps = {(h // 4, h % 4): step_series(rng, None if h < flat_heads else t - lead) for h in range(n_heads)}
        loss = step_series(rng, t, shift=-4.0)
        out.append(dyn.SeedDynamics(population, s, f"{population}-seed{s}", STEPS,
                                    step_series(rng, None if s < flat_icl else t), {"gap": gaps},
                                    {"loss": loss}))
    return out


def test_gaps_changing_before_icl_pass():
    """Gaps shift 3 checkpoints (about 0.31 decades) before the ICL score in every seed: PASS."""
    a = dyn.analyse(seeds_with_lead(3))
    (v,) = a.verdicts
    assert v["key"] == dyn.VERDICT_KEY and v["metric"] == "gap" and not v["exploratory"]
    assert v["verdict"] == "PASS"
    assert v["value"] == pytest.approx(-3 * (X[-1] - X[0]) / (len(X) - 1), abs=0.06)  # -0.31 decades
    assert v["high"] < 0 and v["k"] == 4 and v["fraction_precede"] == pytest.approx(1.0)
    assert v["rule"] == dyn.RULE and "Holm over 1 population" in v["correction"]
    for m in a.models:
        assert (m["n_heads"], m["n_changed"], m["n_precede"]) == (6, 6, 6)
    tables.from_rows(a.changepoints, tables.DYNAMICS_CHANGEPOINTS, "dynamics_changepoints")
    tables.from_rows(a.models, tables.REPORT_DYNAMICS_MODELS, "dynamics_models")
    tables.from_rows(a.verdicts, tables.REPORT_DYNAMICS_VERDICTS, "dynamics_verdicts")


def test_gaps_changing_after_icl_fail():
    v = dyn.analyse(seeds_with_lead(-3, seed0=10)).verdicts[0]
    assert v["verdict"] == "FAIL" and v["low"] > 0 and v["fraction_precede"] == 0.0


def test_changepoint_rows_carry_positions_and_lags():
    s = seeds_with_lead(3, n_seeds=1, seed0=20)[0]
    rows = dyn.changepoint_rows(s)
    assert [r["series"] for r in rows[:2]] == [dyn.ICL, "loss"] and len(rows) == 2 + 6
    icl = rows[0]
    t = int(np.random.default_rng(20).integers(16, 25))  # the ICL change-point seeds_with_lead planted
    assert icl["first_log_step"] == pytest.approx((X[t - 1] + X[t]) / 2, abs=0.11)
    assert math.isnan(icl["lag"]) and icl["layer"] == icl["head"] == dyn.MODEL_LEVEL
    head = rows[2]
    assert head["lag"] == pytest.approx(head["first_log_step"] - icl["first_log_step"])
    assert head["lag"] < 0 and head["note"] == "" and head["method"] == "pelt-l2"


def test_heads_and_seeds_without_change_points_are_counted():
    seeds = seeds_with_lead(3, n_seeds=5, flat_heads=2, flat_icl=1, seed0=30)
    a = dyn.analyse(seeds)
    v = a.verdicts[0]
    assert (v["n_seeds"], v["k"], v["n_seeds_no_icl_change"], v["n_seeds_no_head_change"]) == (5, 4, 1, 0)
    assert v["n_heads"] == 30 and v["n_heads_no_change"] == 10
    assert "4 of 5 seeds with a value" in v["note"] and "1 seed(s) without an ICL change-point" in v["note"]
    assert "10 of 30 heads without a change-point" in v["note"]
    first = next(m for m in a.models if m["seed"] == 0)
    assert math.isnan(first["median_lag"]) and math.isnan(first["fraction_precede"])
    assert first["n_changed"] == 4  # the heads' change-points are still counted
    other = next(m for m in a.models if m["seed"] == 1)
    assert (other["n_changed"], other["n_precede"]) == (4, 4) and other["fraction_precede"] == pytest.approx(4 / 6)
    assert "2 of 6 heads without a change-point" in other["note"]
    assert v["verdict"] == "PASS"


def test_exploratory_metric_rows_carry_no_verdict():
    seeds = seeds_with_lead(3, n_seeds=3, seed0=40)
    for s in seeds:
        rng = np.random.default_rng(s.seed)
        s.heads["entropy"] = {k: step_series(rng, None) for k in s.heads["gap"]}
    a = dyn.analyse(seeds)
    rows = {r["metric"]: r for r in a.verdicts}
    assert rows["gap"]["verdict"] == "PASS" and rows["entropy"]["key"] == dyn.EXPLORATORY_KEY
    assert rows["entropy"]["exploratory"] and rows["entropy"]["verdict"] == ""
    assert rows["entropy"]["n_heads_no_change"] >= 16  # white noise: at most a few false alarms of 18 series


GRID = np.log10(1 + np.unique(np.round(np.logspace(1, 5, 30))))
"""log10(1 + step) of 30 log-spaced checkpoints, 10 .. 100,000."""
NULLS = ("normal", "uniform", "triangular", "arcsine", "grid")


def draw_positions(rng, positions: str, size) -> np.ndarray:
    """Change-point log-steps: ``normal`` (mean 3, SD 1 decade), ``uniform`` (1 to 5 decades),
    ``triangular`` (1, mode 3, 5), ``arcsine`` (1 + 4 x beta(0.5, 0.5): U-shaped, the lightest
    tails of these) or ``grid`` (uniform over the 29 midpoints of ``GRID``, as real change-points fall)."""
    if positions == "normal":
        return rng.normal(3, 1, size)
    if positions == "uniform":
        return rng.uniform(1, 5, size)
    if positions == "triangular":
        return rng.triangular(1, 3, 5, size)
    if positions == "arcsine":
        return 1 + 4 * rng.beta(0.5, 0.5, size)
    mid = (GRID[:-1] + GRID[1:]) / 2
    return mid[rng.integers(0, mid.size, size)]


def null_families(rng, n_families: int, k: int, n_heads: int, p_missing: float, positions: str):
    """The null: per family and seed the ICL score's first change and every head's first change
    (NaN for a head without one, with probability ``p_missing``) drawn independently from one
    distribution of log-steps (``draw_positions``). Returns ((families, k), (families, k, heads))."""
    icl = draw_positions(rng, positions, (n_families, k))
    heads = draw_positions(rng, positions, (n_families, k, n_heads))
    heads[rng.random(heads.shape) < p_missing] = np.nan
    return icl, heads


def null_pass_rate(rng, n_families: int, k: int, n_populations: int, positions: str) -> float:
    """Fraction of families in which any population's verdict (Holm across them) is PASS, through
    the module's rows."""
    icl, heads = null_families(rng, n_families * n_populations, k, 8, 0.2, positions)
    passes = 0
    for f in range(n_families):
        rows = [dyn.model_row(f"pop{p}", s, f"m{p}-{s}", "gap", icl[f * n_populations + p, s],
                              heads[f * n_populations + p, s]) for p in range(n_populations) for s in range(k)]
        passes += any(v["verdict"] == "PASS" for v in dyn.verdict_rows(dyn.population_rows(rows)))
    return passes / n_families


def tolerance(n: int, rate: float = dyn.NOMINAL) -> float:
    """3 binomial standard errors of a rate over ``n`` families."""
    return 3 * math.sqrt(rate * (1 - rate) / n)


@pytest.mark.parametrize("k, n_populations, positions", [
    (3, 1, "normal"), (5, 1, "normal"), (4, 2, "normal"), (3, 1, "uniform"), (3, 1, "arcsine"), (5, 1, "grid")])
def test_null_passes_at_most_at_nominal_rate(k, n_populations, positions):
    """Head change-points independent of the ICL score's: a family (the populations' verdicts, Holm
    across them) PASSes, through the module's rows, at most at the nominal one-sided 2.5 % + 3
    binomial SEs over 1,000 families (the calibrated rates are below: next test)."""
    n = 1000
    rate = null_pass_rate(np.random.default_rng(50 + k), n, k, n_populations, positions)
    assert rate <= dyn.NOMINAL + tolerance(n), f"PASS in {rate:.2%} of {n} families"


def lag_level_rates(rng, n_families: int, k: int, positions: str, level: float) -> float:
    """Vectorised null: the fraction of families whose one-sided t p-value of 'mean median lag <
    0' over k seeds is below ``level`` (one population)."""
    icl, heads = null_families(rng, n_families, k, 8, 0.2, positions)
    heads[:, :, 0] = np.where(np.isnan(heads).all(axis=2), 3.0, heads[:, :, 0])  # keep a head (p 0.2^8)
    lag = np.nanmedian(heads, axis=2) - icl  # (families, k)
    with np.errstate(divide="ignore", invalid="ignore"):  # seeds with equal lags: t = ±inf (p 0 or 1) or NaN
        t = lag.mean(axis=1) / (lag.std(axis=1, ddof=1) / math.sqrt(k))
    return float((stats.t.cdf(t, k - 1) < level).mean())


def test_vectorised_null_matches_the_module():
    """The vectorised p-values below are the module's: same PASS decisions on 300 families."""
    rng = np.random.default_rng(3)
    icl, heads = null_families(rng, 300, 3, 8, 0.0, "uniform")
    lag = np.median(heads, axis=2) - icl
    t = lag.mean(axis=1) / (lag.std(axis=1, ddof=1) / math.sqrt(3))
    ours = stats.t.cdf(t, 2) < dyn.ONE_SIDED_LEVEL
    module = [dyn.verdict_rows(dyn.population_rows([dyn.model_row("p", s, f"m{s}", "gap", icl[f, s], heads[f, s])
                                                    for s in range(3)]))[0]["verdict"] == "PASS" for f in range(300)]
    assert list(ours) == module and 0 < sum(module) < 30


@pytest.mark.parametrize("positions", NULLS)
def test_calibrated_level_holds_the_nominal_rate(positions):
    """At ``ONE_SIDED_LEVEL`` (1.75 %) the t over k = 3, 5, 8 seeds passes in at most the nominal 2.5 %
    + 3 binomial SEs (0.23 %) of 40,000 null families for every null (measured over 200,000: worst
    2.29 %, arcsine at k = 3); at the uncalibrated 2.5 % the uniform null at k = 3 passed in 3.1 %."""
    n = 40_000
    for k in (3, 5, 8):
        rate = lag_level_rates(np.random.default_rng(100 * NULLS.index(positions) + k), n, k, positions,
                               dyn.ONE_SIDED_LEVEL)
        assert rate <= dyn.NOMINAL + tolerance(n), f"{positions}, {k} seeds: PASS in {rate:.2%} of {n} families"
    if positions == "uniform":  # why the level is calibrated: uncalibrated, the rate exceeds the nominal
        rate = lag_level_rates(np.random.default_rng(7), n, 3, positions, dyn.NOMINAL)
        assert rate > dyn.NOMINAL + tolerance(n), f"uncalibrated: {rate:.2%}"


def test_plain_median_lag_reference():
    """The model row against the definition, written out."""
    firsts = [2.0, np.nan, 3.5, 2.5, 3.0]
    m = dyn.model_row("p", 0, "m", "gap", 3.0, firsts)
    lags = [2.0 - 3.0, 3.5 - 3.0, 2.5 - 3.0, 3.0 - 3.0]
    assert m["median_lag"] == pytest.approx(float(np.median(lags)))  # -0.25
    assert (m["n_heads"], m["n_changed"], m["n_precede"], m["n_follow"]) == (5, 4, 2, 1)
    assert m["fraction_precede"] == pytest.approx(2 / 5)


@pytest.mark.parametrize("mutate, phrase", [
    (lambda s: s._replace(icl=s.icl[:2]), "icl_score: change-points: a series needs at least 6"),
    (lambda s: s._replace(icl=np.r_[s.icl[:-1], np.nan]), "non-finite"),
    (lambda s: s._replace(heads={"gap": {(0, 0): s.heads["gap"][(0, 0)][:-1]}}),
     "gap of L0H0: change-points: 40 steps for a series of 39"),
    (lambda s: s._replace(steps=s.steps[::-1]), "strictly increasing"),
])
def test_bad_input_is_one_line(mutate, phrase):
    s = mutate(seeds_with_lead(3, n_seeds=1, seed0=60)[0])
    with pytest.raises(UsageError, match=phrase) as err:
        dyn.analyse([s])
    assert "\n" not in str(err.value)


def test_no_seeds_or_no_verdict_metric_is_an_error():
    with pytest.raises(UsageError, match="no seeds"):
        dyn.analyse([])
    s = seeds_with_lead(3, n_seeds=1, seed0=70)[0]
    with pytest.raises(UsageError, match="'gap'"):
        dyn.analyse([s._replace(heads={"entropy": s.heads["gap"]})])
