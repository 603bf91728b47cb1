"""Plots of results tables (matplotlib, headless)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa

from spectral.kernels.metrics import UNSTABLE_GAP


def pyplot():
    """matplotlib's pyplot on the headless Agg backend, imported on first use (jobs that do not
    plot do not pay for it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def layer_head_grid(table: pa.Table, column: str) -> tuple[np.ndarray, list[int], list[int]]:
    """(layers, heads) array of ``column`` with NaN where a head has no row."""
    layer, head = table["layer"].to_numpy(), table["head"].to_numpy()
    values = table[column].to_numpy(zero_copy_only=False).astype(float)
    layers, heads = sorted(set(layer.tolist())), sorted(set(head.tolist()))
    grid = np.full((len(layers), len(heads)), np.nan)
    li = {l: i for i, l in enumerate(layers)}
    hi = {h: i for i, h in enumerate(heads)}
    for l, h, v in zip(layer, head, values):
        grid[li[l], hi[h]] = v
    return grid, layers, heads


def gap_heatmap(table: pa.Table, path: str | Path, title: str = "", threshold: float = UNSTABLE_GAP) -> Path:
    """Layer x head heatmap of gaps; heads at or below ``threshold`` are outlined."""
    plt = pyplot()
    grid, layers, heads = layer_head_grid(table, "gap")
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * len(heads) + 2), max(3, 0.35 * len(layers) + 1.5)))
    im = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
    for (i, j), g in np.ndenumerate(grid):
        if np.isfinite(g) and g <= threshold:
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.5))
    ax.set_xticks(range(len(heads)), heads)
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    label = f"{title}\n" if title else ""
    ax.set_title("\n".join(textwrap.wrap(label + f"eigenvalue gap (red: gap <= {threshold:g})", 60)), fontsize=8)
    fig.colorbar(im, ax=ax, label="gap")
    fig.tight_layout()
    return save(fig, path)


def save(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG atomically (a reader never sees half a file) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    pyplot().close(fig)
    tmp.replace(path)
    return path


def gap_importance_scatter(heads: pa.Table, path: str | Path, title: str = "", threshold: float = UNSTABLE_GAP) -> Path:
    """Gap (x) vs importance (y: the measured restoration), one point per head, coloured by layer."""
    plt = pyplot()
    gap, imp = heads["gap"].to_numpy(), heads["restoration"].to_numpy()
    layer = heads["layer"].to_numpy()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    sc = ax.scatter(gap, imp, c=layer, cmap="viridis", s=28, edgecolor="k", linewidth=0.3)
    ax.axvline(threshold, color="red", ls="--", lw=1, label=f"gap = {threshold:g}")
    ax.set_xlabel("eigenvalue gap (key kernel)")
    ax.set_ylabel("importance (restoration)")
    ax.set_title("\n".join(textwrap.wrap(title or "gap vs importance", 60)), fontsize=8)
    ax.legend(fontsize=7)
    fig.colorbar(sc, ax=ax, label="layer")
    fig.tight_layout()
    return save(fig, path)


def gap_importance_heatmaps(heads: pa.Table, path: str | Path, title: str = "") -> Path:
    """Layer x head heatmaps of gap and of importance (the measured restoration), side by side."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, column, cmap in zip(axes, ("gap", "restoration"), ("viridis", "magma")):
        grid, layers, head_ids = layer_head_grid(heads, column)
        im = ax.imshow(grid, cmap=cmap, aspect="auto", origin="lower")
        ax.set_xticks(range(len(head_ids)), head_ids)
        ax.set_yticks(range(len(layers)), layers)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(column, fontsize=9)
        fig.colorbar(im, ax=ax)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def effect_by_layer(layers: pa.Table, path: str | Path, title: str = "") -> Path:
    """Steering effect per layer at the matched budget (bars with 95 % intervals), with each
    layer's min gap and mean gap on a second axis."""
    plt = pyplot()
    rows = layers.to_pylist()
    fig, ax = plt.subplots(figsize=(6, 4))
    if rows:
        x = np.array([r["layer"] for r in rows])
        eff = np.array([r["effect"] for r in rows])
        err = np.array([[r["effect"] - r["effect_low"] for r in rows], [r["effect_high"] - r["effect"] for r in rows]])
        ax.bar(x, eff, yerr=err, color="tab:blue", alpha=0.7, capsize=3, label="effect at budget")
        ax2 = ax.twinx()
        ax2.plot(x, [r["min_gap"] for r in rows], "o-", color="tab:red", label="min gap")
        ax2.plot(x, [r["mean_gap"] for r in rows], "s--", color="tab:orange", label="mean gap")
        ax2.set_ylabel("eigenvalue gap")
        ax2.legend(fontsize=7, loc="upper right")
        ax.set_xticks(x)
    ax.set_xlabel("layer")
    ax.set_ylabel("effect: change of log P(target) - log P(opposite)")
    ax.set_title("\n".join(textwrap.wrap(title or "steering effect by layer", 60)), fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def effect_vs_side_effect(strategies: pa.Table, grid: pa.Table, path: str | Path, title: str = "") -> Path:
    """Effect vs KL: every grid point (layer x coefficient) in grey, each strategy at the budget."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    if grid.num_rows:
        ax.scatter(grid["kl"].to_numpy(), grid["effect"].to_numpy(), c="lightgrey", s=14, label="grid (layer x coefficient)")
    for r in strategies.to_pylist():
        ax.errorbar([r["kl"]], [r["effect"]], yerr=[[r["effect"] - r["effect_low"]], [r["effect_high"] - r["effect"]]],
                    fmt="o", capsize=3, label=r["strategy"])
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("side effect: mean KL on neutral prompts (nats)")
    ax.set_ylabel("effect")
    ax.set_title("\n".join(textwrap.wrap(title or "effect vs side effect", 60)), fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, path)


def circuit_landscape(heads: pa.Table, edges: list[tuple[int, int, int, int, str]], path: str | Path,
                      title: str = "", threshold: float = UNSTABLE_GAP) -> Path:
    """The gap landscape (layers x heads) with the circuit drawn over it: circuit heads boxed
    (white), heads at or below ``threshold`` marked (red dot), and each head-to-head edge of the
    circuit an arrow from sender to receiver, labelled by the receiver's input (q, k, v).
    ``edges``: (sender layer, sender head, receiver layer, receiver head, input)."""
    plt = pyplot()
    grid, layers, head_ids = layer_head_grid(heads, "gap")
    fig, ax = plt.subplots(figsize=(max(4.5, 0.55 * len(head_ids) + 2.5), max(3.5, 0.6 * len(layers) + 1.5)))
    im = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
    member = dict(zip(zip(heads["layer"].to_pylist(), heads["head"].to_pylist()), heads["in_circuit"].to_pylist()))
    li, hi = {l: i for i, l in enumerate(layers)}, {h: i for i, h in enumerate(head_ids)}
    for (l, h), inside in member.items():
        g = grid[li[l], hi[h]]
        if inside:
            ax.add_patch(plt.Rectangle((hi[h] - 0.5, li[l] - 0.5), 1, 1, fill=False, edgecolor="white", lw=2))
        if np.isfinite(g) and g <= threshold:
            ax.plot(hi[h], li[l], "o", color="red", ms=3)
    colors = {"q": "tab:orange", "k": "tab:pink", "v": "tab:cyan"}
    for sl, sh, rl, rh, kind in edges:
        ax.annotate("", xy=(hi[rh], li[rl]), xytext=(hi[sh], li[sl]),
                    arrowprops={"arrowstyle": "->", "color": colors.get(kind, "white"), "lw": 1.2, "alpha": 0.9})
    ax.set_xticks(range(len(head_ids)), head_ids)
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    label = f"{title}\n" if title else ""
    ax.set_title("\n".join(textwrap.wrap(label + f"gap; white: circuit heads; red dot: gap <= {threshold:g}; "
                                          "arrows: head -> head edges (orange q, pink k, cyan v)", 70)), fontsize=8)
    fig.colorbar(im, ax=ax, label="gap")
    fig.tight_layout()
    return save(fig, path)


def kernel_gaps(table: pa.Table, path: str | Path, title: str = "", threshold: float = UNSTABLE_GAP) -> Path:
    """Every head's gap under each kernel of ``spectral.features.names.FEATURE_KERNELS`` (one
    column of points per kernel, a box over them); the threshold as a dashed line."""
    from spectral.features.names import FEATURE_KERNELS

    plt = pyplot()
    kernels = list(FEATURE_KERNELS)
    values = [np.asarray(table[f"{k}.gap"].to_numpy(), float) for k in kernels]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.boxplot([v[np.isfinite(v)] for v in values], positions=range(len(kernels)), widths=0.5, showfliers=False)
    rng = np.random.default_rng(0)
    for i, v in enumerate(values):
        v = v[np.isfinite(v)]
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(v)), v, s=8, alpha=0.6)
    ax.axhline(threshold, color="red", ls="--", lw=1)
    ax.set_xticks(range(len(kernels)), kernels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("gap (l1 - l2) / l1")
    label = f"{title}\n" if title else ""
    ax.set_title("\n".join(textwrap.wrap(label + f"every head's gap per kernel (red: {threshold:g})", 80)), fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def feature_forest(rows: list[dict], path: str | Path, title: str = "", top: int = 25) -> Path:
    """Held-out Spearman of each feature with its 95 % interval (``analysis.features`` per-feature
    rows): every baseline and the ``top`` spectral features by |Spearman|; filled markers are
    significant after Holm. Spectral in blue, baselines in orange."""
    plt = pyplot()
    finite = [r for r in rows if np.isfinite(r["spearman"])]
    spectral = sorted((r for r in finite if r["group"] == "spectral"), key=lambda r: -abs(r["spearman"]))[:top]
    chosen = sorted(spectral + [r for r in finite if r["group"] != "spectral"], key=lambda r: r["spearman"])
    fig, ax = plt.subplots(figsize=(7.5, max(2.5, 0.22 * len(chosen) + 1.2)))
    for i, r in enumerate(chosen):
        colour = "tab:blue" if r["group"] == "spectral" else "tab:orange"
        ax.plot([r["spearman_low"], r["spearman_high"]], [i, i], color=colour, lw=1.2)
        ax.scatter([r["spearman"]], [i], color=colour if r["significant"] else "white", edgecolor=colour, zorder=3, s=22)
    ax.axvline(0, color="grey", lw=0.8, ls="--")
    ax.set_yticks(range(len(chosen)), [r["feature"] for r in chosen], fontsize=7)
    ax.set_xlabel("held-out Spearman with the target (95 % interval)")
    if not chosen:
        ax.text(0.5, 0.5, "no feature has a held-out value", ha="center", va="center", transform=ax.transAxes)
    label = f"{title}: " if title else ""
    ax.set_title("\n".join(textwrap.wrap(label + f"baselines (orange) and the {len(spectral)} spectral features with the "
                                         "largest |Spearman| (blue); filled: significant after Holm", 90)), fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def sae_pareto(table: pa.Table, path: str | Path, title: str = "", threshold: float = UNSTABLE_GAP) -> Path:
    """Explained variance against L0 (log2) per head SAE across the run's k, one line per head
    coloured by its key-kernel gap (unstable heads, gap <= threshold, drawn solid, stable dashed);
    layer SAEs in black."""
    plt = pyplot()
    rows = table.to_pylist()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    by_target: dict[str, list[dict]] = {}
    for r in rows:
        by_target.setdefault(r["target"], []).append(r)
    gaps = np.array([r["gap"] for r in rows if r["kind"] == "head"], float)
    finite = gaps[np.isfinite(gaps)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    cmap = plt.get_cmap("viridis")
    for target, group in by_target.items():
        group = sorted(group, key=lambda r: r["l0"])
        x = [r["l0"] for r in group]
        y = [r["explained_variance"] for r in group]
        if group[0]["kind"] == "layer":
            ax.plot(x, y, color="black", lw=1.4, marker="s", ms=3, label="layer SAEs" if target else None)
            continue
        g = group[0]["gap"]
        colour = cmap((g - lo) / (hi - lo)) if np.isfinite(g) and hi > lo else "grey"
        ax.plot(x, y, color=colour, lw=0.9, marker="o", ms=2.5, ls="-" if group[0]["unstable"] else "--", alpha=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("L0 (active features per token)")
    ax.set_ylabel("explained variance (held out)")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(lo, hi))
    fig.colorbar(sm, ax=ax, label="head's key-kernel gap")
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles[:1], labels[:1], fontsize=7, loc="lower right")
    label = f"{title}\n" if title else ""
    ax.set_title("\n".join(textwrap.wrap(label + f"SAE Pareto curves per head (solid: gap <= {threshold:g})", 80)),
                 fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def sae_density(table: pa.Table, path: str | Path, title: str = "") -> Path:
    """Log10 feature-density histograms summed over the unstable and the stable head SAEs (each
    normalised to its features), at each k; dead features as a separate bar at the left."""
    from spectral.saes.metrics import LOG_DENSITY_EDGES

    plt = pyplot()
    rows = [r for r in table.to_pylist() if r["kind"] == "head"]
    ks = sorted({r["k"] for r in rows})
    fig, axes = plt.subplots(1, max(1, len(ks)), figsize=(3.2 * max(1, len(ks)), 3.0), squeeze=False)
    centres = (LOG_DENSITY_EDGES[1:] + LOG_DENSITY_EDGES[:-1]) / 2
    width = LOG_DENSITY_EDGES[1] - LOG_DENSITY_EDGES[0]
    for ax, k in zip(axes[0], ks):
        for unstable, colour in ((True, "tab:red"), (False, "tab:blue")):
            group = [r for r in rows if r["k"] == k and r["unstable"] == unstable]
            if not group:
                continue
            counts = np.sum([r["density_histogram"] for r in group], axis=0).astype(float)
            dead = float(sum(r["dead"] for r in group))
            total = float(sum(r["d_sae"] for r in group))
            ax.bar(centres, counts / total, width=width, alpha=0.5, color=colour,
                   label=f"{'unstable' if unstable else 'stable'} ({len(group)} heads)")
            ax.bar([LOG_DENSITY_EDGES[0] - width], [dead / total], width=width, alpha=0.5, color=colour, hatch="//")
        ax.set_title(f"k = {k}", fontsize=8)
        ax.set_xlabel("log10 feature density (hatched: dead)", fontsize=7)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("fraction of features")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def sae_stable_unstable(table: pa.Table, path: str | Path, title: str = "",
                        metrics: tuple[str, ...] = ("superposition_index", "l0", "fvu", "ce_score"), *,
                        k: int) -> Path:
    """Per metric, the head SAEs' values at ``k`` (the comparison's, ``jobs.saes.verdict_k``) of
    unstable and stable heads side by side, each point a head."""
    plt = pyplot()
    rows = [r for r in table.to_pylist() if r["kind"] == "head" and r["k"] == k]
    fig, axes = plt.subplots(1, len(metrics), figsize=(1.9 * len(metrics), 3.0), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, m in zip(axes[0], metrics):
        for i, unstable in enumerate((True, False)):
            v = np.array([r[m] for r in rows if r["unstable"] == unstable], float)
            v = v[np.isfinite(v)]
            ax.scatter(i + rng.uniform(-0.15, 0.15, v.size), v, s=8, alpha=0.7,
                       color="tab:red" if unstable else "tab:blue")
            if v.size:
                ax.hlines(np.median(v), i - 0.3, i + 0.3, color="black", lw=1.2)
        ax.set_xticks([0, 1], ["unstable", "stable"], fontsize=7)
        ax.set_title(m, fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle("\n".join(textwrap.wrap((f"{title}: " if title else "") + f"head SAEs at k = {k} "
                                         "(black: median)", 90)), fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def sae_differences(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Per population and metric, the across-seed mean of the unstable - stable median difference
    with its 95 % interval (``analysis.saes.population_rows``), at 0.77 (filled) and at the
    calibrated threshold (open); one panel per metric (the metrics have different units)."""
    plt = pyplot()
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(2.2 * max(1, len(metrics)), 3.2), squeeze=False)
    pops = sorted({r["population"] for r in rows})
    for ax, m in zip(axes[0], metrics):
        for r in (r for r in rows if r["metric"] == m):
            y = pops.index(r["population"]) + (0.15 if r["threshold_kind"] == "calibrated" else -0.15)
            if np.isfinite(r["difference"]):
                ax.plot([r["difference_low"], r["difference_high"]], [y, y], color="black", lw=1)
                ax.scatter([r["difference"]], [y], s=18, zorder=3, edgecolor="black",
                           color="black" if r["threshold_kind"] == "reference" else "white")
        ax.axvline(0, color="grey", ls="--", lw=0.8)
        ax.set_yticks(range(len(pops)), pops, fontsize=6)
        ax.set_title(m, fontsize=7)
        ax.tick_params(axis="x", labelsize=6)
    fig.suptitle("\n".join(textwrap.wrap((f"{title}: " if title else "") + "unstable - stable median difference over "
                                         "seeds (95 %; filled: gap <= 0.77, open: calibrated)", 110)), fontsize=8)
    fig.tight_layout()
    return save(fig, path)
