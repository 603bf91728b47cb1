"""Feature-aware steering vs ActAdd at the same KL budget, and which SAE features predict the
steering effect (issue 16, point 4): tables, intervals and the verdict across training seeds.
Measurements come from ``spectral.saes.steering``; this module never loads a model.

Per model (``steering_rows``; one SAE's ``FeatureSteering``): each arm's mean effect on the held-out
prompts of the steer job's split (``steer_split``: ``analysis.steering.selection_split``
stratified by the sign of the unsteered score, as ``eigengap steer``), the paired difference
feature - ActAdd, each with the steer job's interval (``analysis.steering.Comparison``: a paired
bootstrap over the held-out prompts, estimate ± t(n-1) x bootstrap SE x sqrt(n/(n-1))), the KL
each arm reached with its interval over the neutral prompts, and a one-sided p of "> 0".

Across the seeds of a population (``population_rows``; seeds are the replicates): per seed the
mean held-out difference (averaged over the seed's SAEs of the chosen ``kind`` when it has
several: SAEs of one model are not independent replicates), across seeds the mean with the
t-interval of ``analysis.population.across_seeds`` and one-sided t p-values.

Verdict ``VERDICT_KEY`` per population (``RULE``, printed with it): PASS / FAIL by
``analysis.stats.decide_claims`` at one-sided 0.025 after Holm across populations (the PASS and
FAIL claims each), else INCONCLUSIVE. ``tests/test_sae_steering.py`` checks by simulation that it
passes at most at its nominal rate when the two arms are equal.

The correlation screen (``correlation_summary``): per SAE and in total, features tested, dead,
and significant after Benjamini-Hochberg (``spectral.saes.steering.CORRECTION``), and the top
feature.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np

from analysis.population import across_seeds, holm, one_sided_t
from analysis.stats import CONFIDENCE, N_RESAMPLES, decide_claims
from analysis.steering import Comparison, Split, mean_ci, selection_split
from spectral import tables as schemas
from spectral.errors import UsageError

if TYPE_CHECKING:
    import pyarrow as pa

    from spectral.saes.steering import FeatureSteering

NAN = float("nan")
ARMS = ("actadd", "feature")
DIFFERENCE = "feature-actadd"
VERDICT_KEY = "feature_steering_beats_actadd"
Kind = Literal["all", "head", "layer"]
SCHEME = (f"{CONFIDENCE:.0%}, paired bootstrap over held-out prompts ({N_RESAMPLES} resamples), estimate ± t(n-1) x "
          "bootstrap SE x sqrt(n/(n-1)) (analysis.steering.Comparison); KL: the same over neutral prompts")


def rule(kind: Kind = "all") -> str:
    """The verdict's rule in words."""
    which = {"all": "all its SAEs", "head": "its head SAEs", "layer": "its layer SAEs"}[kind]
    return (f"{VERDICT_KEY}: per population, claim 'feature-aware steering moves the concept more than ActAdd at the "
            "same KL budget' (features chosen on the selection split of the steer job's prompts, both arms scaled "
            "to the same mean KL on the neutral prompts, effects on the held-out split); per seed the mean over "
            f"held-out prompts of feature - ActAdd, averaged over {which}; across seeds the mean with a t-interval "
            "(mean ± t(k-1) x SD/sqrt(k)); one-sided t p-values for '> 0' (PASS) and '< 0' (FAIL), Holm across "
            "populations for each claim; PASS / FAIL when the adjusted p < 0.025, else INCONCLUSIVE (also with "
            "fewer than 2 seeds with a value).")


RULE = rule()

POPULATION_COLUMNS = ("population", "kind", "n_seeds", "k", "value", "low", "high", "se", "df", "p_above", "p_below",
                      "same_sign", "per_seed", "scheme", "note")
VERDICT_COLUMNS = ("key", "population", "kind", "rule", "value", "low", "high", "p_pass", "p_fail", "p_pass_holm",
                   "p_fail_holm", "verdict", "n_seeds", "k", "per_seed", "correction", "note")
"""Keys of ``population_rows`` / ``verdict_rows`` rows (n_seeds, k: int; the text columns str;
the rest float)."""
SUMMARY_COLUMNS = ("model", "sae", "d_sae", "n_dead", "n_tested", "n_significant", "top_feature", "top_spearman",
                   "top_p_adjusted", "n_tests", "correction")
"""Keys of ``correlation_summary`` rows; the row with ``sae`` "all" totals a model's SAEs."""


# ---------------------------------------------------------------------------- per model
def steer_split(base_score, fraction: float = 0.5, seed: int = 0) -> Split:
    """The steer job's split of the evaluation prompts: stratified by the sign of the unsteered
    score (``Evaluator.base_score``)."""
    score = np.asarray(base_score.cpu() if hasattr(base_score, "cpu") else base_score, dtype=float)
    try:
        return selection_split(len(score), fraction, seed, strata=score > 0)
    except ValueError as err:
        raise UsageError(f"--selection-fraction: {err}") from None


def steering_rows(result: FeatureSteering, *, seed: int = 0) -> list[dict]:
    """Rows of ``spectral.tables.SAE_STEERING``: ActAdd, the feature arm, and their difference."""
    held = list(result.heldout)
    arms = {"actadd": result.actadd, "feature": result.feature}
    cmp = Comparison.of({name: arm.effect[held][None] for name, arm in arms.items()}, seed=seed)
    c = result.chosen
    common = dict(model=result.model, sae=result.sae, layer=result.layer,
                  head=-1 if result.head is None else result.head, features=json.dumps(list(c.features)),
                  signs=json.dumps(list(c.signs)), separation=json.dumps([round(d, 6) for d in c.separation]),
                  kl_budget=result.kl_budget, n_prompts=len(held), n_selection=len(result.selection_split),
                  cosine_actadd=result.cosine, scheme=SCHEME)
    rows = []
    for name, arm in arms.items():
        eff, kl = cmp.effect(name), mean_ci(arm.kl, seed)
        rows.append(dict(common, arm=name, scale=arm.scale, kl=kl.value, kl_low=kl.low, kl_high=kl.high,
                         loss_increase=float(arm.loss_increase.mean()) if len(arm.loss_increase) else NAN,
                         effect=eff.value, effect_low=eff.low, effect_high=eff.high, p_value=eff.p_value))
    diff, dkl = cmp.difference("feature", "actadd"), mean_ci(result.feature.kl - result.actadd.kl, seed)
    loss = [r["loss_increase"] for r in rows]
    rows.append(dict(common, arm=DIFFERENCE, scale=NAN, kl=dkl.value, kl_low=dkl.low, kl_high=dkl.high,
                     loss_increase=loss[1] - loss[0], effect=diff.value, effect_low=diff.low, effect_high=diff.high,
                     p_value=diff.p_value))
    return rows


def steering_table(rows: Sequence[Mapping]) -> pa.Table:
    return schemas.from_rows(rows, schemas.SAE_STEERING, "sae_steering")


# ---------------------------------------------------------------------------- across seeds
class SeedSteering(NamedTuple):
    """One training seed's ``SAE_STEERING`` rows (one or more SAEs of one model)."""

    population: str
    seed: int | None
    rows: Sequence[Mapping]


def seed_value(rows: Sequence[Mapping], kind: Kind = "all") -> tuple[float, int]:
    """(mean held-out difference over the seed's SAEs of ``kind``, how many SAEs)."""
    if kind not in ("all", "head", "layer"):
        raise UsageError(f"kind must be all, head or layer, got {kind!r}")
    diffs = [float(r["effect"]) for r in rows if r["arm"] == DIFFERENCE
             and (kind == "all" or (r["head"] < 0) == (kind == "layer"))]
    finite = [d for d in diffs if np.isfinite(d)]
    return (float(np.mean(finite)) if finite else NAN), len(finite)


def population_rows(seeds: Sequence[SeedSteering], kind: Kind = "all") -> list[dict]:
    """Per population, the across-seed estimate of the feature - ActAdd difference (``POPULATION_COLUMNS``)."""
    cells: dict[str, list[tuple[SeedSteering, float, int]]] = {}
    for s in seeds:
        cells.setdefault(s.population, []).append((s, *seed_value(s.rows, kind)))
    out = []
    for pop, members in cells.items():
        values = [v for _, v, _ in members]
        value, low, high, se, df, k = across_seeds(values, False, CONFIDENCE)
        p_above, p_below = one_sided_t(value, se, df)
        finite = np.array([v for v in values if np.isfinite(v)])
        out.append(dict(
            population=pop, kind=kind, n_seeds=len(members), k=k, value=value, low=low, high=high, se=se, df=df,
            p_above=p_above, p_below=p_below,
            same_sign=float(np.mean(np.sign(finite) == np.sign(value))) if k and value != 0 else NAN,
            per_seed="; ".join(f"seed {s.seed}: {v:.3g} ({n} SAE{'s' * (n != 1)})" for s, v, n in members),
            scheme=(f"{len(members)} seeds: mean ± t(k-1) x SD/sqrt(k) over the seeds with a value; per seed the "
                    "mean held-out difference feature - ActAdd (averaged over its SAEs)"),
            note="" if k == len(members) else f"{k} of {len(members)} seeds with a value"))
    return out


def verdict_rows(populations: Sequence[Mapping]) -> list[dict]:
    """The verdict per population, Holm across populations for each claim (``VERDICT_COLUMNS``)."""
    pass_holm, fail_holm = holm([r["p_above"] for r in populations]), holm([r["p_below"] for r in populations])
    m = int(sum(np.isfinite(r["p_above"]) for r in populations))
    out = []
    for r, a, b in zip(populations, pass_holm, fail_holm):
        out.append(dict(
            key=VERDICT_KEY, population=r["population"], kind=r["kind"], rule=rule(r["kind"]), value=r["value"],
            low=r["low"], high=r["high"], p_pass=r["p_above"], p_fail=r["p_below"], p_pass_holm=float(a),
            p_fail_holm=float(b), verdict=decide_claims(a, b), n_seeds=r["n_seeds"], k=r["k"],
            per_seed=r["per_seed"],
            correction=f"Holm over {m} population(s), PASS and FAIL claims each; one-sided tests at 0.025",
            note=r["note"]))
    return out


def verdicts(seeds: Sequence[SeedSteering], kind: Kind = "all") -> list[dict]:
    """``verdict_rows(population_rows(seeds, kind))``."""
    return verdict_rows(population_rows(seeds, kind))


# ---------------------------------------------------------------------------- the correlation screen
def correlation_summary(rows: Sequence[Mapping]) -> list[dict]:
    """Per (model, SAE) and per model in total ("all"): features tested, dead, significant after
    the correction, and the top feature (smallest adjusted p) (``SUMMARY_COLUMNS``).
    ``rows``: ``spectral.tables.SAE_STEERABILITY`` rows."""
    by: dict[tuple[str, str], list[Mapping]] = {}
    for r in rows:
        by.setdefault((r["model"], r["sae"]), []).append(r)
        by.setdefault((r["model"], "all"), []).append(r)
    out = []
    for (model, sae), rs in by.items():
        top = min(rs, key=lambda r: (not np.isfinite(r["p_adjusted"]), r["p_adjusted"], r["sae"], r["feature"]))
        saes = {r["sae"]: r for r in rs}
        out.append(dict(
            model=model, sae=sae, d_sae=sum(r["d_sae"] for r in saes.values()),
            n_dead=sum(r["n_dead"] for r in saes.values()), n_tested=int(sum(np.isfinite(r["p_value"]) for r in rs)),
            n_significant=sum(bool(r["significant"]) for r in rs),
            top_feature=f"{top['sae']}:{top['feature']}" if sae == "all" else str(top["feature"]),
            top_spearman=float(top["spearman"]), top_p_adjusted=float(top["p_adjusted"]), n_tests=int(top["n_tests"]),
            correction=top["correction"]))
    return sorted(out, key=lambda r: (r["model"], r["sae"] != "all", r["sae"]))
