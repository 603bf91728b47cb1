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
    STATUS_FEW_TOKENS, STATUS_NONFINITE, STATUS_OK, STATUS_RANK, KernelResult, blank, rank_tolerance,
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
        """Add each prompt's spectra: prompts whose real tokens sit at the same positions (a
        right-padded batch of equal lengths) are decomposed together, one batched SVD."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for b in range(mats.shape[0]):
            idx = tuple(mask[b].nonzero().squeeze(-1).tolist())
            if len(idx) >= 2:
                groups.setdefault(idx, []).append(b)
        eps = float(torch.finfo(mats.dtype).eps)
        for idx, rows in groups.items():
            pos = torch.tensor(idx, device=mats.device)
            m = mats[torch.tensor(rows, device=mats.device)][:, :, pos][..., pos].to(torch.float64)  # (n, head, T, T)
            m = torch.where(torch.isneginf(m), 0.0, m)
            finite = torch.isfinite(m).flatten(2).all(dim=2).cpu().numpy()  # (n, head)
            self.nonfinite[layer] |= ~finite.all(axis=0)
            sv = torch.linalg.svdvals(torch.where(torch.isfinite(m), m, 0.0)).cpu().numpy()  # (n, head, T) desc
            sv = np.where(sv > rank_tolerance(sv[..., :1], len(idx), eps), sv, 0.0)
            with np.errstate(divide="ignore", invalid="ignore"):
                res = spectrum_metrics(sv)
            for name, values in res.as_dict().items():
                defined = ~np.isnan(values)
                self.sums[name][layer] += np.where(defined, values, 0.0).sum(axis=0)
                self.counts[name][layer] += defined.sum(axis=0)
            rank = (sv > 0).sum(-1).min(axis=0)
            self.rank_min[layer] = np.minimum(self.rank_min[layer], rank)
            self.n_prompts[layer] += len(rows)
            self.n_tokens[layer] += len(idx) * len(rows)

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
