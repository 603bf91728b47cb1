"""Every feature of every head (``spectral.features.names``) from one forward pass per prompt batch.

One pass captures queries, raw and rotated keys, scores, probabilities and the per-head result
of every layer; the statistics stream like the scan's:

- the Gram kernels (keys raw and rotated, queries; each with and without each prompt's first
  token) as ``KeyStats`` (sum of x x^T, sum of x, N), reduced exactly into their N x N spectra
  by ``key_kernel_spectra`` with the scan's ridge, centring and ridge mode;
- the per-prompt kernels (scores, probabilities; with and without the first token's row and
  column) as ``PromptSpectra``: each prompt's singular values reduced to metrics, the metrics
  averaged over prompts;
- the baselines as sums over real tokens (output norm) or real query positions (attention
  entropy, attention to the first token);
- the weight kernels (W_Q W_K^T, W_V W_O) and the weights' norms from the weights alone, read by
  the work unit with index 0 only.

Every statistic is additive, so shards on different machines (``cluster.executors``) reduce
exactly, as in the scan. ``features_table`` is the whole pipeline (shard -> ``feature_unit`` ->
reduce -> ``finalize`` -> one row per head).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from spectral.features.names import (
    BASELINE_PREFIX, BASELINES, FEATURE_KERNELS, FEATURE_METRICS, baseline_features, spectral_features, status_columns,
)
from spectral.kernels.attention import PromptSpectra
from spectral.kernels.key import KeyStats, key_kernel_spectra
from spectral.kernels.registry import RidgeMode
from spectral.kernels.result import KernelResult
from spectral.kernels.scan import Executor, input_device, shard, token_batches
from spectral.kernels.weights import weight_kernel_result, weight_spectra
from spectral.models.adapter import HeadAdapter
from spectral.models.loading import LoadedModel

GRAM_SITES = {"key_raw": "keys_raw", "key_rotated": "keys_rotated", "query": "queries"}
"""Gram kernel -> the adapter site whose vectors it is built from."""
PROMPT_SITES = {"scores": "scores", "probs": "probs"}
"""Per-prompt kernel -> the adapter site of its T x T matrices."""
NOBOS = "_nobos"
SITES = ("keys_raw", "keys_rotated", "queries", "scores", "probs", "result")
"""What the one forward pass captures."""


@dataclass(frozen=True)
class FeatureSettings:
    """What a feature extraction computes (the scan's options without a kernel choice: every
    kernel is computed)."""

    ridge: float = 1e-2
    center: bool = True
    ridge_mode: RidgeMode = "absolute"
    batch_size: int = 8
    max_tokens: int | None = None
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None


@dataclass(frozen=True)
class FeatureUnit:
    """One work unit: a shard of prompts (unit 0 also reads the weights)."""

    index: int
    prompts: tuple[str, ...]
    settings: FeatureSettings


def first_token_dropped(mask: Bool[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
    """``mask`` without each prompt's first real token."""
    return mask & (mask.cumsum(dim=1) > 1)


@dataclass
class WeightFeatures:
    """The weight kernels' singular values and the weights' Frobenius norms, per (layer, head)."""

    qk: np.ndarray  # (layers, heads, d_head) descending
    ov: np.ndarray  # (layers, heads, d_head) descending
    norms: dict[str, np.ndarray]  # baseline name -> (layers, heads)
    eps: float

    @classmethod
    def of(cls, adapter: HeadAdapter) -> WeightFeatures:
        qk, ov, norms = [], [], {n: [] for n in ("wq_norm", "wk_norm", "wv_norm", "wo_norm")}
        for layer in range(adapter.n_layers):
            wq, wk = adapter.qk_weights(layer)
            wv, wo = adapter.ov_weights(layer)
            qk.append(weight_spectra(wq, wk))
            ov.append(ov_spectra(wv, wo))
            for name, w in zip(norms, (wq, wk, wv, wo)):
                norms[name].append(torch.linalg.matrix_norm(w.detach().to(torch.float64).cpu()).numpy())
        eps = float(torch.finfo(adapter.qk_weights(0)[0].dtype).eps)
        return cls(np.stack(qk), np.stack(ov), {n: np.stack(v) for n, v in norms.items()}, eps)


def ov_spectra(wv: Float[Tensor, "head d_model d_head"], wo: Float[Tensor, "head d_head d_model"]) -> np.ndarray:
    """Singular values (head, d_head; descending) of W_V W_O (d_model x d_model) per head: with
    W_V = Q R (thin QR) they are those of R W_O (d_head x d_model)."""
    _, rv = torch.linalg.qr(wv.detach().to(torch.float64).cpu())
    return torch.linalg.svdvals(rv @ wo.detach().to(torch.float64).cpu()).numpy()


@dataclass
class FeatureStats:
    """The additive statistics of every feature of every (layer, head) over the prompts seen."""

    grams: dict[str, KeyStats]
    prompts: dict[str, PromptSpectra]
    output_norm: np.ndarray  # (layers, heads) sum over real tokens of ||z W_O||
    n_tokens: np.ndarray  # (layers, heads) real tokens
    attention_entropy: np.ndarray  # (layers, heads) sum over real query positions
    first_token_attention: np.ndarray  # (layers, heads) sum over real query positions
    n_queries: np.ndarray  # (layers, heads) real query positions
    weights: WeightFeatures | None = None
    wo: list[Tensor] | None = field(default=None, repr=False)
    """Per layer W_O (head, d_head, d_model) of the model this shard ran on (not summed)."""

    @classmethod
    def zeros(cls, adapter: HeadAdapter) -> FeatureStats:
        layers, heads, d = adapter.n_layers, adapter.n_heads, adapter.d_head
        grams = {f"{k}{v}": KeyStats.zeros(layers, heads, d) for k in GRAM_SITES for v in ("", NOBOS)}
        prompts = {f"{k}{v}": PromptSpectra(layers, heads) for k in PROMPT_SITES for v in ("", NOBOS)}
        z = lambda: np.zeros((layers, heads))  # noqa: E731
        return cls(grams, prompts, z(), np.zeros((layers, heads), np.int64), z(), z(),
                   np.zeros((layers, heads), np.int64))

    def update(self, layer: int, site: str, t: Tensor, mask: Bool[Tensor, "batch pos"],
               nobos: Bool[Tensor, "batch pos"]) -> None:
        """Add one captured tensor of one layer (``mask``: real tokens; ``nobos``: without the first)."""
        for kernel, gram_site in GRAM_SITES.items():
            if site == gram_site:
                self.grams[kernel].update(layer, t, mask)
                self.grams[kernel + NOBOS].update(layer, t, nobos)
        if site in PROMPT_SITES:
            self.prompts[site].update(layer, t, mask)
            self.prompts[site + NOBOS].update(layer, t, nobos)
        if site == "probs":
            self._attention_baselines(layer, t, mask)
        if site == "result":
            z = t[mask.to(t.device)].to(torch.float64)  # (n, head, d_head)
            written = torch.einsum("nhd,hdm->nhm", z, self.wo[layer].to(z.device, torch.float64))
            self.output_norm[layer] += torch.linalg.vector_norm(written, dim=-1).sum(0).cpu().numpy()
            self.n_tokens[layer] += z.shape[0]

    def _attention_baselines(self, layer: int, probs: Float[Tensor, "batch head q k"],
                             mask: Bool[Tensor, "batch pos"]) -> None:
        p = probs.to(torch.float64)
        real = mask.to(p.device)
        rows = real[:, None, :].expand(-1, p.shape[1], -1)  # (batch, head, q): real query positions
        entropy = -torch.special.xlogy(p, p).sum(-1)  # (batch, head, q)
        first = real.int().argmax(dim=1)  # each prompt's first real position
        to_first = p.gather(-1, first[:, None, None, None].expand(-1, p.shape[1], p.shape[2], 1)).squeeze(-1)
        self.attention_entropy[layer] += torch.where(rows, entropy, 0.0).sum((0, 2)).cpu().numpy()
        self.first_token_attention[layer] += torch.where(rows, to_first, 0.0).sum((0, 2)).cpu().numpy()
        self.n_queries[layer] += rows.sum((0, 2)).cpu().numpy()

    def __add__(self, other: FeatureStats) -> FeatureStats:
        weights = self.weights if self.weights is not None else other.weights
        if self.weights is not None and other.weights is not None:
            raise ValueError("two shards both read the weights: only the unit with index 0 may")
        return FeatureStats(
            {k: v + other.grams[k] for k, v in self.grams.items()},
            {k: v + other.prompts[k] for k, v in self.prompts.items()},
            self.output_norm + other.output_norm, self.n_tokens + other.n_tokens,
            self.attention_entropy + other.attention_entropy,
            self.first_token_attention + other.first_token_attention, self.n_queries + other.n_queries,
            weights)


@torch.no_grad()
def feature_unit(loaded: LoadedModel, unit: FeatureUnit) -> FeatureStats:
    """Run one shard: one forward pass per batch capturing every site of every selected layer."""
    adapter = HeadAdapter(loaded.model)
    layers = adapter.check_layers(unit.settings.layers)
    stats = FeatureStats.zeros(adapter)
    stats.wo = [adapter.ov_weights(l)[1].detach() if l in layers else None for l in range(adapter.n_layers)]
    if unit.index == 0:
        stats.weights = WeightFeatures.of(adapter)
    device = input_device(loaded.model)
    for ids, mask in token_batches(loaded, unit.prompts, unit.settings):
        ids, mask = ids.to(device), mask.to(device)
        real = mask.bool()
        nobos = first_token_dropped(real)
        with adapter.trace(SITES, lambda layer, site, t: stats.update(layer, site, t, real, nobos), layers=layers,
                           attention_mask=mask):
            loaded.model(input_ids=ids, attention_mask=mask, use_cache=False)
    stats.wo = None
    return stats


def feature_units(texts: Sequence[str], settings: FeatureSettings, shard_size: int) -> list[FeatureUnit]:
    """Prompt shards; unit 0 also reads the weights."""
    units = shard(texts, settings, shard_size)  # ScanUnit-shaped
    if not units:
        raise ValueError("no prompts: the features need at least one prompt")
    return [FeatureUnit(u.index, u.prompts, settings) for u in units]


@dataclass
class FeatureResult:
    """Every kernel's ``KernelResult`` and every baseline, per (layer, head)."""

    kernels: dict[str, KernelResult]
    baselines: dict[str, np.ndarray]
    n_prompts: np.ndarray
    n_tokens: np.ndarray


def finalize(total: FeatureStats, settings: FeatureSettings) -> FeatureResult:
    if total.weights is None:
        raise ValueError("no shard read the weights (the unit with index 0 is missing)")
    kernels: dict[str, KernelResult] = {}
    for name, stats in total.grams.items():
        kernels[name] = key_kernel_spectra(stats, ridge=settings.ridge, center=settings.center,
                                           ridge_mode=settings.ridge_mode)
    for name, spectra in total.prompts.items():
        kernels[name] = spectra.result()
    kernels["qk"] = weight_kernel_result(total.weights.qk, eps=total.weights.eps)
    kernels["ov"] = weight_kernel_result(total.weights.ov, eps=total.weights.eps)
    with np.errstate(invalid="ignore", divide="ignore"):
        baselines = {
            "output_norm": np.where(total.n_tokens > 0, total.output_norm / total.n_tokens, np.nan),
            "attention_entropy": np.where(total.n_queries > 0, total.attention_entropy / total.n_queries, np.nan),
            "first_token_attention": np.where(total.n_queries > 0, total.first_token_attention / total.n_queries,
                                              np.nan),
            **total.weights.norms,
        }
    missing = set(FEATURE_KERNELS) ^ set(kernels)
    if missing or set(baselines) != set(BASELINES):
        raise RuntimeError(f"feature extraction out of step with spectral.features.names: {sorted(missing)}")
    return FeatureResult(kernels, baselines, total.grams["key_raw"].n_prompts.copy(), total.n_tokens.copy())


def result_table(result: FeatureResult, settings: FeatureSettings, model: str, n_layers: int, n_heads: int,
                 n_kv_heads: int | None = None) -> pa.Table:
    """One row per selected (layer, head): identity, counts, then every feature column and each
    kernel's status, in the order of ``spectral.tables.FEATURES`` (which the writer checks)."""
    layers = list(settings.layers) if settings.layers is not None else list(range(n_layers))
    heads = list(settings.heads) if settings.heads is not None else list(range(n_heads))
    grid_l, grid_h = np.meshgrid(layers, heads, indexing="ij")
    l, h = grid_l.ravel(), grid_h.ravel()
    n = len(l)
    columns: dict[str, object] = {
        "model": [model] * n, "layer": l.astype(np.int32), "head": h.astype(np.int32),
        "kv_head": (h // (n_heads // (n_kv_heads or n_heads))).astype(np.int32),
        "n_prompts": result.n_prompts[l, h].astype(np.int64), "n_tokens": result.n_tokens[l, h].astype(np.int64),
        "ridge": np.full(n, float(settings.ridge)), "ridge_mode": [settings.ridge_mode] * n,
        "center": [bool(settings.center)] * n,
    }
    for kernel, res in result.kernels.items():
        for metric in FEATURE_METRICS:
            columns[f"{kernel}.{metric}"] = np.asarray(res.metrics[metric][l, h], dtype=np.float64)
    for name, values in result.baselines.items():
        columns[f"{BASELINE_PREFIX}.{name}"] = np.asarray(values[l, h], dtype=np.float64)
    for kernel, res in result.kernels.items():
        columns[f"{kernel}.status"] = [str(s) for s in res.status[l, h]]
    order = [*list(columns)[:9], *spectral_features(), *baseline_features(), *status_columns()]
    return pa.table({name: columns[name] for name in order})


def features_table(executor: Executor, model: str, texts: Sequence[str], settings: FeatureSettings, n_layers: int,
                   n_heads: int, n_kv_heads: int | None = None, *, shard_size: int = 64,
                   desc: str = "features") -> pa.Table:
    """The whole extraction for ``model`` (a spec the executor loads) on ``texts``: shards through
    ``feature_unit`` on the executor, reduced, finalized, one row per selected head."""
    parts = executor.map(model, feature_unit, feature_units(texts, settings, shard_size), desc=desc)
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return result_table(finalize(total, settings), settings, model, n_layers, n_heads, n_kv_heads)
