"""Pre- vs post-softmax (issue 15, point 2): do the head kernels agree on which heads are
unstable? Does the key-based analysis capture the instabilities seen in the pre-softmax scores?

Per model (``model_gaps``: the ``<kernel>.gap`` columns of features.parquet, and the heads'
restorations where validate measured them), for every pair of ``KERNEL_PAIRS``:

- the Spearman correlation of the heads' gaps (heads where both are finite);
- Cohen's kappa (``kappa``, = ``sklearn.metrics.cohen_kappa_score``) of the instability flags ``gap <=
  0.77`` (``REFERENCE``, the earlier study's threshold) of the two kernels;
- Cohen's kappa of the flags at each kernel's OWN calibrated threshold: the Youden-optimal
  threshold of "important iff gap <= t" (``analysis.calibration.calibrate`` against
  ``analysis.calibration.important(restoration)``), when the model's restoration is given;
  NaN ("no importance given") otherwise. Each kernel's threshold is a row of ``thresholds``.

Kappa is undefined (NaN) when neither kernel's flags vary (everything flagged, or nothing); 0
when one kernel's flags do not vary and the other's do (agreement no better than chance).

Across the seeds of a population (the replicates; ``population_rows``): the mean with a
t-interval over the seeds' values (``mean ± t(k-1) x SD / sqrt(k)``); correlations averaged on
Fisher's z = atanh(r) and mapped back (``tanh``), kappas on their own scale. Seeds whose value is
undefined are left out and counted.

Verdict ``key_captures_presoftmax`` (per population; ``RULE``): PASS when the mean Spearman of
the key_rotated and scores gaps is significantly above ``BAR_SPEARMAN`` (0.5) AND the mean kappa
of their flags significantly above ``BAR_KAPPA`` (0.4): p_pass = max of the two one-sided
p-values (an intersection-union test, valid without correction); FAIL when either is
significantly below its bar: p_fail = min of the two (rejecting either part rejects "both hold"
at the same level). Kappa at the calibrated thresholds when every seed of the population has its
restoration, else at 0.77 (the row says which). Holm across populations (PASS and FAIL claims
each); ``analysis.stats.decide_claims`` at one-sided 0.025. The null simulations in
``tests/test_kernel_agreement.py`` put each part exactly at its bar.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from scipy import stats

from analysis.calibration import calibrate, important
from analysis.population import across_seeds, holm
from analysis.stats import decide_claims, spearman
from spectral.errors import UsageError
from spectral.features.names import FEATURE_KERNELS
from spectral.kernels.metrics import UNSTABLE_GAP

NAN = float("nan")
CONFIDENCE = 0.95
REFERENCE = UNSTABLE_GAP
KERNEL_PAIRS: tuple[tuple[str, str], ...] = (
    ("key_raw", "scores"), ("key_rotated", "scores"), ("key_raw", "probs"), ("scores", "probs"),
    ("key_raw", "query"), ("key_raw", "qk"),
    ("key_raw", "key_raw_nobos"), ("key_rotated", "key_rotated_nobos"), ("query", "query_nobos"),
    ("scores", "scores_nobos"), ("probs", "probs_nobos"),
)
"""The pairs compared: keys vs pre-softmax scores (raw and rotated keys), keys vs probabilities,
scores vs probabilities, keys vs queries, keys vs the weight-only W_Q W_K^T, and each kernel vs
itself without the first token."""
VERDICT_PAIR = ("key_rotated", "scores")
BAR_SPEARMAN = 0.5
BAR_KAPPA = 0.4
VERDICT_KEY = "key_captures_presoftmax"
CALIBRATION_RESAMPLES = 2000
IMPORTANCE_SOURCE = "importance (exact restoration; analysis.calibration.important)"

RULE = (f"{VERDICT_KEY}: per population, over its seeds, the mean Spearman of the {VERDICT_PAIR[0]} and "
        f"{VERDICT_PAIR[1]} gaps (t-interval over the seeds on Fisher's z) and the mean Cohen's kappa of their "
        f"instability flags (t-interval over the seeds; flags at each kernel's own threshold calibrated against "
        f"importance when every seed has restorations, else at gap <= {REFERENCE:g}). PASS when both lie above their "
        f"pre-stated bars (Spearman > {BAR_SPEARMAN:g} and kappa > {BAR_KAPPA:g}): p_pass = max of the two one-sided "
        f"p-values; FAIL when either lies below its bar: p_fail = min of the two; Holm across populations for each "
        f"claim; PASS / FAIL when the adjusted p < 0.025, else INCONCLUSIVE (also with fewer than 2 seeds with a "
        f"value).")

PAIR_COLUMNS = ("model", "population", "seed", "kernel_a", "kernel_b", "n_heads", "spearman", "reference",
                "kappa_reference", "flagged_a", "flagged_b", "kappa_calibrated", "threshold_a", "threshold_b",
                "flagged_a_calibrated", "flagged_b_calibrated", "calibrated_against", "note")
"""Keys of ``Agreement.pairs`` rows (seed: int or None; n_heads, flagged_*: int; others float or str)."""
THRESHOLD_COLUMNS = ("model", "population", "seed", "kernel", "threshold", "threshold_low", "threshold_high",
                     "auroc", "separation", "n_heads", "n_important", "calibrated_against", "note")
POPULATION_COLUMNS = ("population", "kernel_a", "kernel_b", "n_seeds", "spearman", "spearman_low", "spearman_high",
                      "kappa_reference", "kappa_reference_low", "kappa_reference_high", "kappa_calibrated",
                      "kappa_calibrated_low", "kappa_calibrated_high", "per_seed", "scheme", "note")
VERDICT_COLUMNS = ("key", "population", "rule", "value", "low", "high", "kappa", "kappa_low", "kappa_high", "flags",
                   "p_pass", "p_fail", "p_pass_holm", "p_fail_holm", "verdict", "n_seeds", "correction", "note")


@dataclass(frozen=True)
class ModelGaps:
    """One model's head gaps per kernel and, where measured, the heads' restorations."""

    model: str
    population: str
    seed: int | None
    gaps: Mapping[str, np.ndarray]
    """Kernel -> (n_heads,) gap (NaN where undefined)."""
    restoration: np.ndarray | None = None
    """(n_heads,) restoration, NaN where undefined; None when the model was not validated."""


def model_gaps(features, heads=None, *, population: str, seed: int | None = None,
               kernels: Sequence[str] | None = None) -> ModelGaps:
    """One model's gaps from features.parquet rows of one model (model, layer, head, ``<kernel>.gap``
    for every kernel of ``kernels``, all by default) and, optionally, validate's heads.parquet
    (layer, head, restoration), joined on (layer, head); heads it lacks get NaN."""
    ft = features if isinstance(features, pa.Table) else pa.table(features)
    kernels = list(FEATURE_KERNELS) if kernels is None else [_kernel(k) for k in kernels]
    missing = [c for c in ("model", "layer", "head", *(f"{k}.gap" for k in kernels)) if c not in ft.column_names]
    if missing:
        raise UsageError(f"features table lacks column(s) {', '.join(map(repr, missing[:5]))}")
    models = sorted(set(ft.column("model").to_pylist()))
    if len(models) != 1:
        raise UsageError(f"features table must hold one model, found {len(models)}: {', '.join(models[:3])}")
    gaps = {k: np.asarray(ft.column(f"{k}.gap").to_numpy(zero_copy_only=False), dtype=float) for k in kernels}
    restoration = None
    if heads is not None:
        ht = heads if isinstance(heads, pa.Table) else pa.table(heads)
        lacking = [c for c in ("layer", "head", "restoration") if c not in ht.column_names]
        if lacking:
            raise UsageError(f"heads table lacks column(s) {', '.join(map(repr, lacking))}")
        known = {(int(a), int(b)): float(r) for a, b, r in zip(*(ht.column(c).to_pylist()
                                                                for c in ("layer", "head", "restoration")))}
        restoration = np.array([known.get((int(a), int(b)), NAN) for a, b in zip(
            ft.column("layer").to_pylist(), ft.column("head").to_pylist())])
    return ModelGaps(models[0], population, seed, gaps, restoration)


def _kernel(name: str) -> str:
    if name not in FEATURE_KERNELS:
        raise UsageError(f"unknown kernel {name!r} (one of {', '.join(FEATURE_KERNELS)})")
    return name


# --- one model ----------------------------------------------------------------------------------

def kappa(a: np.ndarray, b: np.ndarray) -> float:
    """Cohen's kappa of two boolean flag vectors, (p_o - p_e) / (1 - p_e) from their 2 x 2 table
    (``sklearn.metrics.cohen_kappa_score``'s value, checked in the tests; sklearn's input
    validation costs ~7 ms a call, 40x the null simulations' budget); NaN when neither varies
    (chance agreement p_e = 1)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.size == 0 or (a.all() or not a.any()) and (b.all() or not b.any()):
        return NAN
    pa_, pb = a.mean(), b.mean()
    p_o = float((a == b).mean())
    p_e = float(pa_ * pb + (1 - pa_) * (1 - pb))
    return (p_o - p_e) / (1 - p_e)


def thresholds(m: ModelGaps, n_resamples: int = CALIBRATION_RESAMPLES, seed: int = 0) -> list[dict]:
    """Per kernel of the model, its gap threshold calibrated against importance
    (``analysis.calibration.calibrate``; heads with a non-finite gap or restoration dropped); NaN
    with a note when the model has no restorations or one class only."""
    rows = []
    for kernel, gap in m.gaps.items():
        row = dict(model=m.model, population=m.population, seed=m.seed, kernel=kernel, threshold=NAN,
                   threshold_low=NAN, threshold_high=NAN, auroc=NAN, separation="", n_heads=0, n_important=0,
                   calibrated_against="", note="no importance given")
        if m.restoration is not None:
            ok = np.isfinite(gap) & np.isfinite(m.restoration)
            label = important(m.restoration[ok])
            c = calibrate(gap[ok], label, n_resamples=n_resamples, seed=seed)
            row.update(threshold=c.threshold, threshold_low=c.threshold_low, threshold_high=c.threshold_high,
                       auroc=c.auroc, separation=c.separation, n_heads=int(c.n), n_important=int(c.n_positive),
                       calibrated_against=IMPORTANCE_SOURCE, note=c.reason)
        rows.append({k: row[k] for k in THRESHOLD_COLUMNS})
    return rows


def pair_rows(m: ModelGaps, threshold: Mapping[str, float], pairs: Sequence[tuple[str, str]] = KERNEL_PAIRS,
              reference: float = REFERENCE) -> list[dict]:
    """Per pair of kernels: the Spearman of the gaps and Cohen's kappa of the flags at ``reference``
    and at each kernel's ``threshold`` (NaN thresholds: NaN kappa)."""
    rows = []
    for a, b in pairs:
        ga, gb = m.gaps[a], m.gaps[b]
        ok = np.isfinite(ga) & np.isfinite(gb)
        ta, tb = threshold.get(a, NAN), threshold.get(b, NAN)
        calibrated = bool(np.isfinite(ta) and np.isfinite(tb))
        fa, fb = ga[ok] <= reference, gb[ok] <= reference
        ca, cb = ga[ok] <= ta, gb[ok] <= tb
        dropped = int((~ok).sum())
        rows.append(dict(
            model=m.model, population=m.population, seed=m.seed, kernel_a=a, kernel_b=b, n_heads=int(ok.sum()),
            spearman=spearman(ga[ok], gb[ok]), reference=float(reference), kappa_reference=kappa(fa, fb),
            flagged_a=int(fa.sum()), flagged_b=int(fb.sum()),
            kappa_calibrated=kappa(ca, cb) if calibrated else NAN, threshold_a=float(ta), threshold_b=float(tb),
            flagged_a_calibrated=int(ca.sum()) if calibrated else 0,
            flagged_b_calibrated=int(cb.sum()) if calibrated else 0,
            calibrated_against=IMPORTANCE_SOURCE if calibrated else "",
            note="; ".join(x for x in (f"{dropped} heads without both gaps" if dropped else "",
                                       "" if calibrated else "no calibrated threshold for both kernels") if x)))
    return rows


# --- across seeds --------------------------------------------------------------------------------

def _across(values: Sequence[float], fisher: bool) -> tuple[float, float, float, float, float, int]:
    """(value, low, high, se, df, k): ``analysis.population.across_seeds`` at this module's confidence."""
    return across_seeds(values, fisher, CONFIDENCE)


def _one_sided(values: Sequence[float], bar: float, fisher: bool) -> tuple[float, float]:
    """(p of "mean > bar", p of "mean < bar") from the t over the seeds (on Fisher's z with ``fisher``)."""
    value, _, _, se, df, k = _across(values, fisher)
    if k < 2 or not np.isfinite(se):
        return NAN, NAN
    d = (math.atanh(value) - math.atanh(bar)) if fisher else (value - bar)
    if se == 0:
        return float(d <= 0), float(d >= 0)
    return float(stats.t.sf(d / se, df)), float(stats.t.cdf(d / se, df))


def population_rows(pairs: Sequence[dict]) -> list[dict]:
    """Per (population, kernel pair): the across-seed means and t-intervals of the per-model rows."""
    cells: dict[tuple[str, str, str], list[dict]] = {}
    for r in pairs:
        cells.setdefault((r["population"], r["kernel_a"], r["kernel_b"]), []).append(r)
    rows = []
    for (pop, a, b), rs in cells.items():
        out = dict(population=pop, kernel_a=a, kernel_b=b, n_seeds=len(rs))
        notes = []
        for col, fisher in (("spearman", True), ("kappa_reference", False), ("kappa_calibrated", False)):
            value, low, high, _, _, k = _across([r[col] for r in rs], fisher)
            out.update({col: value, f"{col}_low": low, f"{col}_high": high})
            if k < len(rs):
                notes.append(f"{col}: {k} of {len(rs)} seeds with a value")
        out["per_seed"] = "; ".join(f"{r['model']}: rho {r['spearman']:.3g}, kappa {r['kappa_reference']:.3g} "
                                    f"(0.77) / {r['kappa_calibrated']:.3g} (calibrated)" for r in rs)
        out["scheme"] = (f"{len(rs)} seeds: mean ± t(k-1) x SD/sqrt(k) over the seeds with a value (Spearman on "
                         "Fisher's z, mapped back)")
        out["note"] = "; ".join(notes)
        rows.append({k: out[k] for k in POPULATION_COLUMNS})
    return rows


def verdict_rows(pairs: Sequence[dict], pair: tuple[str, str] = VERDICT_PAIR) -> list[dict]:
    """``VERDICT_KEY`` per population from the per-model rows of ``pair`` (module docstring, ``RULE``)."""
    by_pop: dict[str, list[dict]] = {}
    for r in pairs:
        if (r["kernel_a"], r["kernel_b"]) == tuple(pair):
            by_pop.setdefault(r["population"], []).append(r)
    rows = []
    for pop, rs in by_pop.items():
        calibrated = all(np.isfinite(r["threshold_a"]) and np.isfinite(r["threshold_b"]) for r in rs)
        col = "kappa_calibrated" if calibrated else "kappa_reference"
        rho, kap = [r["spearman"] for r in rs], [r[col] for r in rs]
        value, low, high, _, _, k_rho = _across(rho, True)
        kv, kl, kh, _, _, k_kap = _across(kap, False)
        pr, fr = _one_sided(rho, BAR_SPEARMAN, True)
        pk, fk = _one_sided(kap, BAR_KAPPA, False)
        defined = np.isfinite(pr) and np.isfinite(pk)
        notes = [f"{name}: {k} of {len(rs)} seeds with a value" for name, k in (("Spearman", k_rho), ("kappa", k_kap))
                 if k < len(rs)]
        rows.append(dict(
            key=VERDICT_KEY, population=pop, rule=RULE, value=value, low=low, high=high, kappa=kv, kappa_low=kl,
            kappa_high=kh, flags="calibrated per kernel against importance" if calibrated else f"gap <= {REFERENCE:g}",
            p_pass=max(pr, pk) if defined else NAN,
            p_fail=float(np.nanmin([fr, fk])) if np.isfinite([fr, fk]).any() else NAN,
            p_pass_holm=NAN, p_fail_holm=NAN, verdict="INCONCLUSIVE", n_seeds=len(rs), correction="",
            note="; ".join(notes)))
    m = sum(np.isfinite(r["p_pass"]) or np.isfinite(r["p_fail"]) for r in rows)
    for r, a, b in zip(rows, holm([r["p_pass"] for r in rows]), holm([r["p_fail"] for r in rows])):
        r["p_pass_holm"], r["p_fail_holm"] = float(a), float(b)
        r["verdict"] = decide_claims(a, b)
        r["correction"] = (f"Holm over {m} population(s), PASS and FAIL claims each; one-sided tests at 0.025; the two "
                           "parts combined by intersection-union (PASS) and union (FAIL), no further correction")
    return [{k: r[k] for k in VERDICT_COLUMNS} for r in rows]


@dataclass
class Agreement:
    """Kernel agreement over models and populations: plain rows for Parquet."""

    pairs: list[dict]
    """Per model and kernel pair (``PAIR_COLUMNS``)."""
    thresholds: list[dict]
    """Per model and kernel, its calibrated threshold (``THRESHOLD_COLUMNS``)."""
    populations: list[dict]
    """Per population and kernel pair, across seeds (``POPULATION_COLUMNS``)."""
    verdicts: list[dict]
    """Per population, ``VERDICT_KEY`` (``VERDICT_COLUMNS``)."""


def agreement(models: Sequence[ModelGaps], pairs: Sequence[tuple[str, str]] = KERNEL_PAIRS, *,
              reference: float = REFERENCE, n_resamples: int = CALIBRATION_RESAMPLES, seed: int = 0) -> Agreement:
    """Every table of this module for ``models`` (seeds of one or more populations)."""
    if not models:
        raise UsageError("kernel agreement needs at least one model")
    for a, b in pairs:
        _kernel(a), _kernel(b)
    for m in models:
        lacking = sorted({k for p in pairs for k in p} - set(m.gaps))
        if lacking:
            raise UsageError(f"model {m.model!r} has no gaps of kernel(s) {', '.join(lacking)}")
    if tuple(VERDICT_PAIR) not in [tuple(p) for p in pairs]:
        raise UsageError(f"pairs must include the verdict's pair {VERDICT_PAIR}")
    threshold_rows, pair_table = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for m in models:
            t = thresholds(m, n_resamples, seed)
            threshold_rows += t
            pair_table += [{k: r[k] for k in PAIR_COLUMNS}
                           for r in pair_rows(m, {r["kernel"]: r["threshold"] for r in t}, pairs, reference)]
    return Agreement(pair_table, threshold_rows, population_rows(pair_table), verdict_rows(pair_table))
