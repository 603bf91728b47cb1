"""``eigengap sweep CONFIG``: models x experiments from a YAML file, resumable, tracked in MLflow.

Also ``python -m jobs.sweep CONFIG`` (what ``ray job submit -- python -m jobs.sweep CONFIG``
runs on a cluster). A sweep run lives in ``OUT/RUN_ID``: ``sweep.json`` (the config and its
hash), one directory per unit ``model=<model>/experiment=<i>-<kind>/`` holding that job's
Parquet results, and ``mlflow.db`` (the default tracking store). Rerunning with the same run id
skips completed units; a run id that holds a different config is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from tqdm.auto import tqdm

from cluster.store import write_json
from cluster.tracking import BackgroundTracker, Tracker
from spectral.errors import UsageError


class Experiment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["scan", "patch", "validate", "steer"]
    """Which job."""
    params: dict[str, Any] = {}
    """That job's options (as in its --help, with underscores), except model and out."""


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
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
    executor: Literal["local", "ray"] = "local"
    """Where each job's work units run."""
    workers: int = Field(2, ge=1)
    """Ray actors per job."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs Ray reserves for each actor."""
    gpus_per_worker: float = Field(0.0, ge=0)
    """GPUs Ray reserves for each actor (more than one: the model is spread over them with an
    accelerate device map)."""
    ray_address: str | None = None
    """An existing Ray cluster (default: RAY_ADDRESS, a running local one, or a new one on 127.0.0.1)."""
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


def job_module(kind: str):
    """The job module of an experiment kind, imported on first use (only what a sweep runs)."""
    import importlib

    return importlib.import_module(f"jobs.{kind}")


def config_class(kind: str):
    return getattr(job_module(kind), f"{kind.capitalize()}Config")


def read_sweep(path: str | Path) -> SweepConfig:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"sweep config {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UsageError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    return validated(SweepConfig, data, f"{path}: ")


def validated(cls, values, prefix: str):
    """``cls`` validated from ``values``; the first error as one UsageError line naming the field."""
    try:
        return cls.model_validate(values)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise UsageError(f"{prefix}{where + ': ' if where else ''}{message}") from None


def safe(text: str) -> str:
    """A model spec as a directory name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


class Unit(BaseModel):
    model: str
    index: int
    kind: str
    params: dict[str, Any]

    @property
    def name(self) -> str:
        return f"model={safe(self.model)}/experiment={self.index}-{self.kind}"


def units_of(config: SweepConfig) -> list[Unit]:
    return [Unit(model=m, index=i, kind=e.kind, params=e.params) for m in config.models
            for i, e in enumerate(config.experiments)]


def job_config(config: SweepConfig, unit: Unit, out: Path, source: str = "sweep"):
    """The unit's job config, validated; errors name the experiment and field."""
    cls = config_class(unit.kind)
    values = {**unit.params, "model": unit.model, "out": out, "force": True}
    if "executor" in cls.model_fields and "executor" not in unit.params:
        values.update(executor=config.executor, workers=config.workers, ray_address=config.ray_address,
                      cpus_per_worker=config.cpus_per_worker, gpus_per_worker=config.gpus_per_worker)
    return validated(cls, values, f"{source}: experiments.{unit.index}.params.")


def config_hash(config: SweepConfig) -> str:
    return hashlib.sha256(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def prepare(config: SweepConfig, out: Path, run_id: str | None, source: str) -> tuple[Path, list[Unit]]:
    """Validate every unit up front; create or check the run directory."""
    units = units_of(config)
    for unit in units:
        job_config(config, unit, out, source)
    run_dir = out / (run_id or config.name)
    state = run_dir / "sweep.json"
    digest = config_hash(config)
    if state.exists():
        previous = json.loads(state.read_text())
        if previous["config_hash"] != digest:
            raise UsageError(f"run id {run_dir.name!r} in {out} belongs to a different sweep config "
                             f"(hash {previous['config_hash']}, this one {digest}): choose another --run-id")
    else:
        write_json({"config": config.model_dump(mode="json"), "config_hash": digest, "run_id": run_dir.name},
                   state)
    return run_dir, units


MODEL_FILE = "model.json"


def write_model_facts(run_dir: Path, model: str) -> None:
    """``model=<model>/model.json``: the model's size facts (parameters, layers, heads, d_model,
    d_head) from its architecture, so the cross-model report needs no model."""
    path = run_dir / f"model={safe(model)}" / MODEL_FILE
    if path.exists():
        return
    from jobs.plan import model_facts

    write_json(model_facts(model), path)


def results(run_dir: Path, name: str):
    """One table of the file ``name`` (e.g. ``scan.parquet``) over every finished unit of a sweep
    run, with the partition columns ``sweep_model``, ``experiment`` and ``unit`` in front."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    config = SweepConfig.model_validate(json.loads((run_dir / "sweep.json").read_text())["config"])
    tables = []
    for unit in units_of(config):
        path = run_dir / unit.name / name
        if (run_dir / unit.name / "unit.json").is_file() and path.is_file():
            table = pq.read_table(path)
            for i, (column, value) in enumerate((("sweep_model", unit.model), ("experiment", f"{unit.index}-{unit.kind}"),
                                                 ("unit", unit.name))):
                table = table.add_column(i, column, pa.array([value] * table.num_rows, pa.string()))
            tables.append(table)
    if not tables:
        raise UsageError(f"no finished unit of {run_dir} has {name}")
    return pa.concat_tables(tables, promote_options="default")


def done(run_dir: Path, unit: Unit) -> bool:
    return (run_dir / unit.name / job_module(unit.kind).RESULT_FILE).exists()


def run(path: str | Path, out: Path = Path("runs/sweeps"), run_id: str | None = None, echo=print) -> Path:
    config = read_sweep(path)
    background = BackgroundTracker(echo)  # MLflow's start-up overlaps validation and the first units
    try:
        run_dir, units = prepare(config, Path(out), run_id, str(path))
        background.open(config.tracking_uri, run_dir)
        todo = [u for u in units if not done(run_dir, u)]
        if len(todo) < len(units):
            echo(f"resuming {run_dir}: {len(units) - len(todo)} of {len(units)} units already done")
        with tqdm(total=len(units), initial=len(units) - len(todo), desc="sweep", unit="unit") as bar:
            for unit in todo:
                write_model_facts(run_dir, unit.model)
                start = time.perf_counter()
                unit_dir = run_dir / unit.name
                job_module(unit.kind).run(job_config(config, unit, unit_dir, str(path)), echo=lambda *a: None)
                write_json({"unit": unit.model_dump(), "seconds": round(time.perf_counter() - start, 3)},
                           unit_dir / "unit.json")
                bar.update(1)
                background.poll()
    except BaseException:
        background.close()
        raise
    tracker = background.finish(units)
    echo(f"sweep {run_dir.name}: {len(units)} units in {run_dir}")
    echo(tracker.where())
    return run_dir


def add_parser(sub) -> None:
    parser = sub.add_parser("sweep", help="models x experiments from a YAML config, resumable, tracked in MLflow",
                            description=__doc__.splitlines()[0])
    parser.add_argument("config", help="the sweep's YAML file")
    parser.add_argument("--out", type=Path, default=Path("runs/sweeps"), help="where sweep runs live (default: runs/sweeps)")
    parser.add_argument("--run-id", default=None, help="the run id (default: the sweep's name); the same id resumes")
    parser.set_defaults(handler=lambda ns: run(ns.config, ns.out, ns.run_id))

    track = sub.add_parser("track", help="upload a sweep run's results to MLflow (after the store was unreachable)")
    track.add_argument("run_dir", type=Path, help="the sweep run directory (OUT/RUN_ID)")
    track.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: as the sweep's config)")
    track.set_defaults(handler=lambda ns: track_run(ns.run_dir, ns.tracking_uri))


def track_run(run_dir: Path, uri: str | None = None, echo=print) -> None:
    state = run_dir / "sweep.json"
    if not state.is_file():
        raise UsageError(f"{run_dir} is not a sweep run (no sweep.json)")
    config = SweepConfig.model_validate(json.loads(state.read_text())["config"])
    tracker = Tracker.open(uri or config.tracking_uri, run_dir, echo)
    if not tracker.enabled:
        raise UsageError(f"the tracking store {tracker.uri} is unreachable: nothing uploaded")
    n = tracker.track_all(run_dir, units_of(config))
    echo(f"tracked {n} units of {run_dir}; {tracker.where()}")


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import main as cli_main

    return cli_main(["sweep", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    from jobs.cli import exit_now

    exit_now(main())
