"""Stable vs unstable heads under sparse autoencoders (issue 16, point 3): do the heads with a small
key-kernel gap (unstable) differ from the rest in the SAE metrics of their outputs (superposition,
L0, FVU, dead / dense features, ...)?

Input per model (one training seed of a population; ``HeadMetrics``): each head's gap, any number of
per-head SAE metrics (names are the caller's), optionally each head's restoration (importance, for
a calibrated threshold) and its key-head group (grouped-query models).

Per model, metric and threshold (``model_rows``): heads with gap <= threshold are unstable, the rest
stable, at ``REFERENCE`` (0.77, the project's definition of unstable) and at the model's calibrated
threshold (``analysis.calibration.calibrate`` of "important iff gap <= t" against
``analysis.calibration.important(restoration)``: chosen on importance, never on the SAE metric, so
the comparison does not select on the score). Heads with a non-finite gap or metric are dropped and
counted. Per row:

- the difference of medians, unstable - stable, with a t-scaled interval from a bootstrap that
  resamples heads within each group (whole key groups with ``kv_head``):
  ``d ± t(df) x SE``, ``SE^2 = sum over groups of SE*_g^2 x n_g/(n_g-1)`` (SE*_g: bootstrap SD of
  the group's median; n_g: its independent units), df Welch-Satterthwaite from the two groups'
  terms (the per-seed interval of ``analysis.population.scaled_interval``, per group);
- a two-sided permutation p of the difference (group labels shuffled over heads, or over key
  groups when no key group straddles the threshold; exact enumeration when there are at most
  ``N_PERMUTATIONS`` labellings, else ``(1 + #{|d*| >= |d|}) / (1 + N_PERMUTATIONS)``);
- the Spearman of the metric with the gap over all heads (negative: smaller gap, higher metric).

A group with < 2 heads gives NaN with the reason. These per-model numbers describe one model.

Across the seeds of a population (``population_rows``; the seeds are the replicates): the mean
difference with the t-interval over the seeds' values (``mean ± t(k-1) x SD / sqrt(k)``, as
``analysis.population``), one-sided p-values from the same t, the mean Spearman on Fisher's z
(mapped back); seeds without a value are left out and counted.

Verdict ``VERDICT_KEY`` per population (``RULE``): claim "unstable - stable median difference of
``VERDICT_METRIC`` > 0" at gap <= 0.77 (by default; ``verdict_threshold="calibrated"`` uses each
seed's calibrated threshold instead): PASS / FAIL by ``analysis.stats.decide_claims`` at one-sided
0.025 after Holm across populations (the PASS and FAIL claims each), else INCONCLUSIVE. Every other
(metric, threshold) is an exploratory row with the same statistics, no verdict, its p-values Holm-
adjusted over the metrics of its population and threshold and read as ``direction``. The null
simulations in ``tests/test_sae_analysis.py`` bound the verdict's PASS rate by its nominal level.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats

from analysis.calibration import calibrate, important
from analysis.population import across_seeds, holm, one_sided_t
from analysis.stats import decide_claims, spearman
from spectral.errors import UsageError
from spectral.kernels.metrics import UNSTABLE_GAP

NAN = float("nan")
CONFIDENCE = 0.95
REFERENCE = UNSTABLE_GAP
N_RESAMPLES = 2000
N_PERMUTATIONS = 2000
CALIBRATION_RESAMPLES = 2000
VERDICT_METRIC = "superposition_index"
VERDICT_KEY = "unstable_more_superposition"
IMPORTANCE_SOURCE = "importance (exact restoration; analysis.calibration.important), not the SAE metric"
ThresholdKind = Literal["reference", "calibrated"]
THRESHOLD_KINDS: tuple[str, ...] = ("reference", "calibrated")


def rule(metric: str = VERDICT_METRIC, threshold: str = "reference") -> str:
    """The verdict's rule in words."""
    where = (f"gap <= {REFERENCE:g}" if threshold == "reference" else
             "gap <= each seed's threshold calibrated against importance (not the SAE metric)")
    return (f"{VERDICT_KEY}: per population, claim 'unstable - stable median difference of {metric} > 0' with "
            f"unstable heads at {where}; per seed the difference of the two groups' medians, across seeds the mean "
            f"with a t-interval over the seeds with a value (mean ± t(k-1) x SD/sqrt(k)); one-sided t p-values for "
            f"'> 0' (PASS) and '< 0' (FAIL), Holm across populations for each claim; PASS / FAIL when the adjusted "
            f"p < 0.025, else INCONCLUSIVE (also with fewer than 2 seeds with a value).")


RULE = rule()

MODEL_COLUMNS = ("model", "population", "seed", "metric", "threshold_kind", "threshold", "calibrated_against",
                 "n_heads", "n_unstable", "n_stable", "n_units_unstable", "n_units_stable", "median_unstable",
                 "median_stable", "difference", "difference_low", "difference_high", "df", "p_permutation",
                 "permutation", "spearman", "note")
"""Keys of ``SaeComparison.models`` rows (seed: int or None; n_*: int; threshold_kind, metric,
calibrated_against, permutation, note: str; others float). ``spearman`` does not depend on the
threshold (the same value in both rows of a metric)."""
THRESHOLD_COLUMNS = ("model", "population", "seed", "threshold", "threshold_low", "threshold_high", "auroc",
                     "separation", "n_heads", "n_important", "calibrated_against", "note")
POPULATION_COLUMNS = ("population", "metric", "threshold_kind", "n_seeds", "k_difference", "difference",
                      "difference_low", "difference_high", "se", "df", "p_above", "p_below", "k_spearman",
                      "spearman", "spearman_low", "spearman_high", "same_sign", "per_seed", "scheme", "note")
VERDICT_COLUMNS = ("key", "population", "metric", "threshold_kind", "exploratory", "rule", "value", "low", "high",
                   "spearman", "spearman_low", "spearman_high", "p_pass", "p_fail", "p_pass_holm", "p_fail_holm",
                   "verdict", "direction", "n_seeds", "k", "correction", "note")
"""Keys of ``SaeComparison.verdicts`` rows. ``verdict``: PASS / FAIL / INCONCLUSIVE on the verdict
row, "" on exploratory rows; ``direction`` on every row: "unstable higher" / "unstable lower" /
"not shown" from the row's own adjusted p-values (the verdict's Holm across populations, or the
exploratory Holm over metrics)."""


@dataclass(frozen=True)
class HeadMetrics:
    """One model's heads: gap, SAE metrics and, optionally, restoration and key-head groups."""

    model: str
    population: str
    seed: int | None
    gap: np.ndarray
    """(n_heads,) key-kernel gap (NaN where undefined)."""
    metrics: Mapping[str, np.ndarray]
    """Metric name -> (n_heads,) value (NaN where undefined)."""
    importance: np.ndarray | None = None
    """(n_heads,) restoration (NaN where unmeasured), for the calibrated threshold; None: not validated."""
    kv_head: np.ndarray | None = None
    """(n_heads,) key-head group of each query head (grouped-query); None: every head its own."""

    def __post_init__(self):
        n = np.shape(self.gap)
        if len(n) != 1:
            raise UsageError(f"model {self.model!r}: gap must be one value per head, got shape {n}")
        arrays = {f"metric {k!r}": v for k, v in self.metrics.items()}
        arrays.update({"importance": self.importance, "kv_head": self.kv_head})
        for name, v in arrays.items():
            if v is not None and np.shape(v) != n:
                raise UsageError(f"model {self.model!r}: {name} has shape {np.shape(v)}, gap {n}")


# --- one model ------------------------------------------------------------------------------------

def _units(labels: np.ndarray | None, idx: np.ndarray) -> list[np.ndarray]:
    """Positions (into ``idx``) of each independent unit: key groups, else single heads."""
    if labels is None:
        return [np.array([i]) for i in range(idx.size)]
    _, inv = np.unique(labels[idx], return_inverse=True)
    return [np.flatnonzero(inv == c) for c in range(int(inv.max()) + 1)] if idx.size else []


def bootstrap_medians(x: np.ndarray, units: Sequence[np.ndarray], rng: np.random.Generator, b: int) -> np.ndarray:
    """(b,) medians of ``x`` over resamples of its units (with replacement, whole units)."""
    width = max(u.size for u in units)
    padded = np.full((len(units), width), NAN)  # (units, width)
    for i, u in enumerate(units):
        padded[i, :u.size] = x[u]
    drawn = padded[rng.integers(0, len(units), (b, len(units)))].reshape(b, -1)  # (b, units x width)
    return np.nanmedian(drawn, axis=1)


def median_difference(xu: np.ndarray, xs: np.ndarray, uu: Sequence[np.ndarray], us: Sequence[np.ndarray],
                      rng: np.random.Generator, n_resamples: int) -> tuple[float, float, float, float]:
    """(difference, low, high, df) of median(xu) - median(xs): per group a bootstrap of its units,
    ``SE^2 = sum SE*_g^2 n_g/(n_g-1)``, Welch-Satterthwaite df (module docstring). Interval NaN
    when a group has < 2 units; a point interval when both groups' medians never vary."""
    d = float(np.median(xu) - np.median(xs))
    if min(len(uu), len(us)) < 2:
        return d, NAN, NAN, NAN
    terms = []
    for x, units in ((xu, uu), (xs, us)):
        n = len(units)
        terms.append(float(np.var(bootstrap_medians(x, units, rng, n_resamples), ddof=1)) * n / (n - 1))
    se2 = sum(terms)
    if se2 == 0:
        return d, d, d, NAN
    df = se2 ** 2 / (terms[0] ** 2 / (len(uu) - 1) + terms[1] ** 2 / (len(us) - 1))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, df)) * math.sqrt(se2)
    return d, d - half, d + half, float(df)


def _labellings(n_units: int, n_unstable: int, rng: np.random.Generator,
                n_permutations: int) -> tuple[np.ndarray, bool]:
    """(labellings, exact): (m, n_units) boolean unstable flags, every labelling with ``n_unstable``
    unstable units when there are at most ``n_permutations``, else that many random shuffles."""
    if math.comb(n_units, n_unstable) <= n_permutations:
        out = np.zeros((math.comb(n_units, n_unstable), n_units), dtype=bool)
        for i, c in enumerate(itertools.combinations(range(n_units), n_unstable)):
            out[i, list(c)] = True
        return out, True
    base = np.arange(n_units) < n_unstable
    return rng.permuted(np.broadcast_to(base, (n_permutations, n_units)), axis=1), False


def permutation_p(x: np.ndarray, unstable: np.ndarray, kv: np.ndarray | None, rng: np.random.Generator,
                  n_permutations: int) -> tuple[float, str]:
    """Two-sided permutation p of median(unstable) - median(stable) and how labels were shuffled."""
    n = x.size
    units, unit_of = np.arange(n), np.arange(n)
    level = "heads"
    if kv is not None:
        _, unit_of = np.unique(kv, return_inverse=True)
        flags = [unstable[unit_of == c] for c in range(unit_of.max() + 1)]
        if all(f.all() or not f.any() for f in flags):
            units, level = np.arange(unit_of.max() + 1), "key groups"
        else:
            unit_of, level = np.arange(n), "heads (a key group straddles the threshold)"
    unit_flag = np.zeros(units.size, dtype=bool)
    unit_flag[unit_of[unstable]] = True
    labels, exact = _labellings(units.size, int(unit_flag.sum()), rng, n_permutations)
    heads = labels[:, unit_of]  # (m, n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        d = np.nanmedian(np.where(heads, x, NAN), axis=1) - np.nanmedian(np.where(heads, NAN, x), axis=1)
    obs = float(np.median(x[unstable]) - np.median(x[~unstable]))
    hits = int(np.sum(np.abs(d) >= abs(obs) - 1e-12 * max(1.0, abs(obs))))
    if exact:
        return hits / labels.shape[0], f"exact over {labels.shape[0]} labellings of {level}"
    return (1 + hits) / (1 + labels.shape[0]), f"{labels.shape[0]} random labellings of {level}"


def thresholds(m: HeadMetrics, n_resamples: int = CALIBRATION_RESAMPLES, seed: int = 0) -> dict:
    """The model's gap threshold calibrated against importance (``THRESHOLD_COLUMNS``); NaN with a
    note without restorations or with one class only."""
    row = dict(model=m.model, population=m.population, seed=m.seed, threshold=NAN, threshold_low=NAN,
               threshold_high=NAN, auroc=NAN, separation="", n_heads=0, n_important=0, calibrated_against="",
               note="no importance given")
    if m.importance is not None:
        gap, imp = np.asarray(m.gap, dtype=float), np.asarray(m.importance, dtype=float)
        ok = np.isfinite(gap) & np.isfinite(imp)
        c = calibrate(gap[ok], important(imp[ok]), n_resamples=n_resamples, seed=seed)
        row.update(threshold=c.threshold, threshold_low=c.threshold_low, threshold_high=c.threshold_high,
                   auroc=c.auroc, separation=c.separation, n_heads=int(c.n), n_important=int(c.n_positive),
                   calibrated_against=IMPORTANCE_SOURCE, note=c.reason)
    return {k: row[k] for k in THRESHOLD_COLUMNS}


def _row(m: HeadMetrics, metric: str, kind: str, threshold: float, rng: np.random.Generator, n_resamples: int,
         n_permutations: int) -> dict:
    """One model's comparison of ``metric`` between unstable (gap <= threshold) and stable heads."""
    gap, x = np.asarray(m.gap, dtype=float), np.asarray(m.metrics[metric], dtype=float)
    ok = np.isfinite(gap) & np.isfinite(x)
    kv = None if m.kv_head is None else np.asarray(m.kv_head)[ok]
    gap, x = gap[ok], x[ok]
    unstable = gap <= threshold
    iu, is_ = np.flatnonzero(unstable), np.flatnonzero(~unstable)
    uu, us = _units(kv, iu), _units(kv, is_)
    row = dict(model=m.model, population=m.population, seed=m.seed, metric=metric, threshold_kind=kind,
               threshold=float(threshold), calibrated_against=IMPORTANCE_SOURCE if kind == "calibrated" else "",
               n_heads=int(ok.sum()), n_unstable=int(iu.size), n_stable=int(is_.size), n_units_unstable=len(uu),
               n_units_stable=len(us), median_unstable=NAN, median_stable=NAN, difference=NAN, difference_low=NAN,
               difference_high=NAN, df=NAN, p_permutation=NAN, permutation="", spearman=spearman(gap, x))
    notes = [f"{int((~ok).sum())} heads without a finite gap and {metric}"] if not ok.all() else []
    if not np.isfinite(threshold):
        notes.append("no calibrated threshold")
    elif min(iu.size, is_.size) < 2:
        notes.append(f"fewer than 2 heads in a group ({iu.size} unstable, {is_.size} stable)")
    else:
        d, lo, hi, df = median_difference(x[iu], x[is_], uu, us, rng, n_resamples)
        p, how = permutation_p(x, unstable, kv, rng, n_permutations)
        row.update(median_unstable=float(np.median(x[iu])), median_stable=float(np.median(x[is_])), difference=d,
                   difference_low=lo, difference_high=hi, df=df, p_permutation=p, permutation=how)
        if min(len(uu), len(us)) < 2:
            notes.append("no interval: fewer than 2 key groups in a group")
    row["note"] = "; ".join(notes)
    return row


def model_rows(m: HeadMetrics, metrics: Sequence[str], calibrated: float = NAN, *,
               n_resamples: int = N_RESAMPLES, n_permutations: int = N_PERMUTATIONS, seed: int = 0) -> list[dict]:
    """Per metric, the comparison at ``REFERENCE`` (0.77) and at the ``calibrated`` threshold (NaN: none;
    the rows say why) (``MODEL_COLUMNS``). ``seed`` seeds the bootstrap and permutations."""
    rng = np.random.default_rng(seed)
    return [_row(m, metric, kind, t, rng, n_resamples, n_permutations)
            for metric in metrics for kind, t in (("reference", REFERENCE), ("calibrated", calibrated))]


# --- across seeds ---------------------------------------------------------------------------------

def _across(values: Sequence[float], fisher: bool = False) -> tuple[float, float, float, float, float, int]:
    """(value, low, high, se, df, k): ``analysis.population.across_seeds`` at this module's confidence."""
    return across_seeds(values, fisher, CONFIDENCE)


def population_rows(rows: Sequence[dict]) -> list[dict]:
    """Per (population, metric, threshold kind): the across-seed estimates of the per-model rows
    (``POPULATION_COLUMNS``)."""
    cells: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        cells.setdefault((r["population"], r["metric"], r["threshold_kind"]), []).append(r)
    out = []
    for (pop, metric, kind), rs in cells.items():
        diffs = [r["difference"] for r in rs]
        value, low, high, se, df, k = _across(diffs)
        rho, rho_low, rho_high, _, _, k_rho = _across([r["spearman"] for r in rs], fisher=True)
        p_above, p_below = one_sided_t(value, se, df)
        finite = np.array([d for d in diffs if np.isfinite(d)])
        same = float(np.mean(np.sign(finite) == np.sign(value))) if k and value != 0 else NAN
        notes = [f"{name}: {kk} of {len(rs)} seeds with a value"
                 for name, kk in (("difference", k), ("Spearman", k_rho)) if kk < len(rs)]
        out.append(dict(
            population=pop, metric=metric, threshold_kind=kind, n_seeds=len(rs), k_difference=k, difference=value,
            difference_low=low, difference_high=high, se=se, df=df, p_above=p_above, p_below=p_below,
            k_spearman=k_rho, spearman=rho, spearman_low=rho_low, spearman_high=rho_high, same_sign=same,
            per_seed="; ".join(f"{r['model']}: {r['difference']:.3g} ({r['n_unstable']} vs {r['n_stable']} heads), "
                               f"rho {r['spearman']:.3g}" for r in rs),
            scheme=(f"{len(rs)} seeds: mean ± t(k-1) x SD/sqrt(k) over the seeds with a value (Spearman on Fisher's "
                    "z, mapped back); per seed: difference of medians, bootstrap over heads within each group"),
            note="; ".join(notes)))
    return [{c: r[c] for c in POPULATION_COLUMNS} for r in out]


def _direction(p_pass: float, p_fail: float) -> str:
    return {"PASS": "unstable higher", "FAIL": "unstable lower"}.get(decide_claims(p_pass, p_fail), "not shown")


def verdict_rows(populations: Sequence[dict], metric: str = VERDICT_METRIC,
                 threshold: ThresholdKind = "reference") -> list[dict]:
    """The verdict per population (``metric`` at ``threshold``; Holm across populations) and the
    exploratory rows of every other (metric, threshold) (Holm over the metrics of their population
    and threshold) (``VERDICT_COLUMNS``)."""
    out = []
    for r in populations:
        verdict_row = (r["metric"], r["threshold_kind"]) == (metric, threshold)
        out.append(dict(
            key=VERDICT_KEY if verdict_row else f"exploratory:{r['metric']}@{r['threshold_kind']}",
            population=r["population"], metric=r["metric"], threshold_kind=r["threshold_kind"],
            exploratory=not verdict_row, rule=rule(metric, threshold) if verdict_row else "",
            value=r["difference"], low=r["difference_low"], high=r["difference_high"], spearman=r["spearman"],
            spearman_low=r["spearman_low"], spearman_high=r["spearman_high"], p_pass=r["p_above"],
            p_fail=r["p_below"], p_pass_holm=NAN, p_fail_holm=NAN, verdict="", direction="", n_seeds=r["n_seeds"],
            k=r["k_difference"], correction="", note=r["note"]))
    families: dict[tuple, list[dict]] = {}
    for r in out:
        families.setdefault(("verdict",) if not r["exploratory"] else (r["population"], r["threshold_kind"]),
                            []).append(r)
    for fam, rs in families.items():
        m = sum(np.isfinite(r["p_pass"]) for r in rs)
        for r, a, b in zip(rs, holm([r["p_pass"] for r in rs]), holm([r["p_fail"] for r in rs])):
            r["p_pass_holm"], r["p_fail_holm"] = float(a), float(b)
            r["direction"] = _direction(a, b)
            if fam == ("verdict",):
                r["verdict"] = decide_claims(a, b)
                r["correction"] = (f"Holm over {m} population(s), PASS and FAIL claims each; one-sided tests at "
                                   "0.025")
            else:
                where = (f"gap <= {REFERENCE:g}" if r["threshold_kind"] == "reference"
                         else "each seed's calibrated threshold")
                r["rule"] = (f"exploratory, no verdict: '{r['metric']} median difference != 0' at {where}, t over "
                             "seeds; read as 'direction' at one-sided 0.025")
                r["correction"] = (f"Holm over {m} metric(s) of this population at this threshold (the verdict's row "
                                   "excluded), each direction; not corrected across populations")
    return [{c: r[c] for c in VERDICT_COLUMNS} for r in out]


@dataclass
class SaeComparison:
    """Stable vs unstable heads over models and populations: plain rows for Parquet."""

    models: list[dict]
    """Per model, metric and threshold kind (``MODEL_COLUMNS``)."""
    thresholds: list[dict]
    """Per model, its calibrated threshold (``THRESHOLD_COLUMNS``)."""
    populations: list[dict]
    """Per population, metric and threshold kind, across seeds (``POPULATION_COLUMNS``)."""
    verdicts: list[dict]
    """Per population: ``VERDICT_KEY`` and the exploratory rows (``VERDICT_COLUMNS``)."""


def compare(models: Sequence[HeadMetrics], metrics: Sequence[str] | None = None, *,
            verdict_metric: str = VERDICT_METRIC, verdict_threshold: ThresholdKind = "reference",
            n_resamples: int = N_RESAMPLES, n_permutations: int = N_PERMUTATIONS,
            calibration_resamples: int = CALIBRATION_RESAMPLES, seed: int = 0) -> SaeComparison:
    """Every table of this module for ``models`` (seeds of one or more populations). ``metrics``:
    the metrics compared (default: every metric of the first model); every model must have each."""
    if not models:
        raise UsageError("the stable vs unstable comparison needs at least one model")
    if verdict_threshold not in THRESHOLD_KINDS:
        raise UsageError(f"verdict_threshold must be one of {', '.join(THRESHOLD_KINDS)}, got {verdict_threshold!r}")
    metrics = list(models[0].metrics if metrics is None else metrics)
    if verdict_metric not in metrics:
        raise UsageError(f"the verdict's metric {verdict_metric!r} is not among the metrics compared")
    for m in models:
        lacking = [k for k in metrics if k not in m.metrics]
        if lacking:
            raise UsageError(f"model {m.model!r} has no metric(s) {', '.join(map(repr, lacking))}")
    threshold_rows, rows = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for i, m in enumerate(models):
            t = thresholds(m, calibration_resamples, seed)
            threshold_rows.append(t)
            rows += model_rows(m, metrics, t["threshold"], n_resamples=n_resamples,
                               n_permutations=n_permutations, seed=seed + i)
    pops = population_rows(rows)
    return SaeComparison(rows, threshold_rows, pops, verdict_rows(pops, verdict_metric, verdict_threshold))
