"""Spectral metrics of a kernel, from its eigen- or singular values (DEFINITIONS.md).

A spectrum is given as its leading values ``top`` (sorted descending, last axis) plus
``fill_count`` further values all equal to ``fill_value``: the key kernel's N x N spectrum
is its d_head leading eigenvalues plus N - d_head copies of the ridge, so every metric,
entropy included, is exact without ever forming the N x N matrix.

A metric is one function of a :class:`Spectrum` plus one line in :data:`METRICS`; every kernel
computes it and the scan table carries it as a column.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.special import xlogy

UNSTABLE_GAP = 0.77
"""Gap at or below which the earlier GPT-2 study called a head unstable."""


@dataclass(frozen=True)
class Spectrum:
    """A spectrum: its leading values plus ``fill_count`` copies of ``fill_value`` (module docstring)."""

    top: np.ndarray
    """(..., k) leading values, descending along the last axis."""
    fill_value: np.ndarray
    """(...) the value of the further entries (the key kernel's ridge; 0 when none)."""
    fill_count: np.ndarray
    """(...) how many further entries (N - d_head for the key kernel; 0 when none)."""

    @property
    def total(self) -> np.ndarray:
        return self.top.sum(axis=-1) + self.fill_count * self.fill_value


def lambda1(s: Spectrum) -> np.ndarray:
    """Largest value."""
    return s.top[..., 0]


def lambda2(s: Spectrum) -> np.ndarray:
    """Second largest value."""
    return s.top[..., 1] if s.top.shape[-1] > 1 else np.where(s.fill_count > 0, s.fill_value, np.nan)


def gap(s: Spectrum) -> np.ndarray:
    """(lambda1 - lambda2) / lambda1: small = unstable."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return (lambda1(s) - lambda2(s)) / lambda1(s)


def instability(s: Spectrum) -> np.ndarray:
    """lambda2 / lambda1 (= 1 - gap)."""
    return 1.0 - gap(s)


def entropy(s: Spectrum) -> np.ndarray:
    """-sum p_i log p_i over all values, p_i = value_i / sum of values."""
    total = s.total
    p = s.top / total[..., None]
    q = np.where(s.fill_value > 0, s.fill_value / total, 0.0)
    return -xlogy(p, p).sum(axis=-1) - s.fill_count * xlogy(q, q)


def effective_rank(s: Spectrum) -> np.ndarray:
    """exp(entropy)."""
    return np.exp(entropy(s))


def condition_number(s: Spectrum) -> np.ndarray:
    """lambda1 / smallest value."""
    smallest = np.where(s.fill_count > 0, np.minimum(s.top[..., -1], s.fill_value), s.top[..., -1])
    with np.errstate(divide="ignore", invalid="ignore"):
        return lambda1(s) / smallest


def lambda3_ratio(s: Spectrum) -> np.ndarray:
    """lambda3 / lambda1: how far the spectrum's head reaches beyond the top pair."""
    k = s.top.shape[-1]
    third = s.top[..., 2] if k > 2 else np.where(s.fill_count >= 3 - k, s.fill_value, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        return third / lambda1(s)


def participation_ratio(s: Spectrum) -> np.ndarray:
    """(sum of values)^2 / sum of squared values: 1 for one dominant value, n for n equal ones."""
    squares = (s.top ** 2).sum(axis=-1) + s.fill_count * s.fill_value ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        return s.total ** 2 / squares


def stable_rank(s: Spectrum) -> np.ndarray:
    """sum of values / lambda1 (for singular values of a matrix, its nuclear / spectral norm)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return s.total / lambda1(s)


def lambda1_share(s: Spectrum) -> np.ndarray:
    """lambda1 / sum of values: the top value's share of the trace."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return lambda1(s) / s.total


METRICS: dict[str, Callable[[Spectrum], np.ndarray]] = {
    "lambda1": lambda1,
    "lambda2": lambda2,
    "gap": gap,
    "instability": instability,
    "entropy": entropy,
    "effective_rank": effective_rank,
    "condition_number": condition_number,
    "lambda3_ratio": lambda3_ratio,
    "participation_ratio": participation_ratio,
    "stable_rank": stable_rank,
    "lambda1_share": lambda1_share,
}
"""Metric name -> its function; each is a column of the scan table, in this order."""


@dataclass(frozen=True)
class SpectrumMetrics:
    """One array per metric of :data:`METRICS` (shape: the spectra's leading axes), read as
    ``metrics.gap`` or ``metrics["gap"]``."""

    values: dict[str, np.ndarray]

    def __post_init__(self) -> None:
        if list(self.values) != list(METRICS):
            raise ValueError(f"SpectrumMetrics needs the metrics {list(METRICS)}, got {list(self.values)}")

    @staticmethod
    def names() -> tuple[str, ...]:
        return tuple(METRICS)

    def __getattr__(self, name: str) -> np.ndarray:
        values = self.__dict__.get("values")  # absent while unpickling
        if values is None or name not in values:
            raise AttributeError(name)
        return values[name]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.values[name]

    def as_dict(self) -> dict[str, np.ndarray]:
        return dict(self.values)


def spectrum_metrics(top: np.ndarray, fill_value: float | np.ndarray = 0.0, fill_count: int | np.ndarray = 0) -> SpectrumMetrics:
    """Every metric of the spectrum ``top`` (..., k; descending) plus ``fill_count`` x ``fill_value``.

    ``fill_count`` and ``fill_value`` may be arrays broadcasting against the leading axes
    (per-head N, per-head ridge). Needs at least two values in all; non-positive values give
    inf/NaN condition numbers only where the spectrum truly is singular.
    """
    top = np.asarray(top, dtype=np.float64)
    spectrum = Spectrum(top, np.broadcast_to(np.asarray(fill_value, dtype=np.float64), top.shape[:-1]),
                        np.broadcast_to(np.asarray(fill_count, dtype=np.float64), top.shape[:-1]))
    return SpectrumMetrics({name: metric(spectrum) for name, metric in METRICS.items()})


def dhead_entropy(eig: np.ndarray) -> np.ndarray:
    """Spectral entropy over the d_head eigenvalues of the centred key covariance alone (no
    ridge, no N - d_head ridge copies): independent of the token count N and of the keys'
    scale, unlike the N-value entropy of the definitions, whose ridge copies grow with N."""
    eig = np.clip(np.asarray(eig, dtype=np.float64), 0.0, None)
    total = eig.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = eig / total
    return -xlogy(p, p).sum(-1)
