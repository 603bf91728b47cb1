"""Steering vectors: ActAdd (one contrast pair) and CAA (the mean difference over many), read
from the residual stream entering each block (``resid_pre``) at each prompt's last real token
(or the token mean, or one index), and the right-padded prompt batches they are read from.
Injection is in ``spectral.steering.injection``, the measures of effect and side effect in
``spectral.steering.measure``, concepts in ``spectral.steering.concepts``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from spectral.errors import UsageError
from spectral.models.adapter import HeadAdapter
from spectral.steering.concepts import Concept
from spectral.tokens import right_padded


@dataclass
class Batch:
    """Right-padded token ids of prompts, with each prompt's last real position."""

    ids: Tensor
    mask: Tensor
    last: Tensor

    @classmethod
    def of(cls, tokenizer, texts: Sequence[str], device=None, source: str = "prompts") -> Batch:
        rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        unk = getattr(tokenizer, "unk_token_id", None)
        for text, row in zip(texts, rows):
            if not row:
                raise UsageError(f"{source}: the prompt {text!r} is empty")
            if unk is not None and unk in row:
                raise UsageError(f"{source}: the prompt {text!r} has words that are not in the vocabulary")
        ids, mask = right_padded(tokenizer, rows)
        batch = cls(ids, mask, mask.sum(1) - 1)
        return batch.to(device) if device is not None else batch

    def to(self, device) -> Batch:
        return Batch(self.ids.to(device), self.mask.to(device), self.last.to(device))


ReadAt = Literal["last", "mean"] | int
"""Where a vector is read in each contrast prompt: its last real token, the mean over its real
tokens, or a token index (0-based; every prompt must be that long)."""


@torch.no_grad()
def read_site(adapter: HeadAdapter, batch: Batch, layers: Sequence[int], site: str, at: ReadAt = "last"
              ) -> dict[int, Tensor]:
    """The adapter's ``site`` (shaped (batch, pos, ...)) in each of ``layers``, one row per prompt
    at ``at``: its last real token, the mean over its real tokens, or a token index. One forward pass."""
    out: dict[int, Tensor] = {}
    rows = torch.arange(batch.ids.shape[0], device=batch.ids.device)
    if isinstance(at, int) and not 0 <= at <= int(batch.last.min()):
        raise UsageError(f"position {at} is past the end of the shortest contrast prompt "
                         f"({int(batch.last.min()) + 1} tokens)")

    def keep(layer, site, t):
        if at == "last":
            value = t[rows.to(t.device), batch.last.to(t.device)]
        elif at == "mean":
            m = batch.mask.to(t.device, t.dtype).reshape(*batch.mask.shape, *[1] * (t.dim() - 2))
            value = (t * m).sum(1) / m.sum(1)
        else:
            value = t[:, at]
        out[layer] = value.detach().float().clone()

    with adapter.trace([site], keep, layers=layers):
        adapter.model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False)
    return out


def read_residuals(adapter: HeadAdapter, batch: Batch, layers: Sequence[int], at: ReadAt = "last") -> dict[int, Tensor]:
    """Residual stream entering each of ``layers``, one (n, d_model) row per prompt, at ``at``."""
    return read_site(adapter, batch, layers, "resid_pre", at)


def steering_vectors(adapter: HeadAdapter, tokenizer, pairs: Sequence[tuple[str, str]], layers: Sequence[int],
                     device=None, at: ReadAt = "last") -> dict[int, Tensor]:
    """Mean over ``pairs`` of resid_pre(positive) - resid_pre(negative) read ``at`` the last
    token (default), the token mean or a token index, per layer. One pair is ActAdd; many
    pairs is CAA (contrastive activation addition)."""
    layers = adapter.check_layers(layers)
    pos = read_residuals(adapter, Batch.of(tokenizer, [p for p, _ in pairs], device, "pairs"), layers, at)
    neg = read_residuals(adapter, Batch.of(tokenizer, [n for _, n in pairs], device, "pairs"), layers, at)
    return {l: (pos[l] - neg[l]).mean(0) for l in layers}


def actadd(adapter, tokenizer, concept: Concept, layers, device=None, at: ReadAt = "last") -> dict[int, Tensor]:
    """ActAdd: the first contrast pair only."""
    return steering_vectors(adapter, tokenizer, concept.pairs[:1], layers, device, at)


def caa(adapter, tokenizer, concept: Concept, layers, device=None, at: ReadAt = "last") -> dict[int, Tensor]:
    """CAA: the mean difference over every contrast pair."""
    return steering_vectors(adapter, tokenizer, concept.pairs, layers, device, at)
