"""``eigengap sweep CONFIG``: models x experiments from a YAML file, resumable, tracked in MLflow.

Also ``python -m jobs.sweep CONFIG`` (what ``ray job submit -- python -m jobs.sweep CONFIG``
runs on a cluster). A sweep run lives in ``OUT/RUN_ID`` (``cluster.layout.RunLayout``):
``sweep.json`` (the config and its hash), one directory per cell (an experiment on a model)
``model=<model>/experiment=<i>-<kind>/`` holding that job's Parquet results and, written last,
``cell.json``, and ``mlflow.db`` (the default tracking store). Rerunning with the same run id
skips finished cells and reruns unfinished ones; a run id that holds a different config is
refused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cluster.layout import Cell, RunLayout
from cluster.store import write_json
from jobs import registry
from jobs.config import ExecutorOptions, JobConfig, validate
from spectral.errors import UsageError


class Experiment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str
    """Which job (an experiment kind of ``jobs.registry``)."""
    params: dict[str, Any] = {}
    """That job's options (as in its --help, with underscores), except model and out."""

    @field_validator("kind")
    @classmethod
    def _registered(cls, value):
        if value not in registry.KINDS:
            raise ValueError(f"unknown experiment kind {value!r} (known: {', '.join(registry.KINDS)})")
        return value


class SweepConfig(ExecutorOptions):
    model_config = ConfigDict(frozen=False)
    name: str = Field(min_length=1)
    """The sweep's name (the default run id)."""
    models: list[str] = Field(min_length=1)
    """Model specs."""
    seeds: list[int] | None = None
    """Training seeds: every organism or random-twin spec in ``models`` becomes a population,
    one model per seed (``organism-s`` -> ``organism-s``, ``organism-s?seed=1``, ...); verdicts
    are then taken across seeds. Hub ids and checkpoint directories have no seed: refused."""
    experiments: list[Experiment] = Field(min_length=1)
    """Experiments run on every model."""
    tracking_uri: str | None = None
    """MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///RUN_DIR/mlflow.db)."""

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value):
        if value is not None and (not value or min(value) < 0 or len(set(value)) != len(value)):
            raise ValueError("seeds must be distinct non-negative integers, at least one")
        return value

    @model_validator(mode="after")
    def _expand(self):
        if self.seeds is not None:
            self.models = population_specs(self.models, self.seeds)
            self.seeds = None  # expanded once: the stored config lists every model
        return self

    def executor_options(self) -> dict[str, Any]:
        """The executor options every job of the sweep runs with (unless its params set them)."""
        return {name: getattr(self, name) for name in ExecutorOptions.model_fields}


def population_specs(models: list[str], seeds: list[int]) -> list[str]:
    """Each spec once per seed (seed 0 of an organism keeps its plain name)."""
    from spectral.models.specs import parse_spec

    out = []
    for text in models:
        spec = parse_spec(text)
        if spec.kind not in ("organism", "random"):
            raise ValueError(f"models: {text!r} has no training seed (seeds apply to organism-... and random:... specs)")
        if "seed" in spec.overrides:
            raise ValueError(f"models: {text!r} already names a seed: list it without one when seeds are given")
        for seed in seeds:
            if spec.kind == "organism":
                out.append(text if seed == 0 else f"{text}?seed={seed}")
            else:
                out.append(f"{text}{'&' if '?' in text else '?'}seed={seed}")
    return out


def read_sweep(path: str | Path) -> SweepConfig:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"sweep config {str(path)!r} does not exist")
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UsageError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    return validate(SweepConfig, data, prefix=f"{path}: ", style="field")


def stored_config(layout: RunLayout) -> SweepConfig:
    return SweepConfig.model_validate(layout.sweep_state()["config"])


def cells_of(config: SweepConfig) -> list[Cell]:
    return [Cell(m, i, e.kind, dict(e.params)) for m in config.models for i, e in enumerate(config.experiments)]


def job_config(config: SweepConfig, cell: Cell, out: Path, source: str = "sweep"):
    """The cell's job config, validated; errors name the experiment and field."""
    cls = registry.experiment(cell.kind).config
    values = {**cell.params, "model": cell.model, "out": out, "force": True}
    if "executor" in cls.model_fields and "executor" not in cell.params:
        values.update(config.executor_options())
    return validate(cls, values, prefix=f"{source}: experiments.{cell.index}.params.", style="field")


def config_hash(config: SweepConfig) -> str:
    return hashlib.sha256(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def prepare(config: SweepConfig, out: Path, run_id: str | None, source: str) -> tuple[RunLayout, list[Cell]]:
    """Validate every cell up front; create or check the run directory."""
    cells = cells_of(config)
    for cell in cells:
        job_config(config, cell, out, source)
    layout = RunLayout(out / (run_id or config.name))
    digest = config_hash(config)
    if layout.sweep_file.exists():
        layout.check_current()
        previous = layout.sweep_state()
        if previous["config_hash"] != digest:
            raise UsageError(f"run id {layout.run_id!r} in {out} belongs to a different sweep config "
                             f"(hash {previous['config_hash']}, this one {digest}): choose another --run-id")
    else:
        write_json({"config": config.model_dump(mode="json"), "config_hash": digest, "run_id": layout.run_id},
                   layout.sweep_file)
    return layout, cells


def write_model_facts(layout: RunLayout, model: str) -> None:
    """``model=<model>/model.json``: the model's size facts (parameters, layers, heads, d_model,
    d_head) from its architecture, so the cross-model report needs no model."""
    path = layout.model_file(model)
    if path.exists():
        return
    from spectral.models.facts import model_facts

    write_json(model_facts(model), path)


def results(run_dir: Path, name: str):
    """One table of the file ``name`` (e.g. ``scan.parquet``) over every finished cell of a sweep
    run, with the partition columns ``sweep_model``, ``experiment`` and ``cell`` in front."""
    import pyarrow as pa

    from cluster.store import read_parquet

    layout = RunLayout(Path(run_dir))
    tables = []
    for cell in layout.cells():
        path = layout.cell_dir(cell) / name
        if layout.finished(cell) and path.is_file():
            schema = registry.experiment(cell.kind).tables.get(name)
            if schema is None:
                raise UsageError(f"{path}: a {cell.kind} cell writes no table {name} (it writes "
                                 f"{', '.join(registry.experiment(cell.kind).tables)})")
            table = read_parquet(path, schema)
            for i, (column, value) in enumerate((("sweep_model", cell.model), ("experiment", f"{cell.index}-{cell.kind}"),
                                                 ("cell", cell.name))):
                table = table.add_column(i, column, pa.array([value] * table.num_rows, pa.string()))
            tables.append(table)
    if not tables:
        raise UsageError(f"no finished cell of {run_dir} has {name}")
    return pa.concat_tables(tables, promote_options="default")


def run_cell(config: SweepConfig, layout: RunLayout, cell: Cell, source: str) -> None:
    """Run one cell; its marker is written atomically, last, so a cell killed half-way is rerun
    from scratch on resume (the partial directory of the earlier attempt is removed first)."""
    cell_dir = layout.cell_dir(cell)
    if cell_dir.exists():
        shutil.rmtree(cell_dir)
    write_model_facts(layout, cell.model)
    start = time.perf_counter()
    registry.experiment(cell.kind).run(job_config(config, cell, cell_dir, source), echo=lambda *a: None)
    write_json({"cell": cell.as_dict(), "seconds": round(time.perf_counter() - start, 3)}, layout.marker(cell))


def run(path: str | Path, out: Path = Path("runs/sweeps"), run_id: str | None = None, echo=print) -> Path:
    from tqdm.auto import tqdm

    from jobs.tracking import BackgroundTracker

    config = read_sweep(path)
    background = BackgroundTracker(echo)  # MLflow's start-up overlaps validation and the first cells
    try:
        layout, cells = prepare(config, Path(out), run_id, str(path))
        background.open(config.tracking_uri, layout.root)
        todo = [c for c in cells if not layout.finished(c)]
        if len(todo) < len(cells):
            echo(f"resuming {layout.root}: {len(cells) - len(todo)} of {len(cells)} cells already done")
        with tqdm(total=len(cells), initial=len(cells) - len(todo), desc="sweep", unit="cell") as bar:
            for cell in todo:
                run_cell(config, layout, cell, str(path))
                bar.update(1)
                background.poll()
    except BaseException:
        background.close()
        raise
    tracker = background.finish(cells)
    echo(f"sweep {layout.run_id}: {len(cells)} cells in {layout.root}")
    echo(tracker.where())
    return layout.root


class SweepArgs(JobConfig):
    config: Path
    """The sweep's YAML file."""
    out: Path = Path("runs/sweeps")
    """Where sweep runs live."""
    run_id: str | None = None
    """The run id (default: the sweep's name); the same id resumes."""


class TrackArgs(JobConfig):
    run_dir: Path
    """The sweep run directory (OUT/RUN_ID)."""
    tracking_uri: str | None = None
    """MLflow tracking URI (default: as the sweep's config)."""


def add_parser(sub) -> None:
    from jobs.config import add_arguments, parse_config

    parser = sub.add_parser("sweep", help="models x experiments from a YAML config, resumable, tracked in MLflow",
                            description=__doc__.splitlines()[0])
    add_arguments(parser, SweepArgs, positional=("config",))
    parser.set_defaults(handler=lambda ns: _sweep(parse_config(SweepArgs, ns)))

    track = sub.add_parser("track", help="upload a sweep run's results to MLflow (after the store was unreachable)")
    add_arguments(track, TrackArgs, positional=("run_dir",))
    track.set_defaults(handler=lambda ns: _track(parse_config(TrackArgs, ns)))


def _sweep(args: SweepArgs) -> Path:
    return run(args.config, args.out, args.run_id)


def _track(args: TrackArgs) -> None:
    track_run(args.run_dir, args.tracking_uri)


def track_run(run_dir: Path, uri: str | None = None, echo=print) -> None:
    from jobs.tracking import Tracker

    layout = RunLayout(Path(run_dir))
    if not layout.is_run():
        raise UsageError(f"{run_dir} is not a sweep run (no {RunLayout.SWEEP})")
    layout.check_current()
    config = stored_config(layout)
    tracker = Tracker.open(uri or config.tracking_uri, layout.root, echo)
    if not tracker.enabled:
        raise UsageError(f"the tracking store {tracker.uri} is unreachable: nothing uploaded")
    n = tracker.track_all(layout.root, cells_of(config))
    echo(f"tracked {n} cells of {run_dir}; {tracker.where()}")


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import main as cli_main

    return cli_main(["sweep", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    from jobs.cli import exit_now

    exit_now(main())
