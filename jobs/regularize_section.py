"""The report's section on spectral regularisation and controlled instability (issue 20), from the
run's ``regularize`` cells: every (population, arm, seed) model the cells measured (a cell may hold
several seeds, a sweep cell one; a model found twice is taken once), re-analysed together
(``analysis.regularize``): per population and arm the paired arm - baseline contrasts over seeds and
the three verdict families, each Holm-adjusted across every population's rows.

Tables written into the report directory: regularize_models.parquet (every model), regularize_contrasts.parquet,
regularize_verdicts.parquet; figures regularize_gaps_<population>.png and regularize_contrasts_<population>.png.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from spectral import tables as schemas

KIND = "regularize"
TABLES = ("regularize_models.parquet", "regularize_heads.parquet", "regularize_layers.parquet")


@dataclass
class RegularizeSection:
    verdicts: list[dict]
    contrasts: list[dict]
    models: list[dict]
    plots: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    heads: list[dict] = field(default_factory=list)


def runs_of(models: list[dict], heads: list[dict], layers: list[dict]) -> list:
    """``analysis.regularize.ArmRun`` records from the job's three tables."""
    from analysis.regularize import ArmRun

    def key(r):
        return r["population"], r["arm"], int(r["seed"])

    by_heads, by_layers = {}, {}
    for h in heads:
        by_heads.setdefault(key(h), []).append(h)
    for row in layers:
        by_layers.setdefault(key(row), []).append(row)
    out = []
    for m in models:
        targeted = tuple(tuple(int(x) for x in p.split(".")) for p in m["targeted"].split(",") if p)
        out.append(ArmRun(m["population"], m["arm"], int(m["seed"]), m["direction"], targeted,
                          {k: m[k] for k in schemas.REGULARIZE_MODEL_MEASURES}, by_heads.get(key(m), []),
                          by_layers.get(key(m), [])))
    return out


def analyse(data, load_cell) -> RegularizeSection | None:
    from analysis.regularize import contrast_rows, verdict_rows

    cells = [(cell, path) for cell, path in data.cells if cell.kind == KIND]
    if not cells:
        return None
    models, heads, layers, notes, seen = [], [], [], [], set()
    for cell, path in cells:
        loaded = load_cell(KIND, path)
        if any(t not in loaded for t in TABLES):
            notes.append(f"{cell.model}: incomplete regularize cell (no {', '.join(t for t in TABLES if t not in loaded)})")
            continue
        tables = {t: loaded.table(t).to_pylist() for t in TABLES}
        new = {(m["population"], m["arm"], int(m["seed"])) for m in tables[TABLES[0]]} - seen
        seen |= new
        models += [m for m in tables[TABLES[0]] if (m["population"], m["arm"], int(m["seed"])) in new]
        heads += [h for h in tables[TABLES[1]] if (h["population"], h["arm"], int(h["seed"])) in new]
        layers += [r for r in tables[TABLES[2]] if (r["population"], r["arm"], int(r["seed"])) in new]
    runs = runs_of(models, heads, layers)
    return RegularizeSection(verdict_rows(runs), contrast_rows(runs), models, notes=notes, heads=heads)


def section(data, out: Path, load_cell) -> RegularizeSection | None:
    from cluster.store import write_parquet
    from jobs.regularize import contrasts_plot, gaps_plot

    result = analyse(data, load_cell)
    if result is None:
        return None
    if result.models:
        write_parquet(schemas.from_rows(result.models, schemas.REGULARIZE_MODELS, "regularize models"),
                      out / "regularize_models.parquet", schemas.REGULARIZE_MODELS)
    write_parquet(schemas.from_rows(result.contrasts, schemas.REGULARIZE_CONTRASTS, "regularize contrasts"),
                  out / "regularize_contrasts.parquet", schemas.REGULARIZE_CONTRASTS)
    write_parquet(schemas.from_rows(result.verdicts, schemas.REGULARIZE_VERDICTS, "regularize verdicts"),
                  out / "regularize_verdicts.parquet", schemas.REGULARIZE_VERDICTS)
    for pop in dict.fromkeys(m["population"] for m in result.models):
        seeds = sorted({m["seed"] for m in result.models if m["population"] == pop})
        result.plots[f"gaps/{pop}"] = gaps_plot([h for h in result.heads if h["population"] == pop],
                                                out / f"regularize_gaps_{pop}.png",
                                                f"{pop}: key-kernel gap per head and arm (seeds {seeds})")
        rows = [c for c in result.contrasts if c["population"] == pop]
        if rows:
            result.plots[f"contrasts/{pop}"] = contrasts_plot(rows, out / f"regularize_contrasts_{pop}.png",
                                                              f"{pop}: arm - baseline over seeds (95 % t-interval)")
    return result


def verdict_facts(section: RegularizeSection) -> dict[str, str]:
    return {f"{r['population']}/regularize/{r['arm']}/{r['key']}" + (f"/layer{r['layer']}" if r["layer"] >= 0 else ""):
            r["verdict"] for r in section.verdicts}
