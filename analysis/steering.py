"""Tables, statistics and verdicts of the steering benchmark (reads measurements only).

Intervals are bootstrap 95 % intervals over evaluation prompts (scipy, percentile, 2,000
resamples); comparisons of two strategies resample the prompts jointly (paired).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
from scipy import stats

from analysis.stats import CONFIDENCE, N_RESAMPLES, Estimate, verdict

TARGET_IMPROVEMENT = 0.25
"""The plan's target: spectral-guided steering beats baseline ActAdd by 25 %."""


def mean_ci(values, seed: int = 0) -> Estimate:
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return Estimate(float(x.mean()) if len(x) else float("nan"), float("nan"), float("nan"))
    res = stats.bootstrap((x,), np.mean, n_resamples=N_RESAMPLES, confidence_level=CONFIDENCE,
                          method="percentile", random_state=seed)
    return Estimate(float(x.mean()), float(res.confidence_interval.low), float(res.confidence_interval.high))


def paired(fn, a, b, seed: int = 0) -> Estimate:
    """``fn(a, b)`` of two per-prompt arrays, with a paired bootstrap interval."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    res = stats.bootstrap((a, b), fn, paired=True, vectorized=False, n_resamples=N_RESAMPLES,
                          confidence_level=CONFIDENCE, method="percentile", random_state=seed)
    return Estimate(float(fn(a, b)), float(res.confidence_interval.low), float(res.confidence_interval.high))


def improvement(a, b) -> float:
    """Relative improvement of mean effect a over mean effect b."""
    return float(np.mean(a) / np.mean(b) - 1.0)


def strategy_rows(matched: list[dict], grid: list[dict], gaps: dict[int, tuple[float, float]], seed: int = 0) -> dict[str, pa.Table]:
    """Tables: strategies (at the budget), per-layer (oracle search), grid, per-prompt, verdicts."""
    rows, per_prompt, layers = [], [], []
    for r in matched:
        eff, kl, loss = mean_ci(r["effect"], seed), mean_ci(r["kl"], seed), mean_ci(r["loss_increase"], seed)
        row = {"strategy": r["name"], "layers": json.dumps(sorted(r["profile"])),
               "coefficients": json.dumps({str(l): c * r["scale"] for l, c in sorted(r["profile"].items())}),
               "scale": r["scale"], "effect": eff.value, "effect_low": eff.low, "effect_high": eff.high,
               "effect_std": float(np.std(r["effect"], ddof=1)) if len(r["effect"]) > 1 else float("nan"),
               "kl": kl.value, "kl_low": kl.low, "kl_high": kl.high,
               "loss_increase": loss.value, "loss_increase_low": loss.low, "loss_increase_high": loss.high}
        for key in ("greedy_fraction", "sampled_fraction"):
            if key in r:
                est = mean_ci(r[key], seed)
                row.update({key: est.value, f"{key}_low": est.low, f"{key}_high": est.high})
        if r["name"].startswith("layer "):
            layer = int(r["name"].split()[1])
            layers.append({"layer": layer, "min_gap": gaps[layer][0], "mean_gap": gaps[layer][1], "scale": r["scale"],
                           "effect": eff.value, "effect_low": eff.low, "effect_high": eff.high, "kl": kl.value})
        else:
            rows.append(row)
        per_prompt += [{"strategy": r["name"], "prompt": i, "effect": float(e)} for i, e in enumerate(r["effect"])]
    grid_rows = []
    for r in grid:
        _, layer, coefficient = r["name"].split()
        eff, kl = mean_ci(r["effect"], seed), mean_ci(r["kl"], seed)
        grid_rows.append({"layer": int(layer), "coefficient": float(coefficient), "effect": eff.value,
                          "effect_low": eff.low, "effect_high": eff.high, "kl": kl.value,
                          "loss_increase": float(np.mean(r["loss_increase"])) if r["loss_increase"] else float("nan")})
    tables = {"strategies": pa.Table.from_pylist(rows), "layers": pa.Table.from_pylist(sorted(layers, key=lambda x: x["layer"])),
              "grid": pa.Table.from_pylist(grid_rows), "per_prompt": pa.Table.from_pylist(per_prompt)}
    tables["verdicts"] = pa.Table.from_pylist(verdicts(matched, gaps, seed))
    return tables


def verdicts(matched: list[dict], gaps: dict[int, tuple[float, float]], seed: int = 0) -> list[dict]:
    by = {r["name"]: r for r in matched}
    out = []

    def add(name, est: Estimate, target=float("nan"), check=False, note=""):
        out.append({"name": name, "value": est.value, "low": est.low, "high": est.high, "target": target,
                    "verdict": verdict(est, target) if check else "", "note": note})

    if "spectral" in by and "baseline" in by:
        spectral, baseline = by["spectral"], by["baseline"]
        name = "improvement of spectral over baseline (mean effect)"
        base_ci = mean_ci(baseline["effect"], seed)
        if spectral["profile"] == baseline["profile"]:
            add(name, Estimate(0.0, 0.0, 0.0), TARGET_IMPROVEMENT, True,
                note="the spectral rule chose the baseline's layer: no improvement by construction")
        elif not base_ci.low > 0:
            est = paired(improvement, spectral["effect"], baseline["effect"], seed)
            out.append({"name": name, "value": est.value, "low": est.low, "high": est.high, "target": TARGET_IMPROVEMENT,
                        "verdict": "INCONCLUSIVE", "note": f"the baseline's effect {base_ci.value:.3f} [{base_ci.low:.3f}, "
                        f"{base_ci.high:.3f}] is not above 0: a relative improvement is undefined"})
        else:
            add(name, paired(improvement, spectral["effect"], baseline["effect"], seed), TARGET_IMPROVEMENT, True)
        add("difference of mean effect, spectral - baseline",
            paired(lambda a, b: float(np.mean(a) - np.mean(b)), spectral["effect"], baseline["effect"], seed))
    layer_runs = {int(n.split()[1]): r for n, r in by.items() if n.startswith("layer ")}
    if layer_runs and "spectral" in by:
        best = max(layer_runs, key=lambda l: np.mean(layer_runs[l]["effect"]))
        chosen = sorted(by["spectral"]["profile"])
        add("effect lost by spectral vs the oracle's best layer (fraction)",
            paired(lambda a, b: float(1.0 - np.mean(a) / np.mean(b)), by["spectral"]["effect"], layer_runs[best]["effect"], seed),
            note=f"oracle best layer {best}; spectral layers {chosen}; match: {best in chosen}")
    if len(layer_runs) >= 3:
        ls = sorted(layer_runs)
        effects = np.array([layer_runs[l]["effect"] for l in ls])  # (layers, prompts)
        for which, idx in (("min", 0), ("mean", 1)):
            g = np.array([gaps[l][idx] for l in ls])

            def stat(i, g=g):
                return float(stats.pearsonr(g, effects[:, i.astype(int)].mean(1))[0])

            res = stats.bootstrap((np.arange(effects.shape[1]),), stat, vectorized=False, n_resamples=N_RESAMPLES,
                                  confidence_level=CONFIDENCE, method="percentile", random_state=seed)
            add(f"pearson r(per-layer {which} gap, per-layer steering effect)",
                Estimate(stat(np.arange(effects.shape[1])), float(res.confidence_interval.low),
                         float(res.confidence_interval.high)),
                note="earlier study: r = 0.61 (min gap), r = -0.07 (mean gap)")
    return out


def report(tables: dict[str, pa.Table], gaps, budget: float, baseline_layer: int, config, model: str) -> str:
    lines = [f"# steer: {model} - {config.concept} ({config.vector})", "",
             f"Side-effect budget: mean KL {budget:.4g} nats on the neutral prompts ("
             + (f"the baseline's at layer {baseline_layer}, coefficient {config.coefficient:g}"
                if config.coefficient is not None else "--kl-budget")
             + f"); baseline layer {baseline_layer}. Every strategy is scaled to that budget. "
             "Intervals: bootstrap 95 % over prompts.", "",
             "| strategy | layers | coefficients | effect [95 % CI] | std over prompts | KL | loss increase | greedy target fraction | sampled target fraction |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in tables["strategies"].to_pylist():
        coeffs = ", ".join(f"{k}: {v:.3g}" for k, v in json.loads(r["coefficients"]).items())
        lines.append(f"| {r['strategy']} | {r['layers']} | {coeffs} | {r['effect']:.3f} [{r['effect_low']:.3f}, {r['effect_high']:.3f}] "
                     f"| {r['effect_std']:.3f} | {r['kl']:.4f} | {r['loss_increase']:.4f} | {r.get('greedy_fraction', float('nan')):.3f} "
                     f"| {r.get('sampled_fraction', float('nan')):.3f} |")
    if tables["layers"].num_rows:
        lines += ["", "Per layer at the budget (the oracle's search):", "",
                  "| layer | min gap | mean gap | effect [95 % CI] |", "|---:|---:|---:|---|"]
        lines += [f"| {r['layer']} | {r['min_gap']:.3f} | {r['mean_gap']:.3f} | {r['effect']:.3f} [{r['effect_low']:.3f}, {r['effect_high']:.3f}] |"
                  for r in tables["layers"].to_pylist()]
    lines += ["", "| test | value | 95 % interval | target | verdict | note |", "|---|---:|---|---:|---|---|"]
    for r in tables["verdicts"].to_pylist():
        target = "" if np.isnan(r["target"]) else f"{r['target']:g}"
        lines.append(f"| {r['name']} | {r['value']:.3f} | [{r['low']:.3f}, {r['high']:.3f}] | {target} | {r['verdict']} | {r['note']} |")
    return "\n".join(lines)
