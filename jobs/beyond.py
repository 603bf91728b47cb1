"""Beyond the gap, over a sweep run (research plan 2.3): held-out prediction of head importance
and layer steering from every feature (``analysis.features``), and the agreement of the kernels
(``analysis.kernel_agreement``), from the run's ``features``, ``validate`` and ``steer`` cells.

Two ways in: the cross-model report's "Beyond the gap" section (``section``, when the run has
features cells), and ``eigengap predict-importance RUN_DIR`` (``run``), which writes the same
tables with its own options (hold-out column, features, resamples) and prints the verdicts.

Also ``python -m jobs.beyond RUN_DIR``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field

from jobs.config import JobConfig
from spectral import tables as schemas
from spectral.errors import UsageError

HoldOut = Literal["population", "family", "model"]
TABLES = {
    "feature_verdicts.parquet": ("verdicts", schemas.REPORT_FEATURE_VERDICTS),
    "feature_prediction.parquet": ("features", schemas.REPORT_FEATURE_PREDICTION),
    "feature_folds.parquet": ("folds", schemas.REPORT_FEATURE_FOLDS),
}
"""Prediction tables: file -> (``analysis.features.Prediction`` field, schema); rows of both targets."""
AGREEMENT_TABLES = {
    "kernel_pairs.parquet": ("pairs", schemas.REPORT_KERNEL_PAIRS),
    "kernel_thresholds.parquet": ("thresholds", schemas.REPORT_KERNEL_THRESHOLDS),
    "kernel_populations.parquet": ("populations", schemas.REPORT_KERNEL_POPULATIONS),
    "kernel_verdicts.parquet": ("verdicts", schemas.REPORT_KERNEL_VERDICTS),
}
"""Kernel-agreement tables: file -> (``analysis.kernel_agreement.Agreement`` field, schema)."""


@dataclass
class Beyond:
    """Everything the section shows."""

    predictions: dict = field(default_factory=dict)
    """Target ("importance", "steering") -> ``analysis.features.Prediction``."""
    agreement: object | None = None
    """``analysis.kernel_agreement.Agreement`` (None without validate cells beside the features)."""
    notes: list[str] = field(default_factory=list)
    plots: dict[str, Path] = field(default_factory=dict)
    n_models: int = 0


def expand_features(names: Sequence[str] | None) -> list[str] | None:
    """Feature columns from names: a feature (``key_raw.gap``, ``baseline.output_norm``), a
    kernel (all its metrics) or ``baseline`` (every baseline); None: all. Unknown: UsageError."""
    from spectral.features.names import (
        BASELINE_PREFIX, FEATURE_KERNELS, FEATURE_METRICS, baseline_features, check_feature,
    )

    if names is None:
        return None
    out: list[str] = []
    for name in names:
        if name in FEATURE_KERNELS:
            out += [f"{name}.{m}" for m in FEATURE_METRICS]
        elif name == BASELINE_PREFIX:
            out += baseline_features()
        else:
            out.append(check_feature(name))
    if not any(n.startswith(BASELINE_PREFIX + ".") for n in out):
        out += baseline_features()  # the comparison needs the baselines
    return list(dict.fromkeys(out))


def _family(data, model: str) -> str:
    """The model's family from the sweep's model.json (written beside its cells)."""
    facts = next((m.facts for m in data.models if m.name == model), None)
    if not facts or not facts.get("family"):
        raise UsageError(f"{model}: no model family recorded (model.json) for --hold-out family")
    return str(facts["family"])


def gather(data, load_cell, *, hold_out: HoldOut = "population", names: Sequence[str] | None = None):
    """(head units, layer units, model gaps, notes) of every model with a features cell:
    importance from its validate cell, steering from its steer cell (each when present)."""
    from analysis.crossmodel import population_of
    from analysis.features import head_units, layer_units
    from analysis.kernel_agreement import model_gaps

    by_model: dict[str, dict[str, Path]] = {}
    for cell, path in data.cells:
        by_model.setdefault(cell.model, {})[cell.kind] = path
    heads, layers, gaps, notes = [], [], [], []
    for model, cells in by_model.items():
        if "features" not in cells:
            continue
        pop, seed = population_of(model)
        groups = {"population": pop, "model": model}
        if hold_out == "family":
            groups["family"] = _family(data, model)
        feats = load_cell("features", cells["features"]).table("features.parquet")
        head_table = None
        if "validate" in cells:
            head_table = load_cell("validate", cells["validate"]).table("heads.parquet")
            heads.append(head_units(feats, head_table, groups=groups, seed=seed, names=names))
        else:
            notes.append(f"{model}: no validate cell, no importance")
        if "steer" in cells:
            layer_table = load_cell("steer", cells["steer"]).table("layers.parquet")
            layers.append(layer_units(feats, layer_table, groups=groups, seed=seed, names=names))
        else:
            notes.append(f"{model}: no steer cell, no steering")
        gaps.append(model_gaps(feats, head_table, population=pop, seed=seed))
    return heads, layers, gaps, notes


def analyse(data, load_cell, *, hold_out: HoldOut = "population", replicate: str = "model",
            names: Sequence[str] | None = None, n_resamples: int, n_permutations: int, seed: int = 0) -> Beyond:
    """The held-out predictions (importance, steering) and the kernel agreement of a run."""
    from analysis.features import evaluate
    from analysis.kernel_agreement import agreement

    heads, layers, gaps, notes = gather(data, load_cell, hold_out=hold_out, names=names)
    if not gaps:
        raise UsageError(f"{data.run_dir}: no finished features cell (add `- kind: features` to the sweep)")
    out = Beyond(notes=notes, n_models=len(gaps))
    for target, units in (("importance", heads), ("steering", layers)):
        if units:
            out.predictions[target] = evaluate(units, hold_out=hold_out, replicate=replicate,
                                               n_resamples=n_resamples, n_permutations=n_permutations, seed=seed)
        else:
            out.notes.append(f"no {target}: the run has no {'validate' if target == 'importance' else 'steer'} "
                             "cells beside its features cells")
    out.agreement = agreement(gaps, seed=seed)
    return out


def write(result: Beyond, out: Path) -> None:
    """The tables of ``result`` into ``out`` (schemas in ``spectral.tables``) and its plots."""
    from analysis.render.plots import feature_forest
    from cluster.store import write_parquet

    out.mkdir(parents=True, exist_ok=True)
    for name, (attr, schema) in TABLES.items():
        rows = [r for p in result.predictions.values() for r in getattr(p, attr)]
        write_parquet(schemas.from_rows(rows, schema, str(out / name)), out / name, schema)
    for name, (attr, schema) in AGREEMENT_TABLES.items():
        rows = getattr(result.agreement, attr) if result.agreement is not None else []
        write_parquet(schemas.from_rows(rows, schema, str(out / name)), out / name, schema)
    for target, prediction in result.predictions.items():
        result.plots[target] = feature_forest(prediction.features, out / f"beyond_{target}.png",
                                              title=f"held-out {target}")


def section(data, out: Path, load_cell, *, n_resamples: int, n_permutations: int, seed: int) -> Beyond | None:
    """The report's section: None when the run has no features cells."""
    if not any(cell.kind == "features" for cell, _ in data.cells):
        return None
    result = analyse(data, load_cell, n_resamples=n_resamples, n_permutations=n_permutations, seed=seed)
    write(result, out)
    return result


def verdict_lines(result: Beyond) -> list[str]:
    lines = []
    for target, p in result.predictions.items():
        for r in p.verdicts:
            lines.append(f"{target} / {r['key']} (leave-one-{r['hold_out']}-out): {r['verdict']} - value "
                         f"{r['value']:.3g} [{r['low']:.3g}, {r['high']:.3g}], {r['n_groups']} groups"
                         + (f"; {r['note']}" if r["note"] else ""))
    if result.agreement is not None:
        for r in result.agreement.verdicts:
            lines.append(f"{r['population']} / {r['key']}: {r['verdict']} - Spearman {r['value']:.3g} "
                         f"[{r['low']:.3g}, {r['high']:.3g}], kappa {r['kappa']:.3g}")
    return lines


class PredictConfig(JobConfig):
    run_dir: Path
    """A sweep run directory with features cells (and validate / steer cells beside them)."""
    out: Path | None = None
    """Output directory (default: RUN_DIR/predict)."""
    hold_out: HoldOut = "population"
    """What is held out: each population (organism; default), each model family (e.g. Pythia vs
    Llama), or each model."""
    replicate: Literal["model", "group"] = "model"
    """What the bootstrap of the whole procedure resamples: models within each held-out group, or
    whole groups (for hold-outs of one model per group)."""
    features: list[str] | None = None
    """Only these features (comma-separated: feature columns such as key_raw.gap, kernel names for
    all their metrics, or 'baseline'); the baselines are always included. Default: all."""
    resamples: int = Field(1000, ge=10)
    """Bootstrap resamples of the whole held-out procedure."""
    permutations: int = Field(10_000, ge=100)
    """Permutations of the per-feature tests."""
    seed: int = 0
    """Seed of the resampling."""


def run(config: PredictConfig, echo=print) -> Beyond:
    from analysis.crossmodel import load_run
    from cluster.layout import RunLayout
    from cluster.store import write_text
    from jobs.registry import load_cell

    run_dir = Path(config.run_dir)
    if not run_dir.is_dir() or not RunLayout(run_dir).is_run():
        raise UsageError(f"{run_dir} is not a sweep run (no {RunLayout.SWEEP}): pass the directory `eigengap sweep` wrote")
    RunLayout(run_dir).check_current()
    names = expand_features(config.features)
    out = Path(config.out) if config.out is not None else run_dir / "predict"
    data = load_run(run_dir, load_cell)
    result = analyse(data, load_cell, hold_out=config.hold_out, replicate=config.replicate, names=names,
                     n_resamples=config.resamples, n_permutations=config.permutations, seed=config.seed)
    write(result, out)
    lines = verdict_lines(result)
    write_text("\n".join(["# Beyond the gap: held-out prediction and kernel agreement", "", *[f"- {x}" for x in lines],
                          "", *[f"- note: {n}" for n in result.notes]]) + "\n", out / "predict.md")
    for line in lines:
        echo(line)
    echo(f"wrote {out} ({result.n_models} models)")
    return result


def add_parser(sub) -> None:
    from jobs.config import add_arguments, parse_config

    parser = sub.add_parser("predict-importance", help="held-out prediction of importance and steering from every "
                            "feature, and kernel agreement, over a sweep run", description=__doc__.splitlines()[0])
    add_arguments(parser, PredictConfig, positional=("run_dir",))
    parser.set_defaults(handler=lambda ns: run(parse_config(PredictConfig, ns)))


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import main as cli_main

    return cli_main(["predict-importance", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    from jobs.cli import exit_now

    exit_now(main())
