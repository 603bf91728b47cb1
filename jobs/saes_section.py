"""The report's SAE section (issue 16): the verdicts over training seeds from the run's ``saes``
cells (and the ``validate`` cells beside them, for each model's calibrated threshold).

- Stable vs unstable heads (``analysis.saes``): each seed's head SAEs at k = 8 (``jobs.saes.VERDICT_K``),
  the verdict ``unstable_more_superposition`` per population and the exploratory metrics.
- Feature-aware steering vs ActAdd (``analysis.sae_steering``): per seed the mean held-out difference
  over its SAEs, the verdict ``feature_steering_beats_actadd`` per population; the correlation
  screen's counts per model.
- Ground truth (``analysis.sae_groundtruth``), when the cells hold recovery tables.

Tables written into the report directory: sae_models.parquet, sae_verdicts.parquet,
sae_steering_verdicts.parquet, and the figure sae_differences.png.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from spectral import tables as schemas


@dataclass
class SaeSection:
    comparison: object | None
    """``analysis.saes.SaeComparison`` (None without head SAEs)."""
    steering: list[dict]
    """``analysis.sae_steering.verdict_rows`` (empty without steering tables)."""
    screen: list[dict]
    """Per model, the correlation screen's totals (``analysis.sae_steering.correlation_summary``'s "all" rows)."""
    recovery: list[dict] = field(default_factory=list)
    """Ground-truth verdict rows (``analysis.sae_groundtruth``), empty without recovery tables."""
    plots: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def importance_of(cell_path: Path | None, load_cell) -> dict | None:
    """(layer, head) -> restoration from a validate cell (None without one)."""
    if cell_path is None:
        return None
    data = load_cell("validate", cell_path)
    if "heads.parquet" not in data:
        return None
    t = data.table("heads.parquet")
    return {(int(l), int(h)): (float("nan") if r is None else float(r))
            for l, h, r in zip(t["layer"].to_pylist(), t["head"].to_pylist(), t["restoration"].to_pylist())}


def analyse(data, load_cell, *, n_resamples: int, n_permutations: int, seed: int) -> SaeSection | None:
    from analysis.crossmodel import population_of
    from analysis.sae_steering import SeedSteering, correlation_summary, verdicts
    from analysis.saes import compare
    from analysis.sae_groundtruth import SeedRecovery
    from analysis.sae_groundtruth import verdicts as recovery_verdicts
    from jobs.saes import RECOVERY_FILE, STEERABILITY_FILE, STEERING_FILE, head_metrics

    cells = [(cell, path) for cell, path in data.cells if cell.kind == "saes"]
    if not cells:
        return None
    validate = {cell.model: path for cell, path in data.cells if cell.kind == "validate"}
    models, seeds, screen, notes, recovered = [], [], [], [], []
    for cell, path in cells:
        loaded = load_cell("saes", path)
        pop, seed_ = population_of(cell.model)
        hm = head_metrics(loaded.table("saes.parquet"), cell.model, pop, seed_,
                          importance=importance_of(validate.get(cell.model), load_cell))
        if hm is None:
            notes.append(f"{cell.model}: no head SAEs")
        else:
            models.append(hm)
        if STEERING_FILE in loaded:
            seeds.append(SeedSteering(pop, seed_, loaded.table(STEERING_FILE).to_pylist()))
        if RECOVERY_FILE in loaded:
            recovered.append(SeedRecovery(cell.model, pop, seed_, loaded.table(RECOVERY_FILE).to_pylist()))
        if STEERABILITY_FILE in loaded:
            rows = loaded.table(STEERABILITY_FILE).to_pylist()
            screen += [r for r in correlation_summary(rows) if r["sae"] == "all"] if rows else []
    if not validate:
        notes.append("no validate cells: the calibrated-threshold rows are empty (the verdict uses 0.77)")
    comparison = compare(models, n_resamples=n_resamples, n_permutations=n_permutations, seed=seed) if models else None
    recovery = recovery_verdicts(recovered).verdicts if recovered else []
    return SaeSection(comparison, verdicts(seeds) if seeds else [], screen, recovery, notes=notes)


def write(section: SaeSection, out: Path) -> None:
    from analysis.render.plots import sae_differences
    from cluster.store import write_parquet

    c = section.comparison
    if c is not None:
        models = [{**r, "seed": -1 if r["seed"] is None else r["seed"]} for r in c.models]
        write_parquet(schemas.from_rows(models, schemas.REPORT_SAE_MODELS, "sae models"), out / "sae_models.parquet",
                      schemas.REPORT_SAE_MODELS)
        write_parquet(schemas.from_rows(c.verdicts, schemas.REPORT_SAE_VERDICTS, "sae verdicts"),
                      out / "sae_verdicts.parquet", schemas.REPORT_SAE_VERDICTS)
        section.plots["differences"] = sae_differences(c.populations, out / "sae_differences.png")
    if section.steering:
        write_parquet(schemas.from_rows(section.steering, schemas.REPORT_SAE_STEERING_VERDICTS, "sae steering"),
                      out / "sae_steering_verdicts.parquet", schemas.REPORT_SAE_STEERING_VERDICTS)
    if section.recovery:
        write_parquet(schemas.from_rows(section.recovery, schemas.REPORT_SAE_GROUNDTRUTH, "sae ground truth"),
                      out / "sae_groundtruth_verdicts.parquet", schemas.REPORT_SAE_GROUNDTRUTH)


def section(data, out: Path, load_cell, *, n_resamples: int, n_permutations: int, seed: int) -> SaeSection | None:
    """The report's section: None when the run has no saes cells."""
    result = analyse(data, load_cell, n_resamples=n_resamples, n_permutations=n_permutations, seed=seed)
    if result is not None:
        write(result, out)
    return result


def verdict_facts(section: SaeSection) -> dict[str, str]:
    """summary.json verdict keys of the section's verdict rows."""
    facts = {}
    if section.comparison is not None:
        for r in section.comparison.verdicts:
            if r["verdict"]:
                facts[f"{r['population']}/saes/{r['key']}"] = r["verdict"]
    for r in section.steering:
        facts[f"{r['population']}/saes/{r['key']}"] = r["verdict"]
    for r in section.recovery:
        if r.get("verdict"):
            facts[f"{r['population']}/saes/{r['key']}/{r.get('variable', '')}".rstrip("/")] = r["verdict"]
    return facts
