"""The two tokenising helpers every package uses (scan, patching tasks, steering, organisms).

- ``right_padded``: token-id rows as one right-padded batch with its attention mask.
- ``single_token`` / ``is_single_token``: a word that must be exactly one known token (answers,
  steering target words, organism task words).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from jaxtyping import Int
from torch import Tensor

from spectral.errors import UsageError


class Padded(NamedTuple):
    """A right-padded batch of token ids."""

    input_ids: Int[Tensor, "batch pos"]
    """Each row's tokens first, then the pad id."""
    attention_mask: Int[Tensor, "batch pos"]
    """1 on real tokens, 0 on padding."""

    def to(self, device) -> Padded:
        return Padded(self.input_ids.to(device), self.attention_mask.to(device))


def pad_id(tokenizer) -> int:
    """The id padding is filled with: the tokenizer's pad token, or 0 when it has none (the mask
    hides padded positions, so their id never enters a result)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def right_padded(tokenizer, rows: Sequence[Sequence[int]], device=None) -> Padded:
    """Token-id rows (one per text) as one batch, right-padded to the longest row."""
    if not rows:
        raise ValueError("right_padded: no rows to pad")
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    padded = Padded(ids, mask)
    return padded.to(device) if device is not None else padded


def _word_ids(tokenizer, word: str) -> list[int]:
    return tokenizer(word, add_special_tokens=False)["input_ids"]


def is_single_token(tokenizer, word: str) -> bool:
    """Whether ``word`` is exactly one token that the vocabulary knows (not the unknown token)."""
    ids = _word_ids(tokenizer, word)
    unk = getattr(tokenizer, "unk_token_id", None)
    return len(ids) == 1 and (unk is None or ids[0] != unk)


def single_token(tokenizer, word: str, source: str, what: str = "word") -> int:
    """The id of ``word``, which must be exactly one known token; otherwise a UsageError naming
    the source (file, task line, concept), what the word is and its token count."""
    ids = _word_ids(tokenizer, word)
    if len(ids) != 1:
        raise UsageError(f"{source}: {what} {word!r} is {len(ids)} tokens, not one")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids[0] == unk:
        raise UsageError(f"{source}: {what} {word!r} is not in the vocabulary")
    return ids[0]
