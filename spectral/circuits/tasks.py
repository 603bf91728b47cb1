"""The circuits job's tasks: IOI (``spectral.causal.tasks.builtin_ioi``) and induction.

Induction, in the patching format of ``spectral.causal.tasks``: clean = a span of distinct
tokens ``r`` repeated up to ``r[k]``, answer ``r[k+1]``; corrupt = the same with the first
copy's ``r[k]`` replaced by a token ``x`` outside the span (distractor ``x``), so no earlier
position follows the final token and induction has nothing to copy, while the value it would
copy is still there. Spans per model:

- the ground-truth induction model (``spectral.circuits.groundtruth``): its own task;
- organisms (``tasks.json`` with ``induction_tokens``): ``Repeat: r | r[:k+1]``, the format they
  were trained on;
- any other tokenizer: common English words that are single tokens of it.
"""

from __future__ import annotations

import json
import random

from spectral.causal.tasks import Example, builtin_ioi
from spectral.errors import UsageError
from spectral.tokens import is_single_token

ENGLISH_WORDS = ["apple", "river", "house", "green", "music", "table", "water", "light", "stone", "paper", "chair",
                 "cloud", "horse", "glass", "bread", "tiger", "dream", "ocean", "sugar", "plant", "metal", "smile",
                 "train", "money", "shirt", "clock", "field", "night", "heart", "sound"]
"""Span words for tokenizers without their own induction tokens (kept where a single token)."""
MIN_SPAN, MAX_SPAN = 4, 8


def builtin_induction(loaded, n: int = 64, seed: int = 0) -> list[Example]:
    """``n`` induction examples for ``loaded`` (module docstring)."""
    from spectral.circuits import groundtruth
    from spectral.models.loading import checkpoint_path

    if n < 1:
        raise UsageError(f"induction task: n must be at least 1 (got {n})")
    path = checkpoint_path(loaded)
    if path is not None and (path / groundtruth.MARKER).is_file():
        return groundtruth.induction_task(loaded.tokenizer, n, length=MAX_SPAN, seed=seed)
    tasks = json.loads((path / "tasks.json").read_text()) if path is not None and (path / "tasks.json").is_file() else {}
    if "induction_tokens" in tasks:
        words, prefix, separator = list(tasks["induction_tokens"]), "Repeat:", " |"
    else:
        words, prefix, separator = [w for w in ENGLISH_WORDS if is_single_token(loaded.tokenizer, " " + w)], "", ""
    if len(words) < MAX_SPAN + 1:
        raise UsageError(f"induction task: only {len(words)} span words are single tokens of this tokenizer "
                         f"(need {MAX_SPAN + 1})")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(MIN_SPAN, MAX_SPAN)
        tokens = rng.sample(words, length + 1)
        r, x = tokens[:length], tokens[length]
        k = rng.randrange(length - 1)
        first = [*r[:k], x, *r[k + 1:]]
        second = " ".join(r[:k + 1])

        def text(span):
            return " ".join(p for p in (prefix, " ".join(span) + separator, second) if p)

        out.append(Example(clean=text(r), corrupt=text(first), answer=" " + r[k + 1], distractor=" " + x))
    return out


def task_examples(loaded, task: str, n: int, seed: int) -> list[Example]:
    """The examples of ``task``: 'ioi', 'induction' or a JSONL task file."""
    from spectral.causal.tasks import read_task_file

    if task == "ioi":
        return builtin_ioi(loaded, n, seed)
    if task == "induction":
        return builtin_induction(loaded, n, seed)
    return read_task_file(task)


def pattern_token_pool(loaded) -> list[int] | None:
    """Token ids the attention-pattern scores draw their repeated sequences from: a model's own
    span tokens where it has them (organisms: ``induction_tokens``; the ground-truth model: its
    tokens), else None (every non-special id). Measured on the organisms: with ids from the
    whole vocabulary their induction scores stay <= 0.05; with their span tokens, up to 0.45."""
    from spectral.circuits import groundtruth
    from spectral.models.loading import checkpoint_path

    path = checkpoint_path(loaded)
    words: list[str] = []
    if path is not None and (path / groundtruth.MARKER).is_file():
        words = list(groundtruth.TOKENS)
    elif path is not None and (path / "tasks.json").is_file():
        words = list(json.loads((path / "tasks.json").read_text()).get("induction_tokens", []))
    ids = [loaded.tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in words]
    pool = sorted({i[0] for i in ids if len(i) == 1})
    return pool or None
