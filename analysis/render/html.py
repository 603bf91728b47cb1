"""The cross-model report over populations of models as one self-contained HTML page (inline
CSS, the PNGs of ``analysis.render.figures`` as base64 data URIs, no scripts, no external
resources). The verdict rule is printed at the top of the verdict and population sections; the
page's sections are the registry ``SECTIONS``."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from analysis.calibration import IMPORTANCE_RULE, STEERABLE_RULE
from analysis.crossmodel import (
    ALL, CALIBRATION_TARGETS, INFORMATION_MEASURES, NAN, RULE, RULES, SCALING_QUANTITIES, Analysis, RunData, finite_heads,
    finite_layers,
)
from analysis.render.figures import LANDSCAPE_SCALE
from analysis.scaling import MIN_LOO_POINTS
from spectral.kernels.metrics import UNSTABLE_GAP

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1560px;padding:1em 1.5em;color:#222}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.2em;border-bottom:1px solid #ccc;margin-top:1.6em}
h3{font-size:1em;margin:1em 0 .3em}
table{border-collapse:collapse;margin:.4em 0 1em;font-size:12px}
th,td{border:1px solid #ddd;padding:2px 6px;text-align:left;vertical-align:top}
th{background:#f3f3f3}td:first-child{white-space:nowrap}td:last-child{min-width:18em}details{margin:.4em 0}summary{cursor:pointer;color:#245}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.PASS{background:#c8efc8;font-weight:600}td.FAIL{background:#f6c4c4;font-weight:600}
td.INCONCLUSIVE{background:#f7e9b5;font-weight:600}
.note{color:#555;font-size:12px}.warn{background:#fff4d6;border-left:4px solid #e0a800;padding:.4em .8em}
.grid{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start}.grid figure{margin:0;max-width:100%}
figure{margin:.3em 0}img{max-width:100%;height:auto;border:1px solid #eee}figcaption{font-size:12px;color:#555}
nav a{margin-right:.8em}ul{margin:.3em 0}
.wide{overflow-x:auto;max-width:100%}.wide table{min-width:100%}td.small,td .small{font-size:11px;color:#444}
details.cell summary{color:#245;font-size:11px}details.cell div{white-space:pre;font-size:11px;font-variant-numeric:tabular-nums}
.rule{background:#eef4fb;border-left:4px solid #4a7fb5;padding:.4em .8em;font-size:12px;margin:.4em 0}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _num(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return str(int(x))
    x = float(x)
    return f"{x:.{digits}g}" if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3) else f"{x:.{digits}f}"


def _ci(lo, hi) -> str:
    return "–" if not (np.isfinite(lo) and np.isfinite(hi)) else f"[{_num(lo)}, {_num(hi)}]"


class Raw(str):
    """A table cell that is already HTML (built from escaped parts)."""


def _html_table(headers: list[str], rows: list[list], numeric: set[int] = frozenset(), classes: dict[int, int] | None = None,
           wide: bool = False) -> str:
    """HTML table; cells are escaped (except ``Raw`` ones); column ``k`` in ``classes`` takes its
    class from column ``classes[k]``; ``wide``: scrolls sideways inside the page."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for k, cell in enumerate(row):
            cls = [c for c in (("num" if k in numeric else ""), (str(row[classes[k]]) if classes and k in classes else "")) if c]
            text = cell if isinstance(cell, Raw) else _e(cell)
            cells.append(f"<td class=\"{' '.join(cls)}\">{text}</td>" if cls else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return f"<div class=\"wide\">{table}</div>" if wide else table


def _img(path: Path | None, alt: str, caption: str = "", scale: float | None = None) -> str:
    """A figure with the PNG embedded; ``scale``: display at that fraction of its pixel width
    (so that panels of different sizes keep one font size)."""
    if path is None:
        return f"<p class=\"note\">{_e(alt)}: no data for this figure.</p>"
    raw = Path(path).read_bytes()
    data = base64.b64encode(raw).decode("ascii")
    style = f" style=\"width:{int(int.from_bytes(raw[16:20], 'big') * scale)}px\"" if scale else ""
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f"<figure><img alt=\"{_e(alt)}\"{style} src=\"data:image/png;base64,{data}\">{cap}</figure>"


def _rule_box() -> str:
    return f"<div class=\"rule\"><b>Rule (every verdict):</b> {_e(RULE)}</div>"


VERDICT_HEADERS = ["population", "metric", "seeds", "units / seed", "groups", "value (mean)", "95 % interval",
                   "same sign", "per seed", "target", "p (Holm) pass / fail", "verdict", "interval", "correction",
                   "note"]


def _short_scheme(r: dict) -> str:
    s = r["scheme"]
    if s.startswith("one seed"):
        body = s.split("one seed: ", 1)[1].split("; describes")[0]
        df = s.split("per seed: t-scaled, ", 1)[1] if "per seed: t-scaled, " in s else ""
        return "one model: " + body + (f"; {df}" if df else "")
    if "SD/sqrt" in s:
        k = s.split("x SD/sqrt(", 1)[1].split(")")[0] if "x SD/sqrt(" in s else str(r["n_seeds"])
        out = f"t({int(k) - 1 if k.isdigit() else '?'}) over the seeds' values"
        if "hierarchical bootstrap seeds -> " in s:
            levels = s.split("hierarchical bootstrap seeds -> ", 1)[1].split(" (")[0]
            hier = (f" {_ci(r['hier_low'], r['hier_high'])}" if np.isfinite(r.get("hier_low", NAN))
                    and np.isfinite(r.get("hier_high", NAN)) else "")
            out += f"; hierarchical bootstrap seeds → {levels.replace(' -> ', ' → ')}{hier} (not the verdict's)"
        return out + (f"; clipped to {s.split('clipped to ', 1)[1]}" if "clipped to " in s else "")
    return s


def _short_correction(r: dict) -> str:
    c = r["correction"]
    if c.startswith("Holm over "):
        n = c.split("Holm over ", 1)[1].split(" ", 1)[0]
        return f"Holm ×{n} ({r['family']})"
    return c


def _per_seed_cell(r: dict) -> Raw:
    if not r["per_seed"]:
        return Raw("")
    parts = r["per_seed"].split("; ")
    body = _e("\n".join(parts))
    return Raw(f"<details class=\"cell\"><summary>{len(parts)} value{'s' if len(parts) != 1 else ''}</summary>"
               f"<div>{body}</div></details>")


def _seed_ranges(text: str) -> str:
    """'0, 1, 2, 4' -> '0–2, 4' (other text unchanged)."""
    try:
        seeds = [int(x) for x in text.split(", ")]
    except ValueError:
        return text
    out, start = [], 0
    for i in range(1, len(seeds) + 1):
        if i == len(seeds) or seeds[i] != seeds[i - 1] + 1:
            a, b = seeds[start], seeds[i - 1]
            out.append(str(a) if a == b else f"{a}–{b}" if b > a + 1 else f"{a}, {b}")
            start = i
    return ", ".join(out)


def _verdict_cells(r: dict) -> list:
    seeds = f"{r['n_seeds']} ({_seed_ranges(r['seeds'])})" if r["seeds"] else str(r["n_seeds"])
    units = f"{r['n_units']} {r['unit']}".strip()
    p = f"{_num(r['p_pass_holm'])} / {_num(r['p_fail_holm'])}"
    note = "; ".join(x for x in (r["note"], ("prompts: " + r["prompts"]) if r.get("prompts") else "") if x)
    return [r["population"], r["metric"], seeds, units, r["groups"], _num(r["value"]), _ci(r["low"], r["high"]),
            _num(r["same_sign"]), _per_seed_cell(r), _num(r["target"]), p, r["verdict"], _short_scheme(r),
            _short_correction(r), note]


def _verdicts(a: Analysis) -> str:
    pop_rows = [r for r in a.verdicts if r["population"] != ALL]
    cross = [r for r in a.verdicts if r["population"] == ALL]
    rules = "".join(f"<li><b>{_e(k)}</b>: {_e(v)}</li>" for k, v in RULES.items())
    col = VERDICT_HEADERS.index("verdict")
    table = _html_table(VERDICT_HEADERS, [_verdict_cells(r) for r in pop_rows], {5, 6, 7, 9, 10}, {col: col}, wide=True)
    cross_table = _html_table(VERDICT_HEADERS, [_verdict_cells(r) for r in cross], {5, 6, 9, 10}, {col: col}, wide=True)
    return (_rule_box()
            + "<p class=\"note\">Multiple comparisons: every verdict is Holm-corrected within its family (one metric "
              "over all populations of this run; the two consistency tests together), as the 'correction' column "
              "says; 'p (Holm)': the adjusted one-sided p-values of the claim (pass) and of its opposite (fail). "
              "'same sign': the fraction of seeds whose value has the sign of the mean. 'interval': the resampling "
              "scheme (full text in verdicts.parquet and summary.json); across seeds the verdict's 95 % interval is "
              "the t-interval over the seeds' values, and the hierarchical bootstrap interval (seeds → units → "
              "examples) is shown beside it for comparison only (it counts within-seed noise twice).</p>"
            + "<h3>Per population</h3>" + table
            + "<h3>Across populations</h3>" + cross_table
            + f"<h3>Verdict rules</h3><ul class=\"note\">{rules}</ul>")


def _populations(run: RunData) -> str:
    rows = []
    for p in run.populations:
        heads = [int(finite_heads(m)["gap"].size) for m in p.members if finite_heads(m) is not None]
        layers = [int(finite_layers(m)["min_gap"].size) for m in p.members if finite_layers(m) is not None]
        scan = sorted({m.scan_set for m in p.members if m.scan_set})
        prompts = sorted({m.prompts for m in p.members if m.prompts})
        rows.append([p.name, "one model" if p.one_model else f"{len(p.members)} of {len(p.listed)}",
                     ", ".join(str(m.seed) for m in p.members), _range(heads), _range(layers),
                     "/".join(scan) or "not recorded", "; ".join(prompts) or "–"])
    return (_rule_box() + _html_table(["population", "seeds finished", "seeds", "patched heads per seed",
                                  "steered layers per seed", "scan prompts (gap)", "steering prompts"], rows))


def _range(v: list[int]) -> str:
    return "–" if not v else (str(v[0]) if min(v) == max(v) else f"{min(v)}–{max(v)}")


def _calibration(a: Analysis) -> str:
    rows = [[r["population"], "–" if r["seed"] is None else r["seed"], CALIBRATION_TARGETS[r["target"]],
             _num(r["threshold"]),
             _ci(r["threshold_low"], r["threshold_high"]), _num(r["auroc"]), _ci(r["auroc_low"], r["auroc_high"]),
             f"{_num(r.get('auroc_p_value', NAN))} / {_num(r.get('auroc_p_holm', NAN))}", r.get("separation", ""),
             _num(r["youden_j"]), _num(r["j_at_reference"]), f"{r['n']} ({r['n_positive']} +)", r["n_dropped"],
             "; ".join(x for x in (r["reason"], r.get("separation_note", "")) if x)] for r in a.calibration_rows]
    return (f"<p class=\"note\">Per model (seed). Rule: a unit is predicted positive iff gap &lt;= t; t maximises "
            f"Youden J (TPR − FPR); intervals: stratified bootstrap 95 % (descriptive where a population has several "
            f"seeds: its verdict reads the spread of the seeds' thresholds). Important head: {_e(IMPORTANCE_RULE)}. "
            f"Steerable layer (by its min gap): {_e(STEERABLE_RULE)}.</p>"
            + _html_table(["population", "seed", "positives", "threshold", "95 % CI", "AUROC", "95 % CI",
                      "AUROC exact p / Holm over models", "separation", "J", f"J at {UNSTABLE_GAP:g}", "n", "dropped",
                      "note"], rows, {3, 4, 5, 6, 7, 9, 10, 12}, wide=True))


def _generalization(a: Analysis) -> str:
    rows = [[w, s["n"], _num(s["mean"]), _num(s["sd"]), _num(s["min"]), _num(s["max"]), _num(s["range"])]
            for w, s in (("important heads", a.spread["heads"]), ("steerable layers", a.spread["layers"]))]
    het = [[w, _num(h.pooled), _ci(h.pooled_low, h.pooled_high), _num(h.pooled_p), _num(h.q), h.df, h.test,
            _num(h.p_value), _num(h.i2), f"{h.n_positive} of {h.n_models}", h.reason]
           for w, h in (("r(importance, 1/gap)", a.heterogeneity["importance"]),
                        ("r(layer min gap, steering effect)", a.heterogeneity["steering"]))]
    corr = [[r["population"], r["correlation"], _num(r["r"]), _ci(r["low"], r["high"]), r["n_seeds"],
             ", ".join(_num(x) for x in r["per_seed_r"]), _range([int(n) for n in r["per_seed_n"]]), r["scheme"],
             r["note"]] for r in a.correlations]
    return ("<h3>Spread of the population thresholds (means over seeds)</h3>"
            + _html_table(["threshold of", "populations", "mean", "σ", "min", "max", "range"], rows, {1, 2, 3, 4, 5, 6})
            + "<h3>Correlations per population</h3><p class=\"note\">Layer-level correlations rest on 2–6 layers "
              "per model: a seed's r over its layers has no interval of its own, and the interval shown is across "
              "seeds. They are not comparable with correlations from other studies.</p>"
            + _html_table(["population", "correlation", "r (mean over seeds)", "95 % CI", "seeds", "per seed r",
                      "units per seed", "interval", "note"], corr, {2, 3, 4})
            + "<h3>Consistency of the correlations across populations (Fisher z)</h3>"
            + f"<p class=\"note\">{_e(RULES['correlation_consistent'])}</p>"
            + _html_table(["correlation", "pooled r", "95 % CI", "pooled p", "Q", "df", "test", "p", "I²", "r > 0", "note"],
                     het, {1, 2, 3, 4, 5, 7, 8}))


def _scaling(a: Analysis) -> str:
    excluded = ("<h3>Left out of the threshold fits</h3><ul class=\"note\">"
                + "".join(f"<li>{_e(x)}</li>" for x in a.scaling_excluded) + "</ul>") if a.scaling_excluded else ""
    if not a.scaling_rows:
        return f"<p class=\"warn\">No scaling fit: {_e(a.scaling_reason)}.</p>" + excluded

    def table(rows: list[dict]) -> str:
        cells = [[SCALING_QUANTITIES[r["quantity"]], r["predictor"], r["kind"], _num(r["a"]),
                  _ci(r["a_low"], r["a_high"]), _num(r["b"]),
                  _ci(r["b_low"], r["b_high"]), _num(r["r2"]), r["n"], _num(r.get("cv_mae", NAN)),
                  _num(r.get("cv_press_r2", NAN)), _num(r.get("loo_predicted", NAN)), _num(r.get("loo_observed", NAN)),
                  r["reason"]] for r in rows]
        for prev, row in zip(cells[::-1][1:], cells[::-1]):  # show each quantity once
            if row[0] == prev[0]:
                row[0] = ""
        return _html_table(["quantity", "predictor", "form", "a", "a 95 % CI", "b", "b 95 % CI", "R²", "n",
                       "LOO mean abs. error", "LOO PRESS R²", "largest predicted", "largest observed", "note"], cells,
                      {3, 4, 5, 6, 7, 8, 9, 10, 11, 12})

    main = [r for r in a.scaling_rows if r["predictor"] == "parameters"]
    return ("<p class=\"warn\"><b>Exploratory.</b> A population's quantity is its mean over seeds; each point is "
            "one population. Threshold fits only over populations whose AUROC interval lies above 0.5 (where the gap "
            "separates at all). power: y = a·x^b; log_linear: y = a + b·log10 x; 95 % t-intervals; R² on y. "
            f"Leave-one-out (every point left out in turn) only with >= {MIN_LOO_POINTS} points: its mean absolute "
            "error and PRESS R² (out-of-sample); 'largest': the fold that holds out the largest population. A "
            "prediction outside the quantity's range ([0, 1] for thresholds, gaps and fractions, [-1, 1] for r) is "
            "refused, not clipped. With a handful of sizes these fits describe, they do not establish a law.</p><h3>Against parameters</h3>" + table(main)
            + f"<details><summary>All {len(a.scaling_rows)} fits (parameters, total heads, d_model, d_head)</summary>"
            + table(a.scaling_rows) + "</details>" + excluded)


def _information(a: Analysis) -> str:
    rows = [[r["level"], r["population"], r["model"] or "–", INFORMATION_MEASURES[r["measure"]], _num(r["value"]),
             _ci(r["low"], r["high"]),
             _num(r["null_mean"]), _num(r["corrected"]), _num(r["p_value"]), _num(r["mc_error"]), _num(r["p_holm"]),
             r["family"], r["n"], r["n_strata"] or "–", r["n_dropped"],
             f"{_num(r['unstable_median'])} / {_num(r['stable_median'])}" if r["unstable_n"] + r["stable_n"] else "",
             r["reason"]] for r in a.information_rows]
    perms = sorted({r["n_permutations"] for r in a.information_rows if r["n_permutations"]})
    return ("<p class=\"note\">MI: Kraskov kNN estimate (k = 3, nats), <i>not</i> clipped at 0, with a permutation "
            f"null ({', '.join(map(str, perms)) or '–'} shuffles of y; pooled rows shuffle within each model, so the "
            "null keeps every model's own x and y together); excess = estimate − null mean (negative when there is "
            "no dependence); p: one-sided permutation p-value with its Monte-Carlo standard error; Holm within each "
            "family (measure × level). Entropy: difference of medians (bootstrap 95 % CI), two-sided Mann-Whitney "
            "p per model; per population the mean over seeds with its across-seed interval.</p>"
            + _html_table(["level", "population", "model", "measure", "value", "95 % CI", "null mean", "excess", "p",
                      "MC error", "p (Holm)", "family", "n", "strata", "dropped", "median unstable / stable", "note"],
                     rows, {4, 5, 6, 7, 8, 9, 10, 12, 13, 14}))


def _data(run: RunData) -> str:
    models = [[md.name, md.population, "–" if md.seed is None else md.seed,
               *(md.facts.get(k, "–") if md.facts else "–" for k in ("family", "parameters", "layers", "heads",
                                                                      "d_model", "d_head")),
               ", ".join(sorted(md.cells)) or "none", md.importance_source or "–"] for md in run.models]
    excluded = [[md.name, k, v] for md in run.models for k, v in md.excluded.items()]
    notes = [[md.name, n] for md in run.models for n in md.notes]
    missing = "".join(f"<li>{_e(m)}</li>" for m in run.missing) or "<li>nothing</li>"
    found = "".join(f"<li>{_e(f)}</li>" for f in run.found) or "<li>no finished unit</li>"
    return (_html_table(["model", "population", "seed", "family", "parameters", "layers", "heads/layer", "d_model", "d_head",
                    "finished experiments", "importance from"], models, {4, 5, 6, 7, 8})
            + f"<h3>Experiments found</h3><ul class=\"note\">{found}</ul>"
            + f"<h3>Missing</h3><ul>{missing}</ul>"
            + ("<h3>Notes</h3>" + _html_table(["model", "note"], notes) if notes else "")
            + "<h3>Non-finite values excluded (counted, never silently dropped)</h3>"
            + _html_table(["model", "quantity", "excluded"], excluded, {2}))


def _landscape(run: RunData, a: Analysis, figs: dict) -> str:
    land = figs["landscape"] or {}
    if not land:
        return "<p class=\"note\">No scan in this run.</p>"
    return ("<p class=\"note\">One heatmap per population (its first seed); every seed's heatmap is in its "
            "validate cell (gap_heatmap.png).</p><div class=\"grid\">"
            + "".join(_img(p, f"gap landscape {m}", scale=LANDSCAPE_SCALE) for m, p in land.items()) + "</div>")


def _other_cells(run: RunData, a: Analysis, figs: dict) -> str:
    """Cells of experiment kinds that no analysis of this page reads: the metrics and verdicts
    their kind hands to MLflow (``figs['cells']``: (cell, metrics, params) from jobs.report)."""
    rows = [[cell.model, f"{cell.index}-{cell.kind}", key, value]
            for cell, metrics, params in figs.get("cells") or () for key, value in [*metrics.items(), *params.items()]]
    if not rows:
        return "<p class=\"note\">No other experiment in this run.</p>"
    return ("<p class=\"note\">Per cell, as its experiment kind reports it (the same keys as its MLflow run); "
            "no population statistics are taken here.</p>" + _html_table(["model", "experiment", "key", "value"], rows, {3}))


def _circuits(run: RunData, a: Analysis, figs: dict) -> str:
    """Circuits against spectra (``analysis.circuits``): verdicts per population, the spectral
    signature, one row per circuits cell."""
    from analysis.circuits import RULES as CIRCUIT_RULES

    c = figs.get("circuits")
    if not c:
        return "<p class=\"note\">No circuits experiment in this run.</p>"
    rules = "".join(f"<li><b>{_e(k)}</b>: {_e(v)}</li>" for k, v in CIRCUIT_RULES.items())
    rows = [[r["population"], r["key"], r["metric"], len(r["per_seed"]), _num(r["value"]), _ci(r["low"], r["high"]),
             ", ".join(_num(x) for x in r["per_seed"]), _num(r.get("pattern_auroc", NAN)), _num(r["p_pass_holm"]),
             _num(r["p_fail_holm"]), r["verdict"]] for r in c["verdicts"].rows]
    table = _html_table(["population", "key", "claim", "seeds", "value (mean)", "95 % interval", "per seed",
                         "pattern-score AUROC", "p PASS (Holm)", "p FAIL (Holm)", "verdict"], rows, {3, 4, 8, 9})
    sig = c["verdicts"].signature
    folds = sig.get("folds") or []
    sig_text = (f"Spectral signature (logistic regression on {', '.join(sig.get('features', []))}, leave one "
                f"population out): " + ("; ".join(f"{f['population']}: accuracy {_num(f['accuracy'])} vs majority "
                                                  f"{_num(f['baseline'])}" for f in folds) or sig.get("note", "none"))
                + (f"; verdict {sig['verdict']}" if "verdict" in sig else "") + ".")
    models = _html_table(["model", "task", "method", "ablation", "edges", "of", "faithfulness (exact)", "CPR", "CMD",
                          "Spearman EAP", "Spearman EAP-IG", "circuit heads", "validate's minimal heads",
                          "overlap (Jaccard)"],
                         [[r["model"], r["task"], r["method"], r["ablation"], r["size"], r["n_edges"],
                           _num(r["faithfulness"]), _num(r["cpr"]), _num(r["cmd"]), _num(r["spearman_eap"]),
                           _num(r["spearman_eap_ig"]), r["heads"], r["validate_heads"] or "–",
                           _num(r["validate_overlap"])] for r in c["models"]], {4, 5, 6, 7, 8, 9, 10, 13})
    return (f"<ul class=\"note\">{rules}</ul>" + table + f"<p class=\"note\">{_e(sig_text)}</p>"
            + "<h3>Circuits per model</h3>" + models)


def _beyond(run: RunData, a: Analysis, figs: dict) -> str:
    """Beyond the gap (``jobs.beyond``): the held-out verdicts, the kernels' agreement, each
    feature's held-out Spearman and AUROC, and each fold's choices."""
    b = figs.get("beyond")
    if not b:
        return "<p class=\"note\">No features experiment in this run.</p>"
    parts = []
    verdicts = [r for p in b.predictions.values() for r in p.verdicts]
    if verdicts:
        parts.append(f"<div class=\"rule\"><b>Rule:</b> {_e(verdicts[0]['rule'])}</div>")
        parts.append(_html_table(
            ["target", "claim", "held-out groups", "models", "value", "95 % interval", "p pass / fail", "verdict",
             "per group", "correction", "note"],
            [[r["target"], r["key"], r["n_groups"], r["n_models"], _num(r["value"]), _ci(r["low"], r["high"]),
              f"{_num(r['p_pass'])} / {_num(r['p_fail'])}", r["verdict"], r["per_group"], r["correction"], r["note"]]
             for r in verdicts], {2, 3, 4}))
    if b.agreement is not None:
        from analysis.kernel_agreement import RULE as AGREEMENT_RULE

        parts.append("<h3>Pre- vs post-softmax: do the kernels agree on which heads are unstable?</h3>")
        parts.append(f"<div class=\"rule\"><b>Rule:</b> {_e(AGREEMENT_RULE)}</div>")
        parts.append(_html_table(
            ["population", "claim", "seeds", "Spearman", "95 % interval", "kappa", "kappa 95 %", "flags",
             "p pass / fail (Holm)", "verdict", "note"],
            [[r["population"], r["key"], r["n_seeds"], _num(r["value"]), _ci(r["low"], r["high"]), _num(r["kappa"]),
              _ci(r["kappa_low"], r["kappa_high"]), r["flags"], f"{_num(r['p_pass_holm'])} / {_num(r['p_fail_holm'])}",
              r["verdict"], r["note"]] for r in b.agreement.verdicts], {2, 3, 5}))
        parts.append(_html_table(
            ["population", "kernel a", "kernel b", "seeds", "Spearman of gaps", "95 %", "kappa at 0.77", "95 %",
             "kappa, calibrated", "95 %"],
            [[r["population"], r["kernel_a"], r["kernel_b"], r["n_seeds"], _num(r["spearman"]),
              _ci(r["spearman_low"], r["spearman_high"]), _num(r["kappa_reference"]),
              _ci(r["kappa_reference_low"], r["kappa_reference_high"]), _num(r["kappa_calibrated"]),
              _ci(r["kappa_calibrated_low"], r["kappa_calibrated_high"])] for r in b.agreement.populations],
            {3, 4, 6, 8}))
    for target, p in b.predictions.items():
        rows = sorted((r for r in p.features if r["spearman"] == r["spearman"]), key=lambda r: -r["spearman"])
        top = [r for r in rows if r["group"] == "baseline"] + [r for r in rows if r["group"] == "spectral"][:15]
        parts.append(f"<h3>Held-out {_e(target)}: the baselines and the 15 spectral features with the highest held-out "
                     f"Spearman (all {len(p.features)} in feature_prediction.parquet)</h3>")
        parts.append(_img(b.plots.get(target), f"held-out {target}",
                          "held-out Spearman with 95 % interval; filled: significant after Holm"))
        parts.append(_html_table(
            ["feature", "group", "held-out Spearman", "95 %", "p (Holm)", "AUROC", "95 %", "p (Holm)", "direction"],
            [[r["feature"], r["group"], _num(r["spearman"]), _ci(r["spearman_low"], r["spearman_high"]),
              _num(r["p_holm"]), _num(r["auroc"]), _ci(r["auroc_low"], r["auroc_high"]), _num(r["auroc_p_holm"]),
              r["direction"]] for r in sorted(top, key=lambda r: -r["spearman"])], {2, 4, 5, 7}))
        if p.features:
            parts.append(f"<p class=\"note\">{_e(p.features[0]['correction'])}; positive class: "
                         f"{_e(p.features[0]['positive_class'])}.</p>")
        parts.append(_html_table(
            ["held out", "best spectral (chosen on the others)", "its held-out Spearman", "best baseline",
             "its held-out Spearman", "spectral model", "held-out", "baseline model", "held-out"],
            [[f["held_out"], f["best_spectral"], _num(f["best_spectral_test"]), f["best_baseline"],
              _num(f["best_baseline_test"]), f["spectral_model"], _num(f["spectral_model_test"]), f["baseline_model"],
              _num(f["baseline_model_test"])] for f in p.folds], {2, 4, 6, 8}))
        if p.excluded:
            parts.append(f"<p class=\"note\">Left out: {_e('; '.join(p.excluded))}</p>")
    if b.notes:
        parts.append(f"<p class=\"note\">{_e('; '.join(b.notes))}</p>")
    return "".join(parts)


Section = Callable[[RunData, Analysis, dict], str]

def _saes(run: RunData, a: Analysis, figs: dict) -> str:
    """SAEs on heads' results (``jobs.saes_section``): stable vs unstable verdicts and the
    exploratory metrics, feature-aware steering, the correlation screen, ground truth."""
    s = figs.get("saes")
    if not s:
        return "<p class=\"note\">No saes experiment in this run.</p>"
    parts = []
    c = s.comparison
    if c is not None:
        verdict = [r for r in c.verdicts if not r["exploratory"]]
        if verdict:
            parts.append(f"<div class=\"rule\"><b>Rule:</b> {_e(verdict[0]['rule'])}</div>")
        parts.append(_html_table(
            ["population", "claim / metric", "threshold", "seeds", "unstable - stable (mean over seeds)", "95 %",
             "Spearman with gap", "95 %", "p pass / fail (Holm)", "verdict", "direction", "correction", "note"],
            [[r["population"], r["key"] if not r["exploratory"] else r["metric"], r["threshold_kind"], r["k"],
              _num(r["value"]), _ci(r["low"], r["high"]), _num(r["spearman"]), _ci(r["spearman_low"], r["spearman_high"]),
              f"{_num(r['p_pass_holm'])} / {_num(r['p_fail_holm'])}", r["verdict"] or "(exploratory)", r["direction"],
              r["correction"], r["note"]] for r in sorted(c.verdicts, key=lambda r: (r["exploratory"], r["population"]))],
            {3, 4, 6}))
        parts.append(_img(s.plots.get("differences"), "unstable - stable differences",
                          "per population and metric, the mean over seeds of the unstable - stable median difference"))
    if s.steering:
        parts.append("<h3>Feature-aware steering vs ActAdd at the same KL budget</h3>")
        parts.append(f"<div class=\"rule\"><b>Rule:</b> {_e(s.steering[0]['rule'])}</div>")
        parts.append(_html_table(
            ["population", "claim", "seeds", "feature - ActAdd", "95 %", "p pass / fail (Holm)", "verdict", "per seed",
             "correction", "note"],
            [[r["population"], r["key"], r["k"], _num(r["value"]), _ci(r["low"], r["high"]),
              f"{_num(r['p_pass_holm'])} / {_num(r['p_fail_holm'])}", r["verdict"], r["per_seed"], r["correction"],
              r["note"]] for r in s.steering], {2, 3}))
    if s.screen:
        parts.append("<h3>Which features predict ActAdd's per-prompt effect (correlation screen)</h3>")
        parts.append(_html_table(
            ["model", "features tested", "dead", "significant", "top feature", "its Spearman", "adjusted p", "correction"],
            [[r["model"], r["n_tested"], r["n_dead"], r["n_significant"], r["top_feature"], _num(r["top_spearman"]),
              _num(r["top_p_adjusted"]), r["correction"]] for r in s.screen], {1, 2, 3, 5, 6}))
    if s.recovery:
        parts.append("<h3>Ground truth: do SAE features recover the organisms' planted variables?</h3>")
        parts.append(f"<div class=\"rule\"><b>Rule:</b> {_e(s.recovery[0].get('rule', ''))}</div>")
        cols = [k for k in ("population", "variable", "kind", "k", "value", "low", "high", "verdict", "per_seed",
                            "correction", "note") if k in s.recovery[0]]
        parts.append(_html_table(cols, [[_num(r[k]) if isinstance(r[k], float) else r[k] for k in cols]
                                        for r in s.recovery], set()))
    if s.notes:
        parts.append(f"<p class=\"note\">{_e('; '.join(s.notes))}</p>")
    return "".join(parts)


def _dynamics_steer(run: RunData, a: Analysis, figs: dict) -> str:
    """Spectrally adaptive steering vs a fixed coefficient at the same KL budget (``jobs.dynamics_steer_section``)."""
    s = figs.get("dynamics_steer")
    if not s:
        return "<p class=\"note\">No dynamics_steer experiment in this run.</p>"
    parts = []
    if s.verdicts:
        parts.append(f"<div class=\"rule\"><b>Rule:</b> {_e(s.verdicts[0]['rule'])}</div>")
        parts.append(_verdict_table(s.verdicts, "adaptive - fixed"))
    if s.models:
        parts.append(_html_table(
            ["model", "arm", "rule", "layer", "scale", "KL (prompts matched on)", "KL (prompts evaluated)", "effect", "95 %",
             "mean coefficient"],
            [[r["model"], r["arm"], r["rule"], r["layer"], _num(r["scale"]), _num(r["kl_selection"]), _num(r["kl"]),
              _num(r["effect"]), _ci(r["effect_low"], r["effect_high"]), _num(r["mean_coefficient"])]
             for r in s.models], {3, 4, 5, 6, 7, 9}))
        parts.append(_img(s.plots.get("arms"), "adaptive vs fixed", "per model, each arm at the matched budget: "
                          "the effect on the evaluated prompts with its 95 % CI over prompts, and the KL it reached there"))
    if s.notes:
        parts.append(f"<p class=\"note\">{_e('; '.join(s.notes))}</p>")
    return "".join(parts)


def _dynamics_train(run: RunData, a: Analysis, figs: dict) -> str:
    """Do the heads' gap change-points precede the ICL score's (``jobs.dynamics_train_section``)."""
    s = figs.get("dynamics_train")
    if not s:
        return "<p class=\"note\">No dynamics_train experiment in this run.</p>"
    parts = []
    for rule in dict.fromkeys(r["rule"] for r in s.verdicts if not r["exploratory"]):
        parts.append(f"<div class=\"rule\"><b>Rule:</b> {_e(rule)}</div>")
    if s.verdicts:
        parts.append(_html_table(
            ["population", "claim / metric", "seeds", "mean over seeds (decades)", "95 %", "p pass / fail (Holm)",
             "verdict", "direction", "heads precede", "per seed", "correction", "note"],
            [[r["population"], r["metric"] if r["key"] == "exploratory_lag" else r["key"],
              f"{r['k']} of {r['n_seeds']}",
              _num(r["value"]), _ci(r["low"], r["high"]), f"{_num(r['p_pass_holm'])} / {_num(r['p_fail_holm'])}",
              r["verdict"] or ("(control)" if r["key"] == "control_loss_lag" else "(exploratory)"), r["direction"],
              _num(r["fraction_precede"]), r["per_seed"],
              r["correction"], r["note"]] for r in sorted(s.verdicts, key=lambda r: (r["exploratory"], r["population"]))],
            {2, 3, 8}))
        parts.append(_img(s.plots.get("lags"), "gap change-point lags", "per population, each seed's median lag of "
                          "the heads' gap change-points to the ICL score's (below 0: the gaps change first), the "
                          "training loss's lag (control) and the gaps' median change-point minus the loss's, each "
                          "with the mean and its 95 % CI over seeds"))
    if s.icl:
        parts.append(_html_table(
            ["model", "seed", "checkpoints", "ICL score first", "ICL score last", "ICL change-point (step)",
             "loss change-point (step)", "heads with a late gap change (after the loss's, before ICL's)",
             "median late change - ICL (decades)"],
            [[r["model"], r["seed"], r["n_checkpoints"], _num(r["icl_first"]), _num(r["icl_last"]),
              _num(r["icl_change_step"]), _num(r["loss_change_step"]), f"{r['n_late']} of {r['n_heads']}",
              _num(r["median_late_lag"])] for r in s.icl], {1, 2, 3, 4, 5, 6, 8}))
    if s.notes:
        parts.append(f"<p class=\"note\">{_e('; '.join(s.notes))}</p>")
    return "".join(parts)


def _dynamics_generate(run: RunData, a: Analysis, figs: dict) -> str:
    """How much the heads' gap changes during generation, per model (``jobs.dynamics_generate_section``)."""
    s = figs.get("dynamics_generate")
    if not s:
        return "<p class=\"note\">No dynamics_generate experiment in this run.</p>"
    parts = ["<p>Descriptive, no verdict. Change-points of each (prompt, head) gap trajectory over the generation "
             "steps by the training-dynamics detector's fixed rule; a gap from cumulative key statistics drifts "
             "smoothly with autocorrelated noise, so the detector's stated false-alarm rates do not hold here and "
             "the shares say where the gap moves, not that it jumps.</p>"]
    if s.models:
        parts.append(_html_table(
            ["model", "prompts", "new tokens", "heads", "series with a change-point", "heads (any prompt)",
             "heads (>= half the prompts)", "median |gap change|", "90th pct", "median gap range"],
            [[r["model"], r["n_prompts"], r["generated_tokens"], r["n_heads"], _num(r["share_series_with_change"]),
              _num(r["share_heads_with_change"]), _num(r["share_heads_change_in_most_prompts"]),
              _num(r["median_abs_gap_change"]), _num(r["p90_abs_gap_change"]), _num(r["median_gap_range"])]
             for r in s.models], {1, 2, 3, 4, 5, 6, 7, 8, 9}))
        parts.append(_img(s.plots.get("overview"), "generation dynamics overview", "per model, the share of gap "
                          "trajectories (and heads) with a change-point, and the typical change of the gap over the steps"))
        for r in s.models:
            for key, what in (("trajectories", "each head's gap over the steps, mean over prompts with a 10-90 % band"),
                              ("heatmap", "step x head mean gap")):
                if f"{r['model']}/{key}" in s.plots:
                    parts.append(_img(s.plots[f"{r['model']}/{key}"], f"{r['model']} {key}",
                                      f"{r['model']}: {what}; change-points marked"))
    if s.notes:
        parts.append(f"<p class=\"note\">{_e('; '.join(s.notes))}</p>")
    return "".join(parts)


def _verdict_table(rows: list[dict], value: str) -> str:
    return _html_table(
        ["population", "claim", "seeds", value, "95 %", "p pass / fail (Holm)", "verdict", "per seed", "correction",
         "note"],
        [[r["population"], r["key"], r["k"], _num(r["value"]), _ci(r["low"], r["high"]),
          f"{_num(r['p_pass_holm'])} / {_num(r['p_fail_holm'])}", r["verdict"], r["per_seed"], r["correction"],
          r["note"]] for r in rows], {2, 3})


def _steering_theory(run: RunData, a: Analysis, figs: dict) -> str:
    """Success metrics 4 and 5 (``jobs.autosteer_section``): the first-order prediction and automated steering."""
    s = figs.get("steering_theory")
    if not s:
        return "<p class=\"note\">No predict or autosteer experiment in this run.</p>"
    parts = []
    p = s.get("predict")
    if p is not None:
        parts.append("<h3>Success metric 4: the first-order prediction (eigengap predict)</h3>")
        if p.verdicts:
            parts.append(f"<div class=\"rule\"><b>Rule:</b> {_e(p.verdicts[0]['rule'])}</div>")
            parts.append(_verdict_table(p.verdicts, "Spearman"))
        if p.models:
            parts.append(_html_table(
                ["model", "layers", "Spearman", "95 % (prompt bootstrap)", "bound broken", "measurements",
                 "prediction / search time"],
                [[m["model"], m["n_layers"], _num(m["spearman"]), _ci(m["low"], m["high"]), m["violations"],
                  m["n_measurements"], _num(m["first_order_over_search"])] for m in p.models], {1, 2, 4, 5, 6}))
        parts.append(_img(p.plots.get("layers"), "predicted vs measured", "every layer of every predict cell: the "
                          "measured effect at the matched KL budget against the first-order prediction"))
        if p.notes:
            parts.append(f"<p class=\"note\">{_e('; '.join(p.notes))}</p>")
    t = s.get("autosteer")
    if t is not None:
        parts.append("<h3>Success metric 5: automated steering against the oracle (eigengap autosteer)</h3>")
        if t.verdicts:
            parts.append(f"<div class=\"rule\"><b>Rule:</b> {_e(t.verdicts[0]['rule'])}</div>")
            parts.append(_verdict_table(t.verdicts, "system - 0.9 oracle"))
        if t.strategies:
            parts.append(_html_table(
                ["population", "strategy", "seeds", "effect", "- oracle (mean over seeds)", "95 % (seeds)",
                 "/ oracle", "oracle's layers", "KL", "loss increase", "steerability", "anti-steerable", "choice s"],
                [[r["population"], r["strategy"] + (" (system)" if r["system"] else ""), r["n_seeds"], _num(r["effect"]),
                  _num(r["vs_oracle"]), _ci(r["vs_oracle_low"], r["vs_oracle_high"]), _num(r["ratio_to_oracle"]),
                  _num(r["oracle_layers"]), _num(r["kl"]), _num(r["loss_increase"]), _num(r["steerability"]),
                  _num(r["anti_steerable"]), _num(r["choice_seconds"])] for r in t.strategies],
                {2, 3, 4, 6, 7, 8, 9, 10, 11, 12}, wide=True))
            parts.append(_img(t.plots.get("strategies"), "strategies against the oracle",
                              "per population, each strategy's held-out effect minus the oracle's, mean over seeds with "
                              "its t-interval"))
        if t.notes:
            parts.append(f"<p class=\"note\">{_e('; '.join(t.notes))}</p>")
    return "".join(parts)


def _monitor(run: RunData, a: Analysis, figs: dict) -> str:
    """The spectral runtime monitor against activation baselines (``jobs.monitor_section``)."""
    s = figs.get("monitor")
    if not s:
        return "<p class=\"note\">No monitor experiment in this run.</p>"
    parts = []
    if s.verdicts:
        parts.append(f"<div class=\"rule\"><b>Rule:</b> {_e(s.verdicts[0]['rule'])}</div>")
        parts.append(_html_table(
            ["population", "pairing", "seeds", "spectral - closest baseline (AUROC)", "95 %", "p pass / fail (Holm)",
             "verdict", "per baseline", "correction"],
            [[r["population"], r["pairing"], r["k"], _num(r["value"]), _ci(r["low"], r["high"]),
              f"{_num(r['p_pass_holm'])} / {_num(r['p_fail_holm'])}", r["verdict"], r["detail"], r["correction"]]
             for r in s.verdicts], {2, 3}))
    if s.summary:
        parts.append(_html_table(
            ["population", "pairing", "detector", "seeds", "AUROC (mean)", "min", "max", "TPR at 1 % FPR (mean)"],
            [[r["population"], r["pairing"], r["detector"], r["n_seeds"], _num(r["auroc"]), _num(r["auroc_min"]),
              _num(r["auroc_max"]), _num(r["tpr_at_1pct_fpr"])] for r in s.summary], {3, 4, 5, 6, 7}))
        parts.append(_img(s.plots.get("auroc"), "monitor AUROC", "per population and pairing, each detector's AUROC "
                          "(mean over seeds; bars: min to max); dotted: 0.5"))
    if s.notes:
        parts.append(f"<p class=\"note\">{_e('; '.join(s.notes))}</p>")
    return "".join(parts)


def _regularize(run: RunData, a: Analysis, figs: dict) -> str:
    """Spectral regularisation and controlled instability (``jobs.regularize_section``)."""
    s = figs.get("regularize")
    if not s:
        return "<p class=\"note\">No regularize experiment in this run.</p>"
    parts = []
    if s.verdicts:
        for key in dict.fromkeys(r["key"] for r in s.verdicts):
            rows = [r for r in s.verdicts if r["key"] == key]
            parts.append(f"<div class=\"rule\"><b>Rule:</b> {_e(rows[0]['rule'])}</div>")
            parts.append(_html_table(
                ["population", "arm", "layer", "seeds", "D (mean over seeds)", "95 % (seeds)", "p pass / fail (Holm)",
                 "verdict", "per seed", "correction"],
                [[r["population"], r["arm"], r["layer"] if r["layer"] >= 0 else "", r["k"], _num(r["value"]),
                  _ci(r["low"], r["high"]), f"{_num(r['p_pass_holm'])} / {_num(r['p_fail_holm'])}", r["verdict"],
                  r["per_seed"], r["correction"]] for r in rows], {3, 4}))
    else:
        parts.append("<p class=\"note\">No verdict: no gap arm with a baseline of the same seeds.</p>")
    if s.contrasts:
        parts.append("<p>Arm - baseline per measure, paired by training seed: the mean over seeds with its 95 % "
                     "t-interval (descriptive; no multiplicity claim).</p>")
        parts.append(_html_table(
            ["population", "arm", "measure", "better", "baseline", "arm", "arm - baseline", "95 % (seeds)", "seeds"],
            [[c["population"], c["arm"], c["measure"], c["better"], _num(c["baseline"]), _num(c["arm_value"]),
              _num(c["value"]), _ci(c["low"], c["high"]), c["k"]] for c in s.contrasts], {4, 5, 6, 8}, wide=True))
    for name, path in s.plots.items():
        what, pop = name.split("/", 1)
        caption = (f"{pop}: every head's key-kernel gap on held-out prompts per arm and seed (red: the arm's targeted "
                   "heads); dashed: 0.77" if what == "gaps" else
                   f"{pop}: arm - baseline per measure, mean over seeds with its 95 % t-interval")
        parts.append(_img(path, name, caption))
    if s.notes:
        parts.append(f"<p class=\"note\">{_e('; '.join(s.notes))}</p>")
    return "".join(parts)


SECTIONS: tuple[tuple[str, str, Section], ...] = (
    ("verdicts", "Verdicts", lambda run, a, figs: _verdicts(a)),
    ("populations", "Populations", lambda run, a, figs: _populations(run)),
    ("landscape", "Gap landscape", _landscape),
    ("importance", "Gap vs importance", lambda run, a, figs: _img(
        figs["importance"], "gap vs importance", f"colours: seeds; filled: important heads; dashed: {UNSTABLE_GAP:g}; "
        "red: the population's mean head threshold with its across-seed 95 % CI")),
    ("steering", "Steering by layer", lambda run, a, figs: _img(
        figs["steering"], "steering by layer", "effect at the matched KL budget with 95 % CI over prompts (dots) and "
        f"the layer's min gap (squares), per seed; dotted: {UNSTABLE_GAP:g}")),
    ("calibration", "Threshold calibration", lambda run, a, figs: _calibration(a)),
    ("generalization", "Generalization across populations",
     lambda run, a, figs: _generalization(a) + _img(figs["generalization"], "generalization")),
    ("scaling", "Scaling (exploratory)", lambda run, a, figs: _scaling(a) + _img(
        figs["scaling"], "scaling fits", "exploratory; solid: power law, dashed: log-linear; log x-axis")),
    ("information", "Information measures",
     lambda run, a, figs: _information(a) + _img(figs["entropy"], "entropy by stability")),
    ("circuits", "Circuits and spectra", _circuits),
    ("beyond", "Beyond the gap", _beyond),
    ("saes", "SAEs on heads' results", _saes),
    ("dynamics_steer", "Spectrally adaptive steering", _dynamics_steer),
    ("dynamics_train", "Training dynamics", _dynamics_train),
    ("dynamics_generate", "Generation dynamics", _dynamics_generate),
    ("steering_theory", "Steering theory and automated steering", _steering_theory),
    ("monitor", "Runtime monitor", _monitor),
    ("regularize", "Spectral regularisation and controlled instability", _regularize),
    ("cells", "Other experiments", _other_cells),
    ("data", "Data", lambda run, a, figs: _data(run)),
)
"""The page's sections in order: (anchor, title, renderer). A new analysis adds one line here."""


def render(run: RunData, a: Analysis, figs: dict) -> str:
    """The whole page as one string."""
    body = {k: section(run, a, figs) for k, _, section in SECTIONS}
    nav = "".join(f"<a href=\"#{k}\">{_e(t)}</a>" for k, t, _ in SECTIONS)
    warn = (f"<p class=\"warn\">Missing: {_e('; '.join(run.missing))}</p>" if run.missing else "")
    sections = "".join(f"<section id=\"{k}\"><h2>{_e(t)}</h2>{body[k]}</section>" for k, t, _ in SECTIONS)
    title = f"eigengap report: {run.run_id}"
    pops = ", ".join(f"{p.name} ({'one model' if p.one_model else f'{len(p.members)} seeds'})" for p in run.populations)
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{_e(title)}</h1>"
            f"<p class=\"note\">{_e(len(run.populations))} population(s) of {_e(len(run.models))} model(s): {_e(pops)}. "
            f"Unstable: gap &lt;= {UNSTABLE_GAP:g}. Intervals are 95 %.</p>{warn}<nav>{nav}</nav>{sections}</body></html>")
