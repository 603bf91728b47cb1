"""Plots of generation dynamics (``eigengap dynamics generate``): each head's key-kernel gap over
the generation steps, and a step x head heatmap, with the gap's change-points marked."""

from __future__ import annotations

import textwrap
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa

from analysis.render.plots import pyplot, save


def step_grid(table: pa.Table, column: str = "gap") -> tuple[np.ndarray, list[tuple[int, int]], np.ndarray]:
    """``column`` of the trajectories as (prompt, head, step) with NaN where a prompt had stopped,
    the (layer, head) of each head index (sorted), and the step numbers."""
    prompt, layer, head, step = (table[c].to_numpy() for c in ("prompt", "layer", "head", "step"))
    value = table[column].to_numpy(zero_copy_only=False).astype(float)
    heads = sorted(set(zip(layer.tolist(), head.tolist())))
    where = {lh: i for i, lh in enumerate(heads)}
    prompts = np.unique(prompt)
    p_idx = np.searchsorted(prompts, prompt)
    h_idx = np.array([where[lh] for lh in zip(layer.tolist(), head.tolist())], dtype=np.int64)
    steps = np.arange(int(step.max()) + 1 if len(step) else 0)
    grid = np.full((len(prompts), len(heads), len(steps)), np.nan)
    grid[p_idx, h_idx, step] = value
    return grid, heads, steps


def change_counts(rows: list[dict], heads: list[tuple[int, int]], n_steps: int) -> np.ndarray:
    """(head, step): how many prompts' gap series have a change-point at that step."""
    where = {lh: i for i, lh in enumerate(heads)}
    counts = np.zeros((len(heads), n_steps), dtype=np.int64)
    for r in rows:
        if r.get("change_steps"):
            for s in r["change_steps"].split(","):
                counts[where[(r["layer"], r["head"])], int(s)] += 1
    return counts


def _mean(grid: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():  # all-NaN columns (every prompt stopped) stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(grid, axis=0)


def gap_trajectories(table: pa.Table, rows: list[dict], path: str | Path, title: str = "") -> Path:
    """One panel per layer: each head's gap over the steps, the mean over prompts (line) with the
    10-90 % band across prompts (one prompt: its line alone); change-points (any prompt's) marked
    on the mean line, marker size growing with the number of prompts that have one there."""
    plt = pyplot()
    grid, heads, steps = step_grid(table)
    counts = change_counts(rows, heads, len(steps))
    layers = sorted({l for l, _ in heads})
    cols = min(3, len(layers))
    nrows = -(-len(layers) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False, sharex=True)
    mean = _mean(grid)
    with warnings.catch_warnings():  # all-NaN columns (every prompt stopped) stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanquantile(grid, 0.1, axis=0), np.nanquantile(grid, 0.9, axis=0)
    cmap = plt.get_cmap("tab20")
    for ax, layer in zip(axes.ravel(), layers):
        for i, (l, h) in enumerate(heads):
            if l != layer:
                continue
            color = cmap(h % 20)
            ax.plot(steps, mean[i], color=color, lw=1.0, label=f"h{h}")
            if grid.shape[0] > 1:
                ax.fill_between(steps, low[i], high[i], color=color, alpha=0.12, lw=0)
            marked = counts[i] > 0
            if marked.any():
                ax.scatter(steps[marked], mean[i][marked], s=8 + 40 * counts[i][marked] / grid.shape[0], color=color,
                           marker="v", edgecolor="k", linewidth=0.4, zorder=3)
        ax.set_title(f"layer {layer}", fontsize=8)
        ax.set_ylabel("gap")
        ax.tick_params(labelsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("generation step")
    for ax in axes.ravel()[len(layers):]:
        ax.axis("off")
    if len({h for _, h in heads}) <= 16:
        axes.ravel()[0].legend(fontsize=6, ncol=2, frameon=False)
    band = "mean over prompts, 10-90 % band" if grid.shape[0] > 1 else "one prompt"
    fig.suptitle("\n".join(textwrap.wrap(f"{title}: key-kernel gap per head over generation ({band}; "
                                         "triangles: change-points)", 90)), fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def gap_steps_heatmap(table: pa.Table, rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Step (x) x head (y, layer-major) heatmap of the gap's mean over prompts; a dot where at
    least one prompt's gap series has a change-point."""
    plt = pyplot()
    grid, heads, steps = step_grid(table)
    counts = change_counts(rows, heads, len(steps))
    mean = _mean(grid)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.08 * len(steps) + 2.5), max(3.0, 0.09 * len(heads) + 1.5)))
    im = ax.imshow(mean, aspect="auto", cmap="viridis", interpolation="nearest")
    ys, xs = np.nonzero(counts)
    if len(xs):
        ax.scatter(steps[xs], ys, s=6 + 24 * counts[ys, xs] / grid.shape[0], c="red", marker="o", linewidths=0)
    boundaries = [i - 0.5 for i in range(1, len(heads)) if heads[i][0] != heads[i - 1][0]]
    for y in boundaries:
        ax.axhline(y, color="w", lw=0.5)
    ticks = [i for i in range(len(heads)) if i == 0 or heads[i][0] != heads[i - 1][0]]
    ax.set_yticks(ticks, [f"L{heads[i][0]}" for i in ticks], fontsize=7)
    ax.set_xlabel("generation step")
    ax.set_ylabel("head (layer-major)")
    ax.set_title("\n".join(textwrap.wrap(f"{title}: mean gap over prompts (red: change-points)", 70)), fontsize=8)
    fig.colorbar(im, ax=ax, label="gap")
    fig.tight_layout()
    return save(fig, path)
