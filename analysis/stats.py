"""Statistics of gap vs importance (reads result tables only; never loads a model).

Uncertainty comes from resampling the task's *examples* (the importance of every head is
recomputed on each bootstrap sample) and from permuting gaps across heads (the null of no
association). scipy does the resampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from spectral.metrics import UNSTABLE_GAP

N_RESAMPLES = 2000
CONFIDENCE = 0.95


def finite_pairs(x, y) -> tuple[np.ndarray, np.ndarray, int]:
    """The pairs of ``x`` and ``y`` where both are finite, and how many pairs were dropped
    (never dropped silently: callers report the count)."""
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y must have one length, got {x.size} and {y.size}")
    ok = np.isfinite(x) & np.isfinite(y)
    return x[ok], y[ok], int((~ok).sum())


@dataclass(frozen=True)
class Estimate:
    """A statistic with its bootstrap 95 % interval (and a permutation p-value where one applies)."""

    value: float
    low: float
    high: float
    p_value: float = float("nan")


def restoration_matrix(per_example: dict[str, np.ndarray], n_heads: int, n_examples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(heads, examples) arrays of patched, clean and corrupt metrics from flat per-example columns
    (``head_index``, ``example``, ``metric_patched``, ``metric_clean``, ``metric_corrupt``)."""
    shape = (n_heads, n_examples)
    patched, clean, corrupt = (np.full(shape, np.nan) for _ in range(3))
    h, e = per_example["head_index"], per_example["example"]
    patched[h, e] = per_example["metric_patched"]
    clean[h, e] = per_example["metric_clean"]
    corrupt[h, e] = per_example["metric_corrupt"]
    return patched, clean, corrupt


def importance(patched: np.ndarray, clean: np.ndarray, corrupt: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
    """Restoration per head on the examples ``idx`` (all by default): ratio of means."""
    if idx is not None:
        patched, clean, corrupt = patched[:, idx], clean[:, idx], corrupt[:, idx]
    c, k = clean.mean(1), corrupt.mean(1)
    return (patched.mean(1) - k) / (c - k)


def correlation(x: np.ndarray, patched, clean, corrupt, kind: str = "pearson", seed: int = 0) -> Estimate:
    """Correlation of a per-head quantity ``x`` with importance; bootstrap over examples and
    a permutation p-value (two-sided) over heads."""
    fn = stats.pearsonr if kind == "pearson" else stats.spearmanr
    y = importance(patched, clean, corrupt)
    ok = np.isfinite(x) & np.isfinite(y)
    value = float(fn(x[ok], y[ok])[0])
    n = patched.shape[1]

    def stat(idx):
        yy = importance(patched, clean, corrupt, idx.astype(int))
        good = np.isfinite(x) & np.isfinite(yy)
        return fn(x[good], yy[good])[0]

    boot = stats.bootstrap((np.arange(n),), stat, n_resamples=N_RESAMPLES, vectorized=False,
                           method="percentile", random_state=seed, confidence_level=CONFIDENCE)
    perm = stats.permutation_test((x[ok],), lambda a: fn(a, y[ok])[0], permutation_type="pairings",
                                  n_resamples=N_RESAMPLES, random_state=seed)
    return Estimate(value, float(boot.confidence_interval.low), float(boot.confidence_interval.high), float(perm.pvalue))


def group_ratio(gap: np.ndarray, patched, clean, corrupt, threshold: float = UNSTABLE_GAP, seed: int = 0) -> Estimate:
    """Mean importance of unstable heads (gap <= threshold) over that of stable heads."""
    unstable = gap <= threshold
    if unstable.all() or not unstable.any():
        return Estimate(float("nan"), float("nan"), float("nan"))

    def ratio(idx=None):
        imp = importance(patched, clean, corrupt, None if idx is None else idx.astype(int))
        return imp[unstable].mean() / imp[~unstable].mean()

    boot = stats.bootstrap((np.arange(patched.shape[1]),), ratio, n_resamples=N_RESAMPLES, vectorized=False,
                           method="percentile", random_state=seed, confidence_level=CONFIDENCE)
    return Estimate(float(ratio()), float(boot.confidence_interval.low), float(boot.confidence_interval.high))


def group_difference(gap: np.ndarray, patched, clean, corrupt, threshold: float, seed: int = 0) -> Estimate:
    """Mean importance of unstable heads minus that of stable heads (stable where ratios are not:
    a stable group's mean importance can be near zero)."""
    unstable = gap <= threshold
    if unstable.all() or not unstable.any():
        return Estimate(float("nan"), float("nan"), float("nan"))

    def diff(idx=None):
        imp = importance(patched, clean, corrupt, None if idx is None else idx.astype(int))
        return imp[unstable].mean() - imp[~unstable].mean()

    boot = stats.bootstrap((np.arange(patched.shape[1]),), diff, n_resamples=N_RESAMPLES, vectorized=False,
                           method="percentile", random_state=seed, confidence_level=CONFIDENCE)
    return Estimate(float(diff()), float(boot.confidence_interval.low), float(boot.confidence_interval.high))


def best_threshold(gap: np.ndarray, imp: np.ndarray) -> float:
    """The gap threshold that best separates important heads: maximal difference of mean
    importance between heads at or below it and heads above it (both groups non-empty)."""
    candidates = np.unique(gap[np.isfinite(gap)])[:-1]
    if len(candidates) == 0:
        return float("nan")
    diffs = [imp[gap <= t].mean() - imp[gap > t].mean() for t in candidates]
    return float(candidates[int(np.nanargmax(diffs))])


def verdict(estimate: Estimate, target: float) -> str:
    """PASS when the whole interval clears the target, FAIL when it lies wholly below, else INCONCLUSIVE."""
    if not np.isfinite(estimate.low) or not np.isfinite(estimate.high):
        return "INCONCLUSIVE"
    if estimate.low > target:
        return "PASS"
    if estimate.high < target:
        return "FAIL"
    return "INCONCLUSIVE"
