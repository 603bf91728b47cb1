"""Patching tasks: clean/corrupt prompt pairs with an answer and a distractor token.

A task file is JSONL, one example per line::

    {"clean": "...", "corrupt": "...", "answer": " Mary", "distractor": " John"}

Answer and distractor must be single tokens; clean and corrupt must tokenise to the same
length. Built in: IOI from an organism's ``tasks.json``, and an IOI generator for English
tokenizers (GPT-2, Pythia, Llama) with standard name, place and object lists.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from spectral.errors import UsageError
from spectral.tokens import is_single_token, right_padded, single_token
from spectral.organisms.language import ioi_example

ENGLISH_IOI = {
    "names": ["Mary", "John", "Alice", "Bob", "Sarah", "David", "Emma", "James", "Lisa", "Michael",
              "Anna", "Tom", "Kate", "Paul", "Laura", "Mark", "Linda", "Peter", "Susan", "Daniel"],
    "places": ["store", "park", "station", "library", "market", "beach", "school", "garden", "office", "hospital"],
    "objects": ["drink", "book", "ball", "letter", "flower", "key", "ring", "bag", "ticket", "gift"],
    "ioi_templates": [
        "When {A} and {B} went to the {place}, {B} gave a {object} to",
        "When {B} and {A} went to the {place}, {B} gave a {object} to",
        "After {A} and {B} arrived at the {place}, {B} handed the {object} to",
        "After {B} and {A} arrived at the {place}, {B} handed the {object} to",
        "While {A} and {B} were working at the {place}, {B} passed a {object} to",
        "While {B} and {A} were working at the {place}, {B} passed a {object} to",
    ],
}
"""Standard IOI word lists (Wang et al. style); names that are not single tokens in a
tokenizer are dropped for that tokenizer."""


@dataclass(frozen=True)
class Example:
    clean: str
    corrupt: str
    answer: str
    distractor: str


@dataclass
class EncodedTask:
    """Token ids of a task, right-padded; ``last`` is each example's final real position."""

    clean: torch.Tensor  # (n, pos)
    corrupt: torch.Tensor  # (n, pos)
    mask: torch.Tensor  # (n, pos) 1 = real token (same for clean and corrupt)
    last: torch.Tensor  # (n,)
    answer: torch.Tensor  # (n,)
    distractor: torch.Tensor  # (n,)
    examples: list[Example]

    def __len__(self) -> int:
        return len(self.examples)


def read_task_file(path: str | Path) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"task file {str(path)!r} does not exist")
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        missing = [k for k in ("clean", "corrupt", "answer", "distractor")
                   if not isinstance(record, dict) or not isinstance(record.get(k), str)]
        if missing:
            raise UsageError(f"{path}:{number}: missing string field {missing[0]!r}")
        examples.append(Example(record["clean"], record["corrupt"], record["answer"], record["distractor"]))
    if not examples:
        raise UsageError(f"task file {str(path)!r} is empty")
    return examples


def encode(tokenizer, examples: list[Example], source: str = "task") -> EncodedTask:
    """Tokenise and check every example; UsageError names the first bad one (1-based)."""
    rows = []
    for i, ex in enumerate(examples, 1):
        clean = tokenizer(ex.clean, add_special_tokens=False)["input_ids"]
        corrupt = tokenizer(ex.corrupt, add_special_tokens=False)["input_ids"]
        if len(clean) != len(corrupt):
            raise UsageError(f"{source}:{i}: clean and corrupt differ in length ({len(clean)} vs {len(corrupt)} tokens)")
        if not clean:
            raise UsageError(f"{source}:{i}: the clean prompt is empty")
        ids = [single_token(tokenizer, getattr(ex, field), f"{source}:{i}", field)
               for field in ("answer", "distractor")]
        rows.append((clean, corrupt, *ids))
    clean_t, mask = right_padded(tokenizer, [r[0] for r in rows])
    corrupt_t, _ = right_padded(tokenizer, [r[1] for r in rows])  # same lengths as clean: same mask
    return EncodedTask(clean_t, corrupt_t, mask, mask.sum(1) - 1, torch.tensor([r[2] for r in rows]),
                       torch.tensor([r[3] for r in rows]), list(examples))


def ioi_examples(tasks: dict, n: int, seed: int = 0) -> list[Example]:
    """``n`` IOI examples (templates cycled, so both name orders are balanced)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ex = ioi_example(rng, i % len(tasks["ioi_templates"]), tasks)
        out.append(Example(ex.clean, ex.corrupt, ex.answer, ex.distractor))
    return out


def english_ioi(tokenizer) -> dict:
    """ENGLISH_IOI restricted to words that are single tokens (with a leading space) here."""
    tasks = {key: list(words) if key == "ioi_templates" else [w for w in words if is_single_token(tokenizer, " " + w)]
             for key, words in ENGLISH_IOI.items()}
    if len(tasks["names"]) < 3:
        raise UsageError("this tokenizer has fewer than 3 single-token names: the built-in IOI task does not apply")
    return tasks


def builtin_ioi(loaded, n: int = 64, seed: int = 0) -> list[Example]:
    """IOI for ``loaded``: from its ``tasks.json`` when it has one (organisms), else English."""
    from spectral.models.loading import checkpoint_path

    path = checkpoint_path(loaded)
    if path is not None and (path / "tasks.json").is_file():
        tasks = json.loads((path / "tasks.json").read_text())
    else:
        tasks = english_ioi(loaded.tokenizer)
    return ioi_examples(tasks, n, seed)
