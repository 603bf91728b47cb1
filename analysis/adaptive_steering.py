"""Spectrally adaptive steering vs a fixed coefficient at the same mean-KL budget (issue 17,
point 4): per-model rows, intervals and the verdict across training seeds. Measurements come
from ``spectral.dynamics.adaptive``; this module never loads a model.

Per model (``model_rows``): each arm's per-prompt mean over generation steps of the effect (set
score steered - unsteered) and of the KL(unsteered || steered), on the held-out prompts of the
split (``analysis.steering.selection_split``, stratified by the sign of the unsteered score as
``eigengap steer``: the arms' scales were matched to the budget on the selection prompts only, so
the score never sees the prompts that chose them); the paired difference adaptive - fixed with the
steer job's interval (``analysis.steering.Comparison``: a paired bootstrap over the held-out
prompts, the unit of replication within a model, estimate ± t(n-1) x bootstrap SE x sqrt(n/(n-1)))
and its one-sided p of "> 0"; the KLs with the same interval.

Across the seeds of a population (``population_rows``; the seeds are the replicates): per seed
the mean held-out difference, across seeds the mean with the t-interval of
``analysis.population.across_seeds`` and one-sided t p-values (``one_sided_t``).

Verdict ``VERDICT_KEY`` per population (``RULE``, printed with it): PASS / FAIL by
``analysis.stats.decide_claims`` at one-sided 0.025 after Holm across populations (the PASS and
FAIL claims each), else INCONCLUSIVE (also with fewer than 2 seeds with a value).

Validity guard (``kl_guard``): the scales are matched on the selection prompts, and the held-out
KLs need not stay matched (the adaptive rule's per-prompt KL is heavy-tailed: on organism-xs 10 %
of the prompts carry 40-90 % of its mean KL, those whose gap g_0 is small, so the rule's ratio is
large there). A PASS or FAIL counts only when the winner did not spend more held-out KL than the
loser: the upper bound of the interval of (winner - loser) held-out mean KL (across seeds: the
t-interval of the seeds' differences; one model: the prompt bootstrap) is at most
``KL_TOLERANCE`` x the budget; otherwise INCONCLUSIVE with the reason in the note. The guard only
withdraws claims, so it cannot raise the rate of false PASSes.
``tests/test_adaptive_steering.py`` checks by simulation that with equal arms it passes at most at
its nominal rate. ``model_verdict`` is one model's reading (the job's verdicts.parquet): the same
claim from the prompt-level interval, describing that model only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from analysis.population import across_seeds, holm, one_sided_t
from analysis.stats import CONFIDENCE, N_RESAMPLES, decide_claims
from analysis.steering import Comparison, Split, mean_ci

NAN = float("nan")
KL_TOLERANCE = 0.1
"""The validity guard's tolerance as a fraction of the budget: a claim counts only when the
upper bound of (winner - loser) held-out mean KL is at most this x the budget (0.025 nats at 0.25)."""
ARMS = ("fixed", "adaptive")
DIFFERENCE = "adaptive-fixed"
VERDICT_KEY = "adaptive_steering_beats_fixed"
SCHEME = (f"{CONFIDENCE:.0%}, paired bootstrap over held-out prompts ({N_RESAMPLES} resamples), estimate ± t(n-1) x "
          "bootstrap SE x sqrt(n/(n-1)) (analysis.steering.Comparison); per prompt the mean over generation steps")


def rule(adaptive: str = "alpha_t = alpha x g_t / g_0") -> str:
    """The verdict's rule in words (``adaptive``: the adaptive arm's coefficient rule)."""
    return (f"{VERDICT_KEY}: per population, claim 'steering with the spectrally adaptive coefficient ({adaptive}; "
            "g_t the injection layer's minimum key-kernel gap over its heads of the context before the current "
            "position, g_0 on the prompt) moves the concept more than a fixed coefficient at the same mean KL "
            "budget' (greedy generation, the vector added at the current position; each arm's alpha scaled on the "
            "selection split of the prompts so that its mean KL(unsteered || steered) over steps and prompts equals "
            "the budget; effects, set score steered - unsteered averaged over steps, on the held-out split); per "
            "seed the mean over held-out prompts of adaptive - fixed; across seeds the mean with a t-interval "
            "(mean ± t(k-1) x SD/sqrt(k)); one-sided t p-values for '> 0' (PASS) and '< 0' (FAIL), Holm across "
            "populations for each claim; PASS / FAIL when the adjusted p < 0.025, else INCONCLUSIVE (also with "
            "fewer than 2 seeds with a value); validity guard: a PASS or FAIL counts only when the upper bound of "
            "the 95 % interval (the same t-interval over seeds) of the winner's minus the loser's held-out mean KL "
            f"is at most {KL_TOLERANCE:g} x the budget (the winner did not spend more side effect than the loser), "
            "else INCONCLUSIVE with the reason in the note.")


RULE = rule()

ARM_COLUMNS = ("model", "arm", "rule", "layer", "vector", "budget", "scale", "kl_selection", "kl", "kl_low", "kl_high",
               "effect", "effect_low", "effect_high", "p_value", "mean_coefficient", "mean_gap", "n_heldout",
               "n_selection", "n_steps", "scheme")
POPULATION_COLUMNS = ("population", "n_seeds", "k", "value", "low", "high", "se", "df", "p_above", "p_below",
                      "same_sign", "per_seed", "scheme", "note", "kl", "kl_low", "kl_high", "budget")
VERDICT_COLUMNS = ("key", "population", "rule", "value", "low", "high", "p_pass", "p_fail", "p_pass_holm",
                   "p_fail_holm", "verdict", "n_seeds", "k", "per_seed", "scheme", "correction", "note")
"""Keys of ``model_rows`` (``spectral.tables.DYNAMICS_STEER_ARMS``) and ``verdict_rows`` /
``model_verdict`` (``DYNAMICS_STEER_VERDICTS``) rows."""


class ArmResult(NamedTuple):
    """One arm of one model: its matched scale and per (prompt, step) measures on all prompts."""

    rule: str
    """The coefficient rule (``spectral.dynamics.adaptive.RULES``)."""
    scale: float
    effect: np.ndarray
    """(prompts, steps)."""
    kl: np.ndarray
    """(prompts, steps)."""
    coefficient: np.ndarray
    """(prompts, steps)."""
    gap: np.ndarray
    """(prompts, steps)."""


def model_rows(model: str, arms: Mapping[str, ArmResult], split: Split, *, layer: int, vector: str, budget: float,
               rule_text: Mapping[str, str], seed: int = 0) -> list[dict]:
    """Rows of ``DYNAMICS_STEER_ARMS``: the fixed arm, the adaptive arm and their difference, every
    effect and KL on the held-out prompts (``ARM_COLUMNS``)."""
    held, sel = list(split.heldout), list(split.selection)
    per_prompt = {name: arms[name].effect[held].mean(axis=1) for name in ARMS}  # (held-out prompts,)
    cmp = Comparison.of({name: values[None] for name, values in per_prompt.items()}, seed=seed)
    n_steps = arms[ARMS[0]].effect.shape[1]
    common = dict(model=model, layer=layer, vector=vector, budget=budget, n_heldout=len(held), n_selection=len(sel),
                  n_steps=n_steps, scheme=SCHEME)
    rows = []
    for name in ARMS:
        a = arms[name]
        eff, kl = cmp.effect(name), mean_ci(a.kl[held].mean(axis=1), seed)
        rows.append(dict(common, arm=name, rule=rule_text[a.rule], scale=a.scale,
                         kl_selection=float(a.kl[sel].mean()), kl=kl.value, kl_low=kl.low, kl_high=kl.high,
                         effect=eff.value, effect_low=eff.low, effect_high=eff.high, p_value=eff.p_value,
                         mean_coefficient=float(a.coefficient[held].mean()), mean_gap=float(a.gap[held].mean())))
    diff = cmp.difference("adaptive", "fixed")
    dkl = mean_ci(arms["adaptive"].kl[held].mean(axis=1) - arms["fixed"].kl[held].mean(axis=1), seed)
    rows.append(dict(common, arm=DIFFERENCE, rule="", scale=NAN,
                     kl_selection=rows[1]["kl_selection"] - rows[0]["kl_selection"],
                     kl=dkl.value, kl_low=dkl.low, kl_high=dkl.high, effect=diff.value, effect_low=diff.low,
                     effect_high=diff.high, p_value=diff.p_value,
                     mean_coefficient=rows[1]["mean_coefficient"] - rows[0]["mean_coefficient"],
                     mean_gap=rows[1]["mean_gap"] - rows[0]["mean_gap"]))
    return rows


def kl_guard(verdict: str, kl_low: float, kl_high: float, budget: float) -> tuple[str, str]:
    """The validity guard on a claim: (verdict, reason). ``kl_low``, ``kl_high``: the interval of
    the held-out mean KL adaptive - fixed. A PASS (adaptive wins) stands when ``kl_high`` <=
    ``KL_TOLERANCE`` x ``budget``, a FAIL (fixed wins) when ``-kl_low`` is; an undefined interval
    withdraws the claim too. Otherwise INCONCLUSIVE, and the reason says why ('' when it stands)."""
    if verdict not in ("PASS", "FAIL"):
        return verdict, ""
    tol = KL_TOLERANCE * budget
    winner, loser, excess = (("adaptive", "fixed", kl_high) if verdict == "PASS" else ("fixed", "adaptive", -kl_low))
    if np.isfinite(excess) and excess <= tol:
        return verdict, ""
    return "INCONCLUSIVE", (f"{verdict} by the effect withdrawn: the {winner} arm may have spent more held-out KL than "
                            f"the {loser} arm ({winner} - {loser} up to {excess:.3g} nats, above the tolerance "
                            f"{tol:.3g} = {KL_TOLERANCE:g} x the budget {budget:g})")


def kl_difference_text(value: float, low: float, high: float) -> str:
    return f"held-out mean KL adaptive - fixed {value:.3g} [{low:.3g}, {high:.3g}]"


def model_verdict(rows: Sequence[Mapping], rule_text: str = RULE) -> dict:
    """One model's reading of the claim (``VERDICT_COLUMNS``): the held-out prompts' paired
    interval of adaptive - fixed, one-sided p of "> 0" (PASS) and "< 0" (FAIL) at 0.025, one test;
    ``kl_guard`` on the prompt bootstrap interval of the held-out KL difference."""
    d = next(r for r in rows if r["arm"] == DIFFERENCE)
    p_pass = d["p_value"]
    p_fail = 1.0 - p_pass if np.isfinite(p_pass) else NAN
    if d["effect_low"] == d["effect_high"]:  # identical arms on every prompt: the value exactly
        p_pass, p_fail = float(not d["effect"] > 0), float(not d["effect"] < 0)
    verdict, reason = kl_guard(decide_claims(p_pass, p_fail), d["kl_low"], d["kl_high"], d["budget"])
    note = "; ".join(x for x in (held_out_kl_note(rows), kl_difference_text(d["kl"], d["kl_low"], d["kl_high"]),
                                 reason) if x)
    return dict(key=VERDICT_KEY, population=d["model"], rule=rule_text, value=d["effect"], low=d["effect_low"],
                high=d["effect_high"], p_pass=p_pass, p_fail=p_fail, p_pass_holm=p_pass, p_fail_holm=p_fail,
                verdict=verdict, n_seeds=1, k=1, per_seed=f"{d['model']}: {d['effect']:.3g}",
                scheme=f"one model ({d['n_heldout']} held-out prompts): {d['scheme']}; describes this model only",
                correction="none (one model, one test); the population verdict is the report's",
                note=note)


def held_out_kl_note(rows: Sequence[Mapping]) -> str:
    """The arms' held-out mean KLs beside the budget they were matched to on the selection prompts
    (a budget matched on few prompts need not hold on the others: read the effects with them)."""
    arms = {r["arm"]: r for r in rows}
    return (f"held-out mean KL: fixed {arms['fixed']['kl']:.3g}, adaptive {arms['adaptive']['kl']:.3g} (both matched "
            f"to {arms['fixed']['budget']:g} on the {arms['fixed']['n_selection']} selection prompts)")


# ---------------------------------------------------------------------------- across seeds
class SeedSteering(NamedTuple):
    """One training seed's ``DYNAMICS_STEER_ARMS`` rows."""

    population: str
    seed: int | None
    rows: Sequence[Mapping]


def seed_value(rows: Sequence[Mapping], key: str = "effect") -> float:
    """The seed's mean held-out difference adaptive - fixed of ``key`` (the effect, or ``kl``: the
    held-out mean KL); NaN without one."""
    diffs = [float(r[key]) for r in rows if r["arm"] == DIFFERENCE and r.get(key) is not None and np.isfinite(r[key])]
    return float(np.mean(diffs)) if diffs else NAN


def seed_budget(rows: Sequence[Mapping]) -> float:
    """The KL budget of the seed's arms (NaN when they disagree or give none)."""
    budgets = {float(r["budget"]) for r in rows if r.get("budget") is not None}
    return budgets.pop() if len(budgets) == 1 else NAN


def population_rows(seeds: Sequence[SeedSteering]) -> list[dict]:
    """Per population, the across-seed estimate of adaptive - fixed (``POPULATION_COLUMNS``), and
    that of the held-out mean KL difference (``kl``, ``kl_low``, ``kl_high``) with the budget for
    the validity guard (NaN when the seeds' budgets differ)."""
    cells: dict[str, list[tuple[SeedSteering, float]]] = {}
    for s in seeds:
        cells.setdefault(s.population, []).append((s, seed_value(s.rows)))
    out = []
    for pop, members in cells.items():
        values = [v for _, v in members]
        value, low, high, se, df, k = across_seeds(values, False, CONFIDENCE)
        p_above, p_below = one_sided_t(value, se, df)
        finite = np.array([v for v in values if np.isfinite(v)])
        kl, kl_low, kl_high, *_ = across_seeds([seed_value(s.rows, "kl") for s, _ in members], False, CONFIDENCE)
        budgets = {seed_budget(s.rows) for s, _ in members}
        out.append(dict(
            population=pop, n_seeds=len(members), k=k, value=value, low=low, high=high, se=se, df=df, p_above=p_above,
            p_below=p_below, same_sign=float(np.mean(np.sign(finite) == np.sign(value))) if k and value != 0 else NAN,
            per_seed="; ".join(f"seed {s.seed}: {v:.3g} (KL {seed_value(s.rows, 'kl'):+.3g})" for s, v in members),
            scheme=(f"{len(members)} seeds: mean ± t(k-1) x SD/sqrt(k) over the seeds with a value; per seed the "
                    "mean held-out difference adaptive - fixed (in brackets: that of the held-out mean KL)"),
            note="" if k == len(members) else f"{k} of {len(members)} seeds with a value",
            kl=kl, kl_low=kl_low, kl_high=kl_high, budget=budgets.pop() if len(budgets) == 1 else NAN))
    return out


def verdict_rows(populations: Sequence[Mapping], rule_text: str = RULE) -> list[dict]:
    """The verdict per population, Holm across populations for each claim, then ``kl_guard`` on the
    across-seed interval of the held-out KL difference (``VERDICT_COLUMNS``)."""
    pass_holm, fail_holm = holm([r["p_above"] for r in populations]), holm([r["p_below"] for r in populations])
    m = int(sum(np.isfinite(r["p_above"]) for r in populations))
    out = []
    for r, a, b in zip(populations, pass_holm, fail_holm):
        verdict, reason = kl_guard(decide_claims(a, b), r["kl_low"], r["kl_high"], r["budget"])
        note = "; ".join(x for x in (r["note"], kl_difference_text(r["kl"], r["kl_low"], r["kl_high"]) + " over seeds",
                                     reason) if x)
        out.append(dict(key=VERDICT_KEY, population=r["population"], rule=rule_text, value=r["value"], low=r["low"],
                        high=r["high"], p_pass=r["p_above"], p_fail=r["p_below"], p_pass_holm=float(a),
                        p_fail_holm=float(b), verdict=verdict, n_seeds=r["n_seeds"], k=r["k"],
                        per_seed=r["per_seed"], scheme=r["scheme"],
                        correction=f"Holm over {m} population(s), PASS and FAIL claims each; one-sided tests at 0.025",
                        note=note))
    return out


def verdicts(seeds: Sequence[SeedSteering], rule_text: str = RULE) -> list[dict]:
    """``verdict_rows(population_rows(seeds))``."""
    return verdict_rows(population_rows(seeds), rule_text)
