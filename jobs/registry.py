"""The experiment registry: every experiment kind a sweep can run, and where it is defined.

``cli``, ``sweep``, ``plan``, ``tracking`` and ``report`` learn about experiment kinds only from
here. An experiment kind is one module ``jobs/<kind>.py`` that defines ``EXPERIMENT``, an
:class:`Experiment` record, plus one line in :data:`KINDS`. A record missing a field fails when
its module is imported, with a message naming the field.

The job modules import torch, transformers and matplotlib inside their ``run`` functions only,
so that reading a record (for ``plan``, the report, MLflow) costs no more than pydantic and
pyarrow.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

KINDS: dict[str, str] = {
    "scan": "jobs.scan",
    "patch": "jobs.patch",
    "validate": "jobs.validate",
    "steer": "jobs.steer",
    "circuits": "jobs.circuits",
    "features": "jobs.features",
    "saes": "jobs.saes",
    "dynamics_steer": "jobs.dynamics_steer",
    "dynamics_generate": "jobs.dynamics_generate",
    "dynamics_train": "jobs.dynamics_train",
    "predict": "jobs.predict",
    "autosteer": "jobs.autosteer",
    "monitor": "jobs.monitor",
    "regularize": "jobs.regularize",
}
"""Experiment kind -> the module whose ``EXPERIMENT`` record defines it (one line per kind)."""

PROMPT_TOKENS = 24
"""Tokens per prompt that cost models assume for task prompts (IOI and steering prompts are 10-30)."""

UnitMetrics = tuple[dict[str, float], dict[str, str]]
"""(metrics, params) of a finished cell: numbers under stable keys, verdicts as strings."""


@dataclass(frozen=True)
class ModelFacts:
    """What a cost model may know about a model (from its architecture alone)."""

    parameters: int
    layers: int
    heads: int


@dataclass(frozen=True)
class Experiment:
    """One experiment kind: everything the sweep, ``plan``, MLflow and the report need."""

    kind: str
    """The name in sweep configs and on the command line (``eigengap <kind>``)."""
    help: str
    """One line for ``eigengap --help``."""
    config: type
    """The job's options: a ``jobs.config.JobConfig`` with ``model``, ``out`` and ``force``
    fields (a sweep fills them); executor options when it has them."""
    run: Callable[..., Any]
    """``run(config, echo=print)``: computes and writes the result files into ``config.out``."""
    tables: Mapping[str, Any]
    """Parquet file name -> ``pyarrow.Schema`` of each table the job writes."""
    cost: Callable[[Mapping[str, Any], ModelFacts], float]
    """``cost(params, facts)``: token-forward equivalents of one run (``eigengap plan``)."""
    metrics: Callable[[Path], UnitMetrics]
    """``metrics(cell_dir)``: what a finished cell hands to MLflow and to the report's table of
    cells; keys are stable identifiers (no values or labels inside them)."""
    load: Callable[[Path], Any]
    """``load(cell_dir)``: what the cross-model report reads from a finished cell, a
    ``cluster.store.CellData`` (usually ``read_cell(cell_dir, EXPERIMENT.tables)``: every table
    checked against its schema, and params.json)."""

    def __post_init__(self) -> None:
        where = f"experiment {self.kind!r}"
        if not isinstance(self.kind, str) or not self.kind.isidentifier():
            raise TypeError(f"experiment kind {self.kind!r}: 'kind' must be an identifier")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("run", "cost", "metrics", "load") and not callable(value):
                raise TypeError(f"{where}: field {f.name!r} must be callable, got {type(value).__name__}")
        if not isinstance(self.help, str) or not self.help.strip():
            raise TypeError(f"{where}: field 'help' must be a non-empty string")
        if not isinstance(self.config, type) or not {"model", "out", "force"} <= set(getattr(self.config, "model_fields", {})):
            raise TypeError(f"{where}: field 'config' must be a JobConfig class with model, out and force fields")
        if not isinstance(self.tables, Mapping) or not self.tables:
            raise TypeError(f"{where}: field 'tables' must map each Parquet file it writes to its schema")
        import pyarrow as pa

        for name, schema in self.tables.items():
            if not name.endswith(".parquet") or not isinstance(schema, pa.Schema):
                raise TypeError(f"{where}: field 'tables': {name!r} must be a .parquet file name with a pyarrow.Schema")


_LOADED: dict[str, Experiment] = {}


def register(kind: str, module: str) -> None:
    """Add a kind defined in ``module`` (what the line in :data:`KINDS` does; for plug-ins and tests)."""
    KINDS[kind] = module
    _LOADED.pop(kind, None)


def unregister(kind: str) -> None:
    KINDS.pop(kind, None)
    _LOADED.pop(kind, None)


def kinds() -> list[str]:
    return list(KINDS)


def experiment(kind: str) -> Experiment:
    """The record of ``kind`` (its module imported on first use)."""
    if kind in _LOADED:
        return _LOADED[kind]
    if kind not in KINDS:
        from spectral.errors import UsageError

        raise UsageError(f"unknown experiment kind {kind!r} (known: {', '.join(KINDS)})")
    module = importlib.import_module(KINDS[kind])
    record = getattr(module, "EXPERIMENT", None)
    if not isinstance(record, Experiment):
        raise TypeError(f"{KINDS[kind]} defines no EXPERIMENT record (an jobs.registry.Experiment)")
    if record.kind != kind:
        raise TypeError(f"{KINDS[kind]}: EXPERIMENT.kind is {record.kind!r}, registered as {kind!r}")
    _LOADED[kind] = record
    return record


def load_cell(kind: str, cell_dir: Path):
    """What the report reads from a finished cell: its experiment kind's loader."""
    return experiment(kind).load(cell_dir)


def statistics_metrics(path: Path, schema) -> UnitMetrics:
    """Metrics and verdicts of a job's statistics table of ``schema`` (``spectral.tables``: rows
    with a stable ``key``, ``value``, ``low``, ``high`` and ``verdict``): ``<key>/value``,
    ``<key>/low``, ``<key>/high`` and the param ``verdict/<key>``; non-finite numbers are left out
    (MLflow stores floats)."""
    import math

    from cluster.store import read_parquet

    metrics: dict[str, float] = {}
    params: dict[str, str] = {}
    if not path.is_file():
        return metrics, params
    for r in read_parquet(path, schema, ["key", "value", "low", "high", "verdict"]).to_pylist():
        for stat in ("value", "low", "high"):
            if r.get(stat) is not None and math.isfinite(r[stat]):
                metrics[f"{r['key']}/{stat}"] = float(r[stat])
        if r.get("verdict"):
            params[f"verdict/{r['key']}"] = r["verdict"]
    return metrics, params
