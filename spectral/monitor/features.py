"""Per-prompt features a runtime monitor reads (issue 19, point 2): the heads' spectra of each
prompt, and the activations the baselines read, from one forward pass per batch.

- **Spectral features** (``spectral_features``), per (layer, key head) of each prompt on its own:
  the key kernel of the prompt's raw keys (``spectral.kernels.key``, the scan's definition:
  centred, ridge 1e-2 absolute, scale 1 / d_head) through ``KEY_METRICS`` (gap, entropy,
  effective rank); and per (layer, head) the attention of the prompt's last position over its
  context, the distribution p = softmax(scores) (``ATTENTION_METRICS``: entropy -sum p log p,
  top-1 probability, top-2 margin (p1 - p2) / p1). Columns are named ``L{l}.H{h}.{metric}``.
- **Activations** (``activations``): the residual stream after the last block at the prompt's last
  token (Mahalanobis baseline) and every head's output ``z`` there (the spectral-signature
  baseline of Tran et al. 2018), from the same forward pass.

A prompt needs at least 3 tokens (a key kernel of 2 centred keys has one non-zero eigenvalue and
no gap): fewer is a UsageError naming it, never a silent NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from spectral.errors import UsageError
from spectral.kernels.key import KeyStats, key_kernel_spectra
from spectral.models.adapter import HeadAdapter
from spectral.steering.vectors import Batch

KEY_METRICS = ("gap", "entropy", "effective_rank")
ATTENTION_METRICS = ("attn_entropy", "attn_top1", "attn_gap")
MIN_TOKENS = 3


@dataclass(frozen=True)
class PromptFeatures:
    """Features of a set of prompts, one row each."""

    spectral: np.ndarray
    """(prompts, spectral features)."""
    names: tuple[str, ...]
    residual: np.ndarray
    """(prompts, d_model): the final residual stream at the last token."""
    heads: np.ndarray
    """(prompts, layers x heads x d_head): every head's output z at the last token."""


def feature_names(n_layers: int, n_heads: int, n_kv_heads: int) -> tuple[str, ...]:
    key = [f"L{l}.H{h}.{m}" for l in range(n_layers) for h in range(n_kv_heads) for m in KEY_METRICS]
    att = [f"L{l}.H{h}.{m}" for l in range(n_layers) for h in range(n_heads) for m in ATTENTION_METRICS]
    return tuple(key + att)


def attention_metrics(p: np.ndarray) -> np.ndarray:
    """(..., 3) ``ATTENTION_METRICS`` of distributions p (..., n) over the real keys."""
    q = np.clip(p, 1e-300, None)
    entropy = -(p * np.log(q)).sum(-1)
    top = -np.sort(-p, axis=-1)
    p1 = top[..., 0]
    p2 = top[..., 1] if p.shape[-1] > 1 else np.zeros_like(p1)
    return np.stack([entropy, p1, (p1 - p2) / np.where(p1 > 0, p1, 1.0)], axis=-1)


@torch.no_grad()
def prompt_features(adapter: HeadAdapter, tokenizer, prompts: Sequence[str], *, batch_size: int = 32,
                    source: str = "prompts") -> PromptFeatures:
    """Spectral features and activations of every prompt (module docstring)."""
    if not prompts:
        raise UsageError(f"{source}: no prompts")
    device = adapter.model.get_input_embeddings().weight.device
    group = adapter.n_heads // adapter.n_kv_heads
    kv_first = torch.arange(adapter.n_kv_heads) * group
    L, H, K, d = adapter.n_layers, adapter.n_heads, adapter.n_kv_heads, adapter.d_head
    spectral, residual, heads = [], [], []
    for start in range(0, len(prompts), batch_size):
        texts = list(prompts[start:start + batch_size])
        batch = Batch.of(tokenizer, texts, device, source)
        short = np.flatnonzero(batch.mask.sum(1).cpu().numpy() < MIN_TOKENS)
        if short.size:
            raise UsageError(f"{source}: prompt {start + int(short[0])} ({texts[short[0]]!r}) has fewer than "
                             f"{MIN_TOKENS} tokens: its key kernel has no gap")
        n = len(texts)
        keys: dict[int, Tensor] = {}
        probs: dict[int, np.ndarray] = {}
        zs: dict[int, Tensor] = {}
        rows = torch.arange(n, device=device)
        last = batch.last.to(device)

        def keep(layer: int, site: str, t: Tensor) -> None:
            if site == "keys_raw":  # (batch, pos, head, d_head)
                keys[layer] = t[:, :, kv_first.to(t.device)].detach()
            elif site == "probs":  # (batch, head, query, key)
                probs[layer] = t[rows, :, last].double().cpu().numpy()  # (batch, head, key)
            elif site == "result":  # (batch, pos, head, d_head)
                zs[layer] = t[rows, last].reshape(n, -1).float().cpu()

        with adapter.trace(["keys_raw", "probs", "result"], keep, attention_mask=batch.mask):
            out = adapter.model(input_ids=batch.ids, attention_mask=batch.mask, output_hidden_states=True,
                                use_cache=False)
        stats = KeyStats.zeros(n * L, K, d)
        for l in range(L):
            for i in range(n):
                stats.update(i * L + l, keys[l][i:i + 1], batch.mask[i:i + 1].bool())
        metrics = key_kernel_spectra(stats).metrics
        key_part = np.stack([metrics[m].reshape(n, L, K) for m in KEY_METRICS], axis=-1).reshape(n, -1)
        mask = batch.mask.cpu().numpy().astype(bool)
        att = np.zeros((n, L, H, len(ATTENTION_METRICS)))
        for i in range(n):
            for l in range(L):
                att[i, l] = attention_metrics(probs[l][i][:, mask[i]])
        spectral.append(np.concatenate([key_part, att.reshape(n, -1)], axis=1))
        residual.append(out.hidden_states[-1][rows, last].float().cpu().numpy())
        heads.append(torch.cat([zs[l] for l in range(L)], dim=1).numpy())
    return PromptFeatures(np.concatenate(spectral), feature_names(L, H, K), np.concatenate(residual),
                          np.concatenate(heads))
