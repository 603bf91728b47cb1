"""Information-theoretic views of the gap (research plan, section 3.3): how much a spectral quantity
tells about an outcome (mutual information), and whether spectral entropy differs between
unstable and stable heads.

MI is the Kraskov (KSG, algorithm 1) kNN estimator in nats, computed the way scikit-learn's
``mutual_info_regression`` computes it (unit-variance scaling, 1e-10 jitter, Chebyshev
neighbourhoods) but *without* its clipping of negative estimates at 0: the estimator is
biased at small n, and a clipped estimate minus a clipped null mean is biased upward. Every
value comes with a permutation null (y shuffled against x; within each stratum when strata
are given, so that a pooled estimate over several models is compared with shuffles that
keep every model's own x and y together); the reported *excess* is the raw estimate minus
the null mean (negative when there is no dependence), the p-value the share of shuffles that
reach the raw estimate, and the Monte-Carlo standard error of that p-value is reported with
it (sqrt(p(1 - p) / n_permutations)). The permutations are vectorised (dense distance
matrices), so 1,000 or more are cheap at the sizes of a sweep.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats
from scipy.special import digamma

from analysis.stats import finite_pairs
from spectral.kernels.metrics import UNSTABLE_GAP

CONFIDENCE = 0.95
NAN = float("nan")
N_PERMUTATIONS = 1000
"""Default shuffles of the permutation null (Monte-Carlo error of p about 0.007 at p = 0.05)."""
_CELLS = 4_000_000
"""Distance-matrix cells held at once by the vectorised permutations."""
_DENSE_MAX = 300
"""Above this many pairs the null uses a KD-tree per shuffle instead of dense matrices."""


@dataclass(frozen=True)
class MI:
    """Mutual information (nats) with its permutation baseline."""

    value: float
    """Raw KSG estimate on the data (not clipped at 0)."""
    null_mean: float
    """Mean raw estimate over shuffles of y."""
    null_p95: float
    """95th percentile of the shuffled estimates."""
    corrected: float
    """value - null_mean: the excess over the permutation null (negative without dependence)."""
    p_value: float
    """One-sided permutation p-value: (1 + #shuffles >= value) / (1 + n_permutations)."""
    n: int
    n_dropped: int
    """Pairs dropped because x or y was not finite."""
    n_neighbors: int
    n_permutations: int
    mc_error: float = NAN
    """Monte-Carlo standard error of ``p_value``: sqrt(p (1 - p) / n_permutations)."""
    n_strata: int = 1
    """Strata the shuffles stay within (1: an unstratified permutation)."""
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


def _prepare(v: np.ndarray, rs: np.random.RandomState) -> np.ndarray:
    """Unit-variance scaling (no centring) and 1e-10 jitter, as scikit-learn does."""
    sd = v.std()
    v = v / sd if sd > 0 else v.copy()
    return v + 1e-10 * max(1.0, float(np.mean(np.abs(v)))) * rs.standard_normal(v.size)


def _ksg_batch(dx: np.ndarray, dy: np.ndarray, k: int) -> np.ndarray:
    """KSG estimates for a batch: ``dx`` (n, n) and ``dy`` (b, n, n) absolute differences
    (diagonals 0). Returns (b,) raw estimates."""
    n = dx.shape[0]
    joint = np.maximum(dx[None], dy)
    idx = np.arange(n)
    joint[:, idx, idx] = np.inf
    eps = np.partition(joint, k - 1, axis=-1)[..., k - 1]
    radius = np.nextafter(eps, 0)[..., None]
    nx = (dx[None] <= radius).sum(-1) - 1.0
    ny = (dy <= radius).sum(-1) - 1.0
    return digamma(n) + digamma(k) - digamma(nx + 1).mean(-1) - digamma(ny + 1).mean(-1)


def _ksg_tree(x: np.ndarray, y: np.ndarray, x_tree, k: int) -> float:
    """One KSG estimate with Chebyshev KD-trees, as scikit-learn computes it (large n; the
    same estimator as ``_ksg_batch``). ``x_tree``: the KD-tree of x, shared by all shuffles."""
    from sklearn.neighbors import KDTree

    xy = np.c_[x, y]
    eps = KDTree(xy, metric="chebyshev").query(xy, k=k + 1)[0][:, -1]  # the first neighbour is the point itself
    r = np.nextafter(eps, 0)
    nx = x_tree.query_radius(x[:, None], r, count_only=True) - 1.0
    ny = KDTree(y[:, None], metric="chebyshev").query_radius(y[:, None], r, count_only=True) - 1.0
    return float(digamma(x.size) + digamma(k) - digamma(nx + 1).mean() - digamma(ny + 1).mean())


def ksg(x: np.ndarray, y: np.ndarray, n_neighbors: int = 3, seed: int = 0) -> float:
    """Raw (unclipped) KSG mutual information of two finite 1-D samples, in nats. Equals
    scikit-learn's ``mutual_info_regression`` (same seed) wherever that is above 0."""
    rs = np.random.RandomState(seed)
    x, y = _prepare(np.asarray(x, float), rs), _prepare(np.asarray(y, float), rs)
    return float(_ksg_batch(np.abs(x[:, None] - x[None]), np.abs(y[:, None] - y[None])[None], n_neighbors)[0])


def _shuffles(strata: np.ndarray, n_permutations: int, rng: np.random.Generator) -> np.ndarray:
    """(n_permutations, n) index arrays, each a permutation within every stratum."""
    n = strata.size
    out = np.empty((n_permutations, n), dtype=np.int64)
    keys = rng.random((n_permutations, n))
    order = np.lexsort((keys, np.broadcast_to(strata, keys.shape)), axis=-1)  # by stratum, random within
    base = np.argsort(strata, kind="stable")  # the positions of each stratum, in stratum order
    out[:, base] = order
    return out


def mutual_information(x: np.ndarray, y: np.ndarray, *, n_neighbors: int = 3,
                       n_permutations: int = N_PERMUTATIONS, seed: int = 0,
                       strata: np.ndarray | None = None) -> MI:
    """Raw KSG MI of x and y in nats with a permutation null (shuffles of y within each
    stratum when ``strata`` is given). Non-finite pairs are dropped and counted; fewer than
    ``n_neighbors + 2`` pairs or a constant variable: NaN with a reason."""
    x_all, y_all = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    s_all = np.zeros(x_all.size, dtype=np.int64) if strata is None else np.unique(np.asarray(strata), return_inverse=True)[1]
    if s_all.size != x_all.size:
        raise ValueError(f"strata must have one entry per pair, got {s_all.size} for {x_all.size}")
    x, y, dropped = finite_pairs(x_all, y_all)
    s = s_all[np.isfinite(x_all) & np.isfinite(y_all)]
    n = x.size
    n_strata = int(np.unique(s).size) if n else 0

    def undefined(reason: str) -> MI:
        return MI(NAN, NAN, NAN, NAN, NAN, n, dropped, n_neighbors, n_permutations, NAN, n_strata, reason)

    if n < n_neighbors + 2:
        return undefined(f"{n} finite pairs; the kNN estimator needs >= n_neighbors + 2 = {n_neighbors + 2}")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return undefined(f"{'x' if np.ptp(x) == 0 else 'y'} is constant: nothing to estimate")
    rs = np.random.RandomState(seed)
    xs, ys = _prepare(x, rs), _prepare(y, rs)
    dx, dy = np.abs(xs[:, None] - xs[None]), np.abs(ys[:, None] - ys[None])
    value = float(_ksg_batch(dx, dy[None], n_neighbors)[0])
    perms = _shuffles(s, n_permutations, np.random.default_rng(seed))
    if n > _DENSE_MAX:
        from sklearn.neighbors import KDTree

        x_tree = KDTree(xs[:, None], metric="chebyshev")
        null = np.array([_ksg_tree(xs, ys[p], x_tree, n_neighbors) for p in perms])
    else:
        step = max(1, _CELLS // (n * n))
        null = np.concatenate([_ksg_batch(dx, np.abs(yp[:, :, None] - yp[:, None, :]), n_neighbors)
                               for yp in (ys[perms[i:i + step]] for i in range(0, n_permutations, step))])
    p = float((1 + np.sum(null >= value)) / (1 + n_permutations))
    return MI(value, float(null.mean()), float(np.percentile(null, 95)), value - float(null.mean()), p, n, dropped,
              n_neighbors, n_permutations, float(np.sqrt(p * (1 - p) / n_permutations)), n_strata)


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
