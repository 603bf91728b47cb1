"""The report's section on training dynamics (issue 17, point 2): do the heads' key-kernel gaps
change before in-context learning emerges? From the run's ``dynamics_train`` cells: every cell's
per-checkpoint rows (a cell may hold one seed, as a sweep runs them, or several, as
``--seeds 0,1,2`` does), pooled into one ``analysis.dynamics.SeedDynamics`` per (population, seed)
(a seed that two cells hold is counted once, from the first), then ``analysis.dynamics.analyse``:
change-points, per-head lags, the verdict ``spectral_changes_precede_icl`` per population
(organism size) over its seeds with Holm across populations, and the exploratory metrics.

Tables written into the report directory: dynamics_train_models.parquet, dynamics_train_verdicts.parquet,
and the figure dynamics_train_lags.png (per population, each seed's median lag and the interval).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from spectral import tables as schemas

KIND = "dynamics_train"


@dataclass
class TrainingDynamicsSection:
    verdicts: list[dict]
    """``analysis.dynamics`` verdict rows (the verdict per population and the exploratory rows)."""
    models: list[dict]
    """Per (population, seed) and head metric: the median lag (``analysis.dynamics.MODEL_COLUMNS``)."""
    icl: list[dict]
    """Per (population, seed): ICL score at the first and the last checkpoint and its first change-point step."""
    plots: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def analyse(data, load_cell) -> TrainingDynamicsSection | None:
    from analysis.dynamics import ICL, analyse as analyse_seeds
    from jobs.dynamics_train import CHECKPOINTS_FILE, HEADS_FILE, seed_dynamics

    cells = [(cell, path) for cell, path in data.cells if cell.kind == KIND]
    if not cells:
        return None
    checkpoints, heads, seen, notes = [], [], set(), []
    for cell, path in cells:
        loaded = load_cell(KIND, path)
        if CHECKPOINTS_FILE not in loaded or HEADS_FILE not in loaded:
            notes.append(f"{cell.model}: no {CHECKPOINTS_FILE} / {HEADS_FILE}")
            continue
        rows = loaded.table(CHECKPOINTS_FILE).to_pylist()
        keys = {(r["population"], r["seed"]) for r in rows}
        twice = keys & seen
        if twice:
            notes.append(f"{cell.model}: seed(s) {sorted(str(k[1]) for k in twice)} already read from another cell: "
                         "not counted twice")
        checkpoints += [r for r in rows if (r["population"], r["seed"]) not in twice]
        heads += [h for h in loaded.table(HEADS_FILE).to_pylist() if (h["population"], h["seed"]) not in twice]
        seen |= keys
    if not checkpoints:
        return TrainingDynamicsSection([], [], [], notes=notes)
    seeds, more = seed_dynamics(checkpoints, heads)
    result = analyse_seeds(seeds)
    icl = []
    firsts = {(r["population"], r["seed"]): r["first_step"] for r in result.changepoints if r["series"] == ICL}
    for s in seeds:
        icl.append(dict(population=s.population, seed=s.seed, model=s.model, n_checkpoints=len(s.steps),
                        icl_first=float(s.icl[0]), icl_last=float(s.icl[-1]),
                        icl_change_step=firsts.get((s.population, s.seed), float("nan"))))
    return TrainingDynamicsSection(result.verdicts, result.models, icl, notes=notes + more)


def lags_plot(section: TrainingDynamicsSection, path: Path) -> Path:
    """Per population: each seed's median lag of the gap change-points (dots) and the mean with its
    interval over seeds (bar); below 0: the gaps change first."""
    import numpy as np

    from analysis.dynamics import VERDICT_METRIC
    from analysis.render.plots import pyplot, save

    plt = pyplot()
    verdicts = [v for v in section.verdicts if v["metric"] == VERDICT_METRIC]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(verdicts) + 2), 3.2))
    for i, v in enumerate(verdicts):
        lags = [m["median_lag"] for m in section.models
                if m["population"] == v["population"] and m["metric"] == VERDICT_METRIC]
        ax.plot(np.full(len(lags), i) + np.linspace(-0.1, 0.1, len(lags)), lags, "o", ms=4, color="C0")
        if np.isfinite(v["low"]):
            ax.errorbar([i + 0.25], [v["value"]], yerr=[[v["value"] - v["low"]], [v["high"] - v["value"]]], fmt="s",
                        color="k", capsize=3)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(verdicts)), [f"{v['population']}\n{v['verdict']}" for v in verdicts], fontsize=8)
    ax.set_ylabel("gap - ICL change-point (decades)")
    ax.set_title("Median lag per seed (dots), mean and 95 % CI over seeds", fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def write(section: TrainingDynamicsSection, out: Path) -> None:
    from cluster.store import write_parquet

    if section.models:
        write_parquet(schemas.from_rows(section.models, schemas.REPORT_DYNAMICS_MODELS, "training dynamics models"),
                      out / "dynamics_train_models.parquet", schemas.REPORT_DYNAMICS_MODELS)
    if section.verdicts:
        write_parquet(schemas.from_rows(section.verdicts, schemas.REPORT_DYNAMICS_VERDICTS, "training dynamics"),
                      out / "dynamics_train_verdicts.parquet", schemas.REPORT_DYNAMICS_VERDICTS)
        section.plots["lags"] = lags_plot(section, out / "dynamics_train_lags.png")


def section(data, out: Path, load_cell) -> TrainingDynamicsSection | None:
    """The report's section: None when the run has no dynamics_train cells."""
    result = analyse(data, load_cell)
    if result is not None:
        write(result, out)
    return result


def verdict_facts(section: TrainingDynamicsSection) -> dict[str, str]:
    """summary.json verdict keys (``POP/dynamics/spectral_changes_precede_icl``) of the verdict rows."""
    return {f"{r['population']}/dynamics/{r['key']}": r["verdict"] for r in section.verdicts if r["verdict"]}
