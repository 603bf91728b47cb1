"""The report's section on spectrally adaptive steering (issue 17, point 4): the verdict
``adaptive_steering_beats_fixed`` over training seeds from the run's ``dynamics_steer`` cells
(``analysis.adaptive_steering``): per seed the mean difference adaptive - fixed over the evaluated
prompts at the same mean-KL budget (by default matched on those very prompts), per population the
t-interval over seeds (the replicates), Holm across populations.

Tables written into the report directory: dynamics_steer_verdicts.parquet (per population) and
dynamics_steer_models.parquet (every cell's arm rows), and the figure dynamics_steer.png.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from spectral import tables as schemas

KIND = "dynamics_steer"


@dataclass
class AdaptiveSteeringSection:
    verdicts: list[dict]
    """``analysis.adaptive_steering.verdict_rows`` per population."""
    models: list[dict]
    """Every cell's ``DYNAMICS_STEER_ARMS`` rows."""
    plots: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def analyse(data, load_cell) -> AdaptiveSteeringSection | None:
    from analysis.adaptive_steering import RULE, SeedSteering, matched_on, rule, verdicts
    from analysis.crossmodel import population_of
    from jobs.dynamics_steer import RESULT_FILE

    cells = [(cell, path) for cell, path in data.cells if cell.kind == KIND]
    if not cells:
        return None
    seeds, models, rules, matches, notes = [], [], set(), set(), []
    for cell, path in cells:
        loaded = load_cell(KIND, path)
        if RESULT_FILE not in loaded:
            notes.append(f"{cell.model}: no {RESULT_FILE}")
            continue
        rows = loaded.table(RESULT_FILE).to_pylist()
        pop, seed = population_of(cell.model)
        seeds.append(SeedSteering(pop, seed, rows))
        models += rows
        rules |= {r["rule"] for r in rows if r["arm"] == "adaptive"}
        matches.add(matched_on(rows))
    if len(rules) > 1:
        notes.append(f"the cells use different adaptive rules ({', '.join(sorted(rules))}): the verdict pools them")
    if len(matches) > 1:
        notes.append("some cells matched the budget on the evaluated prompts, others on a selection split: the "
                     "verdict pools them")
    rule_text = rule(" / ".join(sorted(rules)), " / ".join(sorted(matches))) if rules else RULE
    return AdaptiveSteeringSection(verdicts(seeds, rule_text) if seeds else [], models, notes=notes)


def write(section: AdaptiveSteeringSection, out: Path) -> None:
    from cluster.store import write_parquet

    if section.verdicts:
        write_parquet(schemas.from_rows(section.verdicts, schemas.DYNAMICS_STEER_VERDICTS, "adaptive steering"),
                      out / "dynamics_steer_verdicts.parquet", schemas.DYNAMICS_STEER_VERDICTS)
    if section.models:
        write_parquet(schemas.from_rows(section.models, schemas.DYNAMICS_STEER_ARMS, "adaptive steering models"),
                      out / "dynamics_steer_models.parquet", schemas.DYNAMICS_STEER_ARMS)
        section.plots["arms"] = arms_plot(section.models, out / "dynamics_steer.png")


def arms_plot(rows: list[dict], path: Path) -> Path:
    """Per model, each arm's effect on the evaluated prompts with its interval (and the KL it reached)."""
    import numpy as np

    from analysis.render.plots import pyplot, save

    plt = pyplot()
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 0.5 * len(models) + 4), 3.4))
    for k, arm in enumerate(("fixed", "adaptive")):
        sel = {r["model"]: r for r in rows if r["arm"] == arm}
        x = np.arange(len(models)) + (k - 0.5) * 0.3
        eff = np.array([sel[m]["effect"] if m in sel else np.nan for m in models])
        lo = np.array([sel[m]["effect_low"] if m in sel else np.nan for m in models])
        hi = np.array([sel[m]["effect_high"] if m in sel else np.nan for m in models])
        axes[0].errorbar(x, eff, yerr=[eff - lo, hi - eff], fmt="o", ms=4, capsize=2, label=arm)
        axes[1].plot(x, [sel[m]["kl"] if m in sel else np.nan for m in models], "o", ms=4, label=arm)
    for ax, title in zip(axes, ("evaluated effect (95 % CI over prompts)", "evaluated mean KL")):
        ax.set_xticks(range(len(models)), models, rotation=60, ha="right", fontsize=7)
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def section(data, out: Path, load_cell) -> AdaptiveSteeringSection | None:
    """The report's section: None when the run has no dynamics_steer cells."""
    result = analyse(data, load_cell)
    if result is not None:
        write(result, out)
    return result


def verdict_facts(section: AdaptiveSteeringSection) -> dict[str, str]:
    """summary.json verdict keys of the section's verdict rows."""
    return {f"{r['population']}/dynamics/{r['key']}": r["verdict"] for r in section.verdicts}
