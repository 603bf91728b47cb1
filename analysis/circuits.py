"""Circuits against spectra (research plan 2.2): do circuits route through unstable heads, do
known circuits hold spectral bottlenecks, do head classes have spectral signatures?

Inputs are result tables only: per model (one training seed of a population) its heads with
their gap (and the scan's other spectral metrics), whether each head is in the discovered
circuit, its class label and attention-pattern scores, and optionally the bottleneck
measurement (the fraction of the behaviour removed by ablating the circuit's lowest-gap node
alone, and by ablating its median-gap node alone).

Per seed (heads are the units):

- ``circuit_gap_difference``: median gap of circuit heads minus median gap of the other heads;
  95 % interval from a bootstrap resampling circuit and other heads separately (percentile),
  two-sided permutation p-value of "no difference" (circuit membership shuffled).
- ``gap_auroc/<class>``: AUROC of the gap as a detector of the class (small gap = member), and
  beside it the AUROC of the class's own attention-pattern score (the baseline a spectral
  detector has to be compared with); interval from a stratified bootstrap over heads.
- ``bottleneck``: removed(lowest-gap node) - removed(median-gap node).

Across seeds (the unit of replication): the mean of the seeds' values with a t-interval over
seeds (``analysis.population.from_values``); one seed: its own interval, describing that model
only. Claims and verdicts (``RULES``): PASS when the one-sided p-value of the claim is < 0.025
after Holm's correction within the family (one key over every population; the classes' AUROCs
together), FAIL when that of the opposite claim is, else INCONCLUSIVE.

``signature``: the mean spectral profile per class, and a logistic regression on the scan's
metrics (standardised) predicting the class, evaluated leave-one-population-out (trained on the
other organisms' heads, every seed) against the majority class of the training folds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from analysis.population import PopulationEstimate, clip, from_values, holm, p_value
from analysis.stats import decide_claims

NAN = float("nan")
ALPHA = 0.05
N_RESAMPLES = 2000
N_PERMUTATIONS = 2000
SPECTRAL_FEATURES = ("gap", "entropy", "effective_rank", "condition_number", "lambda1")
EXPLORED = ("entropy", "effective_rank", "condition_number", "lambda1")
"""The scan's other metrics, compared between circuit and other heads like the gap, without a
claim (exploratory rows: no verdict, not in a Holm family)."""
"""Scan columns the signature classifier reads (log10 of the condition number and of lambda1)."""

CLAIMS = {
    "circuit_gap_difference": ("below", 0.0),
    "gap_auroc": ("above", 0.5),
    "bottleneck": ("above", 0.0),
}
"""Key -> (side of the claim, target)."""

RULES = {
    "circuit_gap_difference": ("median gap of the circuit's heads minus that of the other heads, per seed; claim: "
                               "< 0 (circuits route through unstable heads). Per seed: percentile bootstrap over "
                               "heads (circuit and other heads resampled separately), permutation p."),
    "gap_auroc": ("AUROC of the gap as a detector of a head class (smaller gap = member), per seed; claim: > 0.5. "
                  "Beside it, not a verdict: the AUROC of the class's own attention-pattern score."),
    "bottleneck": ("fraction of the behaviour removed by ablating the circuit's lowest-gap node alone minus that "
                   "removed by ablating its median-gap node alone, per seed; claim: > 0."),
    "signature": ("class-balanced logistic regression on the scan's spectral metrics predicting the head class, "
                  "trained on every other population and tested on the held-out one (leave-one-population-out); "
                  "score: balanced accuracy (mean recall over the classes present) against the training folds' "
                  "majority class; claim: the gain is > 0 (one-sided t-test over the held-out populations, "
                  "needs >= 3)."),
}


@dataclass
class CircuitModel:
    """What one model's circuits cell gives this analysis."""

    name: str
    population: str
    seed: int | None
    heads: Mapping[str, np.ndarray]
    """Per head: ``gap`` (and any other spectral column), ``in_circuit`` (bool), ``label`` (str),
    and attention-pattern scores by class name (e.g. ``induction``)."""
    bottleneck: tuple[float, float] | None = None
    """(removed by the lowest-gap node alone, removed by the median-gap node alone)."""


@dataclass
class SeedValue:
    value: float
    low: float
    high: float
    p_value: float
    n: int
    note: str = ""


@dataclass
class CircuitVerdicts:
    rows: list[dict] = field(default_factory=list)
    signature: dict = field(default_factory=dict)


# --- per seed ----------------------------------------------------------------------------------

def _finite(*arrays: np.ndarray) -> np.ndarray:
    return np.all([np.isfinite(np.asarray(a, dtype=float)) for a in arrays], axis=0)


def gap_difference(gap: np.ndarray, in_circuit: np.ndarray, *, n_resamples: int = N_RESAMPLES,
                   n_permutations: int = N_PERMUTATIONS, seed: int = 0) -> SeedValue:
    """Median gap of circuit heads minus that of the other heads, with a percentile bootstrap
    interval (each group resampled on its own) and a two-sided permutation p-value."""
    gap = np.asarray(gap, dtype=float)
    member = np.asarray(in_circuit, dtype=bool)
    ok = np.isfinite(gap)
    a, b = gap[ok & member], gap[ok & ~member]
    if len(a) < 1 or len(b) < 1:
        return SeedValue(NAN, NAN, NAN, NAN, int(ok.sum()), "a group is empty")
    value = float(np.median(a) - np.median(b))
    rng = np.random.default_rng(seed)
    boot = np.median(rng.choice(a, (n_resamples, len(a))), axis=1) - np.median(rng.choice(b, (n_resamples, len(b))), axis=1)
    low, high = (float(x) for x in np.quantile(boot, [ALPHA / 2, 1 - ALPHA / 2]))
    pooled = np.concatenate([a, b])
    perms = np.array([rng.permutation(pooled) for _ in range(n_permutations)])
    null = np.median(perms[:, :len(a)], axis=1) - np.median(perms[:, len(a):], axis=1)
    p = float((1 + np.sum(np.abs(null) >= abs(value) - 1e-12)) / (n_permutations + 1))
    return SeedValue(value, low, high, p, int(ok.sum()), f"{len(a)} circuit / {len(b)} other heads")


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """AUROC of ``score`` as a detector of ``positive`` (larger score = member; ties count 1/2)."""
    return float(_aurocs(np.asarray(score, dtype=float)[None], np.asarray(positive, dtype=bool)[None])[0])


def _aurocs(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Row-wise AUROC of (resamples, n) scores against (resamples, n) labels (Mann-Whitney U / n1 n0)."""
    from scipy import stats

    n1 = positive.sum(axis=1)
    n0 = positive.shape[1] - n1
    ranks = stats.rankdata(scores, axis=1)
    u = np.where(positive, ranks, 0.0).sum(axis=1) - n1 * (n1 + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n1 > 0) & (n0 > 0), u / (n1 * n0), np.nan)


def auroc_interval(score: np.ndarray, positive: np.ndarray, *, n_resamples: int = N_RESAMPLES, seed: int = 0) -> SeedValue:
    """AUROC with a stratified percentile bootstrap over heads and a Mann-Whitney p of 0.5."""
    from scipy import stats

    score = np.asarray(score, dtype=float)
    pos = np.asarray(positive, dtype=bool)
    ok = np.isfinite(score)
    score, pos = score[ok], pos[ok]
    value = auroc(score, pos)
    if not np.isfinite(value):
        return SeedValue(NAN, NAN, NAN, NAN, int(ok.sum()), "no member or no non-member of the class")
    rng = np.random.default_rng(seed)
    i1, i0 = np.flatnonzero(pos), np.flatnonzero(~pos)
    idx = np.concatenate([rng.choice(i1, (n_resamples, len(i1))), rng.choice(i0, (n_resamples, len(i0)))], axis=1)
    boot = _aurocs(score[idx], pos[idx])
    low, high = (float(x) for x in np.nanquantile(boot, [ALPHA / 2, 1 - ALPHA / 2]))
    p = float(stats.mannwhitneyu(score[pos], score[~pos], alternative="two-sided").pvalue)
    return SeedValue(value, low, high, p, int(ok.sum()), f"{len(i1)} members / {len(i0)} others")


# --- across seeds ------------------------------------------------------------------------------

def _population_estimate(values: Sequence[SeedValue], seeds: Sequence[int | None], what: str) -> PopulationEstimate:
    return from_values([v.value for v in values], seeds, [v.n for v in values], [v.low for v in values],
                       [v.high for v in values], what=what)


def _claim_ps(e: PopulationEstimate, key: str) -> tuple[float, float]:
    side, target = CLAIMS[key]
    other = "below" if side == "above" else "above"
    return p_value(e, target, side), p_value(e, target, other)


def _row(population: str, key: str, metric: str, e: PopulationEstimate, extra: Mapping | None = None) -> dict:
    family = key.split("/")[0]
    p_pass, p_fail = _claim_ps(e, family) if family in CLAIMS else (NAN, NAN)
    return {"population": population, "key": key, "metric": metric, "value": e.value, "low": e.low, "high": e.high,
            "n_seeds": len(e.per_seed), "per_seed": list(e.per_seed), "p_pass": p_pass, "p_fail": p_fail,
            "scheme": e.scheme, **(extra or {})}


def classes_of(models: Sequence[CircuitModel], min_members: int = 2) -> list[str]:
    """Head classes (labels other than 'other') with at least ``min_members`` heads in some model."""
    found: dict[str, int] = {}
    for m in models:
        labels, counts = np.unique(np.asarray(m.heads["label"], dtype=str), return_counts=True)
        for label, n in zip(labels, counts):
            if label != "other":
                found[label] = max(found.get(label, 0), int(n))
    return sorted(c for c, n in found.items() if n >= min_members)


def analyse(models: Sequence[CircuitModel], *, n_resamples: int = N_RESAMPLES, n_permutations: int = N_PERMUTATIONS,
            seed: int = 0) -> CircuitVerdicts:
    """Every verdict row of the circuits-vs-spectra question over the populations of ``models``."""
    populations: dict[str, list[CircuitModel]] = {}
    for m in models:
        populations.setdefault(m.population, []).append(m)
    classes = classes_of(models)
    rows: list[dict] = []
    for pop, members in populations.items():
        seeds = [m.seed for m in members]
        diffs = [gap_difference(m.heads["gap"], m.heads["in_circuit"], n_resamples=n_resamples,
                                n_permutations=n_permutations, seed=seed + i) for i, m in enumerate(members)]
        e = _population_estimate(diffs, seeds, "percentile bootstrap over heads, circuit and other heads separately")
        rows.append(_row(pop, "circuit_gap_difference", "median gap: circuit - other heads < 0", e,
                         {"per_seed_p_permutation": [d.p_value for d in diffs], "notes": [d.note for d in diffs]}))
        for metric in EXPLORED:  # the scan's other metrics: described, no claim
            if all(metric in m.heads for m in members):
                per = [gap_difference(m.heads[metric], m.heads["in_circuit"], n_resamples=n_resamples,
                                      n_permutations=n_permutations, seed=seed + i) for i, m in enumerate(members)]
                e = _population_estimate(per, seeds, "percentile bootstrap over heads, circuit and other heads separately")
                rows.append(_row(pop, f"circuit_difference/{metric}", f"median {metric}: circuit - other heads "
                                 "(exploratory)", e, {"exploratory": True}))
        for c in classes:
            per = [auroc_interval(-np.asarray(m.heads["gap"], float), np.asarray(m.heads["label"], str) == c,
                                  n_resamples=n_resamples, seed=seed + i) for i, m in enumerate(members)]
            e = clip(_population_estimate(per, seeds, "stratified percentile bootstrap over heads"), 0.0, 1.0)
            own = c if all(c in m.heads for m in members) else None
            baseline = ([auroc(np.asarray(m.heads[own], float), np.asarray(m.heads["label"], str) == c) for m in members]
                        if own else [])
            rows.append(_row(pop, f"gap_auroc/{c}", f"AUROC of -gap detecting {c} heads > 0.5", e,
                             {"pattern_auroc": float(np.nanmean(baseline)) if baseline else NAN}))
        have = [m for m in members if m.bottleneck is not None]
        if have:
            vals = [SeedValue(float(m.bottleneck[0] - m.bottleneck[1]), NAN, NAN, NAN, 1) for m in have]
            e = _population_estimate(vals, [m.seed for m in have], "one ablation each: no within-seed interval")
            rows.append(_row(pop, "bottleneck", "removed by the lowest-gap node - by the median node > 0", e))
    _apply_holm(rows)
    return CircuitVerdicts(rows, signature(models))


def _apply_holm(rows: list[dict]) -> None:
    """Holm over each family: one key over every population (the AUROCs of all classes together)."""
    families: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("exploratory"):
            r.update(p_pass_holm=NAN, p_fail_holm=NAN, verdict="", correction="exploratory: no claim, no verdict")
            continue
        families.setdefault(r["key"].split("/")[0], []).append(r)
    for family in families.values():
        for name in ("p_pass", "p_fail"):
            adjusted = holm([r[name] for r in family])
            for r, q in zip(family, adjusted):
                r[f"{name}_holm"] = float(q)
        for r in family:
            r["verdict"] = decide_claims(r["p_pass_holm"], r["p_fail_holm"])
            r["correction"] = f"Holm over {len(family)} test(s) of the {r['key'].split('/')[0]} family"


# --- spectral signatures ------------------------------------------------------------------------

def _features(heads: Mapping[str, np.ndarray]) -> np.ndarray:
    cols = []
    for name in SPECTRAL_FEATURES:
        v = np.asarray(heads.get(name, np.full(len(heads["gap"]), np.nan)), dtype=float)
        cols.append(np.log10(np.clip(v, 1e-12, None)) if name in ("condition_number", "lambda1") else v)
    return np.stack(cols, axis=1)


def balanced_accuracy_score(y_true, y_pred) -> float:
    """Mean recall over the classes present in ``y_true`` (sklearn's; the majority-class
    baseline scores 1 / classes present)."""
    import warnings

    from sklearn.metrics import balanced_accuracy_score as score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true": expected
        return float(score(y_true, y_pred))


def signature(models: Sequence[CircuitModel]) -> dict:
    """Mean spectral profile per class, and the leave-one-population-out balanced accuracy
    (mean recall over the classes present: 'other' dominates, so plain accuracy would reward
    always saying 'other') of a class-balanced logistic regression on the spectral features,
    against the training folds' majority class (balanced accuracy 1 / classes present)."""
    x_all, y_all, group = [], [], []
    for m in models:
        x_all.append(_features(m.heads))
        y_all.append(np.asarray(m.heads["label"], dtype=str))
        group += [m.population] * len(m.heads["gap"])
    if not x_all:
        return {}
    x, y, g = np.concatenate(x_all), np.concatenate(y_all), np.array(group)
    ok = np.isfinite(x).all(axis=1)
    x, y, g = x[ok], y[ok], g[ok]
    profile = {c: {f: float(np.mean(x[y == c, i])) for i, f in enumerate(SPECTRAL_FEATURES)} for c in np.unique(y)}
    counts = {c: int((y == c).sum()) for c in np.unique(y)}
    out = {"profile": profile, "counts": counts, "features": list(SPECTRAL_FEATURES), "excluded_non_finite": int((~ok).sum())}
    pops = list(dict.fromkeys(g))
    if len(pops) < 2 or len(np.unique(y)) < 2:
        out["note"] = "fewer than 2 populations or 1 class: no leave-one-population-out evaluation"
        return out
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = []
    for held in pops:
        train, test = g != held, g == held
        if len(np.unique(y[train])) < 2:
            folds.append({"population": held, "accuracy": NAN, "baseline": NAN, "n": int(test.sum())})
            continue
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, class_weight="balanced"))
        model.fit(x[train], y[train])
        labels, n = np.unique(y[train], return_counts=True)
        majority = np.full(int(test.sum()), labels[int(np.argmax(n))])
        folds.append({"population": held, "accuracy": balanced_accuracy_score(y[test], model.predict(x[test])),
                      "baseline": balanced_accuracy_score(y[test], majority), "n": int(test.sum())})
    out["folds"] = folds
    gains = np.array([f["accuracy"] - f["baseline"] for f in folds], dtype=float)
    gains = gains[np.isfinite(gains)]
    out["mean_gain"] = float(gains.mean()) if gains.size else NAN
    if gains.size >= 3:
        from scipy import stats

        t = stats.ttest_1samp(gains, 0.0, alternative="greater")
        out["p_gain"] = float(t.pvalue)
        out["verdict"] = "PASS" if t.pvalue < ALPHA / 2 else (
            "FAIL" if stats.ttest_1samp(gains, 0.0, alternative="less").pvalue < ALPHA / 2 else "INCONCLUSIVE")
    else:
        out["verdict"] = "INCONCLUSIVE"
        out["note"] = f"{gains.size} held-out population(s): fewer than 3, no verdict"
    return out


# --- from the circuits job's cells ------------------------------------------------------------

def model_from_cell(name: str, population: str, seed: int | None, heads_table, summary: Mapping) -> CircuitModel:
    """A ``CircuitModel`` from a circuits cell: its heads.parquet and circuit.json."""
    cols = heads_table.to_pydict()
    heads = {k: np.asarray(v, dtype=float) for k, v in cols.items()
             if k not in ("label", "classes", "in_circuit") and all(x is None or isinstance(x, (int, float)) for x in v)}
    heads["label"] = np.asarray(cols["label"], dtype=str)
    heads["in_circuit"] = np.asarray(cols["in_circuit"], dtype=bool)
    b = summary.get("bottleneck")
    return CircuitModel(name, population, seed, heads,
                        (float(b["removed_lowest"]), float(b["removed_median"])) if b else None)


def per_model_rows(models: Sequence[tuple[str, Mapping]]) -> list[dict]:
    """One row per circuits cell: the circuit, its exact faithfulness, CPR, CMD, the attribution
    agreement, and the overlap of its heads with validate's minimal head set where both exist."""
    out = []
    for name, s in models:
        f = s["faithfulness"]
        row = {"model": name, "task": s["task"], "method": s["method"], "ablation": s["ablation"],
               "size": int(s["size"]), "n_edges": int(s["n_edges"]), "faithfulness": float(s["faithfulness_of_circuit"]),
               "cpr": float(f["cpr"]), "cmd": float(f["cmd"]),
               "spearman_eap": float(s["agreement"]["spearman"].get("eap", NAN)),
               "spearman_eap_ig": float(s["agreement"]["spearman"].get("eap-ig", NAN)),
               "heads": ", ".join(f"L{l}H{h}" for l, h in s["heads"]), "validate_overlap": NAN, "validate_heads": ""}
        minimal = s.get("validate_minimal_heads")
        if minimal is not None:
            a, b = {tuple(h) for h in s["heads"]}, {tuple(h) for h in minimal}
            row["validate_overlap"] = len(a & b) / len(a | b) if a | b else NAN
            row["validate_heads"] = ", ".join(f"L{l}H{h}" for l, h in sorted(b))
        out.append(row)
    return out
