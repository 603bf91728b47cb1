"""The cross-model report's figures (matplotlib, Agg, imported lazily): gap landscapes, gap vs
importance, steering by layer, generalization, entropy by stability, scaling fits."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa

from analysis.calibration import important
from analysis.crossmodel import SCALING_QUANTITIES, Analysis, RunData, finite_heads, finite_layers
from analysis.render.plots import pyplot as _plt
from analysis.render.plots import save
from spectral.kernels.metrics import UNSTABLE_GAP

PANEL_COLUMNS = 4
"""Models per row of a multi-panel figure."""
LANDSCAPE_SCALE = 0.6
"""Gap heatmaps are shown at this fraction of their pixel width."""


# --- figures ---------------------------------------------------------------------------

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
    return save(fig, path, dpi=110)


SEED_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def _seed_label(md) -> str:
    return f"seed {md.seed}" if md.seed is not None else md.name


def landscape(run: RunData, out: Path) -> dict[str, Path]:
    """One layer x head gap heatmap per population: its first seed with a scan."""
    from analysis.render.plots import gap_heatmap

    paths = {}
    for i, pop in enumerate(run.populations):
        md = next((m for m in pop.members if m.scan is not None), None)
        if md is None:
            continue
        table = pa.table({"layer": md.scan["layer"].astype(int), "head": md.scan["head"].astype(int), "gap": md.scan["gap"]})
        title = md.name + (f" ({_seed_label(md)} of {len(pop.members)} seeds)" if len(pop.members) > 1 else "")
        paths[pop.name] = gap_heatmap(table, out / f"gap_landscape_{i}.png", title=title)
    return paths


def importance_scatter(run: RunData, a: Analysis, path: Path) -> Path | None:
    """Per population: every seed's heads (gap vs restoration), important heads filled; the
    population's mean head threshold with its across-seed interval."""
    pops = [p for p in run.populations if any(finite_heads(md) is not None for md in p.members)]
    if not pops:
        return None
    fig, axes = _panels(len(pops))
    for ax, pop in zip(axes, pops):
        for j, md in enumerate(m for m in pop.members if finite_heads(m) is not None):
            h = finite_heads(md)
            imp = important(h["restoration"])
            color = SEED_COLORS[j % len(SEED_COLORS)]
            ax.scatter(h["gap"][~imp], h["restoration"][~imp], s=12, facecolors="none", edgecolors=color, alpha=0.7,
                       label="other heads (open)" if j == 0 else None)
            ax.scatter(h["gap"][imp], h["restoration"][imp], s=16, c=color, label=_seed_label(md) + " (filled: important)")
        ax.axvline(UNSTABLE_GAP, color="k", ls="--", lw=1, label=f"{UNSTABLE_GAP:g}")
        e = a.results[pop.name].estimates.get("threshold_heads") if pop.name in a.results else None
        if e is not None and np.isfinite(e.value):
            ax.axvline(e.value, color="tab:red", lw=1.5, label="mean threshold (95 % CI)")
            if np.isfinite(e.low):
                ax.axvspan(e.low, e.high, color="tab:red", alpha=0.12)
        ax.set_title(f"{pop.name} ({len(pop.members)} seed{'s' if len(pop.members) != 1 else ''})", fontsize=9)
        ax.set_xlabel("gap", fontsize=8)
        ax.set_ylabel("importance (restoration)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def steering_by_layer(run: RunData, a: Analysis, path: Path) -> Path | None:
    """Per population: each seed's steering effect per layer (95 % CI over prompts) and its
    layers' min gap on a second axis."""
    pops = [p for p in run.populations if any(finite_layers(md) is not None for md in p.members)]
    if not pops:
        return None
    fig, axes = _panels(len(pops))
    twins = []
    for ax, pop in zip(axes, pops):
        ax2 = ax.twinx()
        twins.append(ax2)
        members = [md for md in pop.members if finite_layers(md) is not None]
        for j, md in enumerate(members):
            l = finite_layers(md)
            color = SEED_COLORS[j % len(SEED_COLORS)]
            dx = (j - (len(members) - 1) / 2) * 0.08
            err = [l["effect"] - l["effect_low"], l["effect_high"] - l["effect"]]
            ax.errorbar(l["layer"] + dx, l["effect"], yerr=err, fmt="o", color=color, capsize=2, ms=3,
                        label=f"effect, {_seed_label(md)}")
            ax2.plot(l["layer"] + dx, l["min_gap"], "s:", color=color, ms=3, alpha=0.6)
        ax2.axhline(UNSTABLE_GAP, color="k", lw=0.8, ls=":")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("layer", fontsize=8)
        ax.set_ylabel("steering effect (dots)", fontsize=8)
        ax2.set_ylabel(f"min gap of the layer (squares; dotted {UNSTABLE_GAP:g})", fontsize=7)
        for axis in (ax, ax2):
            axis.tick_params(labelsize=7)
        ax.set_title(f"{pop.name} ({len(members)} seed{'s' if len(members) != 1 else ''})", fontsize=9)
        ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def generalization(run: RunData, a: Analysis, path: Path) -> Path | None:
    """Forest plots per population: mean thresholds with across-seed intervals vs the 0.77 ±
    0.05 band, and mean correlations; each seed's value as a small dot."""
    names = [p.name for p in run.populations]
    if not names:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.55 * len(names) + 1.8))
    y = np.arange(len(names))
    ax = axes[0]
    ax.axvspan(UNSTABLE_GAP - 0.05, UNSTABLE_GAP + 0.05, color="grey", alpha=0.2, label=f"{UNSTABLE_GAP:g} ± 0.05")

    def forest(ax, i, e, offset, color, label):
        if e is None or not np.isfinite(e.value):
            return
        lo, hi = (e.low, e.high) if np.isfinite(e.low) else (e.value, e.value)
        ax.errorbar(e.value, i + offset, xerr=[[e.value - lo], [hi - e.value]], fmt="o", color=color, capsize=3,
                    label=label if label not in ax.get_legend_handles_labels()[1] else None)
        seeds = np.array(e.per_seed, dtype=float)
        ax.scatter(seeds, np.full(seeds.size, i + offset + 0.08), s=7, color=color, alpha=0.5)

    for i, n in enumerate(names):
        est = a.results[n].estimates
        forest(ax, i, est.get("threshold_heads"), -0.15, "tab:red", "important heads")
        forest(ax, i, est.get("threshold_layers"), 0.15, "tab:blue", "steerable layers")
    ax.set_title("mean thresholds over seeds (95 % CI; dots: seeds)", fontsize=9)
    ax.set_xlabel("gap", fontsize=8)
    ax = axes[1]
    ax.axvline(0, color="grey", lw=0.8)
    for offset, which, color, label in ((-0.15, "importance", "tab:red", "r(importance, 1/gap)"),
                                        (0.15, "steering", "tab:blue", "r(layer min gap, effect)")):
        rows = {r["population"]: r for r in a.correlations if r["correlation"] == which}
        for i, n in enumerate(names):
            if n in rows and np.isfinite(rows[n]["r"]):
                r = rows[n]
                lo, hi = (r["low"], r["high"]) if np.isfinite(r["low"]) else (r["r"], r["r"])
                ax.errorbar(r["r"], i + offset, xerr=[[r["r"] - lo], [hi - r["r"]]], fmt="o", color=color, capsize=3,
                            label=label if label not in ax.get_legend_handles_labels()[1] else None)
                seeds = np.array(r["per_seed_r"], dtype=float)
                ax.scatter(seeds, np.full(seeds.size, i + offset + 0.08), s=7, color=color, alpha=0.5)
    ax.set_xlim(-1.05, 1.05)
    ax.set_title("mean correlations over seeds (95 % CI; dots: seeds)", fontsize=9)
    for ax in axes:
        ax.set_yticks(y, names, fontsize=8)
        ax.set_ylim(-0.7, len(names) - 0.3)
        ax.invert_yaxis()
        if ax.get_legend_handles_labels()[0]:  # a run without steering (or thresholds) has nothing to label
            ax.legend(fontsize=7, loc="best")
        ax.tick_params(labelsize=7)
    return _save(fig, path)


def entropy_boxes(run: RunData, path: Path) -> Path | None:
    """Spectral entropy of unstable vs stable heads, per population (all its seeds' heads)."""
    groups, labels = [], []
    for pop in run.populations:
        g_all, e_all = [], []
        for md in pop.members:
            if md.scan is None:
                continue
            ok = np.isfinite(md.scan["gap"]) & np.isfinite(md.scan["entropy"])
            g_all.append(md.scan["gap"][ok])
            e_all.append(md.scan["entropy"][ok])
        if not g_all:
            continue
        g, e = np.concatenate(g_all), np.concatenate(e_all)
        for name, mask in (("unstable", g <= UNSTABLE_GAP), ("stable", g > UNSTABLE_GAP)):
            groups.append(e[mask])
            labels.append(f"{pop.name}\n{name} (n={int(mask.sum())})")
    if not groups:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(groups)), 3.6))
    box = ax.boxplot([g if g.size else [np.nan] for g in groups], patch_artist=True)
    ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=7)
    for patch, label in zip(box["boxes"], labels):
        patch.set_facecolor("#f4a3a3" if "unstable" in label else "#a3c4f4")
    ax.set_ylabel("spectral entropy (nats)", fontsize=8)
    ax.set_title(f"spectral entropy of unstable (gap <= {UNSTABLE_GAP:g}) vs stable heads (all seeds)", fontsize=9)
    return _save(fig, path)


def scaling_plot(a: Analysis, path: Path) -> Path | None:
    """Rows: quantities with a fit; columns: predictors; population means, power law and
    log-linear fit (exploratory)."""
    from analysis.scaling import PREDICTORS, Fit, predictor_value

    if not a.scaling_rows:
        return None
    quantities = [q for q, v in a.quantities.items() if len(v) >= 2]
    if not quantities:
        return None
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
                ax.set_ylabel("\n".join(_wrap(SCALING_QUANTITIES[q], 22)), fontsize=7)
            if ax.get_legend_handles_labels()[1]:
                ax.legend(fontsize=5.5, loc="best")
    fig.suptitle("exploratory: population means (over seeds) against size", fontsize=9)
    fig.tight_layout()
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
