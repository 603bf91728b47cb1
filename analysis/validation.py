"""Gap vs causal importance: the research plan's test 1.1, as verdicts with intervals.

Input: a scan table (one row per head, ``gap``) and a per-example patching table
(``layer, head, example, metric_*``). Output: per-head rows, statistics rows, a Markdown report.

One model (one training seed) is described here; verdicts about a recipe are taken over a
population of seeds (``analysis.crossmodel``), with the same estimator (``analysis.population``)
and statistics (``analysis.stats``).

Intervals: ``analysis.population.estimate_many`` on this one model (``head_estimates``): a
bootstrap that resamples heads (key-head clusters of a grouped-query model; layers, for the
layer-level row) and examples jointly, so that intervals describe the association across this
model's heads and not only how precisely each head's importance is known; every statistic of
the page on the same resamples. The interval is ``value ± t(df) x SE x sqrt(n/(n-1))``
(``analysis.population.scaled_interval``: the percentile interval under-covers with 6-12 heads), on
Fisher's z scale with df = n - 3 for correlations (n: usable heads, or clusters), with Welch's
df for the difference of group means (and the ratio), n_group - 1 for one group's mean.
p-values: two-sided t p-value of "statistic = target" from the same SE and df
(``analysis.population.p_value``), Holm-adjusted within the verdict family of this page
(``VERDICT_KEYS``; undefined rows are not counted). Verdict: PASS when the Holm-adjusted p <
0.05 and the value lies on the hypothesis' side of the target, FAIL when it is significant on
the other side, else INCONCLUSIVE.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from analysis.population import Member, PopulationEstimate, estimate, estimate_many, holm, p_value
from analysis.stats import (
    MIN_LAYERS, N_RESAMPLES, Estimate, best_threshold, decide, df_correlation,
    df_group, df_groups, group_difference, group_mean, group_ratio, group_sizes, head_member, importance,
    layer_member, layer_r, n_independent, r_gap, r_inverse_gap, ratio_rule, restoration_matrix, restoration_reasons,
    spearman_gap,
)
from spectral import tables
from spectral.kernels.metrics import UNSTABLE_GAP

TARGET_R = 0.7
TARGET_RATIO = 2.0
TARGET_DIFFERENCE = 0.0
TARGET_LAYER_R = 0.0

KEYS = {
    "importance_correlation": "pearson r(importance, 1/gap)",
    "importance_correlation_gap": "pearson r(importance, gap)",
    "importance_spearman_gap": "spearman rho(importance, gap)",
    "restoration_difference": "restoration difference unstable - stable at gap <= {threshold}",
    "restoration_unstable_mean": "mean restoration of unstable heads (gap <= {threshold})",
    "restoration_stable_mean": "mean restoration of stable heads (gap > {threshold})",
    "restoration_ratio": "restoration ratio unstable/stable at gap <= {threshold}",
    "best_threshold": "best threshold (exploratory)",
    "restoration_difference_best": "restoration difference unstable - stable at best threshold {best} (exploratory)",
    "layer_correlation": "pearson r(per-layer min gap, per-layer max importance)",
}
"""Stable key of every statistics row (``key`` column, MLflow's ``<key>/value``) -> its display
label (``name`` column; ``{threshold}`` and ``{best}`` are filled in per run)."""

VERDICT_KEYS = ("importance_correlation", "restoration_difference", "restoration_ratio", "layer_correlation")
"""The verdict family of one validate page: Holm's correction runs over these rows."""

RULE = ("Verdict rule (one model: every interval describes this model only): each interval resamples heads "
        "(key-head clusters of a grouped-query model; layers for the layer-level row) and examples jointly and is "
        "value ± t(df) x SE x sqrt(n/(n-1)) (correlations on Fisher's z scale with df = n - 3; Welch's df for the "
        "difference and the ratio; n_group - 1 for a group's mean). PASS when the Holm-adjusted two-sided p-value "
        "of \"statistic = target\" (a t-test with the same SE and df) is "
        "< 0.05 and the value lies on the hypothesis' side of the target (r(importance, 1/gap) > 0.7; restoration "
        "difference unstable - stable > 0; ratio unstable/stable > 2, only where both group means' intervals lie "
        "above 0; layer-level r(min gap, max importance) < 0, only with >= 5 layers); FAIL when significant on the "
        "other side; INCONCLUSIVE otherwise. Holm's correction runs within this page's verdict family "
        f"({', '.join(VERDICT_KEYS)}; undefined rows are not counted). Rows without a target are descriptive; "
        "rows marked exploratory carry no interval and no verdict.")


@dataclass
class Validation:
    heads: pa.Table
    """``spectral.tables.VALIDATE_HEADS``: layer, head, gap, restoration, unstable, restoration_note."""
    statistics: pa.Table
    """``spectral.tables.VALIDATE``: key, name, value, low, high, p_value, p_holm, target, direction, verdict, n_units, n_unstable,
    n_stable, n_examples, scheme, note."""
    link: dict
    """The weakest-link summary (``weakest_link``)."""
    n_heads: int
    n_used: int
    """Heads with a defined restoration and gap."""
    n_examples: int
    why: list[str]
    """Per head: why its restoration is undefined ('' where it is defined)."""
    threshold: float


def _arrays(scan: pa.Table, per_example: pa.Table):
    scan_rows = {(r["layer"], r["head"]): r["gap"] for r in scan.select(["layer", "head", "gap"]).to_pylist()}
    keys = sorted({(l, h) for l, h in zip(per_example["layer"].to_pylist(), per_example["head"].to_pylist())})
    missing = [k for k in keys if k not in scan_rows]
    if missing:
        raise ValueError(f"the scan has no row for layer {missing[0][0]} head {missing[0][1]}")
    index = {k: i for i, k in enumerate(keys)}
    cols = {name: per_example[name].to_numpy() for name in ("example", "metric_patched", "metric_clean", "metric_corrupt")}
    cols["head_index"] = np.array([index[(l, h)] for l, h in zip(per_example["layer"].to_pylist(), per_example["head"].to_pylist())])
    n_examples = int(cols["example"].max()) + 1
    patched, clean, corrupt = restoration_matrix(cols, len(keys), n_examples)
    gap = np.array([scan_rows[k] for k in keys], dtype=float)
    clusters = None
    if "kv_head" in scan.column_names:  # grouped-query heads sharing a key head are one cluster
        kv = {(r["layer"], r["head"]): r["kv_head"] for r in scan.select(["layer", "head", "kv_head"]).to_pylist()}
        clusters = np.array([k[0] * 100_000 + kv[k] for k in keys])
    return keys, gap, patched, clean, corrupt, clusters


TARGETS = {"importance_correlation": TARGET_R, "restoration_difference": TARGET_DIFFERENCE,
           "restoration_ratio": TARGET_RATIO, "layer_correlation": TARGET_LAYER_R}


def head_estimates(member: Member, threshold: float = UNSTABLE_GAP, *, n_resamples: int = N_RESAMPLES,
                   seed: int = 0) -> dict[str, PopulationEstimate]:
    """The head-level statistics of one model (keys of the statistics table), every one on the
    same resamples of heads (clusters) x examples, with validate's degrees of freedom."""
    stats_ = {"importance_correlation": r_inverse_gap, "importance_correlation_gap": r_gap,
              "importance_spearman_gap": spearman_gap, "restoration_difference": group_difference(threshold),
              "restoration_unstable_mean": group_mean(threshold, True),
              "restoration_stable_mean": group_mean(threshold, False), "restoration_ratio": group_ratio(threshold)}
    dfs = {"importance_correlation": df_correlation, "importance_correlation_gap": df_correlation,
           "importance_spearman_gap": df_correlation, "restoration_difference": df_groups(threshold),
           "restoration_ratio": df_groups(threshold), "restoration_unstable_mean": df_group(threshold, True),
           "restoration_stable_mean": df_group(threshold, False)}
    return estimate_many([member], stats_, n_resamples=n_resamples, seed=seed, df=dfs)


def as_estimate(e: PopulationEstimate, target: float = float("nan")) -> Estimate:
    """One model's estimate with the two-sided p-value of "statistic = target" (NaN without a target)."""
    return Estimate(e.value, e.low, e.high, p_value(e, target) if np.isfinite(target) else float("nan"), e.se, e.df)


def weakest_link(keys, gap, patched, clean, corrupt, seed: int = 0, n_resamples: int = N_RESAMPLES) -> dict:
    """Rank of the min-gap head, and per-layer min gap vs per-layer max importance. The layer-level
    r gets an interval that resamples layers and examples, only with >= ``MIN_LAYERS`` layers."""
    imp = importance(patched, clean, corrupt)
    ok = np.isfinite(imp)
    order = np.argsort(np.where(ok, -imp, np.inf))
    rank_of_weakest = int(np.where(order == int(np.nanargmin(gap)))[0][0]) + 1
    layers = sorted({l for l, _ in keys})
    layer_of = np.array([l for l, _ in keys])
    member = layer_member(layer_of, gap, patched, clean, corrupt)
    min_gap = member.per_unit["min_gap"]
    with np.errstate(all="ignore"):
        max_imp = np.array([np.nanmax(imp[layer_of == l]) if ok[layer_of == l].any() else np.nan for l in layers])
    weakest_layer = layers[int(np.nanargmin(min_gap))]
    top_layer = int(layer_of[int(np.nanargmax(np.where(ok, imp, -np.inf)))]) if ok.any() else -1
    out = {"rank_of_min_gap_head": rank_of_weakest, "n_heads": len(keys), "weakest_layer": weakest_layer,
           "layer_of_most_important_head": top_layer, "weakest_layer_holds_top_head": weakest_layer == top_layer,
           "per_layer_min_gap": min_gap.tolist(), "per_layer_max_importance": max_imp.tolist(), "layers": layers}
    value = layer_r(member.per_unit, member.per_example)
    if len(layers) < MIN_LAYERS:
        out["layer_r"] = Estimate(value, float("nan"), float("nan"))
        out["layer_scheme"] = "none"
        out["layer_note"] = (f"too few layers ({len(layers)} < {MIN_LAYERS}): no interval, no verdict; "
                             "describes this model's layers only")
    else:  # df = layers - 3 (layer_r is a correlation)
        e = estimate([member], layer_r, n_resamples=n_resamples, seed=seed, unit_name="layers")
        out["layer_r"], out["layer_scheme"] = as_estimate(e, TARGET_LAYER_R), e.scheme
        out["layer_note"] = f"{len(layers)} layers; describes this model's layers only (not a replication of any earlier figure)"
    return out


def _row(key, est: Estimate, *, target=float("nan"), direction="", n_units=0, groups=(-1, -1),
         n_examples=0, scheme="", note="", threshold: float = UNSTABLE_GAP, best: float = float("nan")) -> dict:
    name = KEYS[key].format(threshold=f"{threshold:g}", best=f"{best:.3f}")
    return {"key": key, "name": name, "value": float(est.value), "low": float(est.low), "high": float(est.high),
            "p_value": float(est.p_value), "p_holm": float("nan"), "target": float(target), "direction": direction,
            "verdict": "", "n_units": int(n_units), "n_unstable": int(groups[0]), "n_stable": int(groups[1]),
            "n_examples": int(n_examples), "scheme": scheme, "note": note}


def validate(scan: pa.Table, per_example: pa.Table, threshold: float = UNSTABLE_GAP, seed: int = 0,
             n_resamples: int = N_RESAMPLES) -> Validation:
    keys, gap, patched, clean, corrupt, clusters = _arrays(scan, per_example)
    imp = importance(patched, clean, corrupt)
    why = restoration_reasons(patched, clean, corrupt)
    member = head_member(gap, patched, clean, corrupt, seed, clusters)
    n_heads, n_examples = len(keys), patched.shape[1]
    usable = np.isfinite(gap) & np.isfinite(imp)
    n_used = int(usable.sum())
    groups = group_sizes(gap[usable], threshold)
    dropped = (f"{n_heads - n_used} of {n_heads} heads without a defined restoration or gap (excluded)"
               if n_used < n_heads else "")
    gqa = ""
    if member.clusters is not None:
        gqa = (f"grouped-query model: {n_independent(member)} key heads among {n_heads} query heads, resampled "
               "as clusters; df from the key heads")
    rows = []

    es = head_estimates(member, threshold, n_resamples=n_resamples, seed=seed)

    def add(key, direction="", grp=(-1, -1), note=""):
        est = as_estimate(es[key], TARGETS.get(key, float("nan")))
        rows.append(_row(key, est, target=TARGETS.get(key, float("nan")), direction=direction,
                         n_units=n_used, groups=grp, n_examples=n_examples, scheme=es[key].scheme,
                         note="; ".join(x for x in (note, dropped, gqa) if x), threshold=threshold))
        return est

    add("importance_correlation", "above")
    add("importance_correlation_gap")
    add("importance_spearman_gap", note="rho(importance, 1/gap) is exactly its negative")
    add("restoration_difference", "above", groups,
        note="" if np.isfinite(df_groups(threshold)(member)) else "a group has fewer than 2 heads: no interval")
    mu = add("restoration_unstable_mean", grp=groups)
    ms = add("restoration_stable_mean", grp=groups)
    raw, scheme = as_estimate(es["restoration_ratio"], TARGET_RATIO), es["restoration_ratio"].scheme
    ratio, note = ratio_rule(mu, ms, raw, ("unstable (numerator)", "stable (denominator)"))
    rows.append(_row("restoration_ratio", ratio if not note else Estimate(float("nan"), float("nan"), float("nan")),
                     target=TARGET_RATIO, direction="above", n_units=n_used, groups=groups, n_examples=n_examples,
                     scheme=scheme if not note else "none", note="; ".join(x for x in (note, dropped) if x),
                     threshold=threshold))
    best = best_threshold(gap, imp)
    gd = group_difference(best)(member.per_unit, member.per_example) if np.isfinite(best) else float("nan")
    exploratory = ("exploratory: the threshold is chosen on these same heads to maximise the difference, so no "
                   "interval or verdict can account for the selection")
    rows.append(_row("best_threshold", Estimate(best, float("nan"), float("nan")),
                     n_units=n_used, groups=group_sizes(gap[usable], best) if np.isfinite(best) else (0, 0),
                     n_examples=n_examples, scheme="none", note=exploratory))
    rows.append(_row("restoration_difference_best", Estimate(gd, float("nan"), float("nan")), n_units=n_used,
                     groups=group_sizes(gap[usable], best) if np.isfinite(best) else (0, 0), n_examples=n_examples,
                     scheme="none", note=exploratory, best=best))
    link = weakest_link(keys, gap, patched, clean, corrupt, seed + 7, n_resamples)
    rows.append(_row("layer_correlation", link["layer_r"],
                     target=TARGET_LAYER_R, direction="below", n_units=len(link["layers"]), n_examples=n_examples,
                     scheme=link["layer_scheme"], note=link["layer_note"]))
    _holm(rows)
    heads = tables.conform(pa.table({"layer": [l for l, _ in keys], "head": [h for _, h in keys], "gap": gap,
                                     "restoration": imp, "unstable": gap <= threshold, "restoration_note": why}),
                           tables.VALIDATE_HEADS, "validate: heads")
    statistics = tables.from_rows(rows, tables.VALIDATE, "validate: statistics")
    return Validation(heads, statistics, link, n_heads, n_used, n_examples, why, threshold)


def _holm(rows: list[dict]) -> None:
    """Holm-adjusted p and verdicts over the verdict family (in place)."""
    family = [r for r in rows if r["key"] in VERDICT_KEYS]
    adjusted = holm([r["p_value"] for r in family])
    for r, p in zip(family, adjusted):
        r["p_holm"] = float(p)
        r["verdict"] = decide(r["value"], float(p), r["target"], r["direction"])
