"""Prompt files: plain text (one prompt per line) or JSONL with a ``text`` field."""

from __future__ import annotations

import json
from pathlib import Path

from spectral.errors import UsageError


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a file; blank lines are skipped. UsageError names the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"prompts file {str(path)!r} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise UsageError(f"prompts file {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    jsonl = path.suffix in (".jsonl", ".json") or _first_line(lines).startswith("{")
    prompts = [_parse_jsonl_line(path, i, line) for i, line in enumerate(lines, 1) if line.strip()] if jsonl else [
        line for line in lines if line.strip()
    ]
    if not prompts:
        raise UsageError(f"prompts file {str(path)!r} is empty")
    return prompts


def _first_line(lines: list[str]) -> str:
    return next((line.strip() for line in lines if line.strip()), "")


def _parse_jsonl_line(path: Path, number: int, line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise UsageError(f"{path}:{number}: expected an object with a string field 'text'")
    if not record["text"].strip():
        raise UsageError(f"{path}:{number}: 'text' is empty")
    return record["text"]
