"""Kernels of attention heads and their spectra (DEFINITIONS.md).

- ``KeyStats``: streamed sufficient statistics of the key kernel (K^T K, key sum, token
  count per head, float64), additive over prompt batches and over shards on different
  machines; ``key_kernel_spectra`` turns them into the exact spectrum of the N x N kernel
  ``(1/d_head) Kc Kc^T + ridge I`` without forming it.
- ``PromptSpectra``: per-prompt T x T kernels (pre-softmax scores, attention
  probabilities), whose singular values are averaged over prompts.
- ``weight_spectra``: singular values of W_Q W_K^T per head, from the weights alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from spectral.kernels.metrics import SpectrumMetrics, dhead_entropy, spectrum_metrics



def rank_tolerance(largest: np.ndarray, size: int, eps: float) -> np.ndarray:
    """numpy's matrix_rank convention: values below largest x size x eps of the input dtype
    are not resolved by the data (keys, scores and probabilities arrive in the model's
    dtype), so they count as zero: rank-deficient, condition number inf."""
    return largest * size * eps

STATUS_OK = "ok"
STATUS_FEW_TOKENS = "too_few_tokens"
STATUS_RANK = "rank_deficient"
STATUS_NONFINITE = "non_finite"


@dataclass
class KernelResult:
    """Spectral metrics per (layer, head) of one kernel over a prompt set."""

    metrics: SpectrumMetrics
    """Arrays of shape (layers, heads); NaN where ``status`` is not ok/rank_deficient."""
    n_tokens: np.ndarray
    """(layers, heads) tokens that entered the kernel (pooled N, or summed T)."""
    n_prompts: np.ndarray
    """(layers, heads) prompts that entered it."""
    rank: np.ndarray
    """(layers, heads) numerical rank of the kernel before the ridge."""
    status: np.ndarray
    """(layers, heads) strings: ok, too_few_tokens, rank_deficient, non_finite."""
    ridge: np.ndarray | None = None
    """(layers, heads) the ridge added (key kernel; per head under the relative ridge)."""
    entropy_dhead: np.ndarray | None = None
    """(layers, heads) entropy over the d_head eigenvalues alone (key kernel; see
    ``spectral.kernels.metrics.dhead_entropy``)."""


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


RidgeMode = Literal["absolute", "relative"]


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
    metrics = _metrics_with_padding(top + lam[..., None], lam, np.maximum(stats.count - k, 0))
    entropy_d = dhead_entropy(eig)
    status = np.full(stats.count.shape, STATUS_OK, dtype=object)
    status[rank < 2] = STATUS_RANK
    status[stats.count < 2] = STATUS_FEW_TOKENS
    status[stats.nonfinite] = STATUS_NONFINITE
    blank = (status == STATUS_FEW_TOKENS) | (status == STATUS_NONFINITE)
    _blank(metrics, blank)
    entropy_d[blank] = np.nan
    return KernelResult(metrics, stats.count.copy(), stats.n_prompts.copy(), np.minimum(rank, stats.count), status,
                        lam, entropy_d)


def _metrics_with_padding(top: np.ndarray, fill_value: float | np.ndarray, fill_count: np.ndarray) -> SpectrumMetrics:
    """spectrum_metrics for rows whose trailing entries are NaN (fewer than k values)."""
    n_valid = (~np.isnan(top)).sum(-1)
    fill_value = np.broadcast_to(np.asarray(fill_value, dtype=np.float64), top.shape[:-1])
    out: dict[str, np.ndarray] = {name: np.full(top.shape[:-1], np.nan) for name in SpectrumMetrics.names()}
    for m in np.unique(n_valid):
        if m < 1:
            continue
        sel = n_valid == m
        res = spectrum_metrics(top[sel][:, :m], fill_value[sel], fill_count[sel])
        for name, values in res.as_dict().items():
            out[name][sel] = values
    return SpectrumMetrics(**out)


def _blank(metrics: SpectrumMetrics, where: np.ndarray) -> None:
    for values in metrics.as_dict().values():
        values[where] = np.nan


@dataclass
class PromptSpectra:
    """Per-prompt spectra of T x T head kernels (scores or probabilities), averaged over prompts.

    Each prompt's matrix keeps its real tokens only; masked (-inf) entries are zero. The
    values are singular values (the matrices are not symmetric); no ridge is added.
    """

    layers: int
    heads: int
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    n_prompts: np.ndarray | None = None
    n_tokens: np.ndarray | None = None
    rank_min: np.ndarray | None = None
    nonfinite: np.ndarray | None = None

    def __post_init__(self):
        shape = (self.layers, self.heads)
        if not self.sums:
            self.sums = {name: np.zeros(shape) for name in SpectrumMetrics.names()}
            self.n_prompts = np.zeros(shape, np.int64)
            self.n_tokens = np.zeros(shape, np.int64)
            self.rank_min = np.full(shape, np.iinfo(np.int64).max, np.int64)
            self.nonfinite = np.zeros(shape, bool)

    def update(self, layer: int, mats: Float[Tensor, "batch head q k"], mask: Bool[Tensor, "batch pos"]) -> None:
        for b in range(mats.shape[0]):
            idx = mask[b].nonzero().squeeze(-1).to(mats.device)
            if len(idx) < 2:
                continue
            eps = float(torch.finfo(mats.dtype).eps)
            m = mats[b][:, idx][:, :, idx].to(torch.float64)  # (head, T, T)
            m = torch.where(torch.isneginf(m), 0.0, m)
            finite = torch.isfinite(m).flatten(1).all(dim=1).cpu().numpy()
            self.nonfinite[layer] |= ~finite
            sv = torch.linalg.svdvals(torch.where(torch.isfinite(m), m, 0.0)).cpu().numpy()  # (head, T) desc
            sv = np.where(sv > rank_tolerance(sv[:, :1], len(idx), eps), sv, 0.0)
            with np.errstate(divide="ignore"):
                res = spectrum_metrics(sv)
            for name, values in res.as_dict().items():
                self.sums[name][layer] += values
            rank = (sv > 0).sum(-1)
            self.rank_min[layer] = np.minimum(self.rank_min[layer], rank)
            self.n_prompts[layer] += 1
            self.n_tokens[layer] += len(idx)

    def __add__(self, other: "PromptSpectra") -> "PromptSpectra":
        return PromptSpectra(
            self.layers, self.heads, {k: v + other.sums[k] for k, v in self.sums.items()},
            self.n_prompts + other.n_prompts, self.n_tokens + other.n_tokens,
            np.minimum(self.rank_min, other.rank_min), self.nonfinite | other.nonfinite,
        )

    def result(self) -> KernelResult:
        with np.errstate(invalid="ignore", divide="ignore"):
            means = {k: v / self.n_prompts for k, v in self.sums.items()}
        status = np.full(self.n_prompts.shape, STATUS_OK, dtype=object)
        rank = np.where(self.n_prompts > 0, self.rank_min, 0)
        status[rank < 2] = STATUS_RANK
        status[self.n_prompts == 0] = STATUS_FEW_TOKENS
        status[self.nonfinite] = STATUS_NONFINITE
        metrics = SpectrumMetrics(**means)
        _blank(metrics, (status == STATUS_FEW_TOKENS) | (status == STATUS_NONFINITE))
        return KernelResult(metrics, self.n_tokens.copy(), self.n_prompts.copy(), rank, status)


def weight_spectra(wq: Float[Tensor, "head d_model d_head"], wk: Float[Tensor, "head d_model d_head"]) -> np.ndarray:
    """Singular values (head, d_head; descending) of W_Q W_K^T (d_model x d_model) per head.

    With W = Q R (thin QR), W_Q W_K^T = Q_q (R_q R_k^T) Q_k^T, whose singular values are
    those of the d_head x d_head core R_q R_k^T.
    """
    _, rq = torch.linalg.qr(wq.detach().to(torch.float64).cpu())
    _, rk = torch.linalg.qr(wk.detach().to(torch.float64).cpu())
    return torch.linalg.svdvals(rq @ rk.transpose(1, 2)).numpy()


def weight_kernel_result(singular_values: np.ndarray, eps: float = float(np.finfo(np.float32).eps)) -> KernelResult:
    """KernelResult from per-layer weight spectra (layers, heads, d_head); ``eps`` of the weights' dtype."""
    rank = (singular_values > rank_tolerance(singular_values[..., :1], singular_values.shape[-1], eps)).sum(-1)
    singular_values = np.where(np.arange(singular_values.shape[-1]) < rank[..., None], singular_values, 0.0)
    with np.errstate(divide="ignore"):
        metrics = spectrum_metrics(singular_values)
    status = np.where(rank < 2, STATUS_RANK, STATUS_OK).astype(object)
    status[~np.isfinite(singular_values).all(-1)] = STATUS_NONFINITE
    _blank(metrics, status == STATUS_NONFINITE)
    zeros = np.zeros(rank.shape, np.int64)
    return KernelResult(metrics, zeros, zeros.copy(), rank, status)
