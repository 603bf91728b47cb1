"""Cross-model analysis of a sweep run (reads result tables only; never loads a model).

``load_run`` gathers what each model's finished units hold (gaps, importances, steering per
layer, the per-model verdicts the jobs already computed) and names what is missing.
``analyse`` turns that into the report's tables: threshold calibration per model, verdicts
for every success metric of the research plan, cross-model generalization (threshold spread,
heterogeneity of correlations), scaling fits and information measures.

Non-finite gaps, importances, entropies and steering effects are excluded from the statistics
that read them and counted in ``ModelData.excluded``; nothing is dropped silently.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from scipy import stats

from analysis.calibration import IMPORTANCE_RULE, STEERABLE_RULE, Calibration, calibrate, calibrate_layers, important
from analysis.information import entropy_by_stability, mutual_information
from analysis.scaling import scaling_table
from analysis.stats import Estimate, verdict
from spectral.metrics import UNSTABLE_GAP

NAN = float("nan")
BAND = 0.05
"""Half-width of the band around 0.77 the plan allows ("threshold holds ±0.05")."""
STABLE_RANGE = 0.10
"""Largest spread of per-model thresholds that still counts as one threshold (2 x BAND)."""
LAYER_CHOICE_TOLERANCE = 0.10
"""Fraction of the oracle's effect the automated layer choice may lose and still match it."""
MIN_SCALING_MODELS = 3
FINISHED = "unit.json"
HETEROGENEITY_ALPHA = 0.05
Z95 = float(stats.norm.ppf(0.975))

# verdict keys (flat names for summary.json / MLflow) -> metric as the page states it
PER_MODEL_METRICS = {
    "importance_correlation": "r(1/gap, importance) > 0.7",
    "restoration_ratio": f"restoration of unstable heads > 2x stable (gap <= {UNSTABLE_GAP:g})",
    "steering_improvement": "spectral steering improves on the baseline by >= 25 %",
    "layer_choice": f"automated layer choice matches the oracle (effect lost <= {LAYER_CHOICE_TOLERANCE:.0%})",
    "threshold_heads": f"head threshold within {UNSTABLE_GAP:g} ± {BAND:g}",
    "threshold_layers": f"layer threshold within {UNSTABLE_GAP:g} ± {BAND:g}",
}
CROSS_MODEL_METRICS = {
    "threshold_holds_heads": f"{UNSTABLE_GAP:g} holds across models (important heads)",
    "threshold_holds_layers": f"{UNSTABLE_GAP:g} holds across models (steerable layers)",
    "threshold_stable_heads": "threshold stable across models (important heads)",
    "threshold_stable_layers": "threshold stable across models (steerable layers)",
    "consistent_importance_r": "r(importance, 1/gap) consistent across models",
    "consistent_steering_r": "r(layer min gap, steering effect) consistent across models",
}
VERDICT_RULES = {
    "per-model threshold": f"PASS if the bootstrap 95 % interval of the model's threshold lies within "
                           f"[{UNSTABLE_GAP - BAND:.2f}, {UNSTABLE_GAP + BAND:.2f}] and the gap separates "
                           "(AUROC interval above 0.5); FAIL if the interval lies entirely outside the band, or "
                           "the AUROC interval lies below 0.5 (small gaps mark the less important units); "
                           "else (or without an interval) INCONCLUSIVE.",
    "0.77 holds": f"PASS if every model's threshold interval lies within [{UNSTABLE_GAP - BAND:.2f}, "
                  f"{UNSTABLE_GAP + BAND:.2f}] and every model's gap separates (AUROC interval above 0.5); "
                  "FAIL if any model's interval lies entirely outside the band, or any model's gap separates "
                  "the wrong way (AUROC interval below 0.5); else INCONCLUSIVE "
                  "(also with fewer than 2 models).",
    "threshold stable": f"PASS if the range of point thresholds is <= {STABLE_RANGE:.2f} and all intervals "
                        f"overlap a common ±{BAND:g} band (max low - min high <= {STABLE_RANGE:.2f}); FAIL if "
                        f"two models' intervals are more than {STABLE_RANGE:.2f} apart; else INCONCLUSIVE "
                        "(also with fewer than 2 models, or a model without an interval).",
    "correlation consistent": "Cochran's Q on the Fisher-z scale, SE of each model's z from its 95 % "
                              "interval (width / 2 / 1.96): FAIL if Q's p < 0.05 or two models' intervals "
                              "exclude 0 with opposite signs; PASS if p >= 0.05 and every model's r has "
                              "the same sign; else INCONCLUSIVE (also with fewer than 2 models).",
    "copied": "r(1/gap, importance), the restoration ratio and the steering improvement keep the verdict "
              "of the job that measured them: PASS if the interval lies above the target, FAIL if below.",
    "layer choice": f"PASS if the upper bound of the effect the spectral choice loses against the "
                    f"oracle's best layer is <= {LAYER_CHOICE_TOLERANCE:g}; FAIL if its lower bound "
                    f"is > {LAYER_CHOICE_TOLERANCE:g}; else INCONCLUSIVE.",
}


# --- loading ---------------------------------------------------------------------------

@dataclass
class ModelData:
    """Everything the finished units of one model hold, as arrays (non-finite values kept)."""

    name: str
    facts: dict | None
    """model.json: parameters, layers, heads (per layer), d_model, d_head; None if absent."""
    units: dict[str, Path]
    """kind -> directory of the first finished unit of that kind."""
    scan: dict[str, np.ndarray] | None = None
    """layer, head, gap, entropy of every head."""
    heads: dict[str, np.ndarray] | None = None
    """layer, head, gap, importance (restoration) of every patched head."""
    layers: dict[str, np.ndarray] | None = None
    """layer, min_gap, effect, effect_low, effect_high from the steering experiment."""
    validate: dict[str, dict] = field(default_factory=dict)
    """validate.parquet rows by name."""
    steer: dict[str, dict] = field(default_factory=dict)
    """steer verdicts.parquet rows by name."""
    excluded: dict[str, int] = field(default_factory=dict)
    """Non-finite values excluded, by quantity."""


@dataclass
class RunData:
    run_dir: Path
    run_id: str
    config: dict
    models: list[ModelData]
    found: list[str]
    """Finished units, one line each."""
    missing: list[str]
    """What the report could not use, one line each."""


def _columns(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    table = pq.read_table(path)
    return {n: (table[n].to_numpy(zero_copy_only=False).astype(float) if n in table.column_names
                else np.full(table.num_rows, np.nan)) for n in names}


def _rows_by_name(path: Path) -> dict[str, dict]:
    return {r["name"]: r for r in pq.read_table(path).to_pylist()} if path.exists() else {}


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _scan(units: dict[str, Path]) -> dict[str, np.ndarray] | None:
    for kind in ("validate", "scan", "steer", "patch"):
        if kind in units and (units[kind] / "scan.parquet").exists():
            return _columns(units[kind] / "scan.parquet", ("layer", "head", "gap", "entropy"))
    return None


def _heads(units: dict[str, Path], scan: dict[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
    if "validate" in units and (units["validate"] / "heads.parquet").exists():
        return _columns(units["validate"] / "heads.parquet", ("layer", "head", "gap", "importance"))
    if "patch" in units and scan is not None:
        patch = _columns(units["patch"] / "patch.parquet", ("layer", "head", "restoration"))
        gap_of = {(l, h): g for l, h, g in zip(scan["layer"], scan["head"], scan["gap"])}
        gap = np.array([gap_of.get((l, h), np.nan) for l, h in zip(patch["layer"], patch["head"])])
        return {"layer": patch["layer"], "head": patch["head"], "gap": gap, "importance": patch["restoration"]}
    return None


def _count_bad(*arrays: np.ndarray) -> int:
    return int((~np.all([np.isfinite(a) for a in arrays], axis=0)).sum()) if arrays[0].size else 0


def load_model(name: str, facts: dict | None, units: dict[str, Path]) -> ModelData:
    md = ModelData(name, facts, units)
    md.scan = _scan(units)
    md.heads = _heads(units, md.scan)
    if "steer" in units and (units["steer"] / "layers.parquet").exists():
        md.layers = _columns(units["steer"] / "layers.parquet", ("layer", "min_gap", "effect", "effect_low", "effect_high"))
        md.steer = _rows_by_name(units["steer"] / "verdicts.parquet")
    if "validate" in units:
        md.validate = _rows_by_name(units["validate"] / "validate.parquet")
    if md.scan is not None:
        md.excluded["gap (scan)"] = _count_bad(md.scan["gap"])
        md.excluded["entropy (scan)"] = _count_bad(md.scan["entropy"])
    if md.heads is not None:
        md.excluded["gap or importance (patched heads)"] = _count_bad(md.heads["gap"], md.heads["importance"])
    if md.layers is not None:
        md.excluded["min gap or effect (steered layers)"] = _count_bad(md.layers["min_gap"], md.layers["effect"],
                                                                      md.layers["effect_low"])
    return md


def load_run(run_dir: Path, safe: Callable[[str], str]) -> RunData:
    """Read ``run_dir/sweep.json`` and every finished unit; ``safe`` maps a model spec to its
    directory name (``jobs.sweep.safe``). A unit without ``unit.json`` is unfinished: named
    in ``missing`` and not read."""
    sweep = json.loads((run_dir / "sweep.json").read_text(encoding="utf-8"))
    config = sweep.get("config", {})
    experiments = [e.get("kind", "?") for e in config.get("experiments", [])]
    found, missing, models = [], [], []
    for kind in ("validate", "steer"):
        if kind not in experiments and not (kind == "validate" and "patch" in experiments):
            missing.append(f"the sweep has no {kind} experiment: its metrics are not evaluated")
    for model in config.get("models", []):
        model_dir = run_dir / f"model={safe(model)}"
        units: dict[str, Path] = {}
        for i, kind in enumerate(experiments):
            unit = model_dir / f"experiment={i}-{kind}"
            if not unit.is_dir():
                missing.append(f"{model}: experiment {i} ({kind}) not run")
            elif not (unit / FINISHED).exists():
                missing.append(f"{model}: experiment {i} ({kind}) not finished (no {FINISHED})")
            else:
                found.append(f"{model}: experiment {i} ({kind})")
                units.setdefault(kind, unit)
        facts = _read_json(model_dir / "model.json")
        if facts is None:
            missing.append(f"{model}: model.json (size facts) missing: excluded from scaling fits")
        models.append(load_model(model, facts, units))
    return RunData(run_dir, str(sweep.get("run_id", run_dir.name)), config, models, found, missing)


# --- per-model statistics --------------------------------------------------------------

def finite_heads(md: ModelData) -> dict[str, np.ndarray] | None:
    if md.heads is None:
        return None
    ok = np.isfinite(md.heads["gap"]) & np.isfinite(md.heads["importance"])
    return {k: v[ok] for k, v in md.heads.items()}


def finite_layers(md: ModelData) -> dict[str, np.ndarray] | None:
    if md.layers is None:
        return None
    ok = np.isfinite(md.layers["min_gap"]) & np.isfinite(md.layers["effect"]) & np.isfinite(md.layers["effect_low"])
    return {k: v[ok] for k, v in md.layers.items()}


def finite_gaps(md: ModelData) -> np.ndarray:
    if md.scan is None:
        return np.zeros(0)
    return md.scan["gap"][np.isfinite(md.scan["gap"])]


def calibrations(md: ModelData, n_resamples: int, seed: int) -> dict[str, Calibration | None]:
    """Head threshold (important heads) and layer threshold (steerable layers); None where the
    model has no such data."""
    heads, layers = finite_heads(md), finite_layers(md)
    out: dict[str, Calibration | None] = {"heads": None, "layers": None}
    if heads is not None:
        out["heads"] = calibrate(heads["gap"], important(heads["importance"]), n_resamples=n_resamples, seed=seed)
    if layers is not None:
        out["layers"] = calibrate_layers(layers["min_gap"], layers["effect"], layers["effect_low"],
                                         n_resamples=n_resamples, seed=seed)
    return out


def calibration_row(model: str, target: str, c: Calibration) -> dict:
    row = {"model": model, "target": target, "rule": IMPORTANCE_RULE if target == "important heads" else STEERABLE_RULE}
    row.update({k: v for k, v in asdict(c).items()})
    return row


def band_verdict(low: float, high: float, reference: float = UNSTABLE_GAP, band: float = BAND) -> str:
    """Per-model threshold rule (see VERDICT_RULES['per-model threshold'])."""
    lo_edge, hi_edge = round(reference - band, 10), round(reference + band, 10)
    if not (np.isfinite(low) and np.isfinite(high)):
        return "INCONCLUSIVE"
    if lo_edge <= low and high <= hi_edge:
        return "PASS"
    if high < lo_edge or low > hi_edge:
        return "FAIL"
    return "INCONCLUSIVE"


def threshold_verdict(c: Calibration) -> tuple[str, str]:
    """Per-model threshold rule: the band rule, except that a threshold which does not separate
    (AUROC interval not above 0.5) cannot PASS, and one that separates the wrong way FAILs."""
    band = band_verdict(c.threshold_low, c.threshold_high)
    if np.isfinite(c.auroc_high) and c.auroc_high < 0.5:
        return "FAIL", "small gaps mark the LESS important units (AUROC interval below 0.5)"
    if band == "PASS" and not c.auroc_low > 0.5:
        return "INCONCLUSIVE", "interval within the band, but the gap does not separate (AUROC interval reaches 0.5)"
    return band, ""


def _row(model: str, key: str, value=NAN, low=NAN, high=NAN, target=NAN, verdict_="INCONCLUSIVE", note="") -> dict:
    names = {**PER_MODEL_METRICS, **CROSS_MODEL_METRICS}
    return {"model": model, "metric": names[key], "key": key, "value": float(value), "low": float(low),
            "high": float(high), "target": float(target), "verdict": verdict_ or "INCONCLUSIVE", "note": note}


def _copied(model: str, key: str, rows: dict[str, dict], prefix: str, target: float, absent: str) -> dict:
    match = [r for name, r in rows.items() if name.startswith(prefix)]
    if not match:
        return _row(model, key, target=target, note=absent)
    r = match[0]
    note = r.get("note") or ""
    return _row(model, key, r["value"], r["low"], r["high"], target,
                r.get("verdict") or verdict(Estimate(r["value"], r["low"], r["high"]), target),
                f"{r['name']}{'; ' + note if note else ''}")


def layer_choice_row(model: str, steer: dict[str, dict], absent: str) -> dict:
    r = steer.get("effect lost by spectral vs the oracle's best layer (fraction)")
    if r is None:
        return _row(model, "layer_choice", target=LAYER_CHOICE_TOLERANCE, note=absent)
    lo, hi = r["low"], r["high"]
    v = ("PASS" if hi <= LAYER_CHOICE_TOLERANCE else "FAIL" if lo > LAYER_CHOICE_TOLERANCE else "INCONCLUSIVE") \
        if np.isfinite(lo) and np.isfinite(hi) else "INCONCLUSIVE"
    return _row(model, "layer_choice", r["value"], lo, hi, LAYER_CHOICE_TOLERANCE, v,
                "effect lost by the spectral choice vs the oracle's best layer (fraction); " + (r.get("note") or ""))


def model_verdicts(md: ModelData, cal: dict[str, Calibration | None]) -> list[dict]:
    """One row per success metric of the plan, present whether or not the data is."""
    no_validate = "no finished validate experiment for this model"
    no_steer = "no finished steer experiment for this model"
    rows = [
        _copied(md.name, "importance_correlation", md.validate, "pearson r(importance, 1/gap)", 0.7, no_validate),
        _copied(md.name, "restoration_ratio", md.validate, f"restoration ratio unstable/stable at gap <= {UNSTABLE_GAP:g}",
                2.0, no_validate),
        _copied(md.name, "steering_improvement", md.steer, "improvement of spectral over baseline", 0.25, no_steer),
        layer_choice_row(md.name, md.steer, no_steer),
    ]
    for which, key, absent in (("heads", "threshold_heads", "no patched heads for this model"),
                               ("layers", "threshold_layers", no_steer)):
        c = cal[which]
        if c is None:
            rows.append(_row(md.name, key, target=UNSTABLE_GAP, note=absent))
            continue
        note = (f"Youden-optimal gap, AUROC {c.auroc:.2f} [{c.auroc_low:.2f}, {c.auroc_high:.2f}], "
                f"n = {c.n} ({c.n_positive} positive)")
        v, why = threshold_verdict(c)
        rows.append(_row(md.name, key, c.threshold, c.threshold_low, c.threshold_high, UNSTABLE_GAP, v,
                         "; ".join(x for x in (note, why, c.reason) if x)))
    return rows


# --- cross-model rules -----------------------------------------------------------------

def threshold_holds(lows: np.ndarray, highs: np.ndarray, separates: list[bool],
                    reversed_: list[bool] | None = None) -> tuple[str, str]:
    """'0.77 holds' rule over the models' threshold intervals (see VERDICT_RULES); ``separates``:
    whether each model's AUROC interval lies above 0.5 (needed for PASS); ``reversed_``: whether
    it lies below 0.5 (small gaps mark the less important units: the threshold fails there)."""
    n_models = len(separates)
    if n_models < 2:
        return "INCONCLUSIVE", f"generalization needs at least 2 models; this run has {n_models} with a threshold"
    per = [band_verdict(lo, hi) for lo, hi in zip(lows, highs)]
    flipped = sum(reversed_ or [])
    if "FAIL" in per or flipped:
        return "FAIL", (f"{per.count('FAIL')} of {len(per)} models' intervals lie outside the band; in {flipped} "
                        "the gap separates the wrong way (AUROC interval below 0.5)")
    if all(v == "PASS" for v in per) and all(separates):
        return "PASS", "every model's interval lies within the band"
    return "INCONCLUSIVE", (f"{per.count('PASS')} of {len(per)} models' intervals lie within the band; "
                            f"{sum(separates)} of {len(per)} models' gaps separate (AUROC interval above 0.5)")


def threshold_stable(points: np.ndarray, lows: np.ndarray, highs: np.ndarray) -> tuple[str, str]:
    """'threshold stable across models' rule (see VERDICT_RULES)."""
    if points.size < 2:
        return "INCONCLUSIVE", f"generalization needs at least 2 models; this run has {points.size} with a threshold"
    spread = float(np.ptp(points))
    ok = np.isfinite(lows) & np.isfinite(highs)
    apart = float(lows[ok].max() - highs[ok].min()) if ok.sum() >= 2 else NAN
    note = f"range of thresholds {spread:.3f}; " + (f"largest distance between intervals {max(apart, 0.0):.3f}"
                                                      if np.isfinite(apart) else "fewer than 2 intervals")
    if np.isfinite(apart) and apart > STABLE_RANGE:
        return "FAIL", note
    if ok.all() and spread <= STABLE_RANGE:
        return "PASS", note
    return "INCONCLUSIVE", note + ("" if ok.all() else f"; {int((~ok).sum())} model(s) without an interval")


@dataclass(frozen=True)
class Heterogeneity:
    """Fixed-effect pooling of per-model correlations on the Fisher-z scale, Cochran's Q."""

    pooled: float
    pooled_low: float
    pooled_high: float
    q: float
    df: int
    p_value: float
    i2: float
    """max(0, (Q - df) / Q): share of the spread beyond chance."""
    n_models: int
    n_positive: int
    """Models with r > 0."""
    n_excluding_zero_positive: int
    n_excluding_zero_negative: int
    reason: str = ""


def heterogeneity(r: np.ndarray, low: np.ndarray, high: np.ndarray) -> Heterogeneity:
    """Cochran's Q of correlations r with 95 % intervals [low, high]; SE of z = atanh(r) is the
    interval's width on the z scale / (2 x 1.96). Models without a usable interval are left out."""
    r, low, high = (np.asarray(a, dtype=float) for a in (r, low, high))
    clip = 1 - 1e-9
    z, zl, zh = (np.arctanh(np.clip(a, -clip, clip)) for a in (r, low, high))
    se = (zh - zl) / (2 * Z95)
    ok = np.isfinite(z) & np.isfinite(se) & (se > 0)
    r, low, high, z, se = r[ok], low[ok], high[ok], z[ok], se[ok]
    counts = (int(r.size), int((r > 0).sum()), int((low > 0).sum()), int((high < 0).sum()))
    if r.size < 2:
        return Heterogeneity(NAN, NAN, NAN, NAN, 0, NAN, NAN, *counts,
                             reason=f"needs >= 2 models with a correlation and its interval; have {r.size}")
    w = 1 / se ** 2
    zbar = float((w * z).sum() / w.sum())
    half = Z95 / np.sqrt(w.sum())
    q = float((w * (z - zbar) ** 2).sum())
    df = r.size - 1
    return Heterogeneity(float(np.tanh(zbar)), float(np.tanh(zbar - half)), float(np.tanh(zbar + half)), q, df,
                         float(stats.chi2.sf(q, df)), max(0.0, (q - df) / q) if q > 0 else 0.0, *counts)


def consistency_verdict(h: Heterogeneity) -> tuple[str, str]:
    if h.reason:
        return "INCONCLUSIVE", h.reason
    note = (f"Q = {h.q:.2f} (df {h.df}), p = {h.p_value:.3g}, I² = {h.i2:.2f}; {h.n_positive} of {h.n_models} "
            f"r > 0; intervals above 0: {h.n_excluding_zero_positive}, below 0: {h.n_excluding_zero_negative}")
    if h.p_value < HETEROGENEITY_ALPHA or (h.n_excluding_zero_positive and h.n_excluding_zero_negative):
        return "FAIL", note
    if h.n_positive in (0, h.n_models):
        return "PASS", note
    return "INCONCLUSIVE", note


# --- the whole run ---------------------------------------------------------------------

CORRELATIONS = {
    "importance": ("validate", "pearson r(importance, 1/gap)", "consistent_importance_r"),
    "steering": ("steer", "pearson r(per-layer min gap, per-layer steering effect)", "consistent_steering_r"),
}
SCALING_QUANTITIES = ("calibrated threshold (important heads)", "calibrated threshold (steerable layers)",
                      "minimum gap", f"fraction unstable (gap <= {UNSTABLE_GAP:g})", "r(importance, 1/gap)")
FACT_KEYS = ("parameters", "layers", "heads", "d_model", "d_head")


@dataclass
class Analysis:
    """The report's tables (lists of rows) and the numbers behind its figures."""

    calibrations: dict[str, dict[str, Calibration | None]]
    calibration_rows: list[dict]
    verdicts: list[dict]
    correlations: list[dict]
    """model, correlation ('importance' / 'steering'), r, low, high."""
    heterogeneity: dict[str, Heterogeneity]
    spread: dict[str, dict]
    """'heads' / 'layers' -> n, mean, sd, min, max, range of point thresholds."""
    per_model: dict[str, dict[str, float]]
    """Model -> {scaling quantity: value} (every model)."""
    quantities: dict[str, dict[str, float]]
    """Scaling quantity -> {model: value} (models with size facts and a finite value only)."""
    scaling_rows: list[dict]
    scaling_reason: str
    """Why there are no scaling rows; empty when there are."""
    scaling_models: list[dict]
    information_rows: list[dict]


def _spread(values: list[float]) -> dict:
    v = np.array([x for x in values if np.isfinite(x)])
    if v.size == 0:
        return {"n": 0, "mean": NAN, "sd": NAN, "min": NAN, "max": NAN, "range": NAN}
    return {"n": int(v.size), "mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else NAN,
            "min": float(v.min()), "max": float(v.max()), "range": float(np.ptp(v))}


def cross_verdicts(cal: dict[str, dict[str, Calibration | None]], het: dict[str, Heterogeneity]) -> list[dict]:
    rows = []
    for which in ("heads", "layers"):
        cs = [c for m in cal.values() if (c := m[which]) is not None and np.isfinite(c.threshold)]
        pts = np.array([c.threshold for c in cs])
        lows, highs = np.array([c.threshold_low for c in cs]), np.array([c.threshold_high for c in cs])
        env_lo = float(np.nanmin(lows)) if np.isfinite(lows).any() else NAN
        env_hi = float(np.nanmax(highs)) if np.isfinite(highs).any() else NAN
        v, note = threshold_holds(lows, highs, [bool(c.auroc_low > 0.5) for c in cs],
                                  [bool(c.auroc_high < 0.5) for c in cs])
        rows.append(_row("all", f"threshold_holds_{which}", float(np.median(pts)) if pts.size else NAN, env_lo, env_hi,
                         UNSTABLE_GAP, v, "value: median threshold; interval: envelope of the models' intervals; " + note))
        v, note = threshold_stable(pts, lows, highs)
        rows.append(_row("all", f"threshold_stable_{which}", float(np.ptp(pts)) if pts.size else NAN,
                         target=STABLE_RANGE, verdict_=v, note="value: range of point thresholds; " + note))
    for which, (_, _, key) in CORRELATIONS.items():
        h = het[which]
        v, note = consistency_verdict(h)
        rows.append(_row("all", key, h.pooled, h.pooled_low, h.pooled_high, verdict_=v,
                         note="value: pooled r (fixed effect); " + note))
    return rows


def correlations(models: list[ModelData]) -> list[dict]:
    rows = []
    for md in models:
        for which, (kind, name, _) in CORRELATIONS.items():
            r = (md.validate if kind == "validate" else md.steer).get(name)
            if r is not None:
                rows.append({"model": md.name, "correlation": which, "r": r["value"], "low": r["low"], "high": r["high"]})
    return rows


def model_quantities(md: ModelData, cal: dict[str, Calibration | None]) -> dict[str, float]:
    gaps, heads = finite_gaps(md), finite_heads(md)
    r = NAN
    if heads is not None and heads["gap"].size >= 3 and np.ptp(heads["importance"]) > 0:
        r = float(stats.pearsonr(1 / heads["gap"], heads["importance"])[0])
    values = [cal["heads"].threshold if cal["heads"] else NAN, cal["layers"].threshold if cal["layers"] else NAN,
              float(gaps.min()) if gaps.size else NAN, float((gaps <= UNSTABLE_GAP).mean()) if gaps.size else NAN, r]
    return dict(zip(SCALING_QUANTITIES, values))


def scaling(models: list[ModelData], per_model: dict[str, dict[str, float]]) -> tuple[list[dict], list[dict], str, dict]:
    """(size facts, scaling rows, reason when no rows, quantities over models with facts)."""
    facts = [{"model": md.name, **{k: md.facts[k] for k in FACT_KEYS}} for md in models
             if md.facts is not None and all(k in md.facts for k in FACT_KEYS)]
    names = {f["model"] for f in facts}
    quantities = {q: {m: v[q] for m, v in per_model.items() if m in names and np.isfinite(v[q])}
                  for q in SCALING_QUANTITIES}
    if len(facts) < MIN_SCALING_MODELS:
        return facts, [], (f"scaling fits need at least {MIN_SCALING_MODELS} models with size facts; "
                           f"this run has {len(facts)}"), quantities
    return facts, scaling_table(facts, quantities), "", quantities


def _info_row(model: str, measure: str, **values) -> dict:
    row = dict.fromkeys(("value", "low", "high", "null_mean", "null_p95", "corrected", "p_value",
                         "unstable_median", "stable_median"), NAN)
    row.update({"model": model, "measure": measure, "n": 0, "n_dropped": 0, "unstable_n": 0, "stable_n": 0, "reason": ""})
    row.update(values)
    return row


def information_rows(model: str, heads, layers, scan, n_permutations: int, n_resamples: int, seed: int) -> list[dict]:
    """MI(gap, importance), MI(layer min gap, steering effect), entropy of unstable vs stable heads."""
    rows = []
    for measure, data, x, y in (("MI(gap, importance) [nats]", heads, "gap", "importance"),
                                ("MI(layer min gap, steering effect) [nats]", layers, "min_gap", "effect")):
        if data is None:
            rows.append(_info_row(model, measure, reason="no data"))
            continue
        mi = mutual_information(data[x], data[y], n_permutations=n_permutations, seed=seed)
        rows.append(_info_row(model, measure, value=mi.value, null_mean=mi.null_mean, null_p95=mi.null_p95,
                              corrected=mi.corrected, p_value=mi.p_value, n=mi.n, n_dropped=mi.n_dropped, reason=mi.reason))
    measure = f"spectral entropy, median unstable - stable (gap <= {UNSTABLE_GAP:g})"
    if scan is None:
        rows.append(_info_row(model, measure, reason="no scan"))
        return rows
    c = entropy_by_stability(scan["gap"], scan["entropy"], n_resamples=n_resamples, seed=seed)
    rows.append(_info_row(model, measure, value=c.median_diff, low=c.median_diff_low, high=c.median_diff_high,
                          p_value=c.p_value, n=c.unstable.n + c.stable.n, n_dropped=c.n_dropped,
                          unstable_n=c.unstable.n, stable_n=c.stable.n, unstable_median=c.unstable.median,
                          stable_median=c.stable.median, reason=c.reason))
    return rows


def _pooled(parts: list[dict[str, np.ndarray] | None]) -> dict[str, np.ndarray] | None:
    parts = [p for p in parts if p is not None]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else None


def analyse(run: RunData, *, n_resamples: int = 2000, n_permutations: int = 200, seed: int = 0) -> Analysis:
    cal = {md.name: calibrations(md, n_resamples, seed) for md in run.models}
    cal_rows = [calibration_row(m, target, c) for m, cs in cal.items()
                for target, c in (("important heads", cs["heads"]), ("steerable layers", cs["layers"])) if c is not None]
    corr = correlations(run.models)
    het = {which: heterogeneity(*(np.array([c[k] for c in corr if c["correlation"] == which]) for k in ("r", "low", "high")))
           for which in CORRELATIONS}
    verdicts = [r for md in run.models for r in model_verdicts(md, cal[md.name])] + cross_verdicts(cal, het)
    spread = {w: _spread([cs[w].threshold for cs in cal.values() if cs[w] is not None]) for w in ("heads", "layers")}
    per_model = {md.name: model_quantities(md, cal[md.name]) for md in run.models}
    facts, scaling_rows, reason, quantities = scaling(run.models, per_model)
    info = [r for md in run.models for r in information_rows(md.name, finite_heads(md), finite_layers(md), md.scan,
                                                               n_permutations, n_resamples, seed)]
    if len(run.models) > 1:
        info += information_rows("all (pooled)", _pooled([finite_heads(m) for m in run.models]),
                                 _pooled([finite_layers(m) for m in run.models]),
                                 _pooled([m.scan for m in run.models]), n_permutations, n_resamples, seed)
    return Analysis(cal, cal_rows, verdicts, corr, het, spread, per_model, quantities, scaling_rows, reason, facts, info)


def _key(text: str) -> str:
    """A name MLflow accepts (alphanumerics, _ - . space / :)."""
    return "".join(ch if ch.isalnum() or ch in "_-./: " else "_" for ch in text).strip()


def summary(run: RunData, a: Analysis) -> dict:
    """summary.json: flat finite metrics, flat verdicts, models, missing, excluded counts."""
    metrics: dict[str, float] = {}
    for r in a.calibration_rows:
        which = "heads" if r["target"] == "important heads" else "layers"
        for k in ("threshold", "threshold_low", "threshold_high", "auroc", "auroc_low", "auroc_high", "j_at_reference"):
            metrics[f"{r['model']}/calibration_{which}/{k}"] = r[k]
    for r in a.verdicts:
        for k in ("value", "low", "high"):
            metrics[f"{r['model']}/{r['key']}/{k}"] = r[k]
    for model, values in a.per_model.items():
        for quantity, v in values.items():
            metrics[f"{model}/{quantity}"] = v
    for which, s in a.spread.items():
        for k in ("sd", "range", "mean"):
            metrics[f"all/threshold_{which}/{k}"] = s[k]
    for which, h in a.heterogeneity.items():
        for k in ("q", "p_value", "i2"):
            metrics[f"all/heterogeneity_{which}_r/{k}"] = getattr(h, k)
    for r in a.information_rows:
        for k in ("value", "corrected", "p_value", "low", "high"):
            metrics[f"{r['model']}/{r['measure']}/{k}"] = r[k]
    finite = {_key(k): float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}
    return {"run_id": run.run_id, "metrics": finite,
            "undefined_metrics": sorted(_key(k) for k, v in metrics.items() if v is None or not np.isfinite(v)),
            "verdicts": {_key(f"{r['model']}/{r['key']}"): r["verdict"] for r in a.verdicts},
            "models": [md.name for md in run.models], "missing": run.missing,
            "excluded_non_finite": {md.name: md.excluded for md in run.models},
            "scaling": a.scaling_reason or f"fitted over {len(a.scaling_models)} models"}
