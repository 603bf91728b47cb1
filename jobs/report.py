"""``eigengap report RUN_DIR``: one self-contained HTML page (plus PNGs and tables) over a
sweep run: verdicts over populations of models (the seeds of one recipe), threshold
calibration, generalization across populations, exploratory scaling fits and information
measures. Reads result tables only; needs no model.

Also ``python -m jobs.report RUN_DIR``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import Field

from analysis.crossmodel import READS, analyse, load_run, summary
from cluster.layout import RunLayout
from cluster.store import write_json, write_parquet, write_text
from jobs.config import JobConfig
from spectral import tables as schemas
from spectral.errors import UsageError

RESULT_FILE = "report.html"
N_RESAMPLES = 2000
N_PERMUTATIONS = 1000


def _check(run_dir: Path, out: Path) -> None:
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir} is not a directory")
    if not RunLayout(run_dir).is_run():
        raise UsageError(f"{run_dir} is not a sweep run (no {RunLayout.SWEEP}): pass the directory `eigengap sweep` wrote")
    RunLayout(run_dir).check_current()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory")


TABLES = {"verdicts.parquet": ("verdicts", schemas.REPORT_VERDICTS),
          "calibration.parquet": ("calibration_rows", schemas.REPORT_CALIBRATION),
          "correlations.parquet": ("correlations", schemas.REPORT_CORRELATIONS),
          "scaling.parquet": ("scaling_rows", schemas.REPORT_SCALING),
          "information.parquet": ("information_rows", schemas.REPORT_INFORMATION)}
"""The report's tables: file -> (``analysis.crossmodel.Analysis`` field holding its rows, schema)."""


def run(run_dir: Path, out: Path | None = None, echo=print, *, n_resamples: int = N_RESAMPLES,
        n_permutations: int = N_PERMUTATIONS, seed: int = 0, track: bool = True) -> Path:
    """Write report.html, its PNGs, verdicts/calibration/scaling/information.parquet and
    summary.json into ``out`` (default RUN_DIR/report); returns the page's path. With ``track``
    the summary also goes to the sweep's MLflow parent run (when the sweep was tracked)."""
    from analysis.render.figures import figures
    from analysis.render.html import render

    run_dir = Path(run_dir)
    out = Path(out) if out is not None else RunLayout(run_dir).report_dir
    _check(run_dir, out)
    data = load_run(run_dir, load_cell)
    if data.missing:
        echo(f"report {data.run_id}: missing {len(data.missing)}: " + "; ".join(data.missing))
    result = analyse(data, n_resamples=n_resamples, n_permutations=n_permutations, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    figs = figures(data, result, out)
    figs["cells"] = other_cells(data)
    figs["circuits"] = circuits_section(data, out, n_resamples, n_permutations, seed)
    figs["beyond"] = beyond_section(data, out, n_resamples, n_permutations, seed)
    figs["saes"] = saes_section(data, out, n_resamples, n_permutations, seed)
    figs["dynamics_steer"] = dynamics_steer_section(data, out)
    figs["dynamics_train"] = dynamics_train_section(data, out)
    figs["dynamics_generate"] = dynamics_generate_section(data, out)
    figs["steering_theory"] = steering_theory_section(data, out)
    figs["monitor"] = monitor_section(data, out)
    figs["regularize"] = regularize_section(data, out)
    for name, (rows, schema) in TABLES.items():
        write_parquet(schemas.from_rows(getattr(result, rows), schema, str(out / name)), out / name, schema)
    facts = summary(data, result)
    if figs["circuits"] is not None:  # circuits verdicts beside the others, under their own keys
        for r in figs["circuits"]["verdicts"].rows:
            if not r["verdict"]:  # exploratory rows carry numbers, not verdicts
                continue
            facts["verdicts"][f"{r['population']}/circuits/{r['key']}"] = r["verdict"]
            for k in ("value", "low", "high"):
                if r[k] == r[k]:
                    facts["metrics"][f"{r['population']}/circuits/{r['key']}/{k}"] = r[k]
    if figs["beyond"] is not None:
        for target, p in figs["beyond"].predictions.items():
            for r in p.verdicts:
                facts["verdicts"][f"beyond/{target}/{r['key']}"] = r["verdict"]
        for r in figs["beyond"].agreement.verdicts:
            facts["verdicts"][f"{r['population']}/beyond/{r['key']}"] = r["verdict"]
    if figs["saes"] is not None:
        from jobs.saes_section import verdict_facts

        facts["verdicts"].update(verdict_facts(figs["saes"]))
    if figs["dynamics_steer"] is not None:
        from jobs.dynamics_steer_section import verdict_facts as steer_facts

        facts["verdicts"].update(steer_facts(figs["dynamics_steer"]))
    if figs["dynamics_train"] is not None:
        from jobs.dynamics_train_section import verdict_facts as train_facts

        facts["verdicts"].update(train_facts(figs["dynamics_train"]))
    if figs["steering_theory"] is not None:
        from jobs.autosteer_section import verdict_facts as theory_facts

        facts["verdicts"].update(theory_facts(figs["steering_theory"]))
    if figs["monitor"] is not None:
        from jobs.monitor_section import verdict_facts as monitor_facts

        facts["verdicts"].update(monitor_facts(figs["monitor"]))
    if figs["regularize"] is not None:
        from jobs.regularize_section import verdict_facts as regularize_facts

        facts["verdicts"].update(regularize_facts(figs["regularize"]))
    write_json(facts, out / "summary.json")
    page = write_text(render(data, result, figs), out / RESULT_FILE)  # last: its presence means the report is complete
    counts = {v: sum(x == v for x in facts["verdicts"].values()) for v in ("PASS", "FAIL", "INCONCLUSIVE")}
    echo(f"wrote {page} ({_n(len(data.populations), 'population')} of {_n(len(data.models), 'model')}; "
         "verdicts of every section: "
         + ", ".join(f"{n} {v}" for v, n in counts.items()) + ")")
    if track:
        from jobs.tracking import log_report

        if log_report(run_dir, out, echo):
            echo("logged the report's summary, verdicts and files to the sweep's MLflow parent run")
    return page


from jobs.registry import load_cell  # noqa: E402  (what the report reads from a finished cell)


def circuits_section(data, out: Path, n_resamples: int, n_permutations: int, seed: int) -> dict | None:
    """The circuits-vs-spectra analysis of the run's circuits cells (``analysis.circuits``), its
    tables written into ``out``; None without circuits cells."""
    import json

    from analysis.circuits import analyse as analyse_circuits
    from analysis.circuits import model_from_cell, per_model_rows
    from analysis.crossmodel import population_of

    cells = [(cell, path) for cell, path in data.cells if cell.kind == "circuits"]
    if not cells:
        return None
    validate = {cell.model: path for cell, path in data.cells if cell.kind == "validate"}
    models, summaries = [], []
    for cell, path in cells:
        loaded = load_cell("circuits", path)
        s = dict(loaded.params)
        if cell.model in validate and (validate[cell.model] / "params.json").is_file():
            s["validate_minimal_heads"] = json.loads((validate[cell.model] / "params.json").read_text()).get(
                "minimal_circuit")
        pop, seed_ = population_of(cell.model)
        models.append(model_from_cell(cell.model, pop, seed_, loaded.table("heads.parquet"), s))
        summaries.append((cell.model, s))
    verdicts = analyse_circuits(models, n_resamples=n_resamples, n_permutations=n_permutations, seed=seed)
    rows = [{k: (json.dumps(v) if k == "per_seed" else v) for k, v in r.items() if k in schemas.REPORT_CIRCUITS.names}
            | {"pattern_auroc": r.get("pattern_auroc")} for r in verdicts.rows]
    write_parquet(schemas.from_rows(rows, schemas.REPORT_CIRCUITS, "circuits"), out / "circuits.parquet",
                  schemas.REPORT_CIRCUITS)
    per_model = per_model_rows(summaries)
    write_parquet(schemas.from_rows(per_model, schemas.REPORT_CIRCUIT_MODELS, "circuit models"),
                  out / "circuit_models.parquet", schemas.REPORT_CIRCUIT_MODELS)
    write_json(verdicts.signature, out / "circuit_signature.json")
    return {"verdicts": verdicts, "models": per_model}


def beyond_section(data, out: Path, n_resamples: int, n_permutations: int, seed: int):
    """Beyond the gap (``jobs.beyond``): held-out prediction from every feature and the kernels'
    agreement, its tables written into ``out``; None without features cells."""
    from jobs.beyond import section

    return section(data, out, load_cell, n_resamples=min(n_resamples, BEYOND_RESAMPLES),
                   n_permutations=max(n_permutations, BEYOND_PERMUTATIONS), seed=seed)


def saes_section(data, out: Path, n_resamples: int, n_permutations: int, seed: int):
    """SAEs on heads' results (``jobs.saes_section``): stable vs unstable heads, feature-aware
    steering and ground truth over training seeds; None without saes cells."""
    from jobs.saes_section import section

    return section(data, out, load_cell, n_resamples=n_resamples, n_permutations=n_permutations, seed=seed)


def dynamics_steer_section(data, out: Path):
    """Spectrally adaptive steering (``jobs.dynamics_steer_section``): the verdict over training
    seeds; None without dynamics_steer cells."""
    from jobs.dynamics_steer_section import section

    return section(data, out, load_cell)


def dynamics_train_section(data, out: Path):
    """Training dynamics (``jobs.dynamics_train_section``): do the heads' gap change-points precede
    the ICL score's, over training seeds; None without dynamics_train cells."""
    from jobs.dynamics_train_section import section

    return section(data, out, load_cell)


def dynamics_generate_section(data, out: Path):
    """Generation dynamics (``jobs.dynamics_generate_section``): per model, how much the heads'
    gap changes while generating (descriptive); None without dynamics_generate cells."""
    from jobs.dynamics_generate_section import section

    return section(data, out, load_cell)


def steering_theory_section(data, out: Path):
    """Steering theory and automated steering (``jobs.autosteer_section``): success metrics 4 and 5
    over training seeds; None without predict or autosteer cells."""
    from jobs.autosteer_section import section

    return section(data, out, load_cell)


def monitor_section(data, out: Path):
    """The spectral runtime monitor (``jobs.monitor_section``): non-inferiority to the activation
    baselines over training seeds; None without monitor cells."""
    from jobs.monitor_section import section

    return section(data, out, load_cell)


def regularize_section(data, out: Path):
    """Spectral regularisation and controlled instability (``jobs.regularize_section``): arm - baseline
    over training seeds and the verdicts; None without regularize cells."""
    from jobs.regularize_section import section

    return section(data, out, load_cell)


BEYOND_RESAMPLES = 1000
"""At most this many bootstrap resamples of the whole held-out procedure (each refits every fold)."""
BEYOND_PERMUTATIONS = 10_000
"""At least this many permutations per feature: Holm over ~115 features needs p < 0.025 / 115."""


def other_cells(data) -> list:
    from jobs.registry import experiment

    return [(cell, *experiment(cell.kind).metrics(path)) for cell, path in data.cells if cell.kind not in ANALYSED]


ANALYSED = (*READS, "circuits", "features", "saes", "dynamics_steer", "dynamics_train",
            "dynamics_generate", "predict", "autosteer", "monitor", "regularize")
"""Kinds with an analysis of their own on the page (the cross-model analysis, the circuits and
beyond-the-gap sections)."""


def _n(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


class ReportConfig(JobConfig):
    run_dir: Path
    """A sweep run directory (holds sweep.json)."""
    out: Path | None = None
    """Output directory (default: RUN_DIR/report)."""
    resamples: int = Field(N_RESAMPLES, ge=1)
    """Bootstrap resamples."""
    permutations: int = Field(N_PERMUTATIONS, ge=1)
    """Permutations of the MI null (fewer: the page states the Monte-Carlo error of each p-value)."""
    seed: int = 0
    """Seed of the resampling."""
    track: bool = True
    """Log the summary to the sweep's MLflow parent run."""


def add_parser(sub) -> None:
    from jobs.config import add_arguments, parse_config

    parser = sub.add_parser("report", help="cross-model HTML report of a sweep run", description=__doc__.splitlines()[0])
    add_arguments(parser, ReportConfig, positional=("run_dir",))
    parser.set_defaults(handler=lambda ns: _report(parse_config(ReportConfig, ns)))


def _report(c: ReportConfig) -> Path:
    return run(c.run_dir, c.out, n_resamples=c.resamples, n_permutations=c.permutations, seed=c.seed, track=c.track)


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import main as cli_main

    return cli_main(["report", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    from jobs.cli import exit_now

    exit_now(main())
