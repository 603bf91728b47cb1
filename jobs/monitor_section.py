"""The report's section on the spectral runtime monitor (issue 19), from the run's ``monitor``
cells: ``spectral_monitor_matches_baselines`` per (population, pairing) over training seeds
(``analysis.monitor.population_verdicts``), and per population, pairing and detector the across-seed
mean AUROC and TPR at 1 % FPR (the negative control's AUROCs should sit near 0.5).

Tables written into the report directory: monitor_verdicts.parquet and monitor_models.parquet (every
cell's rows); the figure monitor.png.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from spectral import tables as schemas

KIND = "monitor"


@dataclass
class MonitorSection:
    verdicts: list[dict]
    summary: list[dict]
    """Per (population, pairing, detector): seeds, mean AUROC with its min and max, mean TPR at 1 % FPR."""
    plots: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    models: list[dict] = field(default_factory=list)


def analyse(data, load_cell) -> MonitorSection | None:
    import numpy as np

    from analysis.crossmodel import population_of
    from analysis.monitor import population_verdicts
    from jobs.monitor import RESULT_FILE

    cells = [(cell, path) for cell, path in data.cells if cell.kind == KIND]
    if not cells:
        return None
    seeds, models, notes = [], [], []
    for cell, path in cells:
        loaded = load_cell(KIND, path)
        if RESULT_FILE not in loaded:
            notes.append(f"{cell.model}: no {RESULT_FILE}")
            continue
        rows = loaded.table(RESULT_FILE).to_pylist()
        pop, seed = population_of(cell.model)
        seeds.append((pop, seed, rows))
        models += [dict(r, model=cell.model, population=pop) for r in rows]
    summary = []
    keys = dict.fromkeys((m["population"], m["pairing"], m["detector"]) for m in models)
    for pop, pairing, detector in keys:
        ms = [m for m in models if (m["population"], m["pairing"], m["detector"]) == (pop, pairing, detector)]
        aucs = [m["auroc"] for m in ms]
        summary.append(dict(population=pop, pairing=pairing, detector=detector, n_seeds=len(ms),
                            auroc=float(np.mean(aucs)), auroc_min=float(np.min(aucs)), auroc_max=float(np.max(aucs)),
                            tpr_at_1pct_fpr=float(np.mean([m["tpr_at_1pct_fpr"] for m in ms]))))
    return MonitorSection(population_verdicts(seeds) if seeds else [], summary, notes=notes, models=models)


def plot(summary: list[dict], path: Path) -> Path:
    """Per population and pairing, each detector's mean AUROC over seeds (bars: min to max)."""
    import numpy as np

    from analysis.render.plots import pyplot, save

    plt = pyplot()
    groups = list(dict.fromkeys((s["population"], s["pairing"]) for s in summary))
    detectors = list(dict.fromkeys(s["detector"] for s in summary))
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(groups) + 2), 3.6))
    width = 0.8 / max(len(detectors), 1)
    for i, d in enumerate(detectors):
        by = {(s["population"], s["pairing"]): s for s in summary if s["detector"] == d}
        x = np.arange(len(groups)) - 0.4 + (i + 0.5) * width
        v = np.array([by[g]["auroc"] if g in by else np.nan for g in groups])
        lo = np.array([by[g]["auroc_min"] if g in by else np.nan for g in groups])
        hi = np.array([by[g]["auroc_max"] if g in by else np.nan for g in groups])
        ax.errorbar(x, v, yerr=[np.nan_to_num(v - lo), np.nan_to_num(hi - v)], fmt="o", ms=3, capsize=1.5, label=d)
    ax.axhline(0.5, color="k", lw=0.6, ls=":")
    ax.set_xticks(range(len(groups)), [f"{p}\n{q}" for p, q in groups], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("AUROC (mean over seeds)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, path)


def section(data, out: Path, load_cell) -> MonitorSection | None:
    from cluster.store import write_parquet

    result = analyse(data, load_cell)
    if result is None:
        return None
    if result.verdicts:
        write_parquet(schemas.from_rows(result.verdicts, schemas.MONITOR_POPULATION, "monitor verdicts"),
                      out / "monitor_verdicts.parquet", schemas.MONITOR_POPULATION)
    if result.models:
        write_parquet(schemas.from_rows([{k: m[k] for k in schemas.MONITOR.names} for m in result.models],
                                        schemas.MONITOR, "monitor models"), out / "monitor_models.parquet", schemas.MONITOR)
        result.plots["auroc"] = plot(result.summary, out / "monitor.png")
    return result


def verdict_facts(section: MonitorSection) -> dict[str, str]:
    return {f"{r['population']}/monitor/{r['pairing']}/{r['key']}": r["verdict"] for r in section.verdicts}
