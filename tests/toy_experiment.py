"""A toy experiment kind, added through the registry alone (``tests/test_registry.py``): one
module with its ``EXPERIMENT`` record, registered with ``jobs.registry.register``. Nothing in
cli, sweep, plan, tracking or the report knows about it.

It writes one table, ``toy.parquet``: for every layer of the model (from its architecture),
``value = scale x (layer + 1)``."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
from pydantic import Field

from jobs.config import JobConfig, out_dir_ready
from jobs.registry import Experiment

RESULT_FILE = "toy.parquet"
TOY = pa.schema([pa.field("layer", pa.int64(), nullable=False), pa.field("value", pa.float64(), nullable=False)])


class ToyConfig(JobConfig):
    model: str
    """Model spec."""
    out: Path
    """Output directory."""
    scale: float = Field(1.0, gt=0)
    """Multiplies every value."""
    force: bool = False
    """Overwrite toy.parquet in --out."""


def run(config: ToyConfig, *, echo=print) -> pa.Table:
    from cluster.store import write_parquet
    from spectral.models.facts import model_facts

    out_dir_ready(config.out, RESULT_FILE, config.force)
    layers = model_facts(config.model)["layers"]
    table = pa.table({"layer": list(range(layers)), "value": [config.scale * (l + 1) for l in range(layers)]},
                     schema=TOY)
    write_parquet(table, config.out / RESULT_FILE, TOY)
    echo(f"wrote {config.out / RESULT_FILE}")
    return table


def cost(params, facts) -> float:
    return 1000.0 * facts.layers


def metrics(cell_dir: Path) -> tuple[dict[str, float], dict[str, str]]:
    from cluster.store import read_parquet

    values = read_parquet(cell_dir / RESULT_FILE, TOY)["value"].to_pylist()
    return {"toy_total": float(sum(values))}, {"verdict/toy_positive": "PASS" if min(values) > 0 else "FAIL"}


def load(cell_dir: Path):
    from cluster.store import read_cell

    return read_cell(cell_dir, EXPERIMENT.tables)


EXPERIMENT = Experiment(kind="toy", help="a toy experiment (tests)", config=ToyConfig, run=run,
                        tables={RESULT_FILE: TOY}, cost=cost, metrics=metrics, load=load)
