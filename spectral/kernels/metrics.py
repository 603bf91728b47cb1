"""Spectral metrics of a kernel, from its eigen- or singular values (DEFINITIONS.md).

A spectrum is given as its leading values ``top`` (sorted descending, last axis) plus
``fill_count`` further values all equal to ``fill_value``: the key kernel's N x N spectrum
is its d_head leading eigenvalues plus N - d_head copies of the ridge, so every metric,
entropy included, is exact without ever forming the N x N matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from scipy.special import xlogy

UNSTABLE_GAP = 0.77
"""Gap at or below which the earlier GPT-2 study called a head unstable."""


@dataclass
class SpectrumMetrics:
    """Metrics per head; every field has the shape of the leading axes of ``top``."""

    lambda1: np.ndarray
    """Largest value."""
    lambda2: np.ndarray
    """Second largest value."""
    gap: np.ndarray
    """(lambda1 - lambda2) / lambda1: small = unstable."""
    instability: np.ndarray
    """lambda2 / lambda1 (= 1 - gap)."""
    entropy: np.ndarray
    """-sum p_i log p_i over all values, p_i = value_i / sum of values."""
    effective_rank: np.ndarray
    """exp(entropy)."""
    condition_number: np.ndarray
    """lambda1 / smallest value."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def as_dict(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self.names()}


def spectrum_metrics(top: np.ndarray, fill_value: float | np.ndarray = 0.0, fill_count: int | np.ndarray = 0) -> SpectrumMetrics:
    """Metrics of the spectrum ``top`` (..., k; descending) plus ``fill_count`` x ``fill_value``.

    ``fill_count`` and ``fill_value`` may be arrays broadcasting against the leading axes
    (per-head N, per-head ridge). Needs at least two values in all; non-positive values give
    inf/NaN condition numbers only where the spectrum truly is singular.
    """
    top = np.asarray(top, dtype=np.float64)
    fill_count = np.broadcast_to(np.asarray(fill_count, dtype=np.float64), top.shape[:-1])
    fill_value = np.broadcast_to(np.asarray(fill_value, dtype=np.float64), top.shape[:-1])
    has_fill = fill_count > 0
    lam1 = top[..., 0]
    lam2 = top[..., 1] if top.shape[-1] > 1 else np.where(has_fill, fill_value, np.nan)
    total = top.sum(axis=-1) + fill_count * fill_value
    p = top / total[..., None]
    entropy = -xlogy(p, p).sum(axis=-1)
    q = np.where(fill_value > 0, fill_value / total, 0.0)
    entropy = entropy - fill_count * xlogy(q, q)
    smallest = np.where(has_fill, np.minimum(top[..., -1], fill_value), top[..., -1])
    with np.errstate(divide="ignore", invalid="ignore"):
        condition = lam1 / smallest
        gap = (lam1 - lam2) / lam1
    return SpectrumMetrics(lam1, lam2, gap, 1.0 - gap, entropy, np.exp(entropy), condition)


def dhead_entropy(eig: np.ndarray) -> np.ndarray:
    """Spectral entropy over the d_head eigenvalues of the centred key covariance alone (no
    ridge, no N - d_head ridge copies): independent of the token count N and of the keys'
    scale, unlike the N-value entropy of the definitions, whose ridge copies grow with N."""
    eig = np.clip(np.asarray(eig, dtype=np.float64), 0.0, None)
    total = eig.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = eig / total
    return -xlogy(p, p).sum(-1)
