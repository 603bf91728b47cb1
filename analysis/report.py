"""The cross-model report: figures (matplotlib, Agg, imported lazily) and one self-contained
HTML page (inline CSS, PNGs as base64 data URIs, no scripts, no external resources)."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import numpy as np
import pyarrow as pa

from analysis.calibration import IMPORTANCE_RULE, STEERABLE_RULE, important
from analysis.crossmodel import VERDICT_RULES, Analysis, RunData, finite_heads, finite_layers
from spectral.metrics import UNSTABLE_GAP

PANEL_COLUMNS = 4
"""Models per row of a multi-panel figure."""
LANDSCAPE_SCALE = 0.6
"""Gap heatmaps are shown at this fraction of their pixel width."""


# --- figures ---------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(n: int, width: float = 3.4, height: float = 2.8):
    plt = _plt()
    cols = max(1, min(PANEL_COLUMNS, n))
    rows = math.ceil(max(n, 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _shared_legend(fig, axes, twin=None):
    """One legend for all panels, below them (the panels share their series); ``twin``: the
    first panel's second y-axis, whose series join the legend."""
    handles, labels = axes[0].get_legend_handles_labels()
    if twin is not None:
        h, l = twin.get_legend_handles_labels()
        handles, labels = handles + h, labels + l
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08 if len(axes) <= PANEL_COLUMNS else 0.04, 1, 1))
    return fig


def _save(fig, path: Path) -> Path:
    if not fig.get_tight_layout() and not fig.legends:
        fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    _plt().close(fig)
    tmp.replace(path)
    return path


def landscape(run: RunData, out: Path) -> dict[str, Path]:
    """One layer x head gap heatmap per model with a scan."""
    from analysis.plots import gap_heatmap

    paths = {}
    for i, md in enumerate(run.models):
        if md.scan is not None:
            table = pa.table({"layer": md.scan["layer"].astype(int), "head": md.scan["head"].astype(int),
                              "gap": md.scan["gap"]})
            paths[md.name] = gap_heatmap(table, out / f"gap_landscape_{i}.png", title=md.name)
    return paths


def importance_scatter(run: RunData, a: Analysis, path: Path) -> Path | None:
    models = [md for md in run.models if finite_heads(md) is not None]
    if not models:
        return None
    fig, axes = _panels(len(models))
    for ax, md in zip(axes, models):
        h = finite_heads(md)
        imp = important(h["importance"])
        ax.scatter(h["gap"][~imp], h["importance"][~imp], s=14, c="tab:blue", alpha=0.7, label="other heads")
        ax.scatter(h["gap"][imp], h["importance"][imp], s=18, c="tab:red", label="important")
        ax.axvline(UNSTABLE_GAP, color="k", ls="--", lw=1, label=f"{UNSTABLE_GAP:g}")
        c = a.calibrations[md.name]["heads"]
        if c is not None and np.isfinite(c.threshold):
            ax.axvline(c.threshold, color="tab:green", lw=1.5, label="calibrated threshold (95 % CI)")
            if np.isfinite(c.threshold_low):
                ax.axvspan(c.threshold_low, c.threshold_high, color="tab:green", alpha=0.12)
        ax.set_title(f"{md.name}" + (f" (AUROC {c.auroc:.2f})" if c is not None else ""), fontsize=9)
        ax.set_xlabel("gap", fontsize=8)
        ax.set_ylabel("importance (restoration)", fontsize=8)
        ax.tick_params(labelsize=7)
    return _save(_shared_legend(fig, axes), path)


def steering_by_layer(run: RunData, a: Analysis, path: Path) -> Path | None:
    models = [md for md in run.models if finite_layers(md) is not None]
    if not models:
        return None
    fig, axes = _panels(len(models))
    twins = []
    for ax, md in zip(axes, models):
        l = finite_layers(md)
        err = [l["effect"] - l["effect_low"], l["effect_high"] - l["effect"]]
        ax.errorbar(l["layer"], l["effect"], yerr=err, fmt="o", color="tab:blue", capsize=3, label="effect (95 % CI)")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("layer", fontsize=8)
        ax.set_ylabel("steering effect", fontsize=8, color="tab:blue")
        ax.set_xticks(l["layer"])
        ax2 = ax.twinx()
        twins.append(ax2)
        ax2.plot(l["layer"], l["min_gap"], "s--", color="tab:red", ms=4, label="min gap")
        ax2.axhline(UNSTABLE_GAP, color="tab:red", lw=0.8, ls=":", label=f"gap {UNSTABLE_GAP:g}")
        ax2.set_ylabel("min gap of the layer", fontsize=8, color="tab:red")
        for axis in (ax, ax2):
            axis.tick_params(labelsize=7)
        ax.set_title(md.name, fontsize=9)
    return _save(_shared_legend(fig, axes, twins[0]), path)


def generalization(run: RunData, a: Analysis, path: Path) -> Path | None:
    """Forest plots: each model's thresholds vs the 0.77 ± 0.05 band; each model's correlations."""
    names = [md.name for md in run.models]
    if not names:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(names) + 1.8))
    y = np.arange(len(names))
    ax = axes[0]
    ax.axvspan(UNSTABLE_GAP - 0.05, UNSTABLE_GAP + 0.05, color="grey", alpha=0.2, label=f"{UNSTABLE_GAP:g} ± 0.05")
    for offset, which, color in ((-0.12, "heads", "tab:red"), (0.12, "layers", "tab:blue")):
        for i, n in enumerate(names):
            c = a.calibrations[n][which]
            if c is None or not np.isfinite(c.threshold):
                continue
            lo, hi = (c.threshold_low, c.threshold_high) if np.isfinite(c.threshold_low) else (c.threshold, c.threshold)
            ax.errorbar(c.threshold, i + offset, xerr=[[c.threshold - lo], [hi - c.threshold]], fmt="o", color=color,
                        capsize=3, label=("important heads" if which == "heads" else "steerable layers") if i == 0 else None)
    ax.set_title("calibrated thresholds (95 % CI)", fontsize=9)
    ax.set_xlabel("gap", fontsize=8)
    ax = axes[1]
    ax.axvline(0, color="grey", lw=0.8)
    for offset, which, color in ((-0.12, "importance", "tab:red"), (0.12, "steering", "tab:blue")):
        rows = {r["model"]: r for r in a.correlations if r["correlation"] == which}
        label = "r(importance, 1/gap)" if which == "importance" else "r(layer min gap, effect)"
        for i, n in enumerate(names):
            if n in rows:
                r = rows[n]
                ax.errorbar(r["r"], i + offset, xerr=[[r["r"] - r["low"]], [r["high"] - r["r"]]], fmt="o",
                            color=color, capsize=3, label=label if not ax.get_legend_handles_labels()[1].count(label) else None)
    ax.set_xlim(-1.05, 1.05)
    ax.set_title("correlations per model (95 % CI)", fontsize=9)
    for ax in axes:
        ax.set_yticks(y, names, fontsize=8)
        ax.set_ylim(-0.7, len(names) - 0.3)
        ax.invert_yaxis()
        ax.legend(fontsize=7, loc="best")
        ax.tick_params(labelsize=7)
    return _save(fig, path)


def entropy_boxes(run: RunData, path: Path) -> Path | None:
    groups, labels = [], []
    for md in run.models:
        if md.scan is None:
            continue
        ok = np.isfinite(md.scan["gap"]) & np.isfinite(md.scan["entropy"])
        g, e = md.scan["gap"][ok], md.scan["entropy"][ok]
        for name, mask in (("unstable", g <= UNSTABLE_GAP), ("stable", g > UNSTABLE_GAP)):
            groups.append(e[mask])
            labels.append(f"{md.name}\n{name} (n={int(mask.sum())})")
    if not groups:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(groups)), 3.6))
    box = ax.boxplot([g if g.size else [np.nan] for g in groups], patch_artist=True)
    ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=7)
    for patch, label in zip(box["boxes"], labels):
        patch.set_facecolor("#f4a3a3" if "unstable" in label else "#a3c4f4")
    ax.set_ylabel("spectral entropy (nats)", fontsize=8)
    ax.set_title(f"spectral entropy of unstable (gap <= {UNSTABLE_GAP:g}) vs stable heads", fontsize=9)
    return _save(fig, path)


def scaling_plot(a: Analysis, path: Path) -> Path | None:
    """Rows: quantities with a fit; columns: predictors; points, power law and log-linear fit."""
    from analysis.scaling import PREDICTORS, Fit, predictor_value

    if not a.scaling_rows:
        return None
    quantities = [q for q, v in a.quantities.items() if len(v) >= 2]
    plt = _plt()
    from matplotlib.ticker import NullFormatter, NullLocator

    fig, axes = plt.subplots(len(quantities), len(PREDICTORS), figsize=(2.7 * len(PREDICTORS), 2.1 * len(quantities)),
                             squeeze=False)
    facts = {m["model"]: m for m in a.scaling_models}
    fits = {(r["quantity"], r["predictor"], r["kind"]): r for r in a.scaling_rows}
    for i, q in enumerate(quantities):
        names = list(a.quantities[q])
        yv = np.array([a.quantities[q][n] for n in names])
        for j, p in enumerate(PREDICTORS):
            ax = axes[i][j]
            xv = np.array([predictor_value(facts[n], p) for n in names])
            ax.scatter(xv, yv, color="k", s=16, zorder=3)
            grid = np.geomspace(xv.min(), xv.max(), 50) if xv.min() < xv.max() else xv
            for kind, style, color in (("power", "-", "tab:blue"), ("log_linear", "--", "tab:orange")):
                r = fits.get((q, p, kind))
                if r and np.isfinite(r["a"]) and np.isfinite(r["b"]):
                    f = Fit(kind, r["a"], 0, 0, r["b"], 0, 0, 0, 0, 0, 0)
                    ax.plot(grid, f.predict(grid), style, color=color, lw=1, label=f"{kind} R²={r['r2']:.2f}")
            ax.set_xscale("log")
            ticks = np.unique(xv)
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks], rotation=30, fontsize=6)
            ax.tick_params(labelsize=6)
            if i == 0:
                ax.set_title(p, fontsize=8)
            if j == 0:
                ax.set_ylabel("\n".join(_wrap(q, 22)), fontsize=7)
            ax.legend(fontsize=5.5, loc="best")
    return _save(fig, path)


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)


def figures(run: RunData, a: Analysis, out: Path) -> dict[str, Path | dict[str, Path] | None]:
    """Write every PNG into ``out``; None where a figure has no data."""
    return {"landscape": landscape(run, out),
            "importance": importance_scatter(run, a, out / "gap_vs_importance.png"),
            "steering": steering_by_layer(run, a, out / "steering_by_layer.png"),
            "generalization": generalization(run, a, out / "generalization.png"),
            "scaling": scaling_plot(a, out / "scaling.png"),
            "entropy": entropy_boxes(run, out / "entropy_by_stability.png")}


# --- HTML ------------------------------------------------------------------------------

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1200px;padding:1em 1.5em;color:#222}
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


def _table(headers: list[str], rows: list[list], numeric: set[int] = frozenset(), classes: dict[int, int] | None = None) -> str:
    """HTML table; cells are escaped; column ``k`` in ``classes`` takes its class from column ``classes[k]``."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for k, cell in enumerate(row):
            cls = [c for c in (("num" if k in numeric else ""), (str(row[classes[k]]) if classes and k in classes else "")) if c]
            cells.append(f"<td class=\"{' '.join(cls)}\">{_e(cell)}</td>" if cls else f"<td>{_e(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


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


def _verdicts(a: Analysis) -> str:
    rows = [[r["model"], r["metric"], _num(r["value"]), _ci(r["low"], r["high"]), _num(r["target"]), r["verdict"], r["note"]]
            for r in a.verdicts]
    rules = "".join(f"<li><b>{_e(k)}</b>: {_e(v)}</li>" for k, v in VERDICT_RULES.items())
    return (_table(["model", "metric", "value", "95 % interval", "target", "verdict", "note"], rows, {2, 3, 4}, {5: 5})
            + f"<h3>Verdict rules</h3><ul class=\"note\">{rules}</ul>")


def _calibration(a: Analysis) -> str:
    rows = [[r["model"], r["target"], _num(r["threshold"]), _ci(r["threshold_low"], r["threshold_high"]),
             _num(r["auroc"]), _ci(r["auroc_low"], r["auroc_high"]), _num(r["youden_j"]), _num(r["j_at_reference"]),
             f"{r['n']} ({r['n_positive']} +)", r["n_dropped"], r["reason"]] for r in a.calibration_rows]
    return (f"<p class=\"note\">Rule: a unit is predicted positive iff gap &lt;= t; t maximises Youden J "
            f"(TPR − FPR); intervals: stratified bootstrap 95 %. Important head: {_e(IMPORTANCE_RULE)}. "
            f"Steerable layer (by its min gap): {_e(STEERABLE_RULE)}.</p>"
            + _table(["model", "positives", "threshold", "95 % CI", "AUROC", "95 % CI", "J", f"J at {UNSTABLE_GAP:g}",
                      "n", "dropped", "note"], rows, {2, 3, 4, 5, 6, 7, 9}))


def _generalization(a: Analysis) -> str:
    rows = [[w, s["n"], _num(s["mean"]), _num(s["sd"]), _num(s["min"]), _num(s["max"]), _num(s["range"])]
            for w, s in (("important heads", a.spread["heads"]), ("steerable layers", a.spread["layers"]))]
    het = [[w, _num(h.pooled), _ci(h.pooled_low, h.pooled_high), _num(h.q), h.df, _num(h.p_value), _num(h.i2),
            f"{h.n_positive} of {h.n_models}", h.reason]
           for w, h in (("r(importance, 1/gap)", a.heterogeneity["importance"]),
                        ("r(layer min gap, steering effect)", a.heterogeneity["steering"]))]
    return ("<h3>Spread of the calibrated thresholds</h3>"
            + _table(["threshold of", "models", "mean", "σ", "min", "max", "range"], rows, {1, 2, 3, 4, 5, 6})
            + "<h3>Consistency of the correlations (Cochran's Q, Fisher z)</h3>"
            + _table(["correlation", "pooled r", "95 % CI", "Q", "df", "p", "I²", "r > 0", "note"], het, {1, 2, 3, 4, 5, 6}))


def _scaling(a: Analysis) -> str:
    if not a.scaling_rows:
        return f"<p class=\"warn\">No scaling fit: {_e(a.scaling_reason)}.</p>"
    def table(rows: list[dict]) -> str:
        cells = [[r["quantity"], r["predictor"], r["kind"], _num(r["a"]), _ci(r["a_low"], r["a_high"]), _num(r["b"]),
                  _ci(r["b_low"], r["b_high"]), _num(r["r2"]), r["n"], _num(r["loo_predicted"]),
                  _num(r["loo_observed"]), _num(r["loo_rel_error"]), r["reason"]] for r in rows]
        for prev, row in zip(cells[::-1][1:], cells[::-1]):  # show each quantity once
            if row[0] == prev[0]:
                row[0] = ""
        return _table(["quantity", "predictor", "form", "a", "a 95 % CI", "b", "b 95 % CI", "R²", "n",
                       "LOO predicted", "LOO observed", "LOO rel. error", "note"], cells, {3, 4, 5, 6, 7, 8, 9, 10, 11})

    main = [r for r in a.scaling_rows if r["predictor"] == "parameters"]
    return ("<p class=\"note\">power: y = a·x^b; log_linear: y = a + b·log10 x; 95 % t-intervals; R² on y; "
            "LOO: fitted without the largest model, predicted there. With a handful of models these fits are "
            "descriptive.</p><h3>Against parameters</h3>" + table(main)
            + f"<details><summary>All {len(a.scaling_rows)} fits (parameters, total heads, d_model, d_head)</summary>"
            + table(a.scaling_rows) + "</details>")


def _information(a: Analysis) -> str:
    rows = [[r["model"], r["measure"], _num(r["value"]), _ci(r["low"], r["high"]), _num(r["null_mean"]),
             _num(r["corrected"]), _num(r["p_value"]), r["n"], r["n_dropped"],
             f"{_num(r['unstable_median'])} / {_num(r['stable_median'])}" if r["unstable_n"] + r["stable_n"] else "",
             r["reason"]] for r in a.information_rows]
    return ("<p class=\"note\">MI: Kraskov kNN estimate (k = 3, nats) with a permutation null (y shuffled); "
            "corrected = estimate − null mean; p: one-sided permutation p-value. Entropy: difference of medians "
            "(bootstrap 95 % CI), two-sided Mann-Whitney p.</p>"
            + _table(["model", "measure", "value", "95 % CI", "null mean", "corrected", "p", "n", "dropped",
                      "median unstable / stable", "note"], rows, {2, 3, 4, 5, 6, 7, 8}))


def _data(run: RunData) -> str:
    models = [[md.name, *(md.facts.get(k, "–") if md.facts else "–" for k in ("family", "parameters", "layers", "heads",
              "d_model", "d_head")), ", ".join(sorted(md.units)) or "none"] for md in run.models]
    excluded = [[md.name, k, v] for md in run.models for k, v in md.excluded.items()]
    missing = "".join(f"<li>{_e(m)}</li>" for m in run.missing) or "<li>nothing</li>"
    found = "".join(f"<li>{_e(f)}</li>" for f in run.found) or "<li>no finished unit</li>"
    return (_table(["model", "family", "parameters", "layers", "heads/layer", "d_model", "d_head", "finished experiments"],
                   models, {2, 3, 4, 5, 6})
            + f"<h3>Experiments found</h3><ul class=\"note\">{found}</ul>"
            + f"<h3>Missing</h3><ul>{missing}</ul>"
            + "<h3>Non-finite values excluded (counted, never silently dropped)</h3>"
            + _table(["model", "quantity", "excluded"], excluded, {2}))


SECTIONS = (("verdicts", "Verdicts"), ("landscape", "Gap landscape"), ("importance", "Gap vs importance"),
            ("steering", "Steering by layer"), ("calibration", "Threshold calibration"),
            ("generalization", "Generalization across models"), ("scaling", "Scaling laws"),
            ("information", "Information measures"), ("data", "Data"))


def render(run: RunData, a: Analysis, figs: dict) -> str:
    """The whole page as one string."""
    land = figs["landscape"] or {}
    body = {
        "verdicts": _verdicts(a),
        "landscape": "<div class=\"grid\">" + "".join(_img(p, f"gap landscape {m}", scale=LANDSCAPE_SCALE) for m, p in land.items())
                     + "</div>" if land else "<p class=\"note\">No scan in this run.</p>",
        "importance": _img(figs["importance"], "gap vs importance",
                           f"red: important heads; dashed: {UNSTABLE_GAP:g}; green: calibrated threshold with 95 % CI"),
        "steering": _img(figs["steering"], "steering by layer",
                         f"effect at the matched KL budget with 95 % CI; red: the layer's min gap (dotted: {UNSTABLE_GAP:g})"),
        "calibration": _calibration(a),
        "generalization": _generalization(a) + _img(figs["generalization"], "generalization"),
        "scaling": _scaling(a) + _img(figs["scaling"], "scaling fits",
                                       "solid: power law, dashed: log-linear; log x-axis"),
        "information": _information(a) + _img(figs["entropy"], "entropy by stability"),
        "data": _data(run),
    }
    nav = "".join(f"<a href=\"#{k}\">{_e(t)}</a>" for k, t in SECTIONS)
    warn = (f"<p class=\"warn\">Missing: {_e('; '.join(run.missing))}</p>" if run.missing else "")
    sections = "".join(f"<section id=\"{k}\"><h2>{_e(t)}</h2>{body[k]}</section>" for k, t in SECTIONS)
    title = f"eigengap report: {run.run_id}"
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{_e(title)}</h1>"
            f"<p class=\"note\">{_e(len(run.models))} model(s): {_e(', '.join(md.name for md in run.models))}. "
            f"Unstable: gap &lt;= {UNSTABLE_GAP:g}. Intervals are 95 %.</p>{warn}<nav>{nav}</nav>{sections}</body></html>")
