"""Tokenizers: the offline byte-level one, and the two helpers every job tokenises with.

- ``byte_tokenizer``: every UTF-8 byte is one token (ids 0-255 in GPT-2's byte-to-unicode
  order), then ``<|endoftext|>`` and ``<|pad|>``. No merges: any text round-trips exactly and
  nothing has to be downloaded. Real checkpoints bring their own tokenizer.
- ``right_padded``: token-id rows as one right-padded batch with its attention mask.
- ``single_token`` / ``is_single_token``: a word that must be exactly one known token (answers,
  steering target words, organism task words).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from jaxtyping import Int
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import Tensor
from transformers import PreTrainedTokenizerFast

from spectral.errors import UsageError

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """The byte-level tokenizer (258 ids); padding on the right."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=_byte_value)
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    vocab[EOS] = len(vocab)
    vocab[PAD] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=EOS, pad_token=PAD, padding_side="right"
    )


def _byte_value(ch: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode for one character."""
    code = ord(ch)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


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
