"""The organism suite and its cache: named recipes, trained once, verified on every use.

Checkpoints live in ``$EIGENGAP_CACHE/organisms/NAME`` (default ``~/.cache/eigengap``).
An entry holds a plain Hugging Face checkpoint plus ``tasks.json``, ``recipe.json`` and
``manifest.json`` (sha256 of every file). It is written to a temporary directory and renamed
into place, so a crash never leaves a half-trained entry; an entry whose files do not match
its manifest is reported as corrupted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from spectral.errors import UsageError
from spectral.organisms.language import TASKS
from spectral.organisms.train import Recipe, train

RECIPE_VERSION = 4
"""Bump when the language, tokenizer or training loop changes: older entries become stale."""

SUITE: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("organism-xs", layers=2, heads=4, hidden=128, intermediate=256, steps=1150),
        Recipe("organism-s", layers=3, heads=4, hidden=128, intermediate=512, steps=1000),
        Recipe("organism-m", layers=4, heads=8, hidden=128, intermediate=512, steps=1100),
        Recipe("organism-l", layers=6, heads=8, hidden=160, intermediate=640, steps=1200),
    )
}
SMALLEST = "organism-xs"
MANIFEST = "manifest.json"


def cache_root() -> Path:
    return Path(os.environ.get("EIGENGAP_CACHE") or Path.home() / ".cache" / "eigengap") / "organisms"


def recipe_of(name: str) -> Recipe:
    if name not in SUITE:
        raise UsageError(f"unknown organism {name!r} (known: {', '.join(SUITE)})")
    return SUITE[name]


def organism_dir(name: str, *, progress: bool = True) -> Path:
    """The checkpoint directory of organism ``name``, trained first if it is not cached."""
    recipe = recipe_of(name)
    path = cache_root() / name
    if path.exists():
        if _recipe_matches(path, recipe):
            verify(path)
            return path
        print(f"eigengap: cached {name} was trained by an older recipe; retraining it", file=sys.stderr)
    else:
        print(f"eigengap: {name} is not trained yet; training it now into {path}", file=sys.stderr)
    return train_organism(name, force=True, progress=progress)


def train_organism(name: str, *, force: bool = False, progress: bool = True) -> Path:
    """Train ``name`` into the cache (reusing a valid entry unless ``force``)."""
    recipe = recipe_of(name)
    root = cache_root()
    path = root / name
    if path.exists() and not force:
        if not _recipe_matches(path, recipe):
            raise UsageError(f"cached {name} at {path} is stale (older recipe): retrain with "
                             f"`eigengap organisms train {name} --force`")
        verify(path)
        return path
    _check_writable(root)
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        start = time.perf_counter()
        report = train(recipe, tmp, progress=progress)
        report["train_seconds"] = round(time.perf_counter() - start, 1)
        (tmp / "tasks.json").write_text(json.dumps(TASKS, indent=2) + "\n")
        (tmp / "recipe.json").write_text(json.dumps(
            {"version": RECIPE_VERSION, "recipe": recipe.as_dict(), "training": report}, indent=2) + "\n")
        _write_manifest(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def verify(path: Path) -> None:
    """Raise UsageError if any file of the entry is missing or differs from its manifest."""
    name = path.name
    hint = f"retrain with `eigengap organisms train {name} --force`"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        raise UsageError(f"cached {name} at {path} is corrupted (no readable {MANIFEST}): {hint}") from None
    for file, digest in manifest.items():
        target = path / file
        if not target.is_file():
            raise UsageError(f"cached {name} at {path} is corrupted ({file} is missing): {hint}")
        if _sha256(target) != digest:
            raise UsageError(f"cached {name} at {path} is corrupted ({file} does not match its checksum): {hint}")


def training_report(path: Path) -> dict:
    return json.loads((path / "recipe.json").read_text())["training"]


def _recipe_matches(path: Path, recipe: Recipe) -> bool:
    try:
        saved = json.loads((path / "recipe.json").read_text())
    except (OSError, json.JSONDecodeError):
        return True  # let verify() report the corruption
    return saved.get("version") == RECIPE_VERSION and saved.get("recipe") == recipe.as_dict()


def _write_manifest(path: Path) -> None:
    files = sorted(p.name for p in path.iterdir() if p.is_file() and p.name != MANIFEST)
    (path / MANIFEST).write_text(json.dumps({f: _sha256(path / f) for f in files}, indent=2) + "\n")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"organism cache {root} is not writable ({err.strerror}); set EIGENGAP_CACHE to a writable directory") from None
