"""Success metric 4 over training seeds: does the first-order prediction (``jobs.predict``) track
the measured steering effect across layers, population by population and overall. This module
never loads a model; the per-model numbers are the predict job's.

Per seed (a model): the Spearman correlation across layers of the first-order predicted effect at
the budget with the effect measured at the matched budget (``predict_verdicts.parquet``, key
``VERDICT_KEY``). The predictor has no fitted settings, so every seed's correlation is held out:
nothing was fitted on the measured effects it is compared with. Per population (an organism's
training seeds are the replicates): the mean of the seeds' Fisher z = atanh(r), with the t-interval
mean ± t(k-1) x SD/sqrt(k) (``analysis.population.across_seeds`` with ``fisher``), mapped back with
tanh. Across organisms (``jobs.predict_section``): the population "all organisms (pooled layers)",
whose replicate ``s`` is the Spearman correlation over the layers of every organism trained with
seed ``s`` (independent trainings, so the replicates are independent). "Overall": the mean over the
populations of their mean z, SE sqrt(sum se^2)/P, Welch-Satterthwaite df
(``analysis.population.pooled_mean``), a fixed-effect summary, when there is more than one.

A seed's correlation counts only over at least ``MIN_LAYERS`` layers (over 2-4 layers Spearman
takes a handful of values and a correlation of 1 is likely by chance; organism-xs, -s and -m have 2,
3 and 4). Before the z transform a correlation of +-1 is clipped to the largest attainable value
below it, 1 - 12 / (n (n^2 - 1)) for n layers (one adjacent swap): atanh(1) is infinite, and a
clip at 0.999 (z = 3.8) made the per-seed z right-skewed enough that the FAIL claim passed 5.8 %
of null runs at the nominal 2.5 % (6 layers).

Claims, one-sided t on the z scale against atanh(``THRESHOLD``): PASS "the correlation exceeds
0.7", FAIL "it is below 0.7"; Holm across the rows for each claim; PASS / FAIL when the adjusted
p < ``LEVEL`` (one-sided 1.75 %, calibrated: at the nominal 2.5 % the null rates over 6-24 layers
reached 3.1 %; at 1.75 % the worst was 2.1 %), else INCONCLUSIVE (also with fewer than 2 seeds).
``tests/test_predict_population.py`` checks by simulation (each seed's correlation that of L layers
drawn from a bivariate normal, recentred so that the population's mean z is atanh(0.7)) that it
passes at most at the nominal 2.5 %.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy import stats

from analysis.population import across_seeds, holm_claims, one_sided_t, pooled_mean
from analysis.stats import CONFIDENCE, decide_claims

NAN = float("nan")
THRESHOLD = 0.7
MIN_LAYERS = 5
"""A seed's correlation counts only over at least this many layers."""
LEVEL = 0.0175
"""One-sided level of each claim after Holm (calibrated by simulation, module docstring)."""
VERDICT_KEY = "theory_predicts_steering"
OVERALL = "overall"
RULE = (f"{VERDICT_KEY} (success metric 4): claim 'the first-order prediction of the steering effect at the KL "
        f"budget correlates with the measured effect across layers above {THRESHOLD}'. Per seed the Spearman "
        "correlation across layers of the first-order predicted effect (no fitted settings: held out by "
        f"construction) with the effect measured at the matched budget, over at least {MIN_LAYERS} layers, +-1 "
        "clipped to the largest attainable value below it; per population (an organism's training seeds; 'all "
        "organisms (pooled layers)': per seed the correlation over every organism's layers) the mean Fisher z with "
        "a t-interval (mean ± t(k-1) x SD/sqrt(k)), mapped back with tanh; 'overall' (more than one population) "
        "the mean of the population means of z, SE sqrt(sum se^2)/P, Welch-Satterthwaite df; one-sided t p-values "
        f"on the z scale against atanh({THRESHOLD}) for 'above' (PASS) and 'below' (FAIL), Holm across the rows "
        f"for each claim; PASS / FAIL when the adjusted p < {LEVEL:g} (a level calibrated by simulation so that the "
        "rate stays within the nominal 2.5 %), else INCONCLUSIVE (also with fewer than 2 seeds).")


class SeedPrediction(NamedTuple):
    population: str
    seed: int | None
    spearman: float
    n_layers: int


def attainable(n_layers: int) -> float:
    """The largest Spearman correlation below 1 over ``n_layers`` points: 1 - 12 / (n (n^2 - 1))."""
    return 1.0 - 12.0 / (n_layers * (n_layers ** 2 - 1))


def clipped(r: float, n_layers: int) -> float:
    """``r`` with +-1 clipped to the attainable value below it; NaN under ``MIN_LAYERS`` layers."""
    if n_layers < MIN_LAYERS or not np.isfinite(r):
        return NAN
    top = attainable(n_layers)
    return float(np.clip(r, -top, top))


def _z(r: float) -> float:
    return float(np.arctanh(np.clip(r, -0.9999999, 0.9999999))) if np.isfinite(r) else NAN


def population_rows(seeds: Sequence[SeedPrediction], overall: bool = True) -> list[dict]:
    """Per population (and with ``overall`` and more than one population, overall) the across-seed
    estimate on the z scale."""
    cells: dict[str, list[SeedPrediction]] = {}
    for s in seeds:
        cells.setdefault(s.population, []).append(s)
    target = _z(THRESHOLD)
    out = []
    for pop, members in cells.items():
        z_values = [_z(clipped(m.spearman, m.n_layers)) for m in members]
        z, low_z, high_z, se, df, k = across_seeds(z_values, False, CONFIDENCE)
        r, low, high = (math.tanh(x) if np.isfinite(x) else NAN for x in (z, low_z, high_z))
        p_above, p_below = one_sided_t(z - target, se, df)
        out.append(dict(population=pop, n_seeds=len(members), k=k, value=r, low=low, high=high, z=z, se=se, df=df,
                        p_above=p_above, p_below=p_below,
                        per_seed="; ".join(f"seed {m.seed}: {m.spearman:.3g} ({m.n_layers} layers)" for m in members),
                        scheme=f"{len(members)} seeds: mean Fisher z ± t(k-1) x SD/sqrt(k), back with tanh",
                        note="" if k == len(members) else (f"{k} of {len(members)} seeds with a value (a seed needs "
                                                          f"{MIN_LAYERS} layers)")))
    if overall and len(cells) > 1:
        z, se, df = pooled_mean([r["z"] for r in out], [r["se"] for r in out], [r["df"] for r in out])
        t = float(stats.t.ppf(0.5 + CONFIDENCE / 2, df)) if np.isfinite(df) else NAN
        p_above, p_below = one_sided_t(z - target, se, df)
        out.append(dict(population=OVERALL, n_seeds=sum(r["n_seeds"] for r in out), k=sum(r["k"] for r in out),
                        value=math.tanh(z) if np.isfinite(z) else NAN,
                        low=math.tanh(z - t * se) if np.isfinite(se) else NAN,
                        high=math.tanh(z + t * se) if np.isfinite(se) else NAN, z=z, se=se, df=df,
                        p_above=p_above, p_below=p_below,
                        per_seed="; ".join(f"{r['population']}: {r['value']:.3g}" for r in out),
                        scheme=(f"mean over {len(out)} populations of their mean z, SE sqrt(sum se^2)/P, "
                                "Welch-Satterthwaite df, back with tanh (a fixed-effect summary of these populations)"),
                        note="" if np.isfinite(se) else "a population without an interval: no overall estimate"))
    return out


def verdict_rows(populations: Sequence[dict]) -> list[dict]:
    """The verdict per population and overall (``spectral.tables.DYNAMICS_STEER_VERDICTS`` columns)."""
    pass_holm, fail_holm, m = holm_claims(populations)
    return [dict(key=VERDICT_KEY, population=r["population"], rule=RULE, value=r["value"], low=r["low"],
                 high=r["high"], p_pass=r["p_above"], p_fail=r["p_below"], p_pass_holm=float(a), p_fail_holm=float(b),
                 verdict=decide_claims(a, b, 2 * LEVEL) if r["k"] >= 2 or r["population"] == OVERALL else "INCONCLUSIVE", n_seeds=r["n_seeds"], k=r["k"],
                 per_seed=r["per_seed"], scheme=r["scheme"],
                 correction=f"Holm over {m} row(s) (populations and overall), PASS and FAIL claims each; one-sided "
                            f"tests at {LEVEL:g} (calibrated)", note=r["note"])
            for r, a, b in zip(populations, pass_holm, fail_holm)]


def verdicts(seeds: Sequence[SeedPrediction], overall: bool = True) -> list[dict]:
    return verdict_rows(population_rows(seeds, overall))
