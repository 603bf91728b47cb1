"""The table schemas (``spectral.tables``): a table that does not match its schema is refused,
with one line naming the file, the column, the type expected and the type found, when it is
written and when it is read; every schema round-trips; the jobs write what their schemas say."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.store import read_parquet, write_parquet
from jobs.cli import main
from spectral import tables
from spectral.errors import UsageError
from tests.conftest import TINY

EXAMPLE = {pa.float64(): 0.5, pa.int64(): 3, pa.int32(): 2, pa.string(): "x", pa.bool_(): True,
           pa.list_(pa.float64()): [0.25, 0.75], pa.list_(pa.int64()): [4, 5]}


def rows(schema: pa.Schema, n: int = 2) -> list[dict]:
    return [{f.name: EXAMPLE[f.type] for f in schema} for _ in range(n)]


def heads(**change) -> pa.Table:
    """validate's heads.parquet, two heads, with columns replaced or removed (``None``)."""
    columns = {"layer": pa.array([0, 1], pa.int64()), "head": pa.array([0, 0], pa.int64()),
               "gap": pa.array([0.5, 0.9]), "restoration": pa.array([0.8, 0.1]), "unstable": pa.array([True, False]),
               "restoration_note": pa.array(["", ""])}
    columns.update(change)
    return pa.table({k: v for k, v in columns.items() if v is not None})


@pytest.mark.parametrize("name", sorted(tables.ALL))
def test_every_schema_round_trips(tmp_path, name):
    schema = tables.ALL[name]
    for n in (2, 0):  # an empty table keeps its columns and types
        table = tables.from_rows(rows(schema, n), schema, name)
        path = write_parquet(table, tmp_path / f"{name}-{n}.parquet", schema)
        back = read_parquet(path, schema)
        assert back.schema.equals(schema) and back.num_rows == n
        assert back.equals(table)


BAD = [
    (dict(restoration=None, importance=pa.array([0.8, 0.1])), "column 'restoration' missing (expected double)"),
    (dict(gap=pa.array([1, 2], pa.int64())), "column 'gap' has type int64, expected double"),
    (dict(gap=pa.array([None, None], pa.null())), "column 'gap' has type null, expected double"),
    (dict(extra=pa.array(["a", "b"])), "unexpected column 'extra' (string); the schema has no such column"),
    (dict(gap=pa.array([0.5, None])), "column 'gap' holds 1 null(s); the schema declares it not nullable (double)"),
]


@pytest.mark.parametrize("change, problem", BAD)
def test_a_table_off_its_schema_is_not_written(tmp_path, change, problem):
    path = tmp_path / "heads.parquet"
    with pytest.raises(UsageError) as err:
        write_parquet(heads(**change), path, tables.VALIDATE_HEADS)
    assert str(err.value) == f"{path}: {problem}"
    assert not path.exists() and list(tmp_path.iterdir()) == []  # nothing written, no temporary file left


@pytest.mark.parametrize("change, problem", BAD)
def test_a_table_off_its_schema_is_not_read(tmp_path, change, problem):
    """E.g. a heads.parquet written before 'importance' became 'restoration': a one-line
    UsageError, not a KeyError deep in the report."""
    path = tmp_path / "heads.parquet"
    pq.write_table(heads(**change), path)
    with pytest.raises(UsageError) as err:
        read_parquet(path, tables.VALIDATE_HEADS)
    assert str(err.value) == f"{path}: {problem}"
    assert "\n" not in str(err.value)


def test_columns_in_another_order_conform_and_nullable_columns_hold_nulls(tmp_path):
    table = heads().select(["restoration_note", "gap", "head", "layer", "restoration", "unstable"])
    write_parquet(table, tmp_path / "h.parquet", tables.VALIDATE_HEADS)
    assert read_parquet(tmp_path / "h.parquet", tables.VALIDATE_HEADS).column_names == tables.VALIDATE_HEADS.names
    assert read_parquet(tmp_path / "h.parquet", tables.VALIDATE_HEADS, ["gap", "layer"]).column_names == ["gap", "layer"]
    patch = tables.from_rows([{**rows(tables.PATCH, 1)[0], "restoration_exact": None}], tables.PATCH, "patch")
    write_parquet(patch, tmp_path / "p.parquet", tables.PATCH)  # null unless the method is attribution
    assert read_parquet(tmp_path / "p.parquet", tables.PATCH)["restoration_exact"].to_pylist() == [None]


def test_absent_and_unreadable_files_are_one_line_errors(tmp_path):
    with pytest.raises(UsageError, match=r"^\S+/none\.parquet: no such table$"):
        read_parquet(tmp_path / "none.parquet", tables.SCAN)
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(UsageError, match=r"^\S+/bad\.parquet: not a readable Parquet file \("):
        read_parquet(tmp_path / "bad.parquet", tables.SCAN)


def test_rows_with_a_missing_or_an_extra_key_are_refused():
    """``pa.Table.from_pylist`` alone would drop an extra key or null a missing one silently."""
    row = rows(tables.STEER_GRID, 1)[0]
    with pytest.raises(ValueError, match=r"^steer: grid: row 0 lacks column 'kl'$"):
        tables.from_rows([{k: v for k, v in row.items() if k != "kl"}], tables.STEER_GRID, "steer: grid")
    with pytest.raises(ValueError, match=r"^steer: grid: row 0 has column 'kl_low', not in the schema$"):
        tables.from_rows([{**row, "kl_low": 0.1}], tables.STEER_GRID, "steer: grid")


def test_the_scan_schema_has_a_column_per_metric():
    from spectral.kernels.metrics import SpectrumMetrics

    assert set(SpectrumMetrics.names()) <= set(tables.SCAN.names)


# --- real jobs write what their schemas say ---------------------------------------------------

@pytest.mark.parametrize("kernel", ["key", "weights"])
def test_the_scan_job_writes_its_schema(tmp_path, prompts_file, kernel):
    out = tmp_path / kernel
    model = TINY["gpt_neox"].replace("layers=3", "layers=2")
    assert main(["scan", "--model", model, "--prompts", str(prompts_file), "--kernel", kernel, "--out", str(out)]) == 0
    assert pq.read_schema(out / "scan.parquet").remove_metadata().equals(tables.SCAN)
    table = read_parquet(out / "scan.parquet", tables.SCAN)
    assert table.num_rows == 2 * 4 and set(table["kernel"].to_pylist()) == {kernel}


def test_the_validate_job_writes_its_schemas(organism_cache, tmp_path):
    from jobs.registry import experiment

    out = tmp_path / "v"
    assert main(["validate", "--model", str(organism_cache), "--n-examples", "8", "--out", str(out)]) == 0
    written = experiment("validate").tables
    assert set(written) == {p.name for p in out.glob("*.parquet")}
    for name, schema in written.items():
        assert pq.read_schema(out / name).remove_metadata().equals(schema), name
        assert read_parquet(out / name, schema).num_rows > 0
    statistics = read_parquet(out / "validate.parquet", tables.VALIDATE)
    assert statistics["key"].to_pylist()[:2] == ["importance_correlation", "importance_correlation_gap"]
    assert json.loads((out / "params.json").read_text())["scan_set"] == "held-out"
    assert np.isfinite(read_parquet(out / "heads.parquet", tables.VALIDATE_HEADS, ["restoration"])
                       ["restoration"].to_numpy()).any()
