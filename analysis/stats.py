"""Statistics of gap vs importance (reads result tables only; never loads a model).

What varies, and what an interval must resample
-----------------------------------------------
A correlation "across heads" or a difference of group means describes the *heads* of a model:
which heads there are is as random as how precisely each head's importance is known from the
task's examples. Intervals therefore resample heads (or layers) *and* examples jointly
(``analysis.population.estimate_many``); holding heads fixed and resampling examples only
measures the precision of each head's importance, and in a null simulation (8 heads, gap
independent of importance) it declared "r > 0.7: PASS" in 8 of 300 runs (issue 12, defect 3;
``tests/test_nulls.py``).

This module gives *pure statistics* as ``analysis.population.Stat`` objects: called as
``f(per_unit: dict, per_example: dict) -> float`` they evaluate once; inside the estimator
they run on whole batches of resamples (``Stat.batched``) where they have a batched form.
``per_unit = {"gap": (n,)}`` and ``per_example = {"patched", "clean", "corrupt": (n,
n_examples)}`` for head-level statistics (``r_inverse_gap``, ``r_gap``, ``group_contrast``,
``group_difference(t)``, ``group_mean(t, unstable)``, ``group_ratio(t)``: batched;
``spearman_gap``: plain), or ``per_unit = {"gap", "restoration"}`` without per-example arrays
(importance read as given); and a layer-level one (``layer_r``, plain; members built by
``layer_member``). Correlations are marked ``fisher`` (Fisher-z intervals, df n - 3); the
degrees of freedom of the group statistics' intervals come from ``df_groups`` (Welch) and
``df_group``. ``head_member`` builds the ``analysis.population.Member`` of one model;
``analysis.population.estimate_many`` gives the per-seed (heads x examples) intervals and the
across-seed interval (the t-interval over the seeds' values).

Verdict rules
-------------
- Group comparisons rest on the *difference* of mean restorations (unstable - stable). A
  ratio is reported only when both group means' intervals lie above 0; otherwise it is
  undefined (NaN with a note): a ratio with a denominator near or below 0 inverts (-19.4 for
  a difference of +0.226; ``ratio_rule``).
- Restoration is NaN (with a reason) for a head whose clean - corrupt metric difference is
  near zero relative to the metric's scale (``RESTORATION_RTOL``; ``restoration_reasons``).
- Layer-level correlations need at least ``MIN_LAYERS`` layers for an interval.
- ``decide`` turns a Holm-adjusted p-value into PASS / FAIL / INCONCLUSIVE (see its docstring).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from analysis.population import Estimate, Member, Stat
from spectral.kernels.metrics import UNSTABLE_GAP

N_RESAMPLES = 2000
CONFIDENCE = 0.95
NAN = float("nan")

RESTORATION_RTOL = 0.01
"""A head's restoration is undefined (NaN) when ``|mean(clean) - mean(corrupt)| <=
RESTORATION_RTOL x (mean |clean| + mean |corrupt|)`` over its examples: the corruption does not
move the metric by more than 1 % of its magnitude, and dividing by that difference turns noise
into restorations of any size. The same rule applies inside every bootstrap resample."""

MIN_LAYERS = 5
"""Fewer layers than this: a layer-level correlation is reported without an interval
("too few layers"); a Pearson r over 3-4 points has no useful sampling distribution."""

MIN_UNITS = 3
"""A correlation needs at least this many finite (x, y) pairs with distinct x values; else NaN."""

Arrays = Mapping[str, np.ndarray]
Statistic = Callable[[Arrays, Arrays], float]


def finite_pairs(x, y) -> tuple[np.ndarray, np.ndarray, int]:
    """The pairs of ``x`` and ``y`` where both are finite, and how many pairs were dropped
    (never dropped silently: callers report the count)."""
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y must have one length, got {x.size} and {y.size}")
    ok = np.isfinite(x) & np.isfinite(y)
    return x[ok], y[ok], int((~ok).sum())


# --- restoration -------------------------------------------------------------------------

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


def _near_zero(clean: np.ndarray, corrupt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(denominator mean(clean) - mean(corrupt) per row, mask of rows where it is near zero)."""
    with np.errstate(all="ignore"):
        den = clean.mean(-1) - corrupt.mean(-1)
        scale = np.abs(clean).mean(-1) + np.abs(corrupt).mean(-1)
    return den, ~(np.abs(den) > RESTORATION_RTOL * scale)


def restoration(patched: np.ndarray, clean: np.ndarray, corrupt: np.ndarray) -> np.ndarray:
    """Restoration per row (head): ratio of means ``(mean patched - mean corrupt) / (mean clean -
    mean corrupt)`` over the row's examples (last axis); NaN where the denominator is near zero
    (``RESTORATION_RTOL``) or a metric is missing."""
    with np.errstate(all="ignore"):
        c, k = clean.mean(-1), corrupt.mean(-1)
        den = c - k
        scale = np.abs(clean).mean(-1) + np.abs(corrupt).mean(-1)
        out = np.asarray((patched.mean(-1) - k) / den, dtype=float)
        bad = ~(np.abs(den) > RESTORATION_RTOL * scale) | ~np.isfinite(out)
    if bad.any():
        out = np.where(bad, np.nan, out)
    return out


def restoration_reasons(patched: np.ndarray, clean: np.ndarray, corrupt: np.ndarray) -> list[str]:
    """Per row, why its restoration is NaN ("" where it is defined)."""
    den, bad = _near_zero(clean, corrupt)
    value = restoration(patched, clean, corrupt)
    out = []
    for d, b, v in zip(np.atleast_1d(den), np.atleast_1d(bad), np.atleast_1d(value)):
        if not np.isfinite(d):
            out.append("missing metrics")
        elif b:
            out.append(f"clean - corrupt metric difference {d:.3g} is near zero (<= {RESTORATION_RTOL:g} x its "
                       "scale): restoration undefined")
        elif not np.isfinite(v):
            out.append("missing patched metric")
        else:
            out.append("")
    return out


def importance(patched: np.ndarray, clean: np.ndarray, corrupt: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
    """Restoration per head on the examples ``idx`` (all by default); see ``restoration``."""
    if idx is not None:
        patched, clean, corrupt = patched[:, idx], clean[:, idx], corrupt[:, idx]
    return restoration(patched, clean, corrupt)


def _restoration(per_unit: Arrays, per_example: Arrays) -> np.ndarray:
    """Per-unit restoration from the examples, or ``per_unit["restoration"]`` where there are none."""
    if "patched" not in per_example:
        return np.asarray(per_unit["restoration"], dtype=float)
    return restoration(per_example["patched"], per_example["clean"], per_example["corrupt"])


def restoration_b(per_unit: dict, means: dict) -> np.ndarray:
    """(b, n) restoration from a batch's example means (``restoration`` on resampled examples;
    the same near-zero guard); ``per_unit["restoration"]`` where there are no per-example arrays."""
    if "patched" not in means:
        return per_unit["restoration"]
    den = means["clean"] - means["corrupt"]
    bad = ~(np.abs(den) > RESTORATION_RTOL * (means["|clean|"] + means["|corrupt|"]))
    out = (means["patched"] - means["corrupt"]) / np.where(bad, 1.0, den)
    return np.where(bad | ~np.isfinite(out), np.nan, out)


# --- correlations (numpy: these run inside bootstraps) -----------------------------------

def pearson(x, y) -> float:
    """Pearson r over the finite pairs; NaN with fewer than ``MIN_UNITS`` distinct x values among
    them (a bootstrap resample that drew 2 units 8 times is not a correlation over 8 units) or a
    constant side."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    if not ok.all():
        x, y = x[ok], y[ok]
    if x.size < MIN_UNITS or np.unique(x).size < MIN_UNITS:
        return NAN
    x, y = x - x.mean(), y - y.mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    if not den > 1e-300:
        return NAN
    return float(min(1.0, max(-1.0, (x * y).sum() / den)))


def average_ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties averaged (as ``scipy.stats.rankdata``; numpy, for bootstraps)."""
    a = np.asarray(a, dtype=float)
    order = np.argsort(a, kind="mergesort")
    s = a[order]
    first = np.r_[True, s[1:] != s[:-1]]
    dense = np.cumsum(first)
    bounds = np.r_[np.flatnonzero(first), a.size]
    out = np.empty(a.size)
    out[order] = 0.5 * (bounds[dense] + bounds[dense - 1] + 1)
    return out


def spearman(x, y) -> float:
    """Spearman rho (Pearson r of average ranks) over the finite pairs; NaN as ``pearson``."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < MIN_UNITS:
        return NAN
    return pearson(average_ranks(x), average_ranks(y))


def pearson_b(x: np.ndarray, y: np.ndarray, min_units: int = MIN_UNITS) -> np.ndarray:
    """Row-wise ``pearson`` of (b, n) arrays: r over each row's finite pairs; NaN with fewer than
    ``min_units`` distinct x values among them or a constant side."""
    ok = np.isfinite(x) & np.isfinite(y)
    cnt = ok.sum(1)
    xs = np.sort(np.where(ok, x, np.inf), axis=1)
    distinct = ((np.diff(xs, axis=1) != 0) & np.isfinite(xs[:, 1:])).sum(1) + (cnt > 0)
    with np.errstate(all="ignore"):
        mx = np.where(ok, x, 0).sum(1) / cnt
        my = np.where(ok, y, 0).sum(1) / cnt
        dx = np.where(ok, x - mx[:, None], 0)
        dy = np.where(ok, y - my[:, None], 0)
        den = np.sqrt((dx * dx).sum(1) * (dy * dy).sum(1))
        r = np.clip((dx * dy).sum(1) / den, -1, 1)
    return np.where((distinct >= min_units) & (den > 1e-300), r, np.nan)


def _r_inverse_gap(pu: dict, mu: dict) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return pearson_b(1.0 / pu["gap"], restoration_b(pu, mu))


r_inverse_gap = Stat("pearson r(1/gap, restoration)", batched=_r_inverse_gap, fisher=True)
"""Pearson r(1/gap, restoration) across heads: the research plan's test 1.1 (target r > 0.7)."""

r_gap = Stat("pearson r(gap, restoration)", batched=lambda pu, mu: pearson_b(pu["gap"], restoration_b(pu, mu)),
             fisher=True)
"""Pearson r(gap, restoration) across heads (descriptive; negative = small gap important)."""


def _spearman_gap(per_unit: Arrays, per_example: Arrays) -> float:
    return spearman(per_unit["gap"], _restoration(per_unit, per_example))


spearman_gap = Stat("spearman rho(gap, restoration)", plain=_spearman_gap, fisher=True)
"""Spearman rho(gap, restoration) across heads (negative = small gap important; plain form).
The rank correlation with 1/gap is exactly its negative and is not reported separately."""


# --- groups (unstable: gap <= threshold) ------------------------------------------------

def group_sizes(gap, threshold: float) -> tuple[int, int]:
    """(n unstable, n stable) among the heads with a finite gap."""
    g = np.asarray(gap, dtype=float)
    g = g[np.isfinite(g)]
    return int((g <= threshold).sum()), int((g > threshold).sum())


def _groups(per_unit: Arrays, per_example: Arrays, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Restorations of the unstable and the stable units with a finite gap and restoration."""
    gap = np.asarray(per_unit["gap"], dtype=float)
    imp = _restoration(per_unit, per_example)
    ok = np.isfinite(gap) & np.isfinite(imp)
    return imp[ok & (gap <= threshold)], imp[ok & (gap > threshold)]


def group_means_b(gap: np.ndarray, imp: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(b,) mean restorations of the unstable (gap <= threshold) and the stable units of each
    row, over units with a finite gap and restoration; NaN for an empty group."""
    ok = np.isfinite(gap) & np.isfinite(imp)
    u, s = ok & (gap <= threshold), ok & (gap > threshold)
    with np.errstate(all="ignore"):
        mu = np.where(u, imp, 0).sum(1) / u.sum(1)
        ms = np.where(s, imp, 0).sum(1) / s.sum(1)
    return np.where(u.any(1), mu, np.nan), np.where(s.any(1), ms, np.nan)


def group_contrast(threshold: float = UNSTABLE_GAP, unstable: float = 1.0, stable: float = -1.0) -> Stat:
    """Statistic: ``unstable x mean(unstable restoration) + stable x mean(stable restoration)``
    (a zero weight leaves its group out; NaN when a group with a weight is empty). (1, -1): the
    difference; (1, -c): the margin of "unstable > c x stable"; (1, 0) / (0, 1): one group's mean."""
    def f(pu, mu):
        a, b = group_means_b(pu["gap"], restoration_b(pu, mu), threshold)
        return (unstable * a if unstable else 0.0) + (stable * b if stable else 0.0)
    return Stat(f"{unstable:g} x unstable + {stable:g} x stable restoration (gap <= {threshold:g})", batched=f)


def group_difference(threshold: float = UNSTABLE_GAP) -> Stat:
    """Statistic: mean restoration of unstable heads (gap <= threshold) minus that of stable
    heads; NaN when a group is empty. The verdict statistic of the group comparison."""
    return group_contrast(threshold, 1.0, -1.0)


def group_mean(threshold: float = UNSTABLE_GAP, unstable: bool = True) -> Stat:
    """Statistic: mean restoration of the unstable (or stable) heads; NaN when the group is empty."""
    return group_contrast(threshold, 1.0, 0.0) if unstable else group_contrast(threshold, 0.0, 1.0)


def group_ratio(threshold: float = UNSTABLE_GAP) -> Stat:
    """Statistic: mean restoration of unstable heads over that of stable heads. Only meaningful
    when both means are known to be > 0: read it through ``ratio_rule``, never alone."""
    def f(pu, mu):
        a, b = group_means_b(pu["gap"], restoration_b(pu, mu), threshold)
        with np.errstate(all="ignore"):
            return np.where(b != 0, a / np.where(b != 0, b, 1.0), np.nan)
    return Stat(f"unstable / stable restoration (gap <= {threshold:g})", batched=f)


def _usable(m: Member) -> np.ndarray:
    """Units of a head-level member with a finite gap and restoration (on all examples)."""
    gap = np.asarray(m.per_unit["gap"], dtype=float)
    return np.isfinite(gap) & np.isfinite(_restoration(m.per_unit, m.per_example))


def n_usable(m: Member) -> int:
    """Independent units (clusters, else heads) with at least one usable head."""
    ok = _usable(m)
    return int(np.unique(np.asarray(m.clusters)[ok]).size) if m.clusters is not None else int(ok.sum())


def df_correlation(m: Member) -> float:
    """df of a head-level correlation's Fisher-z interval: usable independent units - 3."""
    return float(n_usable(m) - 3)


def df_groups(threshold: float = UNSTABLE_GAP) -> Callable[[Member], float]:
    """df of the unstable - stable difference (and of contrasts of the two groups): Welch's,
    at most the usable independent units - 2."""
    def df(m: Member) -> float:
        u, s = _groups(m.per_unit, m.per_example, threshold)
        return float(min(welch_df(u, s), n_usable(m) - 2))
    return df


def df_group(threshold: float = UNSTABLE_GAP, unstable: bool = True) -> Callable[[Member], float]:
    """df of one group's mean restoration: its usable heads - 1."""
    def df(m: Member) -> float:
        u, s = _groups(m.per_unit, m.per_example, threshold)
        return float((u if unstable else s).size - 1)
    return df


def ratio_rule(numerator: Estimate, denominator: Estimate, ratio: Estimate,
               names: tuple[str, str] = ("numerator", "denominator")) -> tuple[Estimate, str]:
    """The ratio as reported: itself when both group means' intervals lie above 0, else NaN
    (undefined) with a note saying why (``names``: how the note calls the two groups). A verdict
    on a ratio is taken only when it is defined; the difference carries the group comparison's
    verdict in every case."""
    for name, e in zip(names, (numerator, denominator)):
        if not (np.isfinite(e.low) and e.low > 0):
            return (Estimate(NAN, NAN, NAN),
                    f"ratio undefined: the {name} group mean {e.value:.3g} [{e.low:.3g}, {e.high:.3g}] is not "
                    f"known to be > 0 (the raw ratio {ratio.value:.3g} would invert or explode); read the difference")
    return ratio, ""


# --- layer level -------------------------------------------------------------------------

def layer_member(layer, gap, patched: np.ndarray, clean: np.ndarray, corrupt: np.ndarray,
                 seed: int | None = None) -> Member:
    """A ``Member`` whose units are *layers*: ``per_unit = {"min_gap": (L,)}`` (min gap over the
    layer's heads) and ``per_example = {"clean", "corrupt", "patched:<j>": (L, n_examples)}``
    (head slot j of each layer; a layer with fewer heads repeats its last head, which leaves the
    per-layer max restoration unchanged). Resampling rows resamples layers; resampling columns
    resamples examples jointly for every head of every layer."""
    layer, gap = np.asarray(layer), np.asarray(gap, dtype=float)
    layers = np.unique(layer)
    rows = [np.flatnonzero(layer == k) for k in layers]
    width = max(len(r) for r in rows)
    min_gap = np.array([np.nanmin(gap[r]) if np.isfinite(gap[r]).any() else np.nan for r in rows])
    per_example = {"clean": np.stack([clean[r[0]] for r in rows]), "corrupt": np.stack([corrupt[r[0]] for r in rows])}
    for j in range(width):
        per_example[f"patched:{j}"] = np.stack([patched[r[min(j, len(r) - 1)]] for r in rows])
    # clean/corrupt of every head of one layer are the same runs (the model unpatched); the
    # per-head copies are kept where they differ
    for j in range(width):
        c = np.stack([clean[r[min(j, len(r) - 1)]] for r in rows])
        k = np.stack([corrupt[r[min(j, len(r) - 1)]] for r in rows])
        if not (np.array_equal(c, per_example["clean"], equal_nan=True)
                and np.array_equal(k, per_example["corrupt"], equal_nan=True)):
            per_example[f"clean:{j}"], per_example[f"corrupt:{j}"] = c, k
    return Member(seed, {"min_gap": min_gap, "layer": layers.astype(float)}, per_example)


def layer_max_restoration(per_example: Arrays) -> np.ndarray:
    """(L,) max restoration over each layer's heads (a ``layer_member``'s ``per_example``)."""
    slots = sorted(int(k.split(":")[1]) for k in per_example if k.startswith("patched:"))
    cols = [restoration(per_example[f"patched:{j}"], per_example.get(f"clean:{j}", per_example["clean"]),
                        per_example.get(f"corrupt:{j}", per_example["corrupt"])) for j in slots]
    with np.errstate(all="ignore"):
        m = np.stack(cols).astype(float)
        return np.where(np.isfinite(m).any(0), np.nanmax(np.where(np.isfinite(m), m, -np.inf), 0), np.nan)


def _layer_r(per_unit: Arrays, per_example: Arrays) -> float:
    return pearson(per_unit["min_gap"], layer_max_restoration(per_example))


layer_r = Stat("pearson r(per-layer min gap, per-layer max restoration)", plain=_layer_r, fisher=True)
"""Pearson r(per-layer min gap, per-layer max restoration) across layers (negative = layers
with smaller min gaps hold more important heads; plain form). Units are layers (``layer_member``)."""


# --- members -----------------------------------------------------------------------------

def head_member(gap, patched: np.ndarray, clean: np.ndarray, corrupt: np.ndarray, seed: int | None = None,
                clusters: np.ndarray | None = None) -> Member:
    """The ``Member`` of one model for head-level statistics: ``per_unit = {"gap"}``,
    ``per_example = {"patched", "clean", "corrupt"}`` ((heads, examples) arrays). ``clusters``:
    a label per head for heads that are not independent replicates (the query heads of a
    grouped-query model sharing one key head, e.g. ``layer * 1000 + kv_head``); None, or one
    cluster per head, resamples heads."""
    c = None
    if clusters is not None:
        c = np.asarray(clusters)
        if np.unique(c).size == c.size:
            c = None
    return Member(seed, {"gap": np.asarray(gap, dtype=float)},
                  {"patched": np.asarray(patched, dtype=float), "clean": np.asarray(clean, dtype=float),
                   "corrupt": np.asarray(corrupt, dtype=float)}, c)


def n_independent(member: Member) -> int:
    """Independent units of a member: its clusters when it has them, else its units."""
    return member.n_independent


# --- p-values and verdicts ---------------------------------------------------------------

def bootstrap_p(resamples: Sequence[float] | np.ndarray, target: float) -> float:
    """Two-sided bootstrap p-value of "the statistic equals ``target``":
    ``2 x min(P*(theta* <= target), P*(theta* >= target))`` with the +1 correction, over the
    finite resamples (NaN when fewer than half are finite). It rejects at 0.05 exactly when the
    95 % percentile interval excludes the target (up to the +1 correction)."""
    b = np.asarray(resamples, dtype=float)
    ok = b[np.isfinite(b)]
    if ok.size == 0 or ok.size < b.size / 2:
        return NAN
    lo = (1 + (ok <= target).sum()) / (1 + ok.size)
    hi = (1 + (ok >= target).sum()) / (1 + ok.size)
    return float(min(1.0, 2 * min(lo, hi)))


def decide_claims(p_pass_adjusted: float, p_fail_adjusted: float, alpha: float = 1 - CONFIDENCE) -> str:
    """PASS when the (adjusted) one-sided p-value of the claim is < alpha/2, FAIL when that of
    the opposite claim is, else INCONCLUSIVE (also when undefined)."""
    if np.isfinite(p_pass_adjusted) and p_pass_adjusted < alpha / 2:
        return "PASS"
    if np.isfinite(p_fail_adjusted) and p_fail_adjusted < alpha / 2:
        return "FAIL"
    return "INCONCLUSIVE"


def decide(value: float, p_adjusted: float, target: float, direction: str = "above", alpha: float = 1 - CONFIDENCE) -> str:
    """PASS / FAIL / INCONCLUSIVE from a (Holm-adjusted) two-sided p-value of "statistic =
    target": significant (p < alpha) on the hypothesis' side (``direction`` "above": value >
    target; "below": value < target) is PASS, significant on the other side FAIL, else
    INCONCLUSIVE (including an undefined value or p)."""
    if direction not in ("above", "below"):
        raise ValueError(f"direction must be 'above' or 'below', got {direction!r}")
    if not (np.isfinite(value) and np.isfinite(p_adjusted)) or p_adjusted >= alpha or value == target:
        return "INCONCLUSIVE"
    return "PASS" if (value > target) == (direction == "above") else "FAIL"


def verdict(estimate: Estimate, target: float) -> str:
    """PASS when the whole interval clears the target, FAIL when it lies wholly below, else INCONCLUSIVE."""
    if not np.isfinite(estimate.low) or not np.isfinite(estimate.high):
        return "INCONCLUSIVE"
    if estimate.low > target:
        return "PASS"
    if estimate.high < target:
        return "FAIL"
    return "INCONCLUSIVE"


def best_threshold(gap: np.ndarray, imp: np.ndarray) -> float:
    """The gap threshold that best separates important heads: maximal difference of mean
    importance between heads at or below it and heads above it (both groups non-empty).
    Exploratory: any interval computed on the heads it was selected on ignores the selection."""
    gap, imp = np.asarray(gap, dtype=float), np.asarray(imp, dtype=float)
    ok = np.isfinite(gap) & np.isfinite(imp)
    gap, imp = gap[ok], imp[ok]
    candidates = np.unique(gap)[:-1]
    if len(candidates) == 0:
        return NAN
    diffs = [imp[gap <= t].mean() - imp[gap > t].mean() for t in candidates]
    return float(candidates[int(np.nanargmax(diffs))])


# --- one model's interval from a heads x examples bootstrap ------------------------------

def welch_df(a, b) -> float:
    """Welch-Satterthwaite degrees of freedom of the difference of the means of ``a`` and ``b``
    (finite values); NaN when a group has fewer than 2 values, n - 1 of the other group when one
    group's variance is 0."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if a.size < 2 or b.size < 2:
        return NAN
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    if va + vb == 0:
        return float(min(a.size, b.size) - 1)
    return float((va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1)))


