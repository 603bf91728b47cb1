"""Spectrally adaptive steering vs a fixed coefficient at the same mean-KL budget (issue 17,
point 4): per-model rows, intervals and the verdict across training seeds. Measurements come
from ``spectral.dynamics.adaptive``; this module never loads a model.

Per model (``model_rows``): each arm's per-prompt mean over generation steps of the effect (set
score steered - unsteered) and of the KL(unsteered || steered), on the evaluated prompts. By
default (the job's ``--match-on evaluated``) every prompt is both matched and evaluated: each arm's
scale brings its mean KL over the very prompts (and steps) whose effect is compared to the budget
("at the same mean KL budget on the same prompts"). That is no selection on the score: the scale
is a function of the KL (the side-effect constraint) only, never of the effect, and the injection
layer is fixed by a rule or ``--layer``. The old split (``--match-on selection``: scales matched on
a selection split, ``analysis.steering.selection_split`` stratified by the sign of the unsteered
score, effects on the held-out rest) stays as an option; its held-out KLs drift from the budget
(the adaptive rule's per-prompt KL is heavy-tailed). The paired difference adaptive - fixed has
the steer job's interval (``analysis.steering.Comparison``: a paired bootstrap over the evaluated
prompts, estimate ± t(n-1) x bootstrap SE x sqrt(n/(n-1))) with the scales held fixed at their
matched values (the fuller interval would re-match both scales within each bootstrap draw: two
bisections of ~12 generations per draw, not done); its one-sided p of "> 0"; each arm's KL with
the same prompt bootstrap (the spread of the KL over prompts at the fixed scale).

Across the seeds of a population (``population_rows``; the seeds are the replicates): per seed
the mean difference over the evaluated prompts, across seeds the mean with the t-interval of
``analysis.population.across_seeds`` and one-sided t p-values (``one_sided_t``).

Verdict ``VERDICT_KEY`` per population (``RULE``, printed with it): PASS / FAIL by
``analysis.stats.decide_claims`` at one-sided 0.025 after Holm across populations (the PASS and
FAIL claims each), else INCONCLUSIVE (also with fewer than 2 seeds with a value).

Validity guard (``kl_guard``): a PASS or FAIL counts only when the winner did not spend more KL
on the evaluated prompts than the loser: the upper bound of the interval of (winner - loser) mean
KL (across seeds: the t-interval of the seeds' differences; one model: see below) is at most
``KL_TOLERANCE`` x the budget; otherwise INCONCLUSIVE with the reason in the note. The guard only
withdraws claims, so it cannot raise the rate of false PASSes. Matched on the evaluated prompts it
holds by construction up to the matcher's tolerance: each arm's mean KL there is within
``MATCH_TOLERANCE`` (2 %) x the budget of it (unless the arm's mean KL jumps over the budget, a
greedy continuation flipping at one scale: then the closest scale found, said in the note, and
that model's band widened by the miss), so a seed's difference lies within 2 x 2 % = 4 % of
the budget, and for one model its interval is that band, [-4 %, +4 %] x the budget (what
re-matching on any bootstrap draw of the prompts would give); across 4 or more seeds the
t-interval's bound stays below 0.1 x the budget for any differences inside the band (worst case
0.084 x at 4 seeds), with 2-3 seeds it can exceed it. It is kept as a check. Matched on a
selection split the held-out KLs need not stay matched (on organism-xs 10 % of the prompts carry
40-90 % of the adaptive arm's mean KL, those whose gap g_0 is small, so the rule's ratio is large
there), and the one-model interval is the prompt bootstrap of the held-out KL difference.
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
upper bound of (winner - loser) evaluated mean KL is at most this x the budget (0.025 nats at 0.25)."""
MATCH_TOLERANCE = 0.02
"""The matcher's tolerance relative to the budget (``spectral.dynamics.adaptive.MATCH_TOLERANCE``,
repeated here so that this module does not import torch; ``tests/test_adaptive_steering.py`` checks
they agree)."""
ARMS = ("fixed", "adaptive")
DIFFERENCE = "adaptive-fixed"
VERDICT_KEY = "adaptive_steering_beats_fixed"
SCHEME = (f"{CONFIDENCE:.0%}, paired bootstrap over the evaluated prompts ({N_RESAMPLES} resamples) with the arms' "
          "scales held at their matched values, estimate ± t(n-1) x bootstrap SE x sqrt(n/(n-1)) "
          "(analysis.steering.Comparison); per prompt the mean over generation steps")


MATCH_SCHEME = {"evaluated": "scales matched to the budget on the evaluated prompts themselves",
                "selection": "scales matched to the budget on a selection split, effects on the held-out prompts"}
"""Where each arm's scale is matched to the budget (the keys: the job's ``--match-on``): on the
evaluated prompts themselves (the default), or on a selection split with effects on the held-out
rest; said at the end of the arm rows' ``scheme`` (``matched_on`` reads it back; rows without it
predate the option and used a selection split)."""


def rule(adaptive: str = "alpha_t = alpha x g_t / g_0", match_on: str = "evaluated") -> str:
    """The verdict's rule in words (``adaptive``: the adaptive arm's coefficient rule; ``match_on``:
    ``MATCH_ON``, or both joined by ' / ' when a population's cells differ)."""
    if match_on == "evaluated":
        matched = ("each arm's alpha scaled so that its mean KL(unsteered || steered) over steps and the evaluated "
                   f"prompts equals the budget within the matcher's tolerance ({MATCH_TOLERANCE:.0%}; where an arm's "
                   "mean KL jumps over the budget, the closest scale found, said in the note), on the very "
                   "prompts whose effect is compared (the scale is a function of the KL only, never of the effect; "
                   "the injection layer fixed by a rule or --layer); effects, set score steered - unsteered "
                   "averaged over steps, on those prompts")
    elif match_on == "selection":
        matched = ("each arm's alpha scaled on the selection split of the prompts so that its mean "
                   "KL(unsteered || steered) over steps and prompts equals the budget; effects, set score steered - "
                   "unsteered averaged over steps, on the held-out split (the evaluated prompts)")
    else:
        matched = f"each arm's alpha scaled to the budget, matched on {match_on} prompts as each cell says"
    return (f"{VERDICT_KEY}: per population, claim 'steering with the spectrally adaptive coefficient ({adaptive}; "
            "g_t the injection layer's minimum key-kernel gap over its heads of the context before the current "
            "position, g_0 on the prompt) moves the concept more than a fixed coefficient at the same mean KL "
            f"budget' (greedy generation, the vector added at the current position; {matched}); per seed the mean "
            "over the evaluated prompts of adaptive - fixed (one model's interval: a paired bootstrap over prompts "
            "with the scales held fixed); across seeds (the replicates) the mean with a t-interval "
            "(mean ± t(k-1) x SD/sqrt(k)); one-sided t p-values for '> 0' (PASS) and '< 0' (FAIL), Holm across "
            "populations for each claim; PASS / FAIL when the adjusted p < 0.025, else INCONCLUSIVE (also with "
            "fewer than 2 seeds with a value); validity guard, a check: a PASS or FAIL counts only when the upper "
            "bound of the 95 % interval (the same t-interval over seeds) of the winner's minus the loser's mean KL "
            f"on the evaluated prompts is at most {KL_TOLERANCE:g} x the budget (the winner did not spend more "
            "side effect than the loser), else INCONCLUSIVE with the reason in the note (matched on the evaluated "
            f"prompts each seed's KL difference lies within {2 * MATCH_TOLERANCE:.0%} of the budget, so with 4 or "
            "more seeds the guard holds by construction).")


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


def model_rows(model: str, arms: Mapping[str, ArmResult], split: Split | None, *, layer: int, vector: str,
               budget: float, rule_text: Mapping[str, str], seed: int = 0) -> list[dict]:
    """Rows of ``DYNAMICS_STEER_ARMS``: the fixed arm, the adaptive arm and their difference, every
    effect and KL on the evaluated prompts (``ARM_COLUMNS``). ``split`` None: every prompt was
    matched and is evaluated (``n_selection`` = ``n_heldout`` = all, ``kl_selection`` = ``kl``), and
    the difference's KL interval is the matcher's band: ± the sum over the arms of
    max(``MATCH_TOLERANCE`` x ``budget``, |arm's KL - ``budget``|), i.e. ± 4 % of the budget when
    both arms landed within the tolerance (what re-matching on any bootstrap draw of the prompts
    gives; wider by what an arm whose KL jumps over the budget missed it by); else the scales were
    matched on ``split.selection`` and every effect and KL is on ``split.heldout`` (the KL
    difference's interval: the prompt bootstrap)."""
    n = arms[ARMS[0]].effect.shape[0]
    held, sel = (list(range(n)), list(range(n))) if split is None else (list(split.heldout), list(split.selection))
    per_prompt = {name: arms[name].effect[held].mean(axis=1) for name in ARMS}  # (held-out prompts,)
    cmp = Comparison.of({name: values[None] for name, values in per_prompt.items()}, seed=seed)
    n_steps = arms[ARMS[0]].effect.shape[1]
    common = dict(model=model, layer=layer, vector=vector, budget=budget, n_heldout=len(held), n_selection=len(sel),
                  n_steps=n_steps, scheme=f"{SCHEME}; {MATCH_SCHEME['selection' if split else 'evaluated']}")
    rows = []
    for name in ARMS:
        a = arms[name]
        eff, kl = cmp.effect(name), mean_ci(a.kl[held].mean(axis=1), seed)
        rows.append(dict(common, arm=name, rule=rule_text[a.rule], scale=a.scale,
                         kl_selection=kl.value if split is None else float(a.kl[sel].mean()), kl=kl.value,
                         kl_low=kl.low, kl_high=kl.high,
                         effect=eff.value, effect_low=eff.low, effect_high=eff.high, p_value=eff.p_value,
                         mean_coefficient=float(a.coefficient[held].mean()), mean_gap=float(a.gap[held].mean())))
    diff = cmp.difference("adaptive", "fixed")
    dkl = mean_ci(arms["adaptive"].kl[held].mean(axis=1) - arms["fixed"].kl[held].mean(axis=1), seed)
    kl_low, kl_high = dkl.low, dkl.high
    if split is None:
        half = sum(max(MATCH_TOLERANCE * budget, abs(r["kl"] - budget)) for r in rows)
        kl_low, kl_high = -half, half
    rows.append(dict(common, arm=DIFFERENCE, rule="", scale=NAN,
                     kl_selection=rows[1]["kl_selection"] - rows[0]["kl_selection"],
                     kl=dkl.value, kl_low=kl_low, kl_high=kl_high, effect=diff.value, effect_low=diff.low,
                     effect_high=diff.high, p_value=diff.p_value,
                     mean_coefficient=rows[1]["mean_coefficient"] - rows[0]["mean_coefficient"],
                     mean_gap=rows[1]["mean_gap"] - rows[0]["mean_gap"]))
    return rows


def kl_guard(verdict: str, kl_low: float, kl_high: float, budget: float) -> tuple[str, str]:
    """The validity guard on a claim: (verdict, reason). ``kl_low``, ``kl_high``: the interval of
    the mean KL adaptive - fixed on the evaluated prompts. A PASS (adaptive wins) stands when ``kl_high`` <=
    ``KL_TOLERANCE`` x ``budget``, a FAIL (fixed wins) when ``-kl_low`` is; an undefined interval
    withdraws the claim too. Otherwise INCONCLUSIVE, and the reason says why ('' when it stands)."""
    if verdict not in ("PASS", "FAIL"):
        return verdict, ""
    tol = KL_TOLERANCE * budget
    winner, loser, excess = (("adaptive", "fixed", kl_high) if verdict == "PASS" else ("fixed", "adaptive", -kl_low))
    if np.isfinite(excess) and excess <= tol:
        return verdict, ""
    return "INCONCLUSIVE", (f"{verdict} by the effect withdrawn: the {winner} arm may have spent more KL than "
                            f"the {loser} arm ({winner} - {loser} up to {excess:.3g} nats, above the tolerance "
                            f"{tol:.3g} = {KL_TOLERANCE:g} x the budget {budget:g})")


def kl_difference_text(value: float, low: float, high: float) -> str:
    return f"evaluated mean KL adaptive - fixed {value:.3g} [{low:.3g}, {high:.3g}]"


def model_verdict(rows: Sequence[Mapping], rule_text: str = RULE) -> dict:
    """One model's reading of the claim (``VERDICT_COLUMNS``): the evaluated prompts' paired
    interval of adaptive - fixed, one-sided p of "> 0" (PASS) and "< 0" (FAIL) at 0.025, one test;
    ``kl_guard`` on the difference row's KL interval (``model_rows``: the matcher's band, or the
    prompt bootstrap of the held-out KL difference with a selection split)."""
    d = next(r for r in rows if r["arm"] == DIFFERENCE)
    p_pass = d["p_value"]
    p_fail = 1.0 - p_pass if np.isfinite(p_pass) else NAN
    if d["effect_low"] == d["effect_high"]:  # identical arms on every prompt: the value exactly
        p_pass, p_fail = float(not d["effect"] > 0), float(not d["effect"] < 0)
    verdict, reason = kl_guard(decide_claims(p_pass, p_fail), d["kl_low"], d["kl_high"], d["budget"])
    note = "; ".join(x for x in (evaluated_kl_note(rows), kl_difference_text(d["kl"], d["kl_low"], d["kl_high"]),
                                 reason) if x)
    return dict(key=VERDICT_KEY, population=d["model"], rule=rule_text, value=d["effect"], low=d["effect_low"],
                high=d["effect_high"], p_pass=p_pass, p_fail=p_fail, p_pass_holm=p_pass, p_fail_holm=p_fail,
                verdict=verdict, n_seeds=1, k=1, per_seed=f"{d['model']}: {d['effect']:.3g}",
                scheme=f"one model ({d['n_heldout']} evaluated prompts): {d['scheme']}; describes this model only",
                correction="none (one model, one test); the population verdict is the report's",
                note=note)


def matched_on(rows: Sequence[Mapping]) -> str:
    """'evaluated' when the arms' scales were matched on the evaluated prompts themselves (their
    ``scheme`` says so: ``MATCH_SCHEME``), else 'selection'."""
    arms = [r for r in rows if r["arm"] in ARMS]
    same = all(MATCH_SCHEME["evaluated"] in (r.get("scheme") or "") for r in arms)
    return "evaluated" if arms and same else "selection"


def evaluated_kl_note(rows: Sequence[Mapping]) -> str:
    """The arms' mean KLs on the evaluated prompts beside the budget and where they were matched to
    it (a budget matched on other prompts need not hold on these: read the effects with them)."""
    arms = {r["arm"]: r for r in rows}
    budget = arms["fixed"]["budget"]
    where = ("the evaluated prompts themselves" if matched_on(rows) == "evaluated" else
             f"the {arms['fixed']['n_selection']} selection prompts, evaluated on {arms['fixed']['n_heldout']} "
             "held-out ones")
    missed = [f"the {a} arm's mean KL jumps over the budget: the matcher's closest is {arms[a]['kl']:.4g}, outside "
              f"its {MATCH_TOLERANCE:.0%} tolerance (the KL band of the difference widened by it)" for a in ARMS
              if matched_on(rows) == "evaluated"
              and not abs(arms[a]["kl"] - budget) <= MATCH_TOLERANCE * budget * (1 + 1e-9)]
    return "; ".join([f"mean KL on the evaluated prompts: fixed {arms['fixed']['kl']:.3g}, adaptive "
                      f"{arms['adaptive']['kl']:.3g} (both matched to {budget:g} on {where})", *missed])


# ---------------------------------------------------------------------------- across seeds
class SeedSteering(NamedTuple):
    """One training seed's ``DYNAMICS_STEER_ARMS`` rows."""

    population: str
    seed: int | None
    rows: Sequence[Mapping]


def seed_value(rows: Sequence[Mapping], key: str = "effect") -> float:
    """The seed's mean difference adaptive - fixed over the evaluated prompts of ``key`` (the
    effect, or ``kl``: the mean KL); NaN without one."""
    diffs = [float(r[key]) for r in rows if r["arm"] == DIFFERENCE and r.get(key) is not None and np.isfinite(r[key])]
    return float(np.mean(diffs)) if diffs else NAN


def seed_budget(rows: Sequence[Mapping]) -> float:
    """The KL budget of the seed's arms (NaN when they disagree or give none)."""
    budgets = {float(r["budget"]) for r in rows if r.get("budget") is not None}
    return budgets.pop() if len(budgets) == 1 else NAN


def population_rows(seeds: Sequence[SeedSteering]) -> list[dict]:
    """Per population, the across-seed estimate of adaptive - fixed (``POPULATION_COLUMNS``), and
    that of the evaluated mean KL difference (``kl``, ``kl_low``, ``kl_high``) with the budget for
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
                    "mean difference adaptive - fixed over the evaluated prompts (in brackets: that of the mean "
                    "KL)"),
            note="" if k == len(members) else f"{k} of {len(members)} seeds with a value",
            kl=kl, kl_low=kl_low, kl_high=kl_high, budget=budgets.pop() if len(budgets) == 1 else NAN))
    return out


def verdict_rows(populations: Sequence[Mapping], rule_text: str = RULE) -> list[dict]:
    """The verdict per population, Holm across populations for each claim, then ``kl_guard`` on the
    across-seed interval of the evaluated KL difference (``VERDICT_COLUMNS``)."""
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
