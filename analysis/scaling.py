"""Scaling laws across models: how a per-model quantity (calibrated threshold, min gap,
fraction of unstable heads, correlation r) varies with model size.

Two forms, both fitted by ordinary least squares with ``scipy.stats.linregress``:

- power:      ``y = a * x**b``          (fitted as log10 y = log10 a + b log10 x; needs x, y > 0)
- log_linear: ``y = a + b * log10(x)``  (needs x > 0)

Parameter intervals are 95 % t-intervals (n - 2 degrees of freedom) from linregress's
standard errors; for the power law, ``a``'s interval is the transform of log10 a's.
R² and RMSE are measured on y itself (not log y), so the two forms compare directly.

Every fit here is EXPLORATORY (rows carry ``exploratory = True``): with 3-6 models, and some 40
fits per run (quantities x predictors x forms), an R² of 0.99 is what three points on any
smooth curve give, and none of the fits is a test. What can be checked is prediction:

- ``leave_one_out``: real leave-one-out, every point left out in turn, the law refitted on the
  others and evaluated at it (mean and max absolute error, PRESS R²); it needs >= 4 points
  (``MIN_LOO_POINTS``: each fold keeps 3 to fit two parameters with a residual);
- ``extrapolate_largest``: the fold that holds out the largest model(s), kept as the
  ``loo_*`` columns of ``scaling_table``;
- a bounded quantity (a threshold or a fraction in [0, 1], a correlation in [-1, 1]) is never
  given a prediction outside its range: such a prediction is refused (NaN) and said so, not
  clipped (a law that leaves the range has failed there);
- a calibrated threshold means something only for a model whose gap separates the classes at
  all: ``restrict_to_separating`` keeps the models whose AUROC interval lies above 0.5.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from scipy import stats

from analysis.stats import finite_pairs

Kind = Literal["power", "log_linear"]
KINDS: tuple[Kind, ...] = ("power", "log_linear")
PREDICTORS = ("parameters", "heads", "d_model", "d_head")
"""Size measures. ``heads`` is the model's TOTAL head count, layers x heads-per-layer: a
``models`` entry's own ``"heads"`` key is heads per layer, as in DEFINITIONS.md's table."""
CONFIDENCE = 0.95
NAN = float("nan")
MIN_LOO_POINTS = 4
"""Points a leave-one-out needs: every fold keeps >= 3 to fit two parameters with a residual."""
Bounds = tuple[float, float]


@dataclass(frozen=True)
class Fit:
    """A fitted two-parameter law with 95 % parameter intervals."""

    kind: Kind
    a: float
    a_low: float
    a_high: float
    b: float
    """Exponent (power) or slope per decade of x (log_linear)."""
    b_low: float
    b_high: float
    r2: float
    """1 - SS_res / SS_tot on y."""
    rmse: float
    """sqrt(mean squared residual) on y."""
    n: int
    """Points used."""
    n_dropped: int
    """Points dropped because x or y was not finite."""
    reason: str = ""
    """Why some fields are NaN; empty when all were computed."""
    bounds: Bounds | None = None
    """The range the quantity can take; ``predict`` gives NaN outside it (never a clipped value)."""

    @property
    def params(self) -> tuple[float, float]:
        """(a, b)."""
        return self.a, self.b

    def predict(self, x: np.ndarray | float) -> np.ndarray:
        """The law at ``x`` (NaN where x <= 0, and where the law leaves ``bounds``)."""
        x = np.asarray(x, dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            lx = np.where(x > 0, np.log10(np.where(x > 0, x, 1.0)), np.nan)
        y = self.a * 10.0 ** (self.b * lx) if self.kind == "power" else self.a + self.b * lx
        if self.bounds is not None:
            y = np.where((y >= self.bounds[0]) & (y <= self.bounds[1]), y, np.nan)
        return y


@dataclass(frozen=True)
class LeaveOneOut:
    """Fit without the largest-x point(s), predict them: the extrapolation fold of a
    leave-one-out (``extrapolate_largest``)."""

    kind: Kind
    x_held_out: float
    predicted: float
    observed: float
    """y at the largest x (the mean when several points share that x)."""
    abs_error: float
    """|predicted - observed|."""
    rel_error: float
    """abs_error / |observed|."""
    n_train: int
    n_held_out: int
    n_dropped: int
    reason: str = ""


def _domain_problem(x: np.ndarray, y: np.ndarray, kind: Kind) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if (x <= 0).any():
        return f"{kind} fit needs x > 0; {int((x <= 0).sum())} of {x.size} values are <= 0"
    if kind == "power" and (y <= 0).any():
        return f"power fit needs y > 0; {int((y <= 0).sum())} of {y.size} values are <= 0"
    if x.size < 2:
        return f"{x.size} point(s): a two-parameter fit needs at least 2"
    if np.unique(x).size < 2:
        return "all x values are identical: no slope can be fitted"
    return ""


def fit(x: np.ndarray, y: np.ndarray, kind: Kind, bounds: Bounds | None = None) -> Fit:
    """Least-squares fit of ``kind`` (see module docstring). Non-finite pairs are dropped and
    counted. Fewer than 2 usable points, or x (or y, for power) <= 0: all NaN with a reason.
    Exactly 2 points: the law through both, intervals / R² / RMSE NaN with a reason.
    ``bounds``: the quantity's range, kept on the fit (``Fit.predict``)."""
    f = _fit(x, y, kind)
    return f if bounds is None else replace(f, bounds=(float(bounds[0]), float(bounds[1])))


def _fit(x: np.ndarray, y: np.ndarray, kind: Kind) -> Fit:
    x, y, dropped = finite_pairs(x, y)
    problem = _domain_problem(x, y, kind)
    if problem:
        return Fit(kind, *[NAN] * 8, n=x.size, n_dropped=dropped, reason=problem)
    u, v = np.log10(x), (np.log10(y) if kind == "power" else y)
    res = stats.linregress(u, v)
    to_a = (lambda c: 10.0 ** c) if kind == "power" else (lambda c: c)
    a, b, n = float(to_a(res.intercept)), float(res.slope), x.size
    if n == 2:
        return Fit(kind, a, NAN, NAN, b, NAN, NAN, NAN, NAN, n, dropped,
                   "exactly 2 points: the law passes through both, no degrees of freedom "
                   "left for intervals, R² or RMSE (needs >= 3)")
    tq = stats.t.ppf(0.5 + CONFIDENCE / 2, n - 2)
    a_lo, a_hi = to_a(res.intercept - tq * res.intercept_stderr), to_a(res.intercept + tq * res.intercept_stderr)
    b_lo, b_hi = res.slope - tq * res.stderr, res.slope + tq * res.stderr
    partial = Fit(kind, a, float(a_lo), float(a_hi), b, float(b_lo), float(b_hi), NAN, NAN, n, dropped)
    resid = y - partial.predict(x)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    rmse = float(np.sqrt(np.mean(resid ** 2)))
    if ss_tot == 0:
        return replace(partial, rmse=rmse, reason="y is constant: R² and the parameter intervals are undefined")
    r2 = 1.0 - float((resid ** 2).sum()) / ss_tot
    return replace(partial, r2=r2, rmse=rmse)


def fit_power_law(x: np.ndarray, y: np.ndarray) -> Fit:
    """``y = a * x**b``, fitted in log-log space (see ``fit``)."""
    return fit(x, y, "power")


def fit_log_linear(x: np.ndarray, y: np.ndarray) -> Fit:
    """``y = a + b * log10(x)`` (see ``fit``)."""
    return fit(x, y, "log_linear")


def _outside(value: float, bounds: Bounds | None) -> bool:
    return bounds is not None and np.isfinite(value) and not bounds[0] <= value <= bounds[1]


def extrapolate_largest(x: np.ndarray, y: np.ndarray, kind: Kind, bounds: Bounds | None = None) -> LeaveOneOut:
    """Fit on every point except those at the largest x and predict there (the extrapolation
    fold). Needs >= 3 training points (for a fit with residual degrees of freedom); else NaN with
    a reason. A prediction outside ``bounds`` is refused (NaN) with a reason."""
    x, y, dropped = finite_pairs(x, y)
    if x.size == 0:
        return LeaveOneOut(kind, NAN, NAN, NAN, NAN, NAN, 0, 0, dropped, "no finite points")
    held = x == x.max()
    n_train, n_held = int((~held).sum()), int(held.sum())
    x_out, observed = float(x.max()), float(y[held].mean())
    if n_train < 3:
        return LeaveOneOut(kind, x_out, NAN, observed, NAN, NAN, n_train, n_held, dropped,
                           f"{n_train} training points left after holding out the largest x; needs >= 3")
    f = _fit(x[~held], y[~held], kind)
    if not np.isfinite(f.a) or not np.isfinite(f.b):
        return LeaveOneOut(kind, x_out, NAN, observed, NAN, NAN, n_train, n_held, dropped, f.reason)
    predicted = float(f.predict(x_out))
    if _outside(predicted, bounds):
        return LeaveOneOut(kind, x_out, NAN, observed, NAN, NAN, n_train, n_held, dropped,
                           f"prediction {predicted:.3g} lies outside [{bounds[0]:g}, {bounds[1]:g}]: refused "
                           "(the law fails there)")
    abs_error = abs(predicted - observed)
    rel, reason = (abs_error / abs(observed), "") if observed != 0 else (NAN, "observed is 0: relative error undefined")
    return LeaveOneOut(kind, x_out, predicted, observed, abs_error, rel, n_train, n_held, dropped, reason)


@dataclass(frozen=True)
class CrossValidation:
    """Real leave-one-out: every point left out in turn, the law refitted on the others."""

    kind: Kind
    x: tuple[float, ...]
    observed: tuple[float, ...]
    predicted: tuple[float, ...]
    """NaN where the fold's fit failed or its prediction left ``bounds`` (refused)."""
    mae: float
    """Mean |predicted - observed| over the folds with a prediction."""
    max_abs_error: float
    press_r2: float
    """1 - sum (predicted - observed)² / sum (observed - mean)²: R² of out-of-sample
    predictions (can be < 0: worse than predicting the mean); NaN unless every fold predicted."""
    n: int
    n_dropped: int
    n_refused: int
    """Folds whose prediction left ``bounds`` (or whose fit failed)."""
    reason: str = ""


def leave_one_out(x: np.ndarray, y: np.ndarray, kind: Kind, bounds: Bounds | None = None) -> CrossValidation:
    """Every point left out in turn: fit ``kind`` on the others, predict it. Needs
    ``MIN_LOO_POINTS`` finite points; else NaN with a reason. Predictions outside ``bounds`` are
    refused (NaN, counted in ``n_refused``), never clipped."""
    x, y, dropped = finite_pairs(x, y)
    n = x.size
    if n < MIN_LOO_POINTS:
        return CrossValidation(kind, tuple(x), tuple(y), (NAN,) * n, NAN, NAN, NAN, n, dropped, 0,
                               f"{n} points: a leave-one-out needs >= {MIN_LOO_POINTS} (3 to fit in every fold)")
    predicted, notes = np.full(n, NAN), []
    for i in range(n):
        keep = np.arange(n) != i
        f = _fit(x[keep], y[keep], kind)
        if not (np.isfinite(f.a) and np.isfinite(f.b)):
            notes.append(f"fold {i}: {f.reason}")
            continue
        p = float(f.predict(x[i]))
        if _outside(p, bounds):
            notes.append(f"fold x={x[i]:.3g}: prediction {p:.3g} outside [{bounds[0]:g}, {bounds[1]:g}], refused")
            continue
        predicted[i] = p
    ok = np.isfinite(predicted)
    err = np.abs(predicted - y)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    press = (1 - float(((predicted - y) ** 2).sum()) / ss_tot) if ok.all() and ss_tot > 0 else NAN
    return CrossValidation(kind, tuple(map(float, x)), tuple(map(float, y)), tuple(map(float, predicted)),
                           float(err[ok].mean()) if ok.any() else NAN, float(err[ok].max()) if ok.any() else NAN,
                           press, n, dropped, int((~ok).sum()), "; ".join(notes))


def restrict_to_separating(values: Mapping[str, float], auroc: Mapping[str, object | None],
                           quantity: str = "threshold") -> tuple[dict[str, float], list[str]]:
    """The models whose threshold may enter a scaling fit: those whose AUROC interval lies above
    0.5 (the gap separates the classes at all; a threshold of a model where it does not, or where
    it separates the wrong way, is noise or an inverted rule). ``auroc`` maps a model to an object
    with ``low`` (e.g. an ``analysis.population.PopulationEstimate`` of the AUROC) or
    ``auroc_low`` (an ``analysis.calibration.Calibration``), or None. A Calibration must also pass
    its exact test (``separation == "separates"``). Returns (kept values, one note per model left
    out)."""
    kept, notes = {}, []
    for model, value in values.items():
        a = auroc.get(model)
        low = getattr(a, "auroc_low", getattr(a, "low", NAN)) if a is not None else NAN
        exact = getattr(a, "separation", "separates") or "separates"
        if a is None or not (np.isfinite(low) and low > 0.5) or exact != "separates":
            why = ("no AUROC" if a is None else
                   f"AUROC interval low {low:.3g} not above 0.5" if not (np.isfinite(low) and low > 0.5) else
                   f"exact test: {exact}")
            notes.append(f"{quantity}: {model} left out ({why}: the gap does not separate, so its threshold "
                         "means nothing)")
            continue
        kept[model] = float(value)
    return kept, notes


def predictor_value(model: dict, predictor: str) -> float:
    """A size measure of one ``models`` entry; ``heads`` is layers x heads-per-layer."""
    if predictor not in PREDICTORS:
        raise ValueError(f"predictor must be one of {PREDICTORS}, got {predictor!r}")
    keys = ("layers", "heads") if predictor == "heads" else (predictor,)
    missing = [k for k in keys if k not in model]
    if missing:
        raise ValueError(f"model {model.get('model', '?')!r} lacks {missing}")
    return float(model["layers"] * model["heads"]) if predictor == "heads" else float(model[predictor])


def scaling_table(models: list[dict], quantities: dict[str, dict[str, float]],
                  predictors: tuple[str, ...] = PREDICTORS, kinds: tuple[Kind, ...] = KINDS,
                  bounds: Mapping[str, Bounds] | None = None) -> list[dict]:
    """One row per (quantity, predictor, kind): fit over the models that have the quantity, the
    extrapolation to the largest model (``loo_predicted``, ``loo_observed``, ``loo_rel_error``)
    and the real leave-one-out (``cv_mae``, ``cv_max_abs_error``, ``cv_press_r2``, ``cv_n_refused``;
    needs ``MIN_LOO_POINTS``). Every row is ``exploratory``. ``bounds`` maps a quantity to its
    range: predictions outside it are refused (NaN, said in ``reason``). ``models`` entries look
    like ``{"model": "pythia-410m", "parameters": 4.05e8, "layers": 24, "heads": 16,
    "d_model": 1024, "d_head": 64}`` (``heads`` per layer); ``quantities`` maps a quantity
    name to ``{model name: value}``. A value for a model absent from ``models`` is an error."""
    by_name = {m["model"]: m for m in models}
    bounds = dict(bounds or {})
    rows = []
    for quantity, values in quantities.items():
        unknown = sorted(set(values) - set(by_name))
        if unknown:
            raise ValueError(f"quantity {quantity!r} names models not in models: {unknown}")
        names = [m for m in by_name if m in values]
        y = np.array([values[m] for m in names], dtype=float)
        b = bounds.get(quantity)
        n_fits = len(predictors) * len(kinds) * len(quantities)
        for predictor in predictors:
            x = np.array([predictor_value(by_name[m], predictor) for m in names])
            for kind in kinds:
                f, ext, cv = fit(x, y, kind, b), extrapolate_largest(x, y, kind, b), leave_one_out(x, y, kind, b)
                reason = "; ".join(f"{k}: {r}" for k, r in (("fit", f.reason), ("loo", ext.reason),
                                                            ("cv", cv.reason)) if r)
                rows.append(dict(quantity=quantity, predictor=predictor, kind=kind,
                                 a=f.a, a_low=f.a_low, a_high=f.a_high, b=f.b, b_low=f.b_low, b_high=f.b_high,
                                 r2=f.r2, rmse=f.rmse, n=f.n, n_dropped=f.n_dropped,
                                 loo_predicted=ext.predicted, loo_observed=ext.observed,
                                 loo_rel_error=ext.rel_error, cv_mae=cv.mae, cv_max_abs_error=cv.max_abs_error,
                                 cv_press_r2=cv.press_r2, cv_n_refused=cv.n_refused,
                                 bound_low=b[0] if b else NAN, bound_high=b[1] if b else NAN,
                                 exploratory=True,
                                 note=(f"exploratory: one of {n_fits} fits on {f.n} points; no verdict"),
                                 reason=reason))
    return rows
