"""Plots of the training-dynamics tables (``eigengap dynamics train``): one row of panels per
training seed, x = log10(1 + step).

- ``icl_series``: the ICL score (left axis) and the training loss (right axis) over training, each
  series' change-points marked (ICL: solid, loss: dotted vertical lines).
- ``gap_series``: every head's key-kernel gap over training, each head's first change-point as a
  dot on its line and its late change-point (after the training loss's first, before the ICL
  score's first) as a cross, the ICL score's first change-point as a vertical line and the training
  loss's first as a dotted one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from analysis.render.plots import pyplot, save

ICL = "icl_score"
LOSS = "train_loss"


def _seeds(rows: Sequence[Mapping]) -> list[tuple]:
    return list(dict.fromkeys((r["population"], r["seed"], r["model"]) for r in rows))


def _row(changepoints: Sequence[Mapping], key: tuple, series: str, layer: int = -1, head: int = -1) -> Mapping:
    for r in changepoints:
        if (r["population"], r["seed"], r["model"], r["series"], r["layer"], r["head"]) == (*key, series, layer, head):
            return r
    return {}


def _changes(changepoints: Sequence[Mapping], key: tuple, series: str, layer: int = -1, head: int = -1) -> list[float]:
    r = _row(changepoints, key, series, layer, head)
    return json.loads(r["log_steps"]) if r else []


def icl_series(rows: Sequence[Mapping], changepoints: Sequence[Mapping], path: str | Path) -> Path:
    """Per seed: ICL score and training loss over log-step, change-points marked."""
    plt = pyplot()
    keys = _seeds(rows)
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.6 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        mine = sorted((r for r in rows if (r["population"], r["seed"], r["model"]) == key), key=lambda r: r["step"])
        x = np.array([r["log_step"] for r in mine])
        ax.plot(x, [r["icl_score"] for r in mine], "o-", ms=3, color="C0", label="ICL score")
        for c in _changes(changepoints, key, ICL):
            ax.axvline(c, color="C0", lw=1)
        ax.set_ylabel("ICL score (nats)", color="C0")
        loss = np.array([r["train_loss"] for r in mine], float)
        if np.isfinite(loss).any():
            twin = ax.twinx()
            twin.plot(x, loss, "s-", ms=2, color="C1", label="training loss")
            for c in _changes(changepoints, key, "train_loss"):
                twin.axvline(c, color="C1", lw=1, ls=":")
            twin.set_ylabel("training loss", color="C1")
        ax.set_title(f"{key[2]}: ICL score (lines: its change-points) and training loss (dotted)", fontsize=9)
        ax.set_xlabel("log10(1 + step)")
    fig.tight_layout()
    return save(fig, path)


def gap_series(heads: Sequence[Mapping], changepoints: Sequence[Mapping], path: str | Path,
               metric: str = "gap") -> Path:
    """Per seed: every head's ``metric`` over log-step, its first change-point a dot, its late
    change-point a cross, the ICL score's first change-point a vertical line, the loss's dotted."""
    plt = pyplot()
    keys = _seeds(heads)
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.8 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        mine = [h for h in heads if (h["population"], h["seed"], h["model"]) == key]
        pairs = sorted({(h["layer"], h["head"]) for h in mine})
        cmap = plt.get_cmap("viridis")
        for i, (layer, head) in enumerate(pairs):
            series = sorted((h for h in mine if (h["layer"], h["head"]) == (layer, head)), key=lambda h: h["step"])
            x = np.array([h["log_step"] for h in series])
            y = np.array([h[metric] for h in series], float)
            color = cmap(i / max(1, len(pairs) - 1))
            ax.plot(x, y, lw=0.8, color=color)
            first = _changes(changepoints, key, metric, layer, head)[:1]
            if first:
                ax.plot(first, [np.interp(first[0], x, y)], "o", ms=4, color=color, mec="k", mew=0.5)
            late = _row(changepoints, key, metric, layer, head).get("late_log_step", float("nan"))
            if late is not None and np.isfinite(late):
                ax.plot([late], [np.interp(late, x, y)], "x", ms=6, mew=1.5, color=color)
        icl = _changes(changepoints, key, ICL)[:1]
        for c in icl:
            ax.axvline(c, color="red", lw=1.2, label="ICL change-point")
        for c in _changes(changepoints, key, LOSS)[:1]:
            ax.axvline(c, color="C1", lw=1.2, ls=":", label="training loss change-point")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
        ax.set_title(f"{key[2]}: {metric} of {len(pairs)} heads (dots: first change-point; crosses: late change)",
                     fontsize=9)
        ax.set_xlabel("log10(1 + step)")
        ax.set_ylabel(metric)
    fig.tight_layout()
    return save(fig, path)
