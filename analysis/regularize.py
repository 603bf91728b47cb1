"""Spectral regularisation and controlled instability (issue 20): what each training arm changed
against the baseline, and the verdicts. Measurements come from ``spectral.regularize.measure``; this
module never loads a model.

The unit of replication is the training seed: arm and baseline are trained from the same seed (the
same initial weights and data order), so each seed gives one paired difference
``D_s = measure(arm, seed s) - measure(baseline, seed s)``; across the seeds the mean with the
t-interval ``mean ± t(k-1) x SD / sqrt(k)`` (``analysis.population.across_seeds``). Per-head
measures enter as their mean over the heads a seed's arm targets (the heads the arm names; every
head for sigma-reparam), so heads are averaged inside a seed and the seeds are what varies.

Contrasts (``contrast_rows``, descriptive, every arm x measure, no multiplicity claim): the
targeted heads' mean key-kernel gap and the other heads', the fraction of unstable heads (gap <=
``THRESHOLD``), each quality and few-shot measure, the targeted heads' mean importance (restoration)
and mean importance rank (1 = most important of all heads), and the steering effect at each layer.

Verdicts (``verdict_rows``; three families, each with one-sided t p-values for the claim (PASS)
and its opposite (FAIL), Holm across the family's rows for each, PASS / FAIL when the adjusted
p < 0.025, else INCONCLUSIVE, and INCONCLUSIVE with fewer than 2 paired seeds):

- ``gap_manipulation_took_hold`` (every gap arm): ``D = s x (gap_targeted(arm) - gap_targeted(baseline))``
  with ``s = +1`` for an arm pushing up, ``-1`` down: the manipulation check;
- ``instability_improves_few_shot`` (arms pushing chosen heads' gaps down: controlled-instability,
  a gap-penalty ``down``): ``D = few_shot_gain_1(arm) - few_shot_gain_1(baseline)``, the one-shot
  gain ``1 - loss_1 / loss_0`` (``spectral.regularize.measure``: the fraction of the no-context loss
  of span tokens 2..10 that one copy seen removes). Not the one-shot loss, which also falls when a
  model merely predicts the tokens better without context (a 60-step pilot "improved" it by 0.02
  nats with no copying at all), nor the ICL score, which once the late loss is near 0 is minus the
  early token's no-context loss (an arm that predicts worse without context would "improve" it);
- ``instability_makes_layer_steerable`` (the same arms, each layer holding targeted heads):
  ``D = effect_arm(layer) - effect_baseline(layer)`` of the CAA sentiment vector matched to the same
  KL budget.

``tests/test_regularize.py`` checks by simulation that at D = 0 the rule passes at most at its
nominal rate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from analysis.population import across_seeds, holm_claims, one_sided_t
from analysis.stats import CONFIDENCE, decide_claims

NAN = float("nan")
THRESHOLD = 0.77
"""The earlier GPT-2 study's instability threshold (gap <= 0.77)."""
BASELINE = "baseline"
FEW_SHOT_MEASURE = "few_shot_gain_1"
MODEL_MEASURES = {
    "few_shot_gain_1": "higher", "few_shot_gain_2": "higher", "icl_score": "lower", "few_shot_loss_1": "lower", "few_shot_loss_2": "lower", "few_shot_accuracy_1": "higher",
    "few_shot_accuracy_2": "higher", "induction_accuracy": "higher", "ioi_accuracy": "higher",
    "repeat_accuracy": "higher", "heldout_loss": "lower",
}
"""Model-level measures contrasted, with the direction that is better."""
MANIPULATION, FEW_SHOT, STEERABLE = "gap_manipulation_took_hold", "instability_improves_few_shot", \
    "instability_makes_layer_steerable"
VERDICT_KEYS = (MANIPULATION, FEW_SHOT, STEERABLE)
VERDICT_COLUMNS = ("key", "population", "arm", "layer", "rule", "value", "low", "high", "p_pass", "p_fail",
                   "p_pass_holm", "p_fail_holm", "verdict", "n_seeds", "k", "per_seed", "scheme", "correction", "note")
CONTRAST_COLUMNS = ("population", "arm", "measure", "better", "baseline", "arm_value", "value", "low", "high", "se",
                    "df", "k", "per_seed")


class ArmRun(NamedTuple):
    """One trained model's measurements."""

    population: str
    """The organism (the recipe whose seeds are the replicates)."""
    arm: str
    seed: int
    direction: str
    """The arm's direction ('up' / 'down'; '' without one)."""
    targeted: tuple[tuple[int, int], ...]
    """The heads the arm acts on (() for sigma-reparam and the baseline: every head)."""
    model: Mapping[str, float]
    heads: Sequence[Mapping]
    """Per head: ``layer``, ``head``, ``gap``, ``restoration``."""
    layers: Sequence[Mapping]
    """Per layer: ``layer``, ``effect``."""


def rule(key: str) -> str:
    what = {
        MANIPULATION: "the gap penalty moved the targeted heads' key-kernel gap in the requested direction: per seed "
                      "D = s x (mean gap of the targeted heads in the arm - the same heads in the baseline), s = +1 "
                      "for 'up', -1 for 'down'",
        FEW_SHOT: "strategic instability improves few-shot learning: per seed D = one-shot gain of the arm - that "
                  "of the baseline, the gain 1 - loss_1 / loss_0 being the fraction of the no-context loss of span "
                  "tokens 2..10 of 'Repeat: r | r | r.' that one copy seen removes",
        STEERABLE: "targeted instability makes a layer more steerable: per seed D = mean effect of the CAA sentiment "
                   "vector at the layer in the arm - in the baseline, each matched to the same KL budget (2 % "
                   "tolerance) on the neutral prompts",
    }[key]
    return (f"{key}: claim '{what.split(':')[0]}'. {what[what.index(':') + 2:]}; arm and baseline trained from the same "
            "seed (paired). Across seeds the mean of D with a t-interval (mean ± t(k-1) x SD/sqrt(k)); one-sided t "
            "p-values for 'D > 0' (PASS) and 'D < 0' (FAIL), Holm across the family's rows for each claim; PASS / "
            "FAIL when the adjusted p < 0.025, else INCONCLUSIVE (also with fewer than 2 seeds).")


def _targeted(run: ArmRun, heads: Sequence[tuple[int, int]] | None = None) -> set[tuple[int, int]]:
    keys = heads if heads is not None else run.targeted
    return set(keys) if keys else {(int(h["layer"]), int(h["head"])) for h in run.heads}


def importance_ranks(restoration: Mapping[tuple[int, int], float]) -> dict[tuple[int, int], int]:
    """Each head's rank by restoration, 1 = the most important (NaN last; ties in head order)."""
    order = sorted(restoration, key=lambda k: -restoration[k] if np.isfinite(restoration[k]) else np.inf)
    return {k: i + 1 for i, k in enumerate(order)}


def head_summary(run: ArmRun, heads: Sequence[tuple[int, int]]) -> dict[str, float]:
    """Per model: the mean gap, restoration and importance rank of ``heads`` (every head when
    empty), the other heads' mean gap, and the fraction of heads with gap <= ``THRESHOLD``."""
    chosen = _targeted(run, heads)
    gap = {(int(h["layer"]), int(h["head"])): float(h["gap"]) for h in run.heads}
    rest = {(int(h["layer"]), int(h["head"])): float(h["restoration"]) for h in run.heads}
    rank = importance_ranks(rest)
    others = [gap[k] for k in gap if k not in chosen]
    everything = not others  # every head chosen: its mean rank is (n + 1) / 2 whatever the model
    gaps = np.array(list(gap.values()))
    return {"gap_targeted": float(np.mean([gap[k] for k in chosen])),
            "gap_rest": float(np.mean(others)) if others else NAN,
            "fraction_unstable": float(np.mean(gaps <= THRESHOLD)) if gaps.size else NAN,
            "restoration_targeted": NAN if everything else _mean([rest[k] for k in chosen]),
            "importance_rank_targeted": NAN if everything else float(np.mean([rank[k] for k in chosen]))}


def _pairs(runs: Sequence[ArmRun]) -> dict[tuple[str, str], list[tuple[ArmRun, ArmRun]]]:
    """(population, arm) -> [(arm run, baseline run of the same seed)], arms other than the baseline."""
    base = {(r.population, r.seed): r for r in runs if r.arm == BASELINE}
    out: dict[tuple[str, str], list[tuple[ArmRun, ArmRun]]] = {}
    for r in runs:
        if r.arm != BASELINE and (r.population, r.seed) in base:
            out.setdefault((r.population, r.arm), []).append((r, base[(r.population, r.seed)]))
    return out


def _estimate(values: Sequence[float], seeds: Sequence[int]) -> dict:
    value, low, high, se, df, k = across_seeds(values, False, CONFIDENCE)
    p_above, p_below = one_sided_t(value, se, df)
    return dict(value=value, low=low, high=high, se=se, df=df, k=k, p_above=p_above, p_below=p_below,
                per_seed="; ".join(f"seed {s}: {v:.4g}" for s, v in zip(seeds, values)))


def measures_of(run: ArmRun, heads: Sequence[tuple[int, int]]) -> dict[str, float]:
    """Every contrasted measure of one model, the per-head ones over ``heads``."""
    out = {k: float(run.model.get(k, NAN)) for k in MODEL_MEASURES}
    out.update(head_summary(run, heads))
    for row in run.layers:
        out[f"steer_effect_layer_{int(row['layer'])}"] = float(row["effect"])
    return out


BETTER = {**MODEL_MEASURES, "gap_targeted": "", "gap_rest": "", "fraction_unstable": "", "restoration_targeted": "",
          "importance_rank_targeted": "lower"}


def contrast_rows(runs: Sequence[ArmRun]) -> list[dict]:
    """Arm - baseline per measure (module docstring), one row per (population, arm, measure)."""
    out = []
    for (pop, arm), pairs in sorted(_pairs(runs).items()):
        heads = pairs[0][0].targeted
        per = [(measures_of(a, heads), measures_of(b, heads)) for a, b in pairs]
        seeds = [a.seed for a, _ in pairs]
        for measure in per[0][0]:
            d = [m[measure] - b[measure] for m, b in per]
            e = _estimate(d, seeds)
            out.append(dict(population=pop, arm=arm, measure=measure,
                            better=BETTER.get(measure, "higher" if measure.startswith("steer_effect") else ""),
                            baseline=_mean([b[measure] for _, b in per]),
                            arm_value=_mean([m[measure] for m, _ in per]),
                            **{k: e[k] for k in ("value", "low", "high", "se", "df", "k", "per_seed")}))
    return out


def _mean(values: Sequence[float]) -> float:
    """The mean of the finite values; NaN when there are none."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else NAN


def _claims(runs: Sequence[ArmRun]) -> list[dict]:
    """The rows of every verdict family before the Holm adjustment."""
    rows = []
    for (pop, arm), pairs in sorted(_pairs(runs).items()):
        first = pairs[0][0]
        seeds = [a.seed for a, _ in pairs]
        if first.direction in ("up", "down") and first.targeted and arm != "entropy":
            sign = 1.0 if first.direction == "up" else -1.0
            d = [sign * (head_summary(a, a.targeted)["gap_targeted"] - head_summary(b, a.targeted)["gap_targeted"])
                 for a, b in pairs]
            rows.append(dict(key=MANIPULATION, population=pop, arm=arm, layer=-1, n_seeds=len(pairs),
                             **_estimate(d, seeds)))
            if first.direction == "down":
                d = [float(a.model[FEW_SHOT_MEASURE]) - float(b.model[FEW_SHOT_MEASURE]) for a, b in pairs]
                rows.append(dict(key=FEW_SHOT, population=pop, arm=arm, layer=-1, n_seeds=len(pairs),
                                 **_estimate(d, seeds)))
                for layer in sorted({l for l, _ in first.targeted}):
                    def effect(run: ArmRun) -> float:
                        return next((float(r["effect"]) for r in run.layers if int(r["layer"]) == layer), NAN)
                    d = [effect(a) - effect(b) for a, b in pairs]
                    rows.append(dict(key=STEERABLE, population=pop, arm=arm, layer=layer, n_seeds=len(pairs),
                                     **_estimate(d, seeds)))
    return rows


def decide_family(rows: Sequence[dict]) -> list[dict]:
    """Holm across ``rows`` (one family) for each claim, then the verdict of each row."""
    pass_holm, fail_holm, m = holm_claims(rows)
    out = []
    for r, a, b in zip(rows, pass_holm, fail_holm):
        verdict = decide_claims(a, b) if r["k"] >= 2 else "INCONCLUSIVE"
        out.append(dict(key=r["key"], population=r["population"], arm=r["arm"], layer=int(r["layer"]),
                        rule=rule(r["key"]), value=r["value"], low=r["low"], high=r["high"], p_pass=r["p_above"],
                        p_fail=r["p_below"], p_pass_holm=float(a), p_fail_holm=float(b), verdict=verdict,
                        n_seeds=r["n_seeds"], k=r["k"], per_seed=r["per_seed"],
                        scheme=f"{r['k']} paired seeds: mean ± t(k-1) x SD/sqrt(k) of the seeds' D",
                        correction=f"Holm over the {m} row(s) of {r['key']}, PASS and FAIL claims each; one-sided "
                                   "tests at 0.025",
                        note="" if r["k"] == r["n_seeds"] else f"{r['k']} of {r['n_seeds']} seeds with a value"))
    return out


def verdict_rows(runs: Sequence[ArmRun]) -> list[dict]:
    """Every verdict row, each family Holm-adjusted on its own."""
    claims = _claims(runs)
    out = []
    for key in VERDICT_KEYS:
        out += decide_family([r for r in claims if r["key"] == key])
    return out
