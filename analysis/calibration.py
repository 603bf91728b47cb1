"""Calibrating the gap threshold of one model: which gap best separates important heads
(or steerable layers) from the rest, and how well does the fixed 0.77 do.

Rule under test: a unit (head, or layer by its min gap) is predicted positive iff
``gap <= t`` (small gap = unstable = important). The threshold ``t`` is chosen among the
observed gaps to maximise Youden's J = TPR - FPR; separation is summarised by the AUROC of
the score ``-gap``. Intervals come from a bootstrap over units, stratified by class (scipy
resamples the positives and the negatives independently, with replacement), so that every
resample holds both classes and keeps the observed class balance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

from spectral.metrics import UNSTABLE_GAP

CONFIDENCE = 0.95

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


def calibrate(gap: np.ndarray, positive: np.ndarray, *, n_resamples: int = 2000, seed: int = 0,
              reference: float = UNSTABLE_GAP) -> Calibration:
    """Youden-optimal threshold of "positive iff gap <= t", AUROC of -gap, J at ``reference``,
    with stratified percentile-bootstrap 95 % intervals. Units with a non-finite gap or label
    are dropped and counted; with only one class present everything is NaN with a reason.
    The optimal J is a maximum over thresholds, so it is biased upward (its interval can
    exclude 0 for random labels): judge separation by the AUROC interval and j_at_reference."""
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
    if min(n_pos, n - n_pos) < 2:
        return Calibration(threshold, nan, nan, youden, nan, nan, auroc, nan, nan, j_ref, reference,
                           n, n_pos, n_dropped, "a class has 1 unit: no bootstrap interval (needs >= 2 per class)")
    boot = stats.bootstrap((gap[pos], gap[~pos]), youden_auroc, n_resamples=n_resamples,
                           vectorized=False, method="percentile", random_state=seed,
                           confidence_level=CONFIDENCE)
    lo, hi = boot.confidence_interval.low, boot.confidence_interval.high
    return Calibration(threshold, float(lo[0]), float(hi[0]), youden, float(lo[1]), float(hi[1]),
                       auroc, float(lo[2]), float(hi[2]), j_ref, reference,
                       n, n_pos, n_dropped)


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
