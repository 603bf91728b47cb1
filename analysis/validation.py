"""Gap vs causal importance: the research plan's test 1.1, as verdicts with intervals.

Input: a scan table (one row per head, ``gap``) and a per-example patching table
(``layer, head, example, metric_*``). Output: per-head rows, statistics rows, a Markdown report.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from scipy import stats as sps

from analysis.stats import CONFIDENCE, N_RESAMPLES, Estimate, best_threshold, importance, restoration_matrix, verdict
from spectral.metrics import UNSTABLE_GAP
from scipy import stats

TARGET_R = 0.7
TARGET_RATIO = 2.0


# --- interim: the pre-issue-12 example-only bootstraps (replaced in the next commit) ---

def _old_importance(patched, clean, corrupt, idx=None):
    if idx is not None:
        patched, clean, corrupt = patched[:, idx], clean[:, idx], corrupt[:, idx]
    c, k = clean.mean(1), corrupt.mean(1)
    return (patched.mean(1) - k) / (c - k)


def correlation(x: np.ndarray, patched, clean, corrupt, kind: str = "pearson", seed: int = 0) -> Estimate:
    """Correlation of a per-head quantity ``x`` with importance; bootstrap over examples and
    a permutation p-value (two-sided) over heads."""
    fn = stats.pearsonr if kind == "pearson" else stats.spearmanr
    y = _old_importance(patched, clean, corrupt)
    ok = np.isfinite(x) & np.isfinite(y)
    value = float(fn(x[ok], y[ok])[0])
    n = patched.shape[1]

    def stat(idx):
        yy = _old_importance(patched, clean, corrupt, idx.astype(int))
        good = np.isfinite(x) & np.isfinite(yy)
        return fn(x[good], yy[good])[0]

    boot = stats.bootstrap((np.arange(n),), stat, n_resamples=N_RESAMPLES, vectorized=False,
                           method="percentile", random_state=seed, confidence_level=CONFIDENCE)
    perm = stats.permutation_test((x[ok],), lambda a: fn(a, y[ok])[0], permutation_type="pairings",
                                  n_resamples=N_RESAMPLES, random_state=seed)
    return Estimate(value, float(boot.confidence_interval.low), float(boot.confidence_interval.high), float(perm.pvalue))


def group_ratio(gap: np.ndarray, patched, clean, corrupt, threshold: float = UNSTABLE_GAP, seed: int = 0) -> Estimate:
    """Mean importance of unstable heads (gap <= threshold) over that of stable heads."""
    unstable = gap <= threshold
    if unstable.all() or not unstable.any():
        return Estimate(float("nan"), float("nan"), float("nan"))

    def ratio(idx=None):
        imp = _old_importance(patched, clean, corrupt, None if idx is None else idx.astype(int))
        return imp[unstable].mean() / imp[~unstable].mean()

    boot = stats.bootstrap((np.arange(patched.shape[1]),), ratio, n_resamples=N_RESAMPLES, vectorized=False,
                           method="percentile", random_state=seed, confidence_level=CONFIDENCE)
    return Estimate(float(ratio()), float(boot.confidence_interval.low), float(boot.confidence_interval.high))


def group_difference(gap: np.ndarray, patched, clean, corrupt, threshold: float, seed: int = 0) -> Estimate:
    """Mean importance of unstable heads minus that of stable heads (stable where ratios are not:
    a stable group's mean importance can be near zero)."""
    unstable = gap <= threshold
    if unstable.all() or not unstable.any():
        return Estimate(float("nan"), float("nan"), float("nan"))

    def diff(idx=None):
        imp = _old_importance(patched, clean, corrupt, None if idx is None else idx.astype(int))
        return imp[unstable].mean() - imp[~unstable].mean()

    boot = stats.bootstrap((np.arange(patched.shape[1]),), diff, n_resamples=N_RESAMPLES, vectorized=False,
                           method="percentile", random_state=seed, confidence_level=CONFIDENCE)
    return Estimate(float(diff()), float(boot.confidence_interval.low), float(boot.confidence_interval.high))




@dataclass
class Validation:
    heads: pa.Table
    """layer, head, gap, importance (restoration), unstable."""
    statistics: pa.Table
    """name, value, low, high, p_value, target, verdict."""
    report: str


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
    return keys, gap, patched, clean, corrupt


def weakest_link(keys, gap, patched, clean, corrupt, seed: int = 0) -> dict:
    """Rank of the min-gap head, and per-layer min gap vs per-layer max importance."""
    imp = importance(patched, clean, corrupt)
    order = np.argsort(-imp)
    rank_of_weakest = int(np.where(order == int(np.nanargmin(gap)))[0][0]) + 1
    layers = sorted({l for l, _ in keys})
    layer_of = np.array([l for l, _ in keys])

    def per_layer(values, fn):
        return np.array([fn(values[layer_of == l]) for l in layers])

    min_gap = per_layer(gap, np.nanmin)
    max_imp = per_layer(imp, np.nanmax)
    weakest_layer = layers[int(np.nanargmin(min_gap))]
    top_layer = int(layer_of[int(np.nanargmax(imp))])
    out = {"rank_of_min_gap_head": rank_of_weakest, "n_heads": len(keys), "weakest_layer": weakest_layer,
           "layer_of_most_important_head": top_layer, "weakest_layer_holds_top_head": weakest_layer == top_layer,
           "per_layer_min_gap": min_gap.tolist(), "per_layer_max_importance": max_imp.tolist(), "layers": layers}
    if len(layers) >= 3:
        def stat(idx):
            return sps.pearsonr(min_gap, per_layer(importance(patched, clean, corrupt, idx.astype(int)), np.nanmax))[0]

        boot = sps.bootstrap((np.arange(patched.shape[1]),), stat, n_resamples=N_RESAMPLES, vectorized=False,
                             method="percentile", random_state=seed, confidence_level=CONFIDENCE)
        out["layer_r"] = Estimate(float(sps.pearsonr(min_gap, max_imp)[0]), float(boot.confidence_interval.low),
                                  float(boot.confidence_interval.high))
    return out


def validate(scan: pa.Table, per_example: pa.Table, threshold: float = UNSTABLE_GAP, seed: int = 0) -> Validation:
    keys, gap, patched, clean, corrupt = _arrays(scan, per_example)
    imp = importance(patched, clean, corrupt)
    inv = 1.0 / gap
    rows = []

    def add(name, est: Estimate, target=float("nan"), check=None):
        rows.append({"name": name, "value": est.value, "low": est.low, "high": est.high, "p_value": est.p_value,
                     "target": target, "verdict": verdict(est, target) if check else ""})

    add("pearson r(importance, 1/gap)", correlation(inv, patched, clean, corrupt, "pearson", seed), TARGET_R, True)
    add("spearman rho(importance, 1/gap)", correlation(inv, patched, clean, corrupt, "spearman", seed))
    add("pearson r(importance, gap)", correlation(gap, patched, clean, corrupt, "pearson", seed))
    add("spearman rho(importance, gap)", correlation(gap, patched, clean, corrupt, "spearman", seed))
    add(f"restoration ratio unstable/stable at gap <= {threshold:g}",
        group_ratio(gap, patched, clean, corrupt, threshold, seed), TARGET_RATIO, True)
    best = best_threshold(gap, imp)
    add(f"restoration ratio unstable/stable at best threshold {best:.3f}", group_ratio(gap, patched, clean, corrupt, best, seed))
    add(f"restoration difference unstable - stable at gap <= {threshold:g}",
        group_difference(gap, patched, clean, corrupt, threshold, seed))
    add(f"restoration difference unstable - stable at best threshold {best:.3f}",
        group_difference(gap, patched, clean, corrupt, best, seed))
    link = weakest_link(keys, gap, patched, clean, corrupt, seed)
    if "layer_r" in link:
        add("pearson r(per-layer min gap, per-layer max importance)", link["layer_r"])
    heads = pa.table({"layer": [l for l, _ in keys], "head": [h for _, h in keys], "gap": gap, "importance": imp,
                      "unstable": gap <= threshold})
    statistics = pa.Table.from_pylist(rows)
    return Validation(heads, statistics, _report(statistics, link, best, threshold, len(keys), patched.shape[1]))


def _report(statistics: pa.Table, link: dict, best: float, threshold: float, n_heads: int, n_examples: int) -> str:
    lines = [f"Heads: {n_heads}; examples: {n_examples}; intervals: bootstrap {CONFIDENCE:.0%} over examples "
             f"({N_RESAMPLES} resamples); p-values: permutation of gaps over heads.", "",
             "| statistic | value | 95 % interval | p | target | verdict |", "|---|---:|---|---:|---:|---|"]
    for r in statistics.to_pylist():
        target = "" if np.isnan(r["target"]) else f"{r['target']:g}"
        p = "" if np.isnan(r["p_value"]) else f"{r['p_value']:.3g}"
        lines.append(f"| {r['name']} | {r['value']:.3f} | [{r['low']:.3f}, {r['high']:.3f}] | {p} | {target} | {r['verdict']} |")
    lines += ["", "Weakest link:",
              f"- the min-gap head ranks {link['rank_of_min_gap_head']} of {link['n_heads']} by importance;",
              f"- the layer with the smallest min gap is layer {link['weakest_layer']}; the most important head is in "
              f"layer {link['layer_of_most_important_head']} "
              f"({'the same layer' if link['weakest_layer_holds_top_head'] else 'a different layer'});",
              "- per layer (min gap / max importance): " + ", ".join(
                  f"L{l}: {g:.3f} / {i:.3f}" for l, g, i in zip(link["layers"], link["per_layer_min_gap"],
                                                                  link["per_layer_max_importance"]))]
    return "\n".join(lines)
