"""The spectral scan: every head of every layer from one forward pass per prompt batch.

A scan is a list of work units (prompt shards) whose partial statistics add up exactly,
plus a reduce step; ``cluster.executors`` runs the units in-process or on Ray actors.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import torch

from spectral.models.adapter import HeadAdapter
from spectral.kernels.spectra import (
    KernelResult, KeyStats, PromptSpectra, key_kernel_spectra, weight_kernel_result, weight_spectra,
)
from spectral.models.loading import LoadedModel
from spectral.kernels.metrics import SpectrumMetrics

Kernel = Literal["key", "scores", "probs", "weights"]
KeyKind = Literal["raw", "rotated"]
KERNEL_SITE = {"scores": "scores", "probs": "probs"}

Partial = KeyStats | PromptSpectra


@dataclass(frozen=True)
class ScanSettings:
    """What a scan computes (the science half of the scan config)."""

    kernel: Kernel = "key"
    keys: KeyKind = "raw"
    ridge: float = 1e-2
    center: bool = True
    ridge_mode: str = "absolute"
    """"absolute" (lambda = ridge, the definitions' default) or "relative" (lambda = ridge x the
    kernel's mean eigenvalue; scale-invariant metrics)."""
    batch_size: int = 8
    max_tokens: int | None = None
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None

    @property
    def site(self) -> str:
        return KERNEL_SITE.get(self.kernel, f"keys_{self.keys}")


@dataclass(frozen=True)
class ScanUnit:
    """One work unit: a shard of prompts to push through the model."""

    index: int
    prompts: tuple[str, ...]
    settings: ScanSettings


def shard(prompts: Sequence[str], settings: ScanSettings, shard_size: int) -> list[ScanUnit]:
    """Split prompts into work units of ``shard_size`` prompts."""
    return [
        ScanUnit(i, tuple(prompts[start:start + shard_size]), settings)
        for i, start in enumerate(range(0, len(prompts), shard_size))
    ]


def token_batches(loaded: LoadedModel, prompts: Sequence[str], settings: ScanSettings) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) batches, right-padded; prompts sorted by length to cut padding."""
    tok = loaded.tokenizer
    limit = settings.max_tokens or getattr(loaded.model.config, "max_position_embeddings", None)
    encoded = [tok(p, add_special_tokens=False, truncation=limit is not None, max_length=limit)["input_ids"] for p in prompts]
    encoded = sorted((ids for ids in encoded if ids), key=len)
    pad = tok.pad_token_id
    for start in range(0, len(encoded), settings.batch_size):
        chunk = encoded[start:start + settings.batch_size]
        width = max(len(ids) for ids in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        yield ids, mask


def input_device(model: torch.nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


@torch.no_grad()
def scan_unit(loaded: LoadedModel, unit: ScanUnit) -> Partial:
    """Run one shard: one forward pass per batch, all requested layers and heads at once."""
    adapter = HeadAdapter(loaded.model)
    settings = unit.settings
    layers = adapter.check_layers(settings.layers)
    if settings.kernel == "key":
        acc: Partial = KeyStats.zeros(adapter.n_layers, adapter.n_heads, adapter.d_head)
    else:
        acc = PromptSpectra(adapter.n_layers, adapter.n_heads)
    device = input_device(loaded.model)
    for ids, mask in token_batches(loaded, unit.prompts, settings):
        ids, mask = ids.to(device), mask.to(device)
        real = mask.bool()
        with adapter.trace([settings.site], lambda layer, site, t: acc.update(layer, t, real),
                           layers=layers, attention_mask=mask):
            loaded.model(input_ids=ids, attention_mask=mask, use_cache=False)
    return acc


def reduce_partials(parts: Sequence[Partial]) -> Partial:
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def finalize(total: Partial, settings: ScanSettings) -> KernelResult:
    if isinstance(total, KeyStats):
        return key_kernel_spectra(total, ridge=settings.ridge, center=settings.center, ridge_mode=settings.ridge_mode)
    return total.result()


def weights_result(loaded: LoadedModel, settings: ScanSettings) -> KernelResult:
    """The weight-only kernel: no forward pass at all."""
    adapter = HeadAdapter(loaded.model)
    spectra = np.stack([weight_spectra(*adapter.qk_weights(l)) for l in range(adapter.n_layers)])
    dtype = adapter.qk_weights(0)[0].dtype
    return weight_kernel_result(spectra, eps=float(torch.finfo(dtype).eps))


def result_table(result: KernelResult, settings: ScanSettings, model: str, n_layers: int, n_heads: int,
                 n_kv_heads: int | None = None) -> pa.Table:
    """One row per (layer, head) selected, carrying what produced it. ``kv_head`` is the key
    head a query head reads (grouped-query models: ``head // (heads / kv_heads)``): heads of
    one key group have identical key kernels and are not independent replicates."""
    layers = list(settings.layers) if settings.layers is not None else list(range(n_layers))
    heads = list(settings.heads) if settings.heads is not None else list(range(n_heads))
    grid_l, grid_h = np.meshgrid(layers, heads, indexing="ij")
    l, h = grid_l.ravel(), grid_h.ravel()
    # scores and probabilities are what the model computes: from rotated queries and keys
    keys = {"key": settings.keys, "scores": "rotated", "probs": "rotated"}.get(settings.kernel, "none")
    n = len(l)
    columns = {
        "model": [model] * n, "kernel": [settings.kernel] * n, "keys": [keys] * n,
        "ridge": result.ridge[l, h] if result.ridge is not None else np.zeros(n),
        "ridge_mode": [settings.ridge_mode if settings.kernel == "key" else "none"] * n,
        "center": [settings.center if settings.kernel == "key" else False] * n,
        "layer": l.astype(np.int32), "head": h.astype(np.int32),
        "kv_head": (h // (n_heads // (n_kv_heads or n_heads))).astype(np.int32),
        "n_tokens": result.n_tokens[l, h], "n_prompts": result.n_prompts[l, h],
    }
    for name in SpectrumMetrics.names():
        columns[name] = getattr(result.metrics, name)[l, h]
    columns["entropy_dhead"] = result.entropy_dhead[l, h] if result.entropy_dhead is not None else np.full(n, np.nan)
    columns["rank"] = result.rank[l, h].astype(np.int64)
    columns["status"] = [str(s) for s in result.status[l, h]]
    return pa.table(columns)


def settings_dict(settings: ScanSettings) -> dict:
    return asdict(settings)
