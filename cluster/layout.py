"""Where a sweep run's files live: the one description of a run directory.

A sweep run is ``OUT/RUN_ID``. It holds ``sweep.json`` (the config and its hash), one directory
per model ``model=<model>/`` with ``model.json`` (its size facts), and in it one directory per
*cell* - one experiment of the sweep on one model - ``experiment=<i>-<kind>/`` holding that
experiment's result files. ``cell.json`` in a cell's directory is written atomically, last:
it is the one completion marker that sweep (resume), tracking and report read. A cell with
result files but no marker is unfinished and is run again. ``tracking.json`` records what
MLflow holds, ``mlflow.db`` is the default embedded store, ``report/`` the cross-model report.

Vocabulary: a *cell* is a (model, experiment) pair of a sweep; a *work unit* is one piece of a
job that an executor sends to a worker (a shard of prompts, a layer's heads).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def safe(text: str) -> str:
    """A model spec as a directory name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


@dataclass(frozen=True)
class Cell:
    """One experiment of a sweep on one model."""

    model: str
    index: int
    """The experiment's position in the sweep config."""
    kind: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The cell's directory relative to the run directory (also its id in MLflow)."""
        return f"model={safe(self.model)}/experiment={self.index}-{self.kind}"

    @property
    def label(self) -> str:
        return f"experiment {self.index} ({self.kind})"

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "index": self.index, "kind": self.kind, "params": self.params}


@dataclass(frozen=True)
class RunLayout:
    """The paths of one sweep run directory."""

    root: Path

    SWEEP = "sweep.json"
    MODEL = "model.json"
    DONE = "cell.json"
    TRACKING = "tracking.json"
    MLFLOW_DB = "mlflow.db"

    @property
    def run_id(self) -> str:
        return self.root.name

    @property
    def sweep_file(self) -> Path:
        return self.root / self.SWEEP

    @property
    def tracking_file(self) -> Path:
        return self.root / self.TRACKING

    @property
    def mlflow_db(self) -> Path:
        return self.root / self.MLFLOW_DB

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    def is_run(self) -> bool:
        return self.sweep_file.is_file()

    def model_dir(self, model: str) -> Path:
        return self.root / f"model={safe(model)}"

    def model_file(self, model: str) -> Path:
        return self.model_dir(model) / self.MODEL

    def cell_dir(self, cell: Cell) -> Path:
        return self.root / cell.name

    def marker(self, cell: Cell) -> Path:
        return self.cell_dir(cell) / self.DONE

    def finished(self, cell: Cell) -> bool:
        """True once the cell's marker is written (its results are complete)."""
        return self.marker(cell).is_file()

    LEGACY_DONE = "unit.json"
    """The completion marker of run directories written before cells had ``cell.json``."""

    def check_current(self) -> None:
        """Refuse, with one line, a run directory an older eigengap wrote (its cells marked by
        ``unit.json``): resuming it would run every cell again over the old results, and its
        tables predate the schemas the report checks."""
        old = next(self.root.glob(f"model=*/experiment=*/{self.LEGACY_DONE}"), None)
        if old is not None:
            from spectral.errors import UsageError

            raise UsageError(f"{self.root} was written by an older eigengap ({old.relative_to(self.root)}; cells "
                             f"are now marked by {self.DONE}): rerun the sweep under another --run-id or --out")

    def sweep_state(self) -> dict[str, Any]:
        return json.loads(self.sweep_file.read_text(encoding="utf-8"))

    def cells(self) -> list[Cell]:
        """Every cell of the run's stored config, model-major (the order the sweep runs them)."""
        config = self.sweep_state()["config"]
        return [Cell(model, i, e["kind"], dict(e.get("params") or {}))
                for model in config["models"] for i, e in enumerate(config["experiments"])]
