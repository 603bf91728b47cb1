"""The key kernel: ``(1/d_head) Kc Kc^T + ridge I`` over every real token's key (DEFINITIONS.md).

``KeyStats`` are its streamed sufficient statistics (K^T K, key sum, token count per head,
float64), additive over prompt batches and over shards on different machines;
``key_kernel_spectra`` turns them into the exact spectrum of the N x N kernel without forming it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from spectral.kernels.metrics import dhead_entropy
from spectral.kernels.registry import KernelSteps, RidgeMode
from spectral.kernels.result import (
    STATUS_FEW_TOKENS, STATUS_NONFINITE, STATUS_OK, STATUS_RANK, KernelResult, blank, metrics_with_padding,
    rank_tolerance,
)


@dataclass
class KeyStats:
    """Sufficient statistics of the key kernel for every (layer, head)."""

    ktk: np.ndarray  # (layers, heads, d_head, d_head) float64: sum of k k^T
    ksum: np.ndarray  # (layers, heads, d_head) float64
    count: np.ndarray  # (layers, heads) int64: tokens N
    n_prompts: np.ndarray  # (layers, heads) int64
    nonfinite: np.ndarray  # (layers, heads) bool
    eps: float = float(np.finfo(np.float64).eps)
    """Machine epsilon of the least precise keys seen (sets the rank tolerance)."""

    @classmethod
    def zeros(cls, layers: int, heads: int, d_head: int) -> "KeyStats":
        return cls(
            np.zeros((layers, heads, d_head, d_head)), np.zeros((layers, heads, d_head)),
            np.zeros((layers, heads), np.int64), np.zeros((layers, heads), np.int64),
            np.zeros((layers, heads), bool),
        )

    def update(self, layer: int, keys: Float[Tensor, "batch pos head d_head"], mask: Bool[Tensor, "batch pos"]) -> None:
        """Add the keys of every real token of a batch to ``layer``'s statistics."""
        self.eps = max(self.eps, float(torch.finfo(keys.dtype).eps))
        x = keys[mask.to(keys.device)].to(torch.float64)  # (n, head, d_head)
        finite = torch.isfinite(x).all(dim=2).all(dim=0)  # (head,)
        x = torch.where(torch.isfinite(x), x, 0.0)
        self.ktk[layer] += torch.einsum("nhd,nhe->hde", x, x).cpu().numpy()
        self.ksum[layer] += x.sum(dim=0).cpu().numpy()
        self.count[layer] += x.shape[0]
        self.n_prompts[layer] += int(mask.any(dim=1).sum())
        self.nonfinite[layer] |= ~finite.cpu().numpy()

    def __add__(self, other: "KeyStats") -> "KeyStats":
        return KeyStats(self.ktk + other.ktk, self.ksum + other.ksum, self.count + other.count,
                        self.n_prompts + other.n_prompts, self.nonfinite | other.nonfinite, max(self.eps, other.eps))




def key_kernel_spectra(stats: KeyStats, ridge: float = 1e-2, center: bool = True, scale: float | None = None,
                       ridge_mode: RidgeMode = "absolute") -> KernelResult:
    """Exact spectrum metrics of G = scale * Kc Kc^T + lambda I (N x N) from the statistics.

    The non-zero eigenvalues of Kc Kc^T are those of Kc^T Kc (d x d); the remaining N - d
    eigenvalues of G equal lambda. ``scale`` defaults to 1/d_head.

    ``ridge_mode``: "absolute" (the definitions' default, lambda = ``ridge``, which reproduces
    the earlier study) or "relative" (lambda = ``ridge`` x trace(G before the ridge) / N, the
    kernel's mean eigenvalue: then every metric is invariant to the keys' scale). Under an
    absolute ridge the N-value entropy and effective rank grow with N and shrink with the key
    scale; ``entropy_dhead`` (over the d_head eigenvalues only) depends on neither.
    """
    d = stats.ktk.shape[-1]
    scale = 1.0 / d if scale is None else scale
    n = stats.count.astype(np.float64)
    cov = stats.ktk.copy()
    if center:
        safe_n = np.where(n > 0, n, 1.0)
        cov -= np.einsum("lhd,lhe->lhde", stats.ksum, stats.ksum) / safe_n[..., None, None]
    eig = np.linalg.eigvalsh(cov * scale)[..., ::-1]  # (layers, heads, d) descending
    eig = np.clip(eig, 0.0, None)
    rank = (eig > np.maximum(rank_tolerance(eig[..., :1], d, stats.eps), np.finfo(float).tiny)).sum(-1)
    k = int(min(d, max(int(stats.count.max()), 2)))
    top = eig[..., :k].copy()
    # heads with N < k keep only their top N eigenvalues: N x N kernels have N values
    idx = np.arange(k)
    short = idx[None, None, :] >= stats.count[..., None]
    top[short] = np.nan
    if ridge_mode == "relative":
        mean_eig = eig.sum(-1) / np.where(n > 0, n, 1.0)
        lam = ridge * np.maximum(mean_eig, np.finfo(float).tiny)
    elif ridge_mode == "absolute":
        lam = np.full(stats.count.shape, float(ridge))
    else:
        raise ValueError(f"unknown ridge mode {ridge_mode!r} (absolute or relative)")
    metrics = metrics_with_padding(top + lam[..., None], lam, np.maximum(stats.count - k, 0))
    entropy_d = dhead_entropy(eig)
    status = np.full(stats.count.shape, STATUS_OK, dtype=object)
    status[rank < 2] = STATUS_RANK
    status[stats.count < 2] = STATUS_FEW_TOKENS
    status[stats.nonfinite] = STATUS_NONFINITE
    failed = (status == STATUS_FEW_TOKENS) | (status == STATUS_NONFINITE)
    blank(metrics, failed)
    entropy_d[failed] = np.nan
    return KernelResult(metrics, stats.count.copy(), stats.n_prompts.copy(), np.minimum(rank, stats.count), status,
                        lam, entropy_d)


KEY = KernelSteps(
    site=lambda settings: f"keys_{settings.keys}",
    start=lambda adapter, settings: KeyStats.zeros(adapter.n_layers, adapter.n_heads, adapter.d_head),
    finalize=lambda stats, settings: key_kernel_spectra(stats, ridge=settings.ridge, center=settings.center,
                                                        ridge_mode=settings.ridge_mode),
    keys=lambda settings: settings.keys,
    ridged=True,
)
