"""The spectral scan: every head of every layer from one forward pass per prompt batch.

A scan is a list of work units (prompt shards) whose partial statistics add up exactly,
plus a reduce step; ``cluster.executors`` runs the units in-process or on Ray actors.
``scan_table`` is the whole pipeline (shard -> ``scan_unit`` -> reduce -> finalize -> one
row per head); the kernel, registered in ``spectral.kernels.registry``, supplies the site its
forward pass captures, the statistics it streams and its finalize.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import torch

from spectral.kernels.metrics import METRICS
from spectral.kernels.registry import KERNELS, Kernel, KernelSteps, KeyKind, RidgeMode
from spectral.kernels.result import KernelResult
from spectral.models.adapter import HeadAdapter
from spectral.models.families import family_of
from spectral.models.loading import LoadedModel
from spectral.tokens import Padded, right_padded



@dataclass(frozen=True)
class ScanSettings:
    """What a scan computes (the science half of the scan config)."""

    kernel: Kernel = "key"
    keys: KeyKind = "raw"
    ridge: float = 1e-2
    center: bool = True
    ridge_mode: RidgeMode = "absolute"
    """"absolute" (lambda = ridge, the definitions' default) or "relative" (lambda = ridge x the
    kernel's mean eigenvalue; scale-invariant metrics)."""
    batch_size: int = 8
    max_tokens: int | None = None
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None

    @property
    def steps(self) -> KernelSteps:
        """How the kernel is computed (its registry record's steps)."""
        return KERNELS[self.kernel].steps()


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


def scan_units(texts: Sequence[str], settings: ScanSettings, shard_size: int) -> list[ScanUnit]:
    """The work units of a scan: prompt shards, or, for a kernel read from the weights alone,
    one unit without prompts."""
    if not KERNELS[settings.kernel].forward:
        return [ScanUnit(0, (), settings)]
    return shard(texts, settings, shard_size)


def token_batches(loaded: LoadedModel, prompts: Sequence[str], settings: ScanSettings) -> Iterator[Padded]:
    """(input_ids, attention_mask) batches, right-padded; prompts sorted by length to cut padding.
    Prompts get the tokenizer's special tokens only for a family trained with them (BERT's
    ``[CLS] ... [SEP]``, ``Family.special_tokens``); decoders read them as they are."""
    tok = loaded.tokenizer
    special = family_of(loaded.model).special_tokens
    limit = settings.max_tokens or getattr(loaded.model.config, "max_position_embeddings", None)
    encoded = [tok(p, add_special_tokens=special, truncation=limit is not None, max_length=limit)["input_ids"]
               for p in prompts]
    encoded = sorted((ids for ids in encoded if ids), key=len)
    for start in range(0, len(encoded), settings.batch_size):
        yield right_padded(tok, encoded[start:start + settings.batch_size])


def input_device(model: torch.nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


@torch.no_grad()
def scan_unit(loaded: LoadedModel, unit: ScanUnit) -> Any:
    """Run one shard: one forward pass per batch, all requested layers and heads at once.
    Returns the kernel's statistics (``registry.Statistics``) of this shard."""
    adapter = HeadAdapter(loaded.model)
    settings = unit.settings
    steps = settings.steps
    layers = adapter.check_layers(settings.layers)
    stats = steps.start(adapter, settings)
    if steps.site is None:  # read from the weights: nothing to run
        return stats
    sites = [steps.site(settings)]
    device = input_device(loaded.model)
    for ids, mask in token_batches(loaded, unit.prompts, settings):
        ids, mask = ids.to(device), mask.to(device)
        real = mask.bool()
        with adapter.trace(sites, lambda layer, site, t: stats.update(layer, t, real), layers=layers,
                           attention_mask=mask):
            loaded.model(input_ids=ids, attention_mask=mask, use_cache=False)
    return stats


def reduce_partials(parts: Sequence[Any]) -> Any:
    """The statistics of all shards together (partials add exactly)."""
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def finalize(total: Any, settings: ScanSettings) -> KernelResult:
    return settings.steps.finalize(total, settings)


def result_table(result: KernelResult, settings: ScanSettings, model: str, n_layers: int, n_heads: int,
                 n_kv_heads: int | None = None) -> pa.Table:
    """One row per (layer, head) selected, carrying what produced it. ``kv_head`` is the key
    head a query head reads (grouped-query models: ``head // (heads / kv_heads)``): heads of
    one key group have identical key kernels and are not independent replicates."""
    layers = list(settings.layers) if settings.layers is not None else list(range(n_layers))
    heads = list(settings.heads) if settings.heads is not None else list(range(n_heads))
    grid_l, grid_h = np.meshgrid(layers, heads, indexing="ij")
    l, h = grid_l.ravel(), grid_h.ravel()
    steps = settings.steps
    n = len(l)
    columns = {
        "model": [model] * n, "kernel": [settings.kernel] * n, "keys": [steps.keys(settings)] * n,
        "ridge": result.ridge[l, h] if result.ridge is not None else np.zeros(n),
        "ridge_mode": [settings.ridge_mode if steps.ridged else "none"] * n,
        "center": [settings.center if steps.ridged else False] * n,
        "layer": l.astype(np.int32), "head": h.astype(np.int32),
        "kv_head": (h // (n_heads // (n_kv_heads or n_heads))).astype(np.int32),
        "n_tokens": result.n_tokens[l, h], "n_prompts": result.n_prompts[l, h],
    }
    for name in METRICS:
        columns[name] = result.metrics[name][l, h]
    columns["entropy_dhead"] = result.entropy_dhead[l, h] if result.entropy_dhead is not None else np.full(n, np.nan)
    columns["rank"] = result.rank[l, h].astype(np.int64)
    columns["status"] = [str(s) for s in result.status[l, h]]
    return pa.table(columns)


def settings_dict(settings: ScanSettings) -> dict:
    return asdict(settings)


class Executor(Protocol):
    """What runs work units: ``cluster.executors`` (in-process or on Ray actors)."""

    def map(self, spec: str, fn: Callable[[LoadedModel, Any], Any], units: Sequence[Any], *,
            desc: str = "units") -> list[Any]: ...


def scan_table(executor: Executor, model: str, texts: Sequence[str], settings: ScanSettings, n_layers: int,
               n_heads: int, n_kv_heads: int | None = None, *, shard_size: int = 64, desc: str = "scan") -> pa.Table:
    """The whole scan of ``model`` (a spec the executor loads) on ``texts``: shards of
    ``shard_size`` prompts through ``scan_unit`` on the executor, their statistics reduced and
    finalized, one row per selected (layer, head) (``result_table``)."""
    parts = executor.map(model, scan_unit, scan_units(texts, settings, shard_size), desc=desc)
    result = finalize(reduce_partials(parts), settings)
    return result_table(result, settings, model, n_layers, n_heads, n_kv_heads)
