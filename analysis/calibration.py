"""Calibrating the gap threshold of one model: which gap best separates important heads
(or steerable layers) from the rest, and how well does the fixed 0.77 do.

Rule under test: a unit (head, or layer by its min gap) is predicted positive iff
``gap <= t`` (small gap = unstable = important). The threshold ``t`` is chosen among the
observed gaps to maximise Youden's J = TPR - FPR; separation is summarised by the AUROC of
the score ``-gap``. J and AUROC intervals come from a bootstrap over units, stratified by class
(scipy resamples the positives and the negatives independently, with replacement), so that
every resample holds both classes and keeps the observed class balance.

The threshold's interval is NOT a percentile bootstrap of the argmax: a resample can only pick
one of the observed gaps, and with few units the argmax sits on the same gap in most resamples,
so that interval hugs the point (0.817 [0.748, 0.817]) and never covers a true threshold lying
between two observed gaps (in a perfectly separable sample the true threshold lies above the
largest positive gap, which no resample can pick: coverage 0). Instead the interval is the
range of thresholds whose J is not significantly below the maximum (``near_optimal_thresholds``:
a paired, class-stratified bootstrap of J(best) - J(t) at every observed gap t; t stays when the
5 % quantile of that difference is <= 0), extended up to the next observed gap, since every
t in [g_i, g_i+1) makes the same predictions.

Whether the gap separates the classes at all is decided by the exact permutation test of the
AUROC (Mann-Whitney; ``auroc_test``), which is valid for any class sizes; with very small
classes no ordering can be significant, and the result says so (``separation`` = "too few
units", see ``MIN_ORDERINGS``) instead of reading INCONCLUSIVE for a perfectly reversed AUROC.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from math import comb

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

from spectral.kernels.metrics import UNSTABLE_GAP

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE

MIN_ORDERINGS = int(round(2 / ALPHA))
"""Minimum group size rule: the exact two-sided permutation p of a perfect ordering is
2 / C(n, n_small); it can fall below 0.05 only when C(n, n_small) > 40 (1 positive: n >= 41;
2: n >= 10; 3: n >= 8; 4: n >= 8). Smaller samples get separation "too few units"."""

EXACT_LIMIT = 200_000
"""Class assignments enumerated for the exact AUROC test; beyond, the tie-corrected normal
approximation of the Mann-Whitney U."""

IMPORTANCE_MIN_RESTORATION = 0.1
"""Absolute restoration a head needs before it can count as important."""
IMPORTANCE_QUANTILE = 0.75
"""Quantile of the model's own restorations a head must reach (0.75: its top quartile)."""
IMPORTANCE_RULE = (
    f"a head is important when its restoration is >= {IMPORTANCE_MIN_RESTORATION} "
    f"(absolute) and >= the {IMPORTANCE_QUANTILE:.0%} quantile of that model's restorations "
    "(its top quartile; linear-interpolated quantile over all heads of the model)"
)
"""The importance rule in words, for reports."""

STEERABLE_RULE = (
    "with per-layer lower confidence bounds: a layer is steerable when the lower bound of its "
    "steering effect is > 0 (the effect is distinguishable from none); without them: when its "
    "effect is >= the median effect over the model's layers (the upper half)"
)
"""The steerability rule in words, for reports."""


@dataclass(frozen=True)
class Calibration:
    """Best gap threshold for "positive iff gap <= t" with bootstrap 95 % intervals."""

    threshold: float
    """Observed gap maximising Youden J (ties: the smallest such gap)."""
    threshold_low: float
    threshold_high: float
    youden_j: float
    """TPR - FPR at ``threshold``."""
    youden_j_low: float
    youden_j_high: float
    auroc: float
    """AUROC of the score -gap (1: every positive has a smaller gap than every negative)."""
    auroc_low: float
    auroc_high: float
    """Stratified percentile bootstrap: descriptive. It is anti-conservative with few units (in
    null simulations ``auroc_low > 0.5`` in 34 of 500 models of 8 heads, 30 of 500 of 12 heads,
    17 of 500 of 32 heads; nominal: 2.5 %, 12.5 of 500): decide separation by ``separation`` (exact)."""
    j_at_reference: float
    """Youden J of the rule at the reference threshold (0.77 by default)."""
    reference: float
    n: int
    """Units used (after dropping non-finite ones)."""
    n_positive: int
    n_dropped: int
    """Units dropped because their gap or label was not finite."""
    reason: str = ""
    """Why the statistics are NaN; empty when they were computed."""
    auroc_p_value: float = float("nan")
    """Exact two-sided permutation p-value of AUROC = 0.5 (Mann-Whitney; ``auroc_test``)."""
    auroc_min_p: float = float("nan")
    """Smallest p-value any ordering of these class sizes could give (2 / C(n, n_positive))."""
    separation: str = ""
    """"separates" (AUROC > 0.5, p < 0.05), "reversed" (AUROC < 0.5, p < 0.05: small gaps mark
    the LESS important units), "not shown" (p >= 0.05), "too few units" (no ordering of these
    class sizes could reach p < 0.05: ``MIN_ORDERINGS``), or "" when undefined (one class)."""
    separation_note: str = ""
    threshold_method: str = ""
    """How threshold_low / threshold_high were obtained."""


def important(restoration: np.ndarray) -> np.ndarray:
    """Boolean mask of important heads of one model (see ``IMPORTANCE_RULE``):
    ``restoration >= 0.1`` and ``restoration >= quantile(restoration, 0.75)``.

    Raises ValueError on non-finite restorations: drop those heads (and their gaps) first,
    rather than labelling an unmeasured head unimportant.
    """
    r = np.asarray(restoration, dtype=float)
    bad = int((~np.isfinite(r)).sum())
    if bad:
        raise ValueError(f"restoration has {bad} non-finite values; drop those heads first")
    if r.size == 0:
        return np.zeros(0, dtype=bool)
    cut = max(IMPORTANCE_MIN_RESTORATION, float(np.quantile(r, IMPORTANCE_QUANTILE)))
    return r >= cut


def steerable(effect: np.ndarray, effect_low: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of steerable layers (see ``STEERABLE_RULE``): ``effect_low > 0`` when
    lower confidence bounds are given, else ``effect >= median(effect)``.

    Raises ValueError on non-finite values in the array the rule reads.
    """
    e = np.asarray(effect if effect_low is None else effect_low, dtype=float)
    bad = int((~np.isfinite(e)).sum())
    if bad:
        raise ValueError(f"steering effect has {bad} non-finite values; drop those layers first")
    if effect_low is not None:
        return e > 0
    return e >= np.median(e) if e.size else np.zeros(0, dtype=bool)


def layer_min_gap(gap: np.ndarray, layer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(layers, min gap per layer) from per-head gaps and layer indices ("weakest link").
    Non-finite gaps are ignored; a layer with no finite gap gets NaN."""
    gap, layer = np.asarray(gap, dtype=float), np.asarray(layer)
    layers = np.unique(layer)
    mins = np.array([np.min(g) if (g := gap[(layer == k) & np.isfinite(gap)]).size else np.nan
                     for k in layers])
    return layers, mins


def youden_auroc(gap_pos: np.ndarray, gap_neg: np.ndarray) -> np.ndarray:
    """[threshold, J, AUROC] from the gaps of positives and negatives (numpy, fast; the
    bootstrap statistic). Matches sklearn's roc_curve / roc_auc_score on ``-gap``."""
    n1, n0 = len(gap_pos), len(gap_neg)
    gaps = np.concatenate([gap_pos, gap_neg])
    cand = np.unique(gaps)  # ascending
    tpr = np.searchsorted(np.sort(gap_pos), cand, side="right") / n1
    fpr = np.searchsorted(np.sort(gap_neg), cand, side="right") / n0
    j = tpr - fpr
    best = int(np.argmax(j))  # first maximum = smallest gap
    ranks = stats.rankdata(gaps)  # negatives ranked above positives = good separation
    auroc = (ranks[n1:].sum() - n0 * (n0 + 1) / 2) / (n0 * n1)
    return np.array([cand[best], j[best], auroc])


def _j_at(gap: np.ndarray, positive: np.ndarray, t: float) -> float:
    pred = gap <= t
    return float(pred[positive].mean() - pred[~positive].mean())


def _clean(gap, positive) -> tuple[np.ndarray, np.ndarray, int]:
    gap = np.asarray(gap, dtype=float)
    lab = np.asarray(positive, dtype=float)
    if gap.shape != lab.shape or gap.ndim != 1:
        raise ValueError(f"gap and positive must be 1-D of one length, got {gap.shape} and {lab.shape}")
    ok = np.isfinite(gap) & np.isfinite(lab)
    lab = lab[ok]
    if not np.isin(lab, (0.0, 1.0)).all():
        raise ValueError("positive must hold booleans (or 0/1; NaN marks an unknown label)")
    return gap[ok], lab.astype(bool), int((~ok).sum())


def auroc_test(gap: np.ndarray, positive: np.ndarray) -> tuple[float, float]:
    """(two-sided exact permutation p-value of AUROC(-gap) = 0.5, smallest attainable p-value).
    Exact: every assignment of the positive labels to the units is enumerated (ties in the gaps
    get mid-ranks) while there are at most ``EXACT_LIMIT``; beyond, the tie-corrected normal
    approximation of Mann-Whitney's U."""
    gap, pos = np.asarray(gap, dtype=float), np.asarray(positive, dtype=bool)
    n, k = gap.size, int(pos.sum())
    if k == 0 or k == n:
        return float("nan"), float("nan")
    k_small = min(k, n - k)
    min_p = min(1.0, 2.0 / comb(n, k_small))
    ranks = stats.rankdata(-gap)  # large rank = small gap
    u_obs = ranks[pos].sum() - k * (k + 1) / 2
    mean = k * (n - k) / 2
    if comb(n, k) <= EXACT_LIMIT:
        combos = np.fromiter(itertools.chain.from_iterable(itertools.combinations(range(n), k)), dtype=np.int64)
        u = ranks[combos.reshape(-1, k)].sum(1) - k * (k + 1) / 2
        p = float(np.mean(np.abs(u - mean) >= abs(u_obs - mean) - 1e-9))
    else:
        res = stats.mannwhitneyu(-gap[pos], -gap[~pos], alternative="two-sided", method="asymptotic")
        p = float(res.pvalue)
    return min(1.0, p), min_p


def separation(auroc: float, p_value: float, min_p: float, n: int, n_positive: int) -> tuple[str, str]:
    """(label, note) of the AUROC test (see ``Calibration.separation``)."""
    if not np.isfinite(auroc):
        return "", ""
    small = min(n_positive, n - n_positive)
    if min_p >= ALPHA:
        return "too few units", (f"smallest class has {small} of {n} units: even a perfect ordering has exact "
                                 f"p = {min_p:.3g} >= {ALPHA:g} (needs C(n, n_small) > {MIN_ORDERINGS}); "
                                 f"AUROC {auroc:.2f} cannot be told from chance")
    if p_value < ALPHA:
        return ("separates", f"exact p = {p_value:.3g}") if auroc > 0.5 else \
            ("reversed", f"exact p = {p_value:.3g}: small gaps mark the LESS important units")
    return "not shown", f"exact p = {p_value:.3g} >= {ALPHA:g}"


def _counts_at(samples: np.ndarray, queries: np.ndarray, side: str = "right") -> np.ndarray:
    """(B, q) counts of the values of each row of ``samples`` (B, m) that are <= (side "right")
    or < (side "left") each query; ``queries`` is (q,) shared by all rows or (B, q). One
    searchsorted over the rows laid end to end, each shifted past the previous one."""
    b, m = samples.shape
    q = np.broadcast_to(queries, (b, queries.shape[-1]))
    lo = min(samples.min(), q.min())
    span = (max(samples.max(), q.max()) - lo) + 1.0
    shift = (np.arange(b) * span)[:, None]
    flat = (np.sort(samples - lo, axis=1) + shift).ravel()
    pos = np.searchsorted(flat, (q - lo + shift).ravel(), side=side).reshape(b, -1)
    return pos - (np.arange(b) * m)[:, None]


def bootstrap_j_auroc(gap_pos: np.ndarray, gap_neg: np.ndarray, *, n_resamples: int = 2000,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class-stratified bootstrap (positives and negatives resampled independently): (candidate
    gaps (K,), J of every candidate on every resample (B, K), AUROC of every resample (B,)). The
    maximum of a row of J is that resample's Youden J (as ``youden_auroc``)."""
    gp, gn = np.asarray(gap_pos, dtype=float), np.asarray(gap_neg, dtype=float)
    cand = np.unique(np.concatenate([gp, gn]))
    n1, n0 = gp.size, gn.size
    rng = np.random.default_rng(seed)
    rp = gp[rng.integers(0, n1, (n_resamples, n1))]
    rn = gn[rng.integers(0, n0, (n_resamples, n0))]
    jb = _counts_at(rp, cand) / n1 - _counts_at(rn, cand) / n0
    le, lt = _counts_at(rn, rp, "right"), _counts_at(rn, rp, "left")
    auroc = ((n0 - le) + 0.5 * (le - lt)).sum(1) / (n0 * n1)
    return cand, jb, auroc


def near_optimal_thresholds(gap_pos: np.ndarray, gap_neg: np.ndarray, *, n_resamples: int = 2000, seed: int = 0,
                            alpha: float = ALPHA, boot: tuple | None = None) -> tuple[float, float, np.ndarray]:
    """(low, high, kept candidate gaps): the observed gaps t whose Youden J is not significantly
    below that of the best gap, by a paired bootstrap stratified by class (``bootstrap_j_auroc``;
    J of every candidate on every resample): t is kept unless the ``alpha`` quantile of
    J(best) - J(t) is > 0. ``low`` is the smallest kept gap; ``high`` the next observed gap above
    the largest kept one (the rule "gap <= t" predicts the same for every t below it), or the
    largest kept gap when none is above. ``boot``: a ``bootstrap_j_auroc`` result to reuse."""
    gp, gn = np.asarray(gap_pos, dtype=float), np.asarray(gap_neg, dtype=float)
    cand, jb, _ = boot if boot is not None else bootstrap_j_auroc(gp, gn, n_resamples=n_resamples, seed=seed)
    j = (gp[:, None] <= cand).mean(0) - (gn[:, None] <= cand).mean(0)
    best = int(np.argmax(j))
    d = jb[:, [best]] - jb
    keep = np.quantile(d, alpha, axis=0) <= 0
    keep[best] = True
    idx = np.flatnonzero(keep)
    lo, top = float(cand[idx[0]]), int(idx[-1])
    hi = float(cand[top + 1]) if top + 1 < cand.size else float(cand[top])
    return lo, hi, cand[keep]


THRESHOLD_METHOD = ("near-optimal set: observed gaps whose J is not significantly below the maximum (paired "
                    "class-stratified bootstrap, one-sided 5 %), up to the next observed gap")


def calibrate(gap: np.ndarray, positive: np.ndarray, *, n_resamples: int = 2000, seed: int = 0,
              reference: float = UNSTABLE_GAP) -> Calibration:
    """Youden-optimal threshold of "positive iff gap <= t", AUROC of -gap, J at ``reference``.
    Intervals: J and AUROC by stratified percentile bootstrap; the threshold by the near-optimal
    set (``near_optimal_thresholds``; module docstring); the AUROC's exact permutation test and
    the ``separation`` label for any class sizes. Units with a non-finite gap or label are
    dropped and counted; with only one class present everything is NaN with a reason; with a
    class of 1 unit there are no bootstrap intervals, but the exact test still runs.
    The optimal J is a maximum over thresholds, so it is biased upward (its interval can
    exclude 0 for random labels): judge separation by ``separation`` (exact test) and j_at_reference."""
    gap, pos, n_dropped = _clean(gap, positive)
    n, n_pos = len(gap), int(pos.sum())
    nan = float("nan")
    if n_pos == 0 or n_pos == n:
        reason = "no finite units" if n == 0 else f"one class only ({n_pos} of {n} positive)"
        return Calibration(*[nan] * 10, reference, n, n_pos, n_dropped, reason)
    fpr, tpr, thr = roc_curve(pos, -gap, drop_intermediate=False)
    j = (tpr - fpr)[1:]  # the first point (threshold +inf) predicts no positive at all
    best = int(np.argmax(j))
    threshold, youden = float(-thr[1:][best]), float(j[best])
    auroc = float(roc_auc_score(pos, -gap))
    j_ref = _j_at(gap, pos, reference)
    p, min_p = auroc_test(gap, pos)
    sep, sep_note = separation(auroc, p, min_p, n, n_pos)
    extra = dict(auroc_p_value=p, auroc_min_p=min_p, separation=sep, separation_note=sep_note)
    if min(n_pos, n - n_pos) < 2:
        return Calibration(threshold, nan, nan, youden, nan, nan, auroc, nan, nan, j_ref, reference,
                           n, n_pos, n_dropped, "a class has 1 unit: no bootstrap interval (needs >= 2 per class)",
                           **extra)
    boot = bootstrap_j_auroc(gap[pos], gap[~pos], n_resamples=n_resamples, seed=seed)
    q = [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2]
    j_lo, j_hi = np.quantile(boot[1].max(1), q)
    a_lo, a_hi = np.quantile(boot[2], q)
    t_lo, t_hi, _ = near_optimal_thresholds(gap[pos], gap[~pos], boot=boot)
    return Calibration(threshold, t_lo, t_hi, youden, float(j_lo), float(j_hi), auroc, float(a_lo), float(a_hi),
                       j_ref, reference, n, n_pos, n_dropped, threshold_method=THRESHOLD_METHOD, **extra)


def calibrate_layers(min_gap: np.ndarray, effect: np.ndarray, effect_low: np.ndarray | None = None,
                     **kwargs) -> Calibration:
    """Calibration of the per-layer min gap against steerability (``steerable``); layers with a
    non-finite min gap or effect are dropped and counted. ``kwargs`` go to ``calibrate``."""
    min_gap = np.asarray(min_gap, dtype=float)
    read = np.asarray(effect if effect_low is None else effect_low, dtype=float)
    ok = np.isfinite(read)
    label = np.full(read.shape, np.nan)
    label[ok] = steerable(np.asarray(effect, dtype=float)[ok],
                          None if effect_low is None else read[ok])
    return calibrate(min_gap, label, **kwargs)
