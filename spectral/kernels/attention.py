"""Kernels of one prompt at a time: each head's T x T pre-softmax scores or attention
probabilities, whose singular values are averaged over prompts (DEFINITIONS.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from spectral.kernels.metrics import METRICS, SpectrumMetrics, spectrum_metrics
from spectral.kernels.registry import KernelSteps
from spectral.kernels.result import (
    STATUS_FEW_TOKENS, STATUS_NONFINITE, STATUS_OK, STATUS_RANK, KernelResult, blank, metrics_with_padding,
    rank_tolerance,
)


@dataclass
class PromptSpectra:
    """Per-prompt spectra of T x T head kernels (scores or probabilities), averaged over prompts.

    Each prompt's matrix keeps its real tokens only; masked (-inf) entries are zero. The
    values are singular values (the matrices are not symmetric); no ridge is added.
    """

    layers: int
    heads: int
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    """Per metric, the prompts where it is defined (lambda3_ratio needs T >= 3 tokens)."""
    n_prompts: np.ndarray | None = None
    n_tokens: np.ndarray | None = None
    rank_min: np.ndarray | None = None
    nonfinite: np.ndarray | None = None

    def __post_init__(self):
        shape = (self.layers, self.heads)
        if not self.sums:
            self.sums = {name: np.zeros(shape) for name in METRICS}
            self.counts = {name: np.zeros(shape, np.int64) for name in METRICS}
            self.n_prompts = np.zeros(shape, np.int64)
            self.n_tokens = np.zeros(shape, np.int64)
            self.rank_min = np.full(shape, np.iinfo(np.int64).max, np.int64)
            self.nonfinite = np.zeros(shape, bool)

    def update(self, layer: int, mats: Float[Tensor, "batch head q k"], mask: Bool[Tensor, "batch pos"]) -> None:
        """Add each prompt's spectra. Prompt b's real tokens (T_b of them) give a T_b x T_b
        matrix; the batch's matrices are zero-padded to the longest and decomposed in one batched
        SVD: a zero-padded matrix has the singular values of the matrix plus zeros, so prompt b
        keeps its leading T_b values."""
        lengths = mask.sum(dim=1).tolist()
        keep = [b for b, n in enumerate(lengths) if n >= 2]
        if not keep:
            return
        t_max = max(lengths[b] for b in keep)
        padded = torch.zeros((len(keep), mats.shape[1], t_max, t_max), dtype=torch.float64, device=mats.device)
        for i, b in enumerate(keep):
            n = lengths[b]
            if bool(mask[b, :n].all()):  # right padding: the real tokens come first
                padded[i, :, :n, :n] = mats[b, :, :n, :n]
            else:
                idx = mask[b].nonzero().squeeze(-1).to(mats.device)
                padded[i, :, :n, :n] = mats[b][:, idx][:, :, idx]
        padded.masked_fill_(torch.isneginf(padded), 0.0)
        finite = torch.isfinite(padded)
        self.nonfinite[layer] |= ~finite.flatten(2).all(dim=2).all(dim=0).cpu().numpy()
        sv = singular_values(padded.masked_fill_(~finite, 0.0))  # (n, head, t_max) descending
        t = np.array([lengths[b] for b in keep], dtype=np.int64)[:, None, None]
        eps = float(torch.finfo(mats.dtype).eps)
        sv = np.where(sv > rank_tolerance(sv[..., :1], t, eps), sv, 0.0)
        sv[np.broadcast_to(np.arange(t_max)[None, None, :] >= t, sv.shape)] = np.nan  # beyond prompt b's T_b values
        with np.errstate(divide="ignore", invalid="ignore"):
            res = metrics_with_padding(sv, 0.0, np.zeros(sv.shape[:-1]))
        for name, values in res.as_dict().items():
            defined = ~np.isnan(values)
            self.sums[name][layer] += np.where(defined, values, 0.0).sum(axis=0)
            self.counts[name][layer] += defined.sum(axis=0)
        rank = (np.nan_to_num(sv, nan=0.0) > 0).sum(-1).min(axis=0)
        self.rank_min[layer] = np.minimum(self.rank_min[layer], rank)
        self.n_prompts[layer] += len(keep)
        self.n_tokens[layer] += int(t.sum())

    def __add__(self, other: "PromptSpectra") -> "PromptSpectra":
        return PromptSpectra(
            self.layers, self.heads, {k: v + other.sums[k] for k, v in self.sums.items()},
            {k: v + other.counts[k] for k, v in self.counts.items()},
            self.n_prompts + other.n_prompts, self.n_tokens + other.n_tokens,
            np.minimum(self.rank_min, other.rank_min), self.nonfinite | other.nonfinite,
        )

    def result(self) -> KernelResult:
        with np.errstate(invalid="ignore", divide="ignore"):
            means = {k: np.where(self.counts[k] > 0, v / self.counts[k], np.nan) for k, v in self.sums.items()}
        status = np.full(self.n_prompts.shape, STATUS_OK, dtype=object)
        rank = np.where(self.n_prompts > 0, self.rank_min, 0)
        status[rank < 2] = STATUS_RANK
        status[self.n_prompts == 0] = STATUS_FEW_TOKENS
        status[self.nonfinite] = STATUS_NONFINITE
        metrics = SpectrumMetrics(means)
        blank(metrics, (status == STATUS_FEW_TOKENS) | (status == STATUS_NONFINITE))
        return KernelResult(metrics, self.n_tokens.copy(), self.n_prompts.copy(), rank, status)


def singular_values(m: Tensor) -> np.ndarray:
    """Singular values (descending, last axis) of a batch of float64 matrices, through numpy's
    LAPACK gesdd on the CPU wherever the matrices live: torch's float64 ``svdvals`` on the CPU is
    about 150x slower for the small T x T matrices of prompts (benchmarks/bench_features.py),
    and a check of torch's CUDA path on a lent H100 did not finish in its time
    (benchmarks/gpu_features.py), so there is one path, the one tested here."""
    return np.linalg.svd(m.detach().cpu().numpy(), compute_uv=False)


def _prompt_kernel(site: str) -> KernelSteps:
    """Scores and probabilities are what the model computes: from rotated queries and keys."""
    return KernelSteps(
        site=lambda settings: site,
        start=lambda adapter, settings: PromptSpectra(adapter.n_layers, adapter.n_heads),
        finalize=lambda spectra, settings: spectra.result(),
        keys=lambda settings: "rotated",
    )


SCORES = _prompt_kernel("scores")
PROBS = _prompt_kernel("probs")
