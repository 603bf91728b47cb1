"""Automated steering against the oracle (issue 18, point 3; success metric 5): per-model strategy
rows, one model's reading and the verdict over training seeds. Measurements come from
``spectral.steering.autosteer``; this module never loads a model.

Per model (``model_rows``): each strategy's effect on the held-out evaluation prompts (the split's
held-out part: no choice looked at them) with the paired interval of ``analysis.steering.Comparison``
(a bootstrap over those prompts shared by every strategy, estimate ± t(n-1) x SE; the random
control's draws resampled too), its difference from the oracle with the same paired interval, its
ratio to the oracle (only where the oracle's interval lies above 0: a ratio of a mean near 0 is
meaningless), the neutral KL it reached (matched to the budget within 2 %), the held-out text's loss
increase, and the steerability slope over ``spectral.steering.autosteer.MULTIPLIERS`` (per prompt the
least-squares slope of the effect on the multiplier, in units of the matched scale; mean with its
interval) with the fraction of anti-steerable prompts (slope < 0; Tan et al. 2024).

Verdict ``VERDICT_KEY`` (success metric 5, ``RULE``): the automated choice reaches at least
``FRACTION`` (90 %) of the oracle's effect at the budget. It rests on the difference
``D = effect(system) - 0.9 x effect(oracle)`` on the held-out prompts, not on a ratio. Per
population (an organism's training seeds are the replicates): per seed D, across seeds the mean with
the t-interval (``analysis.population.across_seeds``), one-sided t p-values for "D > 0" (PASS) and
"D < 0" (FAIL). "Overall": the mean over the populations of their means, its standard error
sqrt(sum se_p^2) / P with Welch-Satterthwaite degrees of freedom (a fixed-effect summary of these
organisms). Holm across the populations and the overall row, for each claim; PASS / FAIL when the
adjusted p < 0.025, else INCONCLUSIVE (also with fewer than 2 seeds). ``tests/test_autosteer.py``
checks by simulation that at D = 0 it passes at most at its nominal rate. ``model_verdict`` is one
model's reading from the prompt-level interval (the job's verdicts.parquet).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from scipy import stats

from analysis.population import across_seeds, holm_claims, one_sided_t, pooled_mean
from analysis.stats import CONFIDENCE, N_RESAMPLES, decide_claims
from analysis.steering import Comparison, Split, mean_ci
from spectral.steering.choices import AUTOMATED

NAN = float("nan")
FRACTION = 0.9
"""Success metric 5: the share of the oracle's effect the automated choice must reach."""
VERDICT_KEY = "autosteer_matches_oracle"
OVERALL = "overall"
SCHEME = (f"{CONFIDENCE:.0%}, paired bootstrap over the held-out evaluation prompts ({N_RESAMPLES} resamples, shared "
          "by every strategy; the random control's draws resampled too), estimate ± t(n-1) x bootstrap SE "
          "(analysis.steering.Comparison)")


def rule(system: str = "probe") -> str:
    return (f"{VERDICT_KEY} (success metric 5): claim 'the automated choice ({system}) reaches at least "
            f"{FRACTION:.0%} of the oracle's effect at the same KL budget'. Every strategy's scale is matched so that "
            "its mean KL(unsteered || steered) on the neutral prompts equals the budget (2 % tolerance); the oracle "
            "is the best layer of the exhaustive grid at the budget, chosen on the selection split of the evaluation "
            "prompts, as every automated choice is; effects (change of log P(target set) - log P(opposite set) at "
            f"the next token) on the held-out split. Per seed D = effect(system) - {FRACTION:g} x effect(oracle); per "
            "population (an organism's training seeds) the mean of D with a t-interval (mean ± t(k-1) x SD/sqrt(k)); "
            "'overall' the mean of the population means, SE sqrt(sum se^2)/P, Welch-Satterthwaite df; one-sided t "
            "p-values for 'D > 0' (PASS) and 'D < 0' (FAIL), Holm across the populations and the overall row for "
            "each claim; PASS / FAIL when the adjusted p < 0.025, else INCONCLUSIVE (also with fewer than 2 seeds).")


RULE = rule()

STRATEGY_COLUMNS = (
    "model", "concept", "strategy", "family", "automated", "system", "layers", "description", "vector", "budget",
    "scale", "kl", "kl_relative_error", "effect", "effect_low", "effect_high", "p_value", "vs_oracle",
    "vs_oracle_low", "vs_oracle_high", "ratio_to_oracle", "beats_oracle_beyond_interval", "loss_increase",
    "loss_low", "loss_high", "steerability", "steerability_low", "steerability_high", "anti_steerable",
    "n_heldout", "n_selection", "n_draws", "choice_seconds", "measure_seconds", "scheme")
VERDICT_COLUMNS = ("key", "population", "rule", "value", "low", "high", "p_pass", "p_fail", "p_pass_holm",
                   "p_fail_holm", "verdict", "n_seeds", "k", "per_seed", "scheme", "correction", "note")


def slopes(multipliers: Sequence[float], effects: np.ndarray) -> np.ndarray:
    """Per prompt the least-squares slope of ``effects`` (multipliers, prompts) on ``multipliers``."""
    m = np.asarray(multipliers, float)
    mc = m - m.mean()
    return (mc @ (effects - effects.mean(axis=0, keepdims=True))) / float(mc @ mc)


def model_rows(model: str, concept: str, results: Sequence[Mapping], split: Split, *, budget: float, system: str,
               vector: str, multipliers: Sequence[float], seed: int = 0) -> list[dict]:
    """Rows of ``spectral.tables.AUTOSTEER_STRATEGIES`` (``STRATEGY_COLUMNS``), one per strategy of
    ``results`` (``spectral.steering.autosteer.summarize``), effects on ``split.heldout``."""
    held = list(split.heldout)
    effects = {r["name"]: np.stack([d["effect"][held] for d in r["draws"]]) for r in results}
    cmp = Comparison.of(effects, seed=seed)
    oracle = cmp.effect("oracle") if "oracle" in effects else None
    rows = []
    for r in results:
        name, draws = r["name"], r["draws"]
        eff = cmp.effect(name)
        vs = (cmp.contrast({name: 1.0, "oracle": -1.0}) if name != "oracle" else cmp.contrast({})) if oracle else None
        slope = np.mean([slopes(multipliers, d["multiplier_effects"][:, held]) for d in draws], axis=0)
        st = mean_ci(slope, seed)
        loss = np.mean([d["loss_increase"] for d in draws], axis=0)
        lo = mean_ci(loss, seed)
        clear = oracle is not None and oracle.low > 0
        rows.append(dict(
            model=model, concept=concept, strategy=name, family=r["family"],
            automated=name in AUTOMATED, system=name == system,
            layers=json.dumps({str(l): round(float(w), 6) for l, w in r["layers"].items()}) if r["layers"] else "",
            description=r["description"], vector=vector, budget=budget,
            scale=float(np.mean([d["scale"] for d in draws])), kl=float(np.mean([d["kl"] for d in draws])),
            kl_relative_error=float(max(abs(d["kl"] - budget) for d in draws) / budget),
            effect=eff.value, effect_low=eff.low, effect_high=eff.high, p_value=eff.p_value,
            vs_oracle=vs.value if vs else NAN, vs_oracle_low=vs.low if vs else NAN, vs_oracle_high=vs.high if vs else NAN,
            ratio_to_oracle=eff.value / oracle.value if clear else NAN,
            beats_oracle_beyond_interval=bool(oracle is not None and name != "oracle"
                                              and eff.value - oracle.value > oracle.high - oracle.value),
            loss_increase=lo.value, loss_low=lo.low, loss_high=lo.high,
            steerability=st.value, steerability_low=st.low, steerability_high=st.high,
            anti_steerable=float(np.mean(slope < 0)), n_heldout=len(held), n_selection=len(split.selection),
            n_draws=len(draws), choice_seconds=float(r["choice_seconds"]),
            measure_seconds=float(sum(d["seconds"] for d in draws)), scheme=SCHEME))
    return rows


def difference(rows: Sequence[Mapping], system: str) -> float:
    """D = effect(system) - FRACTION x effect(oracle) from a model's strategy rows."""
    by = {r["strategy"]: r for r in rows}
    if system not in by or "oracle" not in by:
        return NAN
    return float(by[system]["effect"] - FRACTION * by["oracle"]["effect"])


def model_verdict(model: str, results: Sequence[Mapping], split: Split, *, system: str, seed: int = 0,
                  rule_text: str | None = None) -> dict:
    """One model's reading of the claim from the held-out prompts' paired interval of
    D = system - 0.9 x oracle (one test, no correction; ``VERDICT_COLUMNS``)."""
    held = list(split.heldout)
    effects = {r["name"]: np.stack([d["effect"][held] for d in r["draws"]]) for r in results
               if r["name"] in (system, "oracle")}
    cmp = Comparison.of(effects, seed=seed)
    d = cmp.contrast({system: 1.0, "oracle": -FRACTION})
    p_pass = d.p_value
    p_fail = 1.0 - p_pass if np.isfinite(p_pass) else NAN
    if d.low == d.high:
        p_pass, p_fail = float(not d.value > 0), float(not d.value < 0)
    o, s = cmp.effect("oracle"), cmp.effect(system)
    return dict(key=VERDICT_KEY, population=model, rule=rule_text or rule(system), value=d.value, low=d.low,
                high=d.high, p_pass=p_pass, p_fail=p_fail, p_pass_holm=p_pass, p_fail_holm=p_fail,
                verdict=decide_claims(p_pass, p_fail), n_seeds=1, k=1, per_seed=f"{model}: {d.value:.3g}",
                scheme=f"one model ({len(held)} held-out prompts): {SCHEME}; describes this model only",
                correction="none (one model, one test); the population verdict is the report's",
                note=(f"effect {system} {s.value:.3g} [{s.low:.3g}, {s.high:.3g}], oracle {o.value:.3g} "
                      f"[{o.low:.3g}, {o.high:.3g}]"
                      + (f", ratio {s.value / o.value:.2f}" if o.low > 0 else ", oracle not clearly positive: no ratio")))


# ---------------------------------------------------------------------------- across seeds
class SeedRun(NamedTuple):
    """One training seed's ``AUTOSTEER_STRATEGIES`` rows."""

    population: str
    seed: int | None
    rows: Sequence[Mapping]


def system_of(rows: Sequence[Mapping]) -> str:
    names = [r["strategy"] for r in rows if r.get("system")]
    return names[0] if names else ""


def population_rows(runs: Sequence[SeedRun]) -> list[dict]:
    """Per population the across-seed estimate of D, then the overall row."""
    cells: dict[str, list[tuple[SeedRun, float]]] = {}
    for r in runs:
        cells.setdefault(r.population, []).append((r, difference(r.rows, system_of(r.rows))))
    out = []
    for pop, members in cells.items():
        values = [v for _, v in members]
        value, low, high, se, df, k = across_seeds(values, False, CONFIDENCE)
        p_above, p_below = one_sided_t(value, se, df)
        systems = sorted({system_of(s.rows) for s, _ in members})
        out.append(dict(population=pop, n_seeds=len(members), k=k, value=value, low=low, high=high, se=se, df=df,
                        p_above=p_above, p_below=p_below, systems=systems,
                        per_seed="; ".join(f"seed {s.seed}: {v:.3g}" for s, v in members),
                        scheme=f"{len(members)} seeds: mean ± t(k-1) x SD/sqrt(k) of the seeds' D",
                        note="" if k == len(members) else f"{k} of {len(members)} seeds with a value"))
    if len(cells) > 1:
        value, se, df = pooled_mean([r["value"] for r in out], [r["se"] for r in out], [r["df"] for r in out])
        t = float(stats.t.ppf(0.5 + CONFIDENCE / 2, df)) if np.isfinite(df) else NAN
        p_above, p_below = one_sided_t(value, se, df)
        low, high = value - t * se, value + t * se
        note = "" if np.isfinite(se) else "a population without an interval: no overall estimate"
        out.append(dict(population=OVERALL, n_seeds=sum(r["n_seeds"] for r in out), k=sum(r["k"] for r in out),
                        value=value, low=low, high=high, se=se, df=df, p_above=p_above, p_below=p_below,
                        systems=sorted({s for r in out for s in r["systems"]}),
                        per_seed="; ".join(f"{r['population']}: {r['value']:.3g}" for r in out),
                        scheme=(f"mean over {len(out)} populations of their means, SE sqrt(sum se^2)/P, "
                                "Welch-Satterthwaite df (a fixed-effect summary of these populations)"),
                        note=note))
    return out


def verdict_rows(populations: Sequence[Mapping]) -> list[dict]:
    """The verdict per population and overall, Holm across all of them for each claim."""
    pass_holm, fail_holm, m = holm_claims(populations)
    out = []
    for r, a, b in zip(populations, pass_holm, fail_holm):
        systems = r["systems"]
        note = "; ".join(x for x in (r["note"], f"the seeds used different systems ({', '.join(systems)})"
                                     if len(systems) > 1 else "") if x)
        out.append(dict(key=VERDICT_KEY, population=r["population"], rule=rule(" / ".join(systems) or "probe"),
                        value=r["value"], low=r["low"], high=r["high"], p_pass=r["p_above"], p_fail=r["p_below"],
                        p_pass_holm=float(a), p_fail_holm=float(b), verdict=decide_claims(a, b) if r["k"] >= 2 or
                        r["population"] == OVERALL else "INCONCLUSIVE", n_seeds=r["n_seeds"], k=r["k"],
                        per_seed=r["per_seed"], scheme=r["scheme"],
                        correction=f"Holm over {m} row(s) (populations and overall), PASS and FAIL claims each; "
                                   "one-sided tests at 0.025", note=note))
    return out


def verdicts(runs: Sequence[SeedRun]) -> list[dict]:
    """``verdict_rows(population_rows(runs))``."""
    return verdict_rows(population_rows(runs))
