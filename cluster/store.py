"""Result files, written atomically: a reader never sees a half-written file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from spectral.errors import UsageError
from spectral.tables import conform, schema_problem


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_parquet(table: pa.Table, path: str | Path, schema: pa.Schema) -> Path:
    """Write ``table`` after checking it against ``schema`` (``spectral.tables``): a missing,
    unexpected or mistyped column is a one-line error naming the file and the column, and
    nothing is written."""
    path = Path(path)
    table = conform(table, schema, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(obj: Any, path: str | Path) -> Path:
    return write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", path)


def write_text(text: str, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_parquet(path: str | Path, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    """The table at ``path``, checked against ``schema`` (``spectral.tables``) before it is read
    (``columns``: only these, in this order). A file that is absent, unreadable or does not match
    its schema is a one-line ``UsageError`` naming the file and the column, e.g.
    ``…/heads.parquet: column 'restoration' missing (expected double)``."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such table")
    try:
        found = pq.read_schema(path)
    except (pa.ArrowException, OSError) as err:
        raise UsageError(f"{path}: not a readable Parquet file ({str(err).splitlines()[0][:160]})") from None
    problem = schema_problem(found, schema)
    if problem:
        raise UsageError(f"{path}: {problem}")
    unknown = [c for c in columns or () if c not in schema.names]
    if unknown:
        raise ValueError(f"{path}: column {unknown[0]!r} is not in the table's schema")
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in columns])
    return conform(pq.read_table(path, columns=schema.names), schema, str(path))


class CellData:
    """What one finished cell of a sweep holds, as its experiment kind's loader reads it: each
    table it declares (read and checked against its schema) and its params.json."""

    def __init__(self, path: Path, tables: dict[str, pa.Table], params: dict[str, Any]):
        self.path, self.tables, self.params = path, tables, params

    def table(self, name: str) -> pa.Table:
        if name not in self.tables:
            raise UsageError(f"{self.path / name}: no such table")
        return self.tables[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tables


def read_cell(path: str | Path, schemas: dict[str, pa.Schema]) -> CellData:
    """Every table of ``schemas`` that the cell directory holds, checked against its schema, and
    its params.json ({} when absent)."""
    path = Path(path)
    tables = {name: read_parquet(path / name, schema) for name, schema in schemas.items() if (path / name).is_file()}
    params_file = path / "params.json"
    params = json.loads(params_file.read_text(encoding="utf-8")) if params_file.is_file() else {}
    return CellData(path, tables, params)
