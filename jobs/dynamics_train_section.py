"""The report's section on training dynamics (issue 17, point 2): do the heads' key-kernel gaps
change before in-context learning emerges? From the run's ``dynamics_train`` cells: every cell's
per-checkpoint rows (a cell may hold one seed, as a sweep runs them, or several, as
``--seeds 0,1,2`` does), pooled into one ``analysis.dynamics.SeedDynamics`` per (population, seed)
(a seed that two cells hold is counted once, from the first), then ``analysis.dynamics.analyse``:
change-points, per-head lags, the verdicts ``spectral_changes_precede_icl`` and (against the training
loss's first change-point, the generic early-training transient)
``spectral_changes_precede_icl_beyond_loss`` per population (organism size) over its seeds with Holm
across populations, the loss's own lag (control), each seed's late gap change-points (after the
loss's, before the ICL score's; exploratory) and the exploratory metrics.

Tables written into the report directory: dynamics_train_models.parquet, dynamics_train_verdicts.parquet,
and the figure dynamics_train_lags.png (per population, each seed's median gap lag, the loss's lag and
their difference, each with the mean and interval over seeds).
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
    """Per (population, seed): ICL score at the first and the last checkpoint, its first change-point step,
    the training loss's first change-point step and the heads with a late gap change-point (``n_late`` of
    ``n_heads``, ``median_late_lag`` in decades to the ICL change-point)."""
    plots: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def analyse(data, load_cell) -> TrainingDynamicsSection | None:
    from analysis.dynamics import ICL, LOSS, MODEL_LEVEL, VERDICT_METRIC, analyse as analyse_seeds
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
    nan = float("nan")
    firsts = {(r["population"], r["seed"]): r["first_step"] for r in result.changepoints if r["series"] == ICL}
    losses = {(r["population"], r["seed"]): r["first_step"] for r in result.changepoints
              if r["series"] == LOSS and r["layer"] == MODEL_LEVEL}
    gaps = {(m["population"], m["seed"]): m for m in result.models if m["metric"] == VERDICT_METRIC}
    for s in seeds:
        m = gaps.get((s.population, s.seed), {})
        icl.append(dict(population=s.population, seed=s.seed, model=s.model, n_checkpoints=len(s.steps),
                        icl_first=float(s.icl[0]), icl_last=float(s.icl[-1]),
                        icl_change_step=firsts.get((s.population, s.seed), nan),
                        loss_change_step=losses.get((s.population, s.seed), nan), n_heads=m.get("n_heads", 0),
                        n_late=m.get("n_late", 0), median_late_lag=m.get("median_late_lag", nan)))
    return TrainingDynamicsSection(result.verdicts, result.models, icl, notes=notes + more)


def lags_plot(section: TrainingDynamicsSection, path: Path) -> Path:
    """Per population three groups: each seed's median lag of the gap change-points to the ICL score's,
    the training loss's lag (the control) and their difference (gap - loss; dots), each with the mean and
    its interval over seeds (bar); below 0: the first changes first."""
    import numpy as np

    from analysis.dynamics import BEYOND_KEY, CONTROL_KEY, LOSS, VERDICT_KEY
    from analysis.render.plots import pyplot, save

    plt = pyplot()
    groups = ((VERDICT_KEY, "median_lag", "gap - ICL"), (CONTROL_KEY, "loss_lag", "loss - ICL"),
              (BEYOND_KEY, "median_minus_loss", "gap - loss"))
    populations = list(dict.fromkeys(v["population"] for v in section.verdicts if v["key"] == VERDICT_KEY))
    fig, ax = plt.subplots(figsize=(max(5, 3 * len(populations) + 2), 3.4))
    ticks, labels = [], []
    for i, pop in enumerate(populations):
        for j, (key, column, name) in enumerate(groups):
            at = 4 * i + j
            v = next((r for r in section.verdicts if r["key"] == key and r["population"] == pop), None)
            if v is None:
                continue
            values = [m[column] for m in section.models if m["population"] == pop and m["metric"] == "gap"]
            ax.plot(np.full(len(values), at) + np.linspace(-0.1, 0.1, len(values)), values, "o", ms=4, color=f"C{j}")
            if np.isfinite(v["low"]):
                ax.errorbar([at + 0.25], [v["value"]], yerr=[[v["value"] - v["low"]], [v["high"] - v["value"]]],
                            fmt="s", color="k", capsize=3)
            ticks.append(at)
            labels.append(f"{pop}\n{name}\n{v['verdict'] or '(control)'}")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(ticks, labels, fontsize=7)
    ax.set_ylabel("change-point difference (decades)")
    ax.set_title(f"Per seed (dots): gap - ICL, {LOSS} - ICL, gap - {LOSS};\nmean and 95 % CI over seeds (squares)", fontsize=9)
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
    """summary.json verdict keys (``POP/dynamics/spectral_changes_precede_icl``,
    ``POP/dynamics/spectral_changes_precede_icl_beyond_loss``) of the verdict rows."""
    return {f"{r['population']}/dynamics/{r['key']}": r["verdict"] for r in section.verdicts if r["verdict"]}
