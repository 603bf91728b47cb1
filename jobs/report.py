"""``eigengap report RUN_DIR``: one self-contained HTML page (plus PNGs and tables) over a
sweep run: verdicts over populations of models (the seeds of one recipe), threshold
calibration, generalization across populations, exploratory scaling fits and information
measures. Reads result tables only; needs no model.

Also ``python -m jobs.report RUN_DIR``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyarrow as pa

from analysis.crossmodel import analyse, load_run, summary
from cluster.store import write_json, write_parquet, write_text
from spectral.errors import UsageError

RESULT_FILE = "report.html"
N_RESAMPLES = 2000
N_PERMUTATIONS = 1000


def _check(run_dir: Path, out: Path) -> None:
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir} is not a directory")
    if not (run_dir / "sweep.json").exists():
        raise UsageError(f"{run_dir} is not a sweep run (no sweep.json): pass the directory `eigengap sweep` wrote")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory")


def _table(rows: list[dict], columns: list[str]) -> pa.Table:
    return pa.Table.from_pylist(rows) if rows else pa.table({c: pa.array([], pa.string()) for c in columns})


def run(run_dir: Path, out: Path | None = None, echo=print, *, n_resamples: int = N_RESAMPLES,
        n_permutations: int = N_PERMUTATIONS, seed: int = 0, track: bool = True) -> Path:
    """Write report.html, its PNGs, verdicts/calibration/scaling/information.parquet and
    summary.json into ``out`` (default RUN_DIR/report); returns the page's path. With ``track``
    the summary also goes to the sweep's MLflow parent run (when the sweep was tracked)."""
    from analysis.render.html import figures, render
    from jobs.sweep import safe

    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "report"
    _check(run_dir, out)
    data = load_run(run_dir, safe)
    if data.missing:
        echo(f"report {data.run_id}: missing {len(data.missing)}: " + "; ".join(data.missing))
    result = analyse(data, n_resamples=n_resamples, n_permutations=n_permutations, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    figs = figures(data, result, out)
    write_parquet(_table(result.verdicts, ["population", "key", "metric", "verdict"]), out / "verdicts.parquet")
    write_parquet(_table(result.calibration_rows, ["model", "target"]), out / "calibration.parquet")
    write_parquet(_table(result.correlations, ["population", "correlation"]), out / "correlations.parquet")
    write_parquet(_table(result.scaling_rows, ["quantity", "predictor", "kind", "reason"]), out / "scaling.parquet")
    write_parquet(_table(result.information_rows, ["level", "population", "model", "measure"]),
                  out / "information.parquet")
    write_json(summary(data, result), out / "summary.json")
    page = write_text(render(data, result, figs), out / RESULT_FILE)  # last: its presence means the report is complete
    counts = {v: sum(r["verdict"] == v for r in result.verdicts) for v in ("PASS", "FAIL", "INCONCLUSIVE")}
    echo(f"wrote {page} ({_n(len(data.populations), 'population')} of {_n(len(data.models), 'model')}; verdicts: "
         + ", ".join(f"{n} {v}" for v, n in counts.items()) + ")")
    if track:
        from cluster.tracking import log_report

        if log_report(run_dir, out, echo):
            echo("logged the report's summary, verdicts and files to the sweep's MLflow parent run")
    return page


def _n(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def add_parser(sub) -> None:
    parser = sub.add_parser("report", help="cross-model HTML report of a sweep run", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a sweep run directory (holds sweep.json)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: RUN_DIR/report)")
    parser.add_argument("--resamples", type=int, default=N_RESAMPLES, help=f"bootstrap resamples (default: {N_RESAMPLES})")
    parser.add_argument("--permutations", type=int, default=N_PERMUTATIONS,
                        help=f"permutations of the MI null (default: {N_PERMUTATIONS}; fewer: the page states the "
                             "Monte-Carlo error of each p-value)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resampling (default: 0)")
    parser.add_argument("--track", action=argparse.BooleanOptionalAction, default=True,
                        help="log the summary to the sweep's MLflow parent run (default: on)")
    parser.set_defaults(handler=lambda ns: run(ns.run_dir, ns.out, n_resamples=_positive(ns.resamples, "--resamples"),
                                               n_permutations=_positive(ns.permutations, "--permutations"), seed=ns.seed,
                                               track=ns.track))


def _positive(value: int, option: str) -> int:
    if value < 1:
        raise UsageError(f"{option}: must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import main as cli_main

    return cli_main(["report", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    from jobs.cli import exit_now

    exit_now(main())
