"""Information-theoretic views of the gap (research plan, section 3.3): how much a spectral quantity
tells about an outcome (mutual information), and whether spectral entropy differs between
unstable and stable heads.

MI uses the Kraskov kNN estimator as sklearn implements it (``mutual_info_regression``,
nats, negative estimates clipped to 0). That estimator is biased at small n, so every value
comes with a permutation null (y shuffled against x, by ``scipy.stats.permutation_test``):
the bias-corrected MI is the estimate minus the null mean, and the p-value is the share of
shuffles that reach the observed estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats
from sklearn.feature_selection import mutual_info_regression

from analysis.stats import finite_pairs
from spectral.metrics import UNSTABLE_GAP

CONFIDENCE = 0.95
NAN = float("nan")


@dataclass(frozen=True)
class MI:
    """Mutual information (nats) with its permutation baseline."""

    value: float
    """kNN estimate on the data (clipped at 0 by sklearn)."""
    null_mean: float
    """Mean estimate over shuffles of y."""
    null_p95: float
    """95th percentile of the shuffled estimates."""
    corrected: float
    """value - null_mean (may be slightly negative when there is no dependence)."""
    p_value: float
    """One-sided permutation p-value: (1 + #shuffles >= value) / (1 + n_permutations)."""
    n: int
    n_dropped: int
    """Pairs dropped because x or y was not finite."""
    n_neighbors: int
    n_permutations: int
    reason: str = ""


@dataclass(frozen=True)
class GroupSummary:
    """Distribution of one group's values."""

    n: int
    mean: float
    median: float
    q1: float
    """25th percentile."""
    q3: float
    """75th percentile."""


@dataclass(frozen=True)
class StabilityComparison:
    """Spectral entropy of unstable (gap <= threshold) vs stable heads."""

    threshold: float
    unstable: GroupSummary
    stable: GroupSummary
    mannwhitney_u: float
    """U statistic of the unstable group (two-sided test)."""
    p_value: float
    median_diff: float
    """median(unstable) - median(stable)."""
    median_diff_low: float
    median_diff_high: float
    """Percentile-bootstrap 95 % interval, each group resampled on its own."""
    n_dropped: int
    reason: str = ""


def _knn_mi(x: np.ndarray, y: np.ndarray, n_neighbors: int, seed: int) -> float:
    return float(mutual_info_regression(x[:, None], y, discrete_features=False,
                                        n_neighbors=n_neighbors, random_state=seed)[0])


def mutual_information(x: np.ndarray, y: np.ndarray, *, n_neighbors: int = 3,
                       n_permutations: int = 200, seed: int = 0) -> MI:
    """kNN MI of x and y in nats with a permutation null. Non-finite pairs are dropped and
    counted; fewer than ``n_neighbors + 2`` pairs or a constant variable: NaN with a reason."""
    x, y, dropped = finite_pairs(x, y)
    n = x.size

    def undefined(reason: str) -> MI:
        return MI(NAN, NAN, NAN, NAN, NAN, n, dropped, n_neighbors, n_permutations, reason)

    if n < n_neighbors + 2:
        return undefined(f"{n} finite pairs; the kNN estimator needs >= n_neighbors + 2 = {n_neighbors + 2}")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return undefined(f"{'x' if np.ptp(x) == 0 else 'y'} is constant: nothing to estimate")
    value = _knn_mi(x, y, n_neighbors, seed)
    perm = stats.permutation_test((y,), lambda yy: _knn_mi(x, yy, n_neighbors, seed),
                                  permutation_type="pairings", n_resamples=n_permutations,
                                  alternative="greater", random_state=seed)
    null = np.asarray(perm.null_distribution, dtype=float)
    return MI(value, float(null.mean()), float(np.percentile(null, 95)), value - float(null.mean()),
              float(perm.pvalue), n, dropped, n_neighbors, n_permutations)


def _summary(v: np.ndarray) -> GroupSummary:
    if v.size == 0:
        return GroupSummary(0, NAN, NAN, NAN, NAN)
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return GroupSummary(int(v.size), float(v.mean()), float(med), float(q1), float(q3))


def _median_diff(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.median(a, axis=axis) - np.median(b, axis=axis)


def entropy_by_stability(gap: np.ndarray, entropy: np.ndarray, threshold: float = UNSTABLE_GAP,
                         *, n_resamples: int = 2000, seed: int = 0) -> StabilityComparison:
    """Entropy of unstable (gap <= threshold) vs stable heads: group summaries, two-sided
    Mann-Whitney U, and the difference of medians with a bootstrap 95 % interval. Heads with
    a non-finite gap or entropy are dropped and counted; an empty group gives NaN + reason."""
    gap, ent, dropped = finite_pairs(gap, entropy)
    unstable = gap <= threshold
    a, b = ent[unstable], ent[~unstable]
    sa, sb = _summary(a), _summary(b)
    if a.size == 0 or b.size == 0:
        empty = "unstable" if a.size == 0 else "stable"
        return StabilityComparison(threshold, sa, sb, NAN, NAN, NAN, NAN, NAN, dropped,
                                   f"no {empty} heads (threshold {threshold}, {gap.size} heads)")
    test = stats.mannwhitneyu(a, b, alternative="two-sided")
    if min(a.size, b.size) < 2:
        return StabilityComparison(threshold, sa, sb, float(test.statistic), float(test.pvalue),
                                   float(_median_diff(a, b)), NAN, NAN, dropped,
                                   "a group has 1 head: no bootstrap interval (needs >= 2 per group)")
    boot = stats.bootstrap((a, b), _median_diff, n_resamples=n_resamples, vectorized=True,
                           method="percentile", random_state=seed, confidence_level=CONFIDENCE)
    ci = boot.confidence_interval
    return StabilityComparison(threshold, sa, sb, float(test.statistic), float(test.pvalue),
                               float(_median_diff(a, b)), float(ci.low), float(ci.high), dropped)
