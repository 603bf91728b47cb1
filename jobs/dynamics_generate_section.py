"""The report's section on generation dynamics (issue 17, point 3), from the run's
``dynamics_generate`` cells: per model, how many heads' key-kernel gap changes during generation
(the share of (prompt, head) gap trajectories with a change-point, and of heads with one in at
least one prompt / in at least half the prompts) and the typical size of the gap's change over
the steps (median |gap at the last step - gap at the first| and median range), with each model's
gap-trajectory and step x head plots. Descriptive: no verdict (the change-point counts carry the
false-alarm caveat of ``jobs.dynamics_generate``).

Tables written into the report directory: dynamics_generate_models.parquet (one row per cell),
the figure dynamics_generate.png (the shares and the gap change per model) and each cell's two
plots, copied as dynamics_generate_<model>_{trajectories,heatmap}.png.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

KIND = "dynamics_generate"

MODELS = pa.schema([
    ("model", pa.string()), ("population", pa.string()), ("seed", pa.int64()), ("n_prompts", pa.int64()),
    ("max_new_tokens", pa.int64()), ("generated_tokens", pa.int64()), ("n_heads", pa.int64()),
    ("n_series", pa.int64()), ("share_series_with_change", pa.float64()), ("share_heads_with_change", pa.float64()),
    ("share_heads_change_in_most_prompts", pa.float64()), ("mean_changes_per_series", pa.float64()),
    ("median_abs_gap_change", pa.float64()), ("p90_abs_gap_change", pa.float64()),
    ("median_gap_range", pa.float64()), ("median_first_change_step", pa.float64())])
"""dynamics_generate_models.parquet: one row per dynamics_generate cell (``jobs.dynamics_generate.summarise``;
``seed`` -1 for a model outside a seeded population)."""


@dataclass
class GenerationSection:
    models: list[dict]
    """One ``MODELS`` row per cell."""
    plots: dict[str, Path] = field(default_factory=dict)
    """"overview" and, per model, "<model>/trajectories" and "<model>/heatmap"."""
    notes: list[str] = field(default_factory=list)


def analyse(data, load_cell) -> GenerationSection | None:
    from analysis.crossmodel import population_of
    from jobs.dynamics_generate import CHANGES_FILE, summarise

    cells = [(cell, path) for cell, path in data.cells if cell.kind == KIND]
    if not cells:
        return None
    models, notes = [], []
    for cell, path in cells:
        loaded = load_cell(KIND, path)
        if CHANGES_FILE not in loaded:
            notes.append(f"{cell.model}: no {CHANGES_FILE}")
            continue
        s = summarise(loaded.table(CHANGES_FILE).to_pylist())
        pop, seed = population_of(cell.model)
        config = loaded.params.get("config", {})
        models.append({"model": cell.model, "population": pop, "seed": -1 if seed is None else seed,
                       "n_prompts": s["n_prompts"], "max_new_tokens": config.get("max_new_tokens"),
                       "generated_tokens": loaded.params.get("generated_tokens"), "n_heads": s["n_heads"],
                       "n_series": s["n_series"], **{k: s[k] for k in MODELS.names if k in s and k not in
                                                      ("n_prompts", "n_heads", "n_series")},
                       "path": path})
    return GenerationSection(models, notes=notes)


def write(section: GenerationSection, out: Path) -> None:
    from cluster.store import write_parquet
    from spectral import tables as schemas

    rows = [{k: v for k, v in r.items() if k != "path"} for r in section.models]
    write_parquet(schemas.from_rows(rows, MODELS, "generation dynamics"), out / "dynamics_generate_models.parquet",
                  MODELS)
    if rows:
        section.plots["overview"] = overview_plot(rows, out / "dynamics_generate.png")
    for r in section.models:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", r["model"])
        for key, file in (("trajectories", "gap_trajectories.png"), ("heatmap", "gap_steps_heatmap.png")):
            source = Path(r["path"]) / file
            if source.is_file():
                target = out / f"dynamics_generate_{name}_{key}.png"
                shutil.copyfile(source, target)
                section.plots[f"{r['model']}/{key}"] = target


def overview_plot(rows: list[dict], path: Path) -> Path:
    """Per model: the share of gap trajectories with a change-point and of heads with one (left),
    the median |gap change| and median gap range over the steps (right)."""
    import numpy as np

    from analysis.render.plots import pyplot, save

    plt = pyplot()
    models = [r["model"] for r in rows]
    x = np.arange(len(models))
    fig, axes = plt.subplots(1, 2, figsize=(max(6.5, 0.55 * len(models) + 4), 3.4))
    for k, (key, label) in enumerate((("share_series_with_change", "(prompt, head) series"),
                                      ("share_heads_with_change", "heads, any prompt"),
                                      ("share_heads_change_in_most_prompts", "heads, >= half the prompts"))):
        axes[0].bar(x + (k - 1) * 0.27, [r[key] for r in rows], 0.27, label=label)
    axes[0].set_ylabel("share with a gap change-point")
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize=6, frameon=False)
    for k, (key, label) in enumerate((("median_abs_gap_change", "median |last - first|"),
                                      ("median_gap_range", "median range (max - min)"))):
        axes[1].bar(x + (k - 0.5) * 0.38, [r[key] for r in rows], 0.38, label=label)
    axes[1].set_ylabel("gap change over the steps")
    axes[1].legend(fontsize=6, frameon=False)
    for ax in axes:
        ax.set_xticks(x, models, rotation=60, ha="right", fontsize=6)
    fig.suptitle("Generation dynamics: how much the heads' key-kernel gap moves while generating", fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def section(data, out: Path, load_cell) -> GenerationSection | None:
    """The report's section: None when the run has no dynamics_generate cells."""
    result = analyse(data, load_cell)
    if result is not None:
        write(result, out)
    return result
