"""Markdown renderings of the statistics (``report.md`` of the jobs, the scan's summary): text
only; every number is computed in ``analysis/`` and read here."""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import pyarrow as pa

from analysis.steering import NAN, RULES, Split, _interval_text
from analysis.summary import LayerSummary
from analysis.stats import CONFIDENCE, RESTORATION_RTOL
from analysis.validation import RULE, Validation
from spectral.kernels.metrics import UNSTABLE_GAP


def format_summary(rows: list[LayerSummary], threshold: float = UNSTABLE_GAP) -> str:
    """A Markdown table (readable on a terminal too)."""
    lines = [
        f"| layer | min gap | mean gap | weakest head | heads gap <= {threshold:g} | flagged |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r.layer} | {r.min_gap:.4f} | {r.mean_gap:.4f} | {r.weakest_head} | "
                     f"{r.n_unstable}/{r.n_heads} | {r.n_flagged} |")
    return "\n".join(lines)


def _fmt(x: float, spec: str = ".3f") -> str:
    return "" if not np.isfinite(x) else format(x, spec)


def validation_report(v: Validation) -> str:
    """validate's report.md body: the statistics table, the verdict rule, the weakest link."""
    statistics, link, threshold, n_heads, n_used, n_examples, why = (v.statistics, v.link, v.threshold, v.n_heads,
                                                                     v.n_used, v.n_examples, v.why)
    lines = [f"Heads: {n_heads} ({n_used} with a defined restoration and gap); examples: {n_examples}; "
             f"unstable: gap <= {threshold:g}. One model (one training seed): every interval describes this model only.",
             f"Intervals ({CONFIDENCE:.0%}): bootstrap resampling heads (layers for the layer-level row) and examples "
             "jointly, every statistic on the same resamples; value ± t(df) x SE x sqrt(n/(n-1)) (correlations on "
             "Fisher's z scale, df = n - 3), Welch's df for the group difference and the ratio, n_group - 1 for a "
             "group's mean. p: two-sided t p-value of \"statistic = target\" from the same SE and df; p (Holm): "
             "Holm-adjusted within this page's verdict family.",
             f"Restoration is undefined for a head whose |clean - corrupt| metric difference is <= {RESTORATION_RTOL:g} "
             "x its scale (mean |clean| + mean |corrupt|).", "", RULE, "",
             "| statistic | value | 95 % interval | scheme | n | unstable / stable | p | p (Holm) | target | verdict | note |",
             "|---|---:|---|---|---:|---|---:|---:|---:|---|---|"]
    for r in statistics.to_pylist():
        interval = f"[{r['low']:.3f}, {r['high']:.3f}]" if np.isfinite(r["low"]) and np.isfinite(r["high"]) else "undefined"
        target = "" if not np.isfinite(r["target"]) else ("> " if r["direction"] == "above" else "< ") + f"{r['target']:g}"
        value = _fmt(r["value"]) if np.isfinite(r["value"]) else "undefined"
        grp = f"{r['n_unstable']} / {r['n_stable']}" if r["n_unstable"] >= 0 else ""
        lines.append(f"| {r['name']} | {value} | {interval} | {r['scheme']} | {r['n_units']} | {grp} | "
                     f"{_fmt(r['p_value'], '.3g')} | {_fmt(r['p_holm'], '.3g')} | {target} | {r['verdict']} | {r['note']} |")
    undefined = [w for w in why if w]
    if undefined:
        lines += ["", f"{len(undefined)} head(s) without a restoration: {undefined[0]}"]
    lines += ["", "Weakest link:",
              f"- the min-gap head ranks {link['rank_of_min_gap_head']} of {link['n_heads']} by importance;",
              f"- the layer with the smallest min gap is layer {link['weakest_layer']}; the most important head is in "
              f"layer {link['layer_of_most_important_head']} "
              f"({'the same layer' if link['weakest_layer_holds_top_head'] else 'a different layer'});",
              "- per layer (min gap / max importance): " + ", ".join(
                  f"L{l}: {g:.3f} / {i:.3f}" for l, g, i in zip(link["layers"], link["per_layer_min_gap"],
                                                                  link["per_layer_max_importance"]))]
    return "\n".join(lines)


def steering_report(tables: dict[str, pa.Table], gaps, budget: float, baseline_layer: int, config, model: str,
           split: Split | None = None, scan: Mapping | None = None) -> str:
    """steer's report.md: the strategies at the budget, per layer, the verdicts and their rules."""
    scan = scan or {}
    scan_set = scan.get("scan_set", getattr(config, "scan_set", "held-out"))
    lines = [f"# steer: {model} - {config.concept} ({config.vector})", "",
             f"Side-effect budget: mean KL {budget:.4g} nats on the neutral prompts ("
             + (f"the baseline's at layer {baseline_layer}, coefficient {config.coefficient:g}"
                if config.coefficient is not None else "--kl-budget")
             + f"); baseline layer {baseline_layer}. Every strategy is scaled to that budget.", ""]
    if split is not None:
        lines += [f"Prompts: {split.describe()}.", ""]
    if scan_set == "in-sample":
        lines += ["Scan: **IN-SAMPLE** - the spectrum the spectral rule reads was computed on texts that include the "
                  f"evaluation prompts ({scan.get('n_texts', '?')} texts: {', '.join(scan.get('sources', []))}); "
                  "the spectral rows do not show that the gap predicts steering on unseen prompts.", ""]
    else:
        lines += [f"Scan: held-out - {scan.get('n_texts', '?')} texts ({', '.join(scan.get('sources', []))}), none of "
                  "them an evaluation prompt" + (f" (scan seed {scan['scan_seed']})" if "scan_seed" in scan else "")
                  + ".", ""]
    lines += [f"Intervals: {_interval_text()}.", "",
              "| strategy | k | layers | coefficients | effect [95 % CI] | std over prompts | KL | loss increase | greedy target fraction | sampled target fraction |",
              "|---|---:|---|---|---|---:|---:|---:|---:|---:|"]
    for r in tables["strategies"].to_pylist():
        if r["n_draws"] > 1:
            layers, coeffs = f"{r['n_draws']} random draws", "spectral weights, random order, each draw at the budget"
        else:
            layers = r["layers"]
            coeffs = ", ".join(f"{k}: {v:.3g}" for k, v in json.loads(r["coefficients"]).items())
        lines.append(f"| {r['strategy']} | {r['k']} | {layers} | {coeffs} | {r['effect']:.3f} [{r['effect_low']:.3f}, "
                     f"{r['effect_high']:.3f}] | {r['effect_std']:.3f} | {r['kl']:.4f} | {r['loss_increase']:.4f} | "
                     f"{r.get('greedy_fraction', NAN):.3f} | {r.get('sampled_fraction', NAN):.3f} |")
    if tables["layers"].num_rows:
        lines += ["", "Per layer at the budget (the oracle's search; it chooses on the selection split):", "",
                  "| layer | min gap | mean gap | effect, held-out [95 % CI] | effect, selection |", "|---:|---:|---:|---|---:|"]
        lines += [f"| {r['layer']} | {r['min_gap']:.3f} | {r['mean_gap']:.3f} | {r['effect']:.3f} [{r['effect_low']:.3f}, "
                  f"{r['effect_high']:.3f}] | {r['effect_selection']:.3f} |" for r in tables["layers"].to_pylist()]
    lines += ["", "| key | test | value | 95 % interval | target | verdict | p (one-sided) | p (Holm) | note |",
              "|---|---|---:|---|---:|---|---:|---:|---|"]
    for r in tables["verdicts"].to_pylist():
        target = "" if np.isnan(r["target"]) else f"{r['target']:g}"
        value = "undefined" if np.isnan(r["value"]) else f"{r['value']:.3f}"
        interval = "" if np.isnan(r["low"]) else f"[{r['low']:.3f}, {r['high']:.3f}]"
        p = "" if np.isnan(r["p_value"]) else f"{r['p_value']:.3g}"
        ph = "" if np.isnan(r["p_holm"]) else f"{r['p_holm']:.3g}"
        lines.append(f"| {r['key']} | {r['name']} | {value} | {interval} | {target} | {r['verdict']} | {p} | {ph} | {r['note']} |")
    lines += ["", "Verdict rules (95 % intervals, uncorrected; p (Holm): Holm over this run's steering verdicts, "
              "one-sided in the direction of PASS):", ""]
    lines += [f"- `{k}`: {v}" for k, v in RULES.items()]
    return "\n".join(lines)


def circuits_report(heads: pa.Table, summary: Mapping, model: str) -> str:
    """circuits' report.md: the circuit and its faithfulness, attribution agreement, head classes
    with their gaps, the bottleneck check."""
    f = summary["faithfulness"]
    lines = [f"# circuits: {model} - {summary['task']}", "",
             f"Edges: {summary['n_edges']}; ranking: {summary['method']}"
             + (f" (m = {summary['steps']} steps)" if summary["method"] == "eap-ig" else "")
             + f"; ablation: {summary['ablation']} (an edge outside the circuit carries the sender's "
             + {"corrupt": "write on the corrupt prompt", "mean": "mean write over the task's clean prompts",
                "resample": "write on another example's clean prompt"}[summary["ablation"]] + "); "
             f"{summary['n_examples']} examples: edges scored and the circuit chosen on {summary['n_select']}, "
             f"faithfulness and the bottleneck measured on the other {summary['n_heldout']} (seeded split).",
             "",
             f"Circuit: the top {summary['size']} edges, faithfulness f = {summary['faithfulness_of_circuit']:.3f} "
             f"by exact edge patching (target {summary['target']:g}"
             + ("" if summary["reached_target"] else ", NOT reached at any size") + "); heads: "
             + (", ".join(f"L{l}H{h}" for l, h in summary["heads"]) or "none") + ".",
             f"Faithfulness curve f(C) = (m(C) - m(empty)) / (m(N) - m(empty)), m(N) = {f['metric_full']:.3f}, "
             f"m(empty) = {f['metric_empty']:.3f}; CPR (area under f) = {f['cpr']:.3f}, CMD (area under |1 - f|) = "
             f"{f['cmd']:.3f} over size / edges in [0, 1].", "",
             "| edges | f (exact, held-out half) | f (attribution estimate, selection half) |", "|---:|---:|---:|"]
    lines += [f"| {s} | {v:.3f} | {w:.3f} |" for s, v, w in zip(f["sizes"], f["f"], f["f_attribution"])]
    a = summary["agreement"]
    lines += ["", f"Attribution vs exact edge patching ({a['edges_checked']} edges: {a['subset']}): Spearman "
              + ", ".join(f"{m} {v:.3f}" for m, v in a["spearman"].items()) + ".", ""]
    scan = summary["scan"]
    lines += [f"Gaps from a key-kernel scan on {scan['n_texts']} {scan['set']} prompts"
              + (f" (seed {scan['seed']}, disjoint from the patched examples)" if scan["set"] == "held-out" else
                 " (IN-SAMPLE: the patched prompts themselves)") + ".", "",
              "| layer | head | label | gap | previous-token | duplicate | induction | name-mover attention | "
              "copy score | S-inhibition | backup gain | in circuit |", "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]

    def num(v):
        return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3f}"

    for r in heads.to_pylist():
        if r["label"] != "other" or r["in_circuit"]:
            lines.append(f"| {r['layer']} | {r['head']} | {r['label']} | {num(r['gap'])} | {num(r['previous_token'])} | "
                         f"{num(r['duplicate_token'])} | {num(r['induction'])} | {num(r['name_mover_attention'])} | "
                         f"{num(r['copy_score'])} | {num(r['s_inhibition'])} | {num(r['backup_gain'])} | "
                         f"{'yes' if r['in_circuit'] else ''} |")
    b = summary.get("bottleneck")
    if b:
        lines += ["", f"Bottleneck: ablating the circuit's lowest-gap head L{b['lowest_gap_head'][0]}H"
                  f"{b['lowest_gap_head'][1]} alone removes {b['removed_lowest']:.3f} of the behaviour (fraction of "
                  f"m(N) - m(empty)); its median-gap head L{b['median_gap_head'][0]}H{b['median_gap_head'][1]} "
                  f"{b['removed_median']:.3f}; difference {b['difference']:.3f} (one model: a description; the "
                  "verdict is across seeds, in the cross-model report)."]
    lines += ["", "Class rules: spectral.circuits.scores.THRESHOLDS (pattern scores >= 0.5 in the mul form; name "
              "movers: attention to the IO >= 0.3, copy score >= 0.5; S-inhibition: path patching into the name "
              "movers' queries restores >= 0.1; backup name movers: importance gained when the name movers are "
              "ablated >= 0.1 of the full effect); the rest are 'other'. Rows: heads with a class or in the circuit."]
    return "\n".join(lines)
