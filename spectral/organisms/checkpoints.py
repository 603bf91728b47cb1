"""Training checkpoints of an organism: which steps are kept, how they are written, how they
are listed and verified (light: no torch; the training loop hands in the model).

A recipe with ``checkpoints = n`` (n >= 2) keeps n snapshots of the weights taken during
training, at log-spaced steps. With ``S`` the recipe's steps (step k = the weights after k
optimizer updates; step S is the final model):

    g_i    = round_half_up(S ** (i / (n - 1)))         i = 0 .. n - 1
    step_0 = 1,   step_i = max(g_i, step_{i-1} + 1)

the geometric grid from 1 to S rounded to whole steps, each step pushed one past the previous
where rounding would repeat it (early on, where the grid is denser than one step): exactly n
distinct steps, the first 1 and the last S (the push never passes S when n <= S, as
g_j + (n - 1 - j) <= S for all j by convexity). Example: S = 12, n = 5 -> 1, 2, 3, 6, 12.

Layout, inside the directory training writes (the organism's cache entry)::

    checkpoints/manifest.json
    checkpoints/step-1/   config.json, generation_config.json, model.safetensors,
                          tokenizer files, tasks.json  (a model spec: load_model(str(path)))
    ...
    checkpoints/step-S/

``manifest.json`` lists every step (``step``, ``path`` relative to ``checkpoints/``,
``train_loss``, ``lr``, and the sha256 of each of its files). Each step is written to a
temporary directory, renamed into place, and only then added to the manifest (itself
replaced atomically), so a training cut short lists only complete steps.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from spectral.errors import UsageError

CHECKPOINTS = "checkpoints"
"""The folder of an organism directory that holds its training checkpoints."""
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Checkpoint:
    """One verified training checkpoint."""

    step: int
    """Optimizer updates done (1 .. the recipe's steps)."""
    path: Path
    """Its directory: a plain Hugging Face checkpoint, usable as a model spec."""
    train_loss: float
    """The loss of step ``step``'s training batch, computed with the weights before that
    step's update (what the training loop logs)."""
    lr: float
    """The learning rate of step ``step``'s update."""


def checkpoint_steps(total: int, n: int) -> list[int]:
    """The ``n`` log-spaced steps out of ``total`` (module docstring); [] for n = 0."""
    if n == 0:
        return []
    if not 2 <= n <= total:
        raise UsageError(f"checkpoints={n}: must be 0 (none) or between 2 and the recipe's {total} steps")
    steps: list[int] = []
    for i in range(n):
        grid = math.floor(total ** (i / (n - 1)) + 0.5)
        steps.append(max(grid, steps[-1] + 1) if steps else 1)
    return steps


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class CheckpointWriter:
    """Called by the training loop after every step; saves the steps it was given."""

    def __init__(self, root: Path, steps: list[int], tokenizer, recipe: dict, tasks: dict):
        self.root, self.steps, self.tokenizer = root, steps, tokenizer
        self.header = {"recipe": recipe, "total_steps": recipe["steps"], "requested": len(steps),
                       "formula": "step_0 = 1, step_i = max(round_half_up(S ** (i / (n - 1))), step_(i-1) + 1)"}
        self.tasks_text = json.dumps(tasks, indent=2) + "\n"
        self.written: list[dict] = []
        root.mkdir(parents=True, exist_ok=True)
        self._write_manifest()

    def __call__(self, step: int, model, loss: float, lr: float) -> None:
        if step not in self.steps:
            return
        final, tmp = self.root / f"step-{step}", self.root / f".step-{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self._stage(tmp, model)
            digests = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            shutil.rmtree(final, ignore_errors=True)  # left by an earlier, interrupted run
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.written.append({"step": step, "path": final.name, "train_loss": loss, "lr": lr, "files": digests})
        self._write_manifest()

    def finish(self) -> None:
        """Raise if training ended before every checkpoint step was reached."""
        missing = sorted(set(self.steps) - {e["step"] for e in self.written})
        if missing:
            raise RuntimeError(f"training ended before checkpoint steps {missing} "
                               "(the loader had fewer batches than the recipe's steps)")

    def _stage(self, tmp: Path, model) -> None:
        from transformers.utils import logging as hf_logging  # only while training, which has it loaded

        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Writing model shards" bar per checkpoint
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            if shown:
                hf_logging.enable_progress_bar()
        self.tokenizer.save_pretrained(tmp)
        (tmp / "tasks.json").write_text(self.tasks_text)

    def _write_manifest(self) -> None:
        path, tmp = self.root / MANIFEST, self.root / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps({**self.header, "steps": self.written}, indent=2) + "\n")
        os.replace(tmp, path)


def _root(directory: Path) -> Path:
    """The ``checkpoints/`` folder of an organism directory (or the folder itself)."""
    directory = Path(directory)
    return directory if directory.name == CHECKPOINTS else directory / CHECKPOINTS


def checkpoints_recipe(directory: Path) -> dict:
    """The recipe the checkpoints of an organism directory (or its ``checkpoints/`` folder) were
    trained with, from their manifest ({} when it names none)."""
    try:
        recipe = json.loads((_root(directory) / MANIFEST).read_text()).get("recipe")
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}
    return recipe if isinstance(recipe, dict) else {}


def list_checkpoints(directory: Path) -> list[Checkpoint]:
    """The training checkpoints of an organism directory (or of its ``checkpoints/`` folder),
    in step order, each verified against the manifest's checksums. A step whose directory or
    file is gone or differs from its checksum is a one-line UsageError naming the step."""
    directory = Path(directory)
    root = _root(directory)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        entries, recipe, total, requested = (manifest[k] for k in ("steps", "recipe", "total_steps", "requested"))
    except FileNotFoundError:
        raise UsageError(f"{directory} has no training checkpoints (no {CHECKPOINTS}/{MANIFEST}); train an organism "
                         "with them: eigengap organisms train NAME --checkpoints 30") from None
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise UsageError(f"checkpoints of {directory} are corrupted (unreadable {CHECKPOINTS}/{MANIFEST})") from None
    hint = (f"retrain with `eigengap organisms train {recipe.get('name')} --seeds {recipe.get('seed')} "
            f"--checkpoints {requested} --force`")
    out = []
    for entry in entries:
        step, path = entry["step"], root / entry["path"]
        for file, digest in entry["files"].items():
            if not (path / file).is_file():
                raise UsageError(f"checkpoint step {step} of {directory} is missing ({entry['path']}/{file} is gone): {hint}")
            if sha256_file(path / file) != digest:
                raise UsageError(f"checkpoint step {step} of {directory} is corrupted ({entry['path']}/{file} does not "
                                 f"match its checksum): {hint}")
        out.append(Checkpoint(step, path, entry["train_loss"], entry["lr"]))
    missing = sorted(set(checkpoint_steps(total, requested)) - {c.step for c in out})
    if missing:
        raise UsageError(f"checkpoint step{'s' * (len(missing) > 1)} {', '.join(map(str, missing))} of {directory} "
                         f"{'are' if len(missing) > 1 else 'is'} missing (not in {CHECKPOINTS}/{MANIFEST}: training was "
                         f"cut short): {hint}")
    return sorted(out, key=lambda c: c.step)
