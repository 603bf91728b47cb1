"""The one estimator of eigengap: statistics over populations of models (seeds -> heads or
layers -> examples).

A verdict about "organism-s" is a claim about the *recipe*, not about one training draw: two
trainings of the same recipe can give correlations of opposite sign. The unit of replication
is therefore the training seed. For a statistic computed on one model (a correlation across
its heads, a difference of group means, a steering contrast over prompts) ``estimate_many``
gives

- per seed: the value and a t-scaled interval from a bootstrap that resamples heads (or
  layers) *and* examples jointly (the association across heads is what varies, not only how
  precisely each head's importance is known): ``value ± t(df) x SE* x sqrt(n/(n-1))``
  (``analysis.population.scaled_interval``; SE*: the bootstrap standard deviation; n: independent
  units, i.e. heads, key-head clusters of a grouped-query model, layers, or prompts when only
  examples are resampled). Correlations (``Stat.fisher``) on Fisher's z = atanh(r) scale with
  df = n - 3; otherwise df = n - 1 unless the caller gives one (Welch's df for a difference of
  group means: ``analysis.stats.df_groups``);
- across seeds, the VERDICT interval: the t-interval over the seeds' values,
  ``mean ± t(k-1) x SD / sqrt(k)`` (k seeds with a value). Each seed's value already carries
  its own heads' and examples' noise, so the spread of the seeds' values is the whole
  variance of their mean;
- across seeds, also computed and returned (``hier_low``, ``hier_high``; named in ``scheme``)
  but NOT the verdict's: the hierarchical bootstrap seeds -> heads -> examples (seeds with
  replacement, one of each drawn seed's own resamples), ``mean ± t(k-1) x SE x sqrt(k/(k-1))``.
  It counts the within-seed noise twice (once in the seeds' values, once more in the draws
  inside each seed) and is conservative: on nulls of 5 seeds x 8 or 12 heads its one-sided
  PASS rate was 0-0.1 % for a nominal 2.5 % (the t-interval's 2.2-3.2 %, 2.6 % over 8,000
  tails), and at 5 seeds x 12 heads with a true difference of 0.2 its power was 28.5 % against
  the t-interval's 72.5 % (``tests/test_nulls.py`` records both);
- the fraction of seeds whose value has the sign of the mean.

With one seed the verdict interval is that seed's t-scaled interval and the scheme says it
describes that model only.

Statistics (``Stat``) come in a batched form, run on whole batches of resamples (examples are
resampled through their multiplicities, exact for statistics of per-unit example means), and
the plain form ``f(per_unit, per_example) -> float`` for statistics without a batched form (run
once per resample, on the same resamples). Resamples on which a statistic is undefined (NaN:
a constant column, an empty group) are dropped; when more than half of them are, the seed's
interval is NaN (undefined). Seeds whose value is undefined are left out of the across-seed
mean and interval.

``p_value`` gives the one- or two-sided p-value of "statistic = target" from the verdict
interval's SE and df (the p-value and the interval agree); ``from_values`` builds the same
across-seed estimate from per-seed values computed elsewhere (calibrated thresholds);
``clip`` bounds an interval to the statistic's range for display; ``holm`` adjusts p-values.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import stats

NAN = float("nan")
CONFIDENCE = 0.95
N_RESAMPLES = 2000
CHUNK_CELLS = 2_000_000
"""Cells (resamples x units x examples) one batch of resamples may hold."""

Arrays = Mapping[str, np.ndarray]
Statistic = Callable[[Arrays, Arrays], float]
"""Plain form f(per_unit, per_example) -> float: ``per_unit`` holds (n,) arrays (one entry per
head or layer), ``per_example`` (n, n_examples) arrays; both already resampled."""
Batched = Callable[[dict, dict], np.ndarray]
"""Batched form f(per_unit, means) -> (b,): ``per_unit`` holds (b, n) arrays of b resamples of
the units, ``means`` the (b, n) means over each resample's examples of every per-example array
(and ``|name|`` for arrays whose name starts with ``clean`` or ``corrupt``: means of absolute
values, for the restoration's near-zero guard). Units drawn as clusters are padded with NaN
units: a batched statistic must ignore non-finite units."""
DfSpec = Callable[["Member"], float] | float | None
"""Per statistic, the degrees of freedom of a seed's t-scaled interval: a function of the
member, a number, or None (n - 3 for a ``fisher`` statistic, n - 1 otherwise)."""


@dataclass(frozen=True)
class Estimate:
    """A statistic with its 95 % interval (and a p-value where one applies)."""

    value: float
    low: float
    high: float
    p_value: float = NAN
    se: float = NAN
    """SE behind the interval on its scale (Fisher's z for a correlation), where it is t-scaled."""
    df: float = NAN
    """Degrees of freedom of the t-scaled interval."""


FISHER_CLIP = 0.999
"""Correlations are clipped to ±0.999 before Fisher's z (a resample of few distinct units can
give ±1; z would be infinite)."""


def scaled_interval(value: float, resamples, n_units: int, df: float, target: float = NAN,
                    confidence: float = CONFIDENCE, fisher: bool = False) -> Estimate:
    """One model's interval from the resamples of a joint units x examples bootstrap:
    ``value ± t(df) x SE* x sqrt(n/(n-1))`` (SE*: standard deviation of the finite resamples; n:
    units), and the two-sided p-value of "statistic = target" from the same t. With ``fisher``
    (correlations) all of it happens on Fisher's z = atanh(r) scale and the interval is mapped
    back, so it stays inside [-1, 1].

    Why not the percentile interval: with 6-12 units it under-covers (one-sided miss rates of
    3.4-7 % for a nominal 2.5 % in null simulations, ``tests/test_nulls.py``): a bootstrap
    variance is (n-1)/n of the variance, and z-quantiles stand in for t-quantiles. This is the
    per-seed interval of ``analysis.population.estimate_many``. ``df``: n - 3 for a correlation,
    Welch's for a difference of group means, n_group - 1 for one group's mean. NaN (undefined)
    when fewer than half the resamples are finite, when df < 1 or when the value is NaN. The
    returned ``Estimate`` carries the SE (on the z scale for ``fisher``) and df."""
    b = np.asarray(resamples, dtype=float)
    ok = b[np.isfinite(b)]
    if (not np.isfinite(value) or ok.size < max(2, b.size / 2) or not np.isfinite(df) or df < 1
            or n_units < 2):
        return Estimate(float(value) if np.isfinite(value) else NAN, NAN, NAN)
    fwd, back = ((lambda r: np.arctanh(np.clip(r, -FISHER_CLIP, FISHER_CLIP)), np.tanh) if fisher
                 else (lambda v: v, lambda v: v))
    centre = float(fwd(value))
    se = float(np.std(fwd(ok), ddof=1)) * np.sqrt(n_units / (n_units - 1))
    q = float(stats.t.ppf(0.5 + confidence / 2, df))
    p = NAN
    if np.isfinite(target):
        d = abs(centre - float(fwd(target)))
        p = float(2 * stats.t.sf(d / se, df)) if se > 0 else (0.0 if d > 0 else 1.0)
    return Estimate(float(value), float(back(centre - q * se)), float(back(centre + q * se)), p, se, float(df))


@dataclass(frozen=True)
class Member:
    """One model of a population (one training seed) as the statistic reads it."""

    seed: int | None
    per_unit: dict[str, np.ndarray]
    """(n,) arrays, one entry per head (or layer)."""
    per_example: dict[str, np.ndarray] = field(default_factory=dict)
    """(n, n_examples) arrays; empty when the statistic has no example level."""
    clusters: np.ndarray | None = None
    """(n,) cluster label per unit, or None. Units of one cluster are not independent
    replicates (the query heads of a grouped-query model that share one key head have the
    same key kernel): the bootstrap then draws whole clusters, not units, and n (of the
    interval's sqrt(n/(n-1)) and default df) counts clusters."""

    @property
    def n_units(self) -> int:
        return len(next(iter(self.per_unit.values())))

    @property
    def n_examples(self) -> int:
        return next(iter(self.per_example.values())).shape[1] if self.per_example else 0

    @property
    def n_independent(self) -> int:
        """Independent units: clusters when the member has them, else units."""
        return int(np.unique(self.clusters).size) if self.clusters is not None else self.n_units


@dataclass(frozen=True)
class Stat:
    """A statistic: its batched form (``Batched``), or, for statistics without one, its plain
    form (``Statistic``). ``fisher``: a correlation (intervals on Fisher's z scale, df n - 3).
    Calling a ``Stat`` evaluates it once, on the data as given."""

    name: str
    batched: Batched | None = None
    plain: Statistic | None = None
    fisher: bool = False

    def __post_init__(self):
        if (self.batched is None) == (self.plain is None):
            raise ValueError(f"statistic {self.name!r}: give exactly one of batched and plain")

    def __call__(self, per_unit: Arrays, per_example: Arrays) -> float:
        if self.plain is not None:
            return float(self.plain(per_unit, per_example))
        pu = {k: np.asarray(v, dtype=float)[None] for k, v in per_unit.items()}
        mu = example_means({k: np.asarray(v, dtype=float) for k, v in per_example.items()}, None, 1)
        return float(np.asarray(self.batched(pu, mu), dtype=float)[0])


def as_stat(f: Stat | Statistic, fisher: bool = False) -> Stat:
    """``f`` itself when it is a ``Stat``, else the plain statistic wrapped as one."""
    return f if isinstance(f, Stat) else Stat(getattr(f, "__name__", "statistic"), plain=f, fisher=fisher)


@dataclass(frozen=True)
class PopulationEstimate:
    """A statistic over a population of models with its intervals."""

    value: float
    """Mean over seeds of the per-seed statistic."""
    low: float
    high: float
    """The verdict interval: across >= 2 seeds the t-interval over the seeds' values; with one
    seed, that seed's t-scaled interval."""
    per_seed: tuple[float, ...]
    per_seed_low: tuple[float, ...]
    per_seed_high: tuple[float, ...]
    seeds: tuple[int | None, ...]
    same_sign: float
    """Fraction of seeds whose value has the sign of ``value`` (NaN when it is 0 or NaN)."""
    n_units: tuple[int, ...]
    """Heads (or layers) per seed."""
    n_examples: tuple[int, ...]
    scheme: str
    se: float = NAN
    """SE of the verdict interval on its scale (SD / sqrt(k) across seeds; one seed: its
    bootstrap SE x sqrt(n/(n-1)), on Fisher's z scale for a correlation)."""
    df: float = NAN
    """Degrees of freedom of the verdict interval (k - 1; one seed: its df)."""
    fisher: bool = False
    """Per-seed intervals are on Fisher's z scale (a correlation); so is the verdict interval
    with one seed. Across seeds the verdict interval is on the statistic's own scale."""
    hier_low: float = NAN
    hier_high: float = NAN
    """Hierarchical bootstrap interval (seeds -> units -> examples, t-scaled); shown beside the
    verdict interval, not used for verdicts. NaN with one seed."""
    per_seed_se: tuple[float, ...] = ()
    per_seed_df: tuple[float, ...] = ()
    """Per seed, the SE (on the interval's scale) and df of its t-scaled interval (NaN where
    it is undefined or came from elsewhere)."""
    n_resamples: int = 0
    bounds: tuple[float, float] = (-math.inf, math.inf)
    """The range ``clip`` bounded the displayed intervals to."""
    resamples: tuple[np.ndarray, ...] = field(default=(), repr=False, compare=False)
    """Per seed, the statistic on each bootstrap resample (only with ``keep_resamples``)."""

    @property
    def n_seeds(self) -> int:
        return len(self.per_seed)

    @property
    def k(self) -> int:
        """Seeds with a defined value."""
        return int(np.isfinite(np.array(self.per_seed, dtype=float)).sum())

    @property
    def on_z(self) -> bool:
        """The verdict interval (and p-values) are on Fisher's z scale."""
        return self.fisher and self.n_seeds == 1


# --- resampling ---------------------------------------------------------------------------

def _abs_name(key: str) -> bool:
    return key.split(":")[0] in ("clean", "corrupt")


def example_means(per_example: Arrays, weights: np.ndarray | None, b: int) -> dict[str, np.ndarray]:
    """(b, n) means of every per-example array over resampled examples (``weights``: (b, m)
    multiplicities / m; None: every example once), and ``|name|`` means of absolute values for
    arrays named ``clean*`` / ``corrupt*``."""
    out = {}
    for k, v in per_example.items():
        for name, a in [(k, v)] + ([(f"|{k}|", np.abs(v))] if _abs_name(k) else []):
            out[name] = np.broadcast_to(a.mean(-1), (b, a.shape[0])) if weights is None else weights @ a.T
    return out


def _cluster_index(m: Member) -> list[np.ndarray]:
    _, inverse = np.unique(m.clusters, return_inverse=True)
    return [np.flatnonzero(inverse == c) for c in range(int(inverse.max()) + 1)]


def _draw_units(m: Member, rng: np.random.Generator, b: int, units: bool, groups) -> np.ndarray:
    """(b, width) unit indices; cluster draws are padded with index n (a NaN unit)."""
    n = m.n_units
    if not units:
        return np.broadcast_to(np.arange(n), (b, n))
    if groups is None:
        return rng.integers(0, n, (b, n))
    drawn = rng.integers(0, len(groups), (b, len(groups)))
    rows = [np.concatenate([groups[c] for c in d]) for d in drawn]
    out = np.full((b, max(r.size for r in rows)), n)
    for i, r in enumerate(rows):
        out[i, :r.size] = r
    return out


def _safe(stat: Stat, per_unit, per_example) -> float:
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            value = float(stat(per_unit, per_example))
        except (ValueError, ZeroDivisionError, FloatingPointError):
            return NAN
    return value if np.isfinite(value) else NAN


def _resample(m: Member, stats_: dict[str, Stat], n_resamples: int, rng: np.random.Generator, units: bool,
              examples: bool) -> dict[str, np.ndarray]:
    """Per statistic, its value on each of ``n_resamples`` joint resamples of the member's units
    (clusters) and examples; every statistic on the same resamples."""
    n, ex, mex = m.n_units, m.per_example, m.n_examples
    groups = _cluster_index(m) if units and m.clusters is not None else None
    step = max(1, min(n_resamples, CHUNK_CELLS // max(1, n * max(mex, 1))))
    batched = {k: s for k, s in stats_.items() if s.batched is not None}
    plain = {k: s for k, s in stats_.items() if s.batched is None}
    pad = groups is not None
    pu_src = {k: np.append(np.asarray(v, dtype=float), NAN) if pad else np.asarray(v) for k, v in m.per_unit.items()}
    out = {k: np.empty(n_resamples) for k in stats_}
    for start in range(0, n_resamples, step):
        b = min(step, n_resamples - start)
        u = _draw_units(m, rng, b, units, groups)
        e = rng.integers(0, mex, (b, mex)) if ex and examples and mex else None
        if batched:
            pu = {k: v[u] for k, v in pu_src.items()}
            mu = {}
            if ex:
                w = None if e is None else np.bincount(
                    (e + mex * np.arange(b)[:, None]).ravel(), minlength=b * mex).reshape(b, mex) / mex
                for k, v in example_means(ex, w, b).items():
                    if pad:
                        v = np.concatenate([v, np.full((b, 1), NAN)], axis=1)
                    mu[k] = np.take_along_axis(v, u, axis=1)
            for k, stat in batched.items():
                with np.errstate(all="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    v = np.asarray(stat.batched(pu, mu), dtype=float)
                out[k][start:start + b] = np.where(np.isfinite(v), v, NAN)
        if not plain:
            continue
        for i in range(b):  # plain statistics: once per resample, on the same draws
            idx = u[i][u[i] < n] if pad else u[i]
            pu_i = {k: v[idx] for k, v in m.per_unit.items()}
            pe_i = {k: (v[idx] if e is None else v[idx][:, e[i]]) for k, v in ex.items()}
            for k, stat in plain.items():
                out[k][start + i] = _safe(stat, pu_i, pe_i)
    return out


# --- the estimator ----------------------------------------------------------------------------

def _fmt_df(dfs: Sequence[float]) -> str:
    d = [x for x in dfs if np.isfinite(x)]
    if not d:
        return "undefined"
    lo, hi = min(d), max(d)
    return f"{lo:.3g}" if f"{lo:.3g}" == f"{hi:.3g}" else f"{lo:.3g}–{hi:.3g}"


def seed_rule(levels: str, n_resamples: int, fisher: bool) -> str:
    """One seed's interval rule in words."""
    scale = "Fisher z" if fisher else "value"
    return f"{scale} ± t(df) x SE x sqrt(n/(n-1)), SE from a bootstrap over {levels} ({n_resamples})"


def scheme(n_seeds: int, k: int, levels: str, n_resamples: int, fisher: bool, dfs: Sequence[float]) -> str:
    """The resampling scheme as the report prints it."""
    rule = seed_rule(levels, n_resamples, fisher)
    if n_seeds <= 1:
        return f"one seed: {rule}; describes this model only; per seed: t-scaled, df {_fmt_df(dfs)}"
    per_seed = f"{rule}, df {_fmt_df(dfs)}"
    who = f"{n_seeds} seeds" + (f" ({k} with a value)" if k < n_seeds else "")
    if k < 2:
        return f"{who}: no across-seed interval (fewer than 2 seeds with a value); per seed: {per_seed}"
    return (f"{who}: mean ± t({k - 1}) x SD/sqrt({k}) of the seeds' values; per seed: {per_seed}; "
            f"also computed, not the verdict's: hierarchical bootstrap seeds -> {levels} ({n_resamples}), "
            f"mean ± t({k - 1}) x SE x sqrt(k/(k-1)) (hier_low, hier_high)")


def _df_of(spec: DfSpec, stat: Stat, m: Member, n: int) -> float:
    if spec is None:
        return float(n - 3 if stat.fisher else n - 1)
    return float(spec(m) if callable(spec) else spec)


def _across(values: np.ndarray, confidence: float) -> tuple[float, float, float, float, float, int]:
    """(mean, low, high, se, df, k) of the t-interval over the finite values."""
    ok = values[np.isfinite(values)]
    k = int(ok.size)
    mean = float(ok.mean()) if k else NAN
    if k < 2:
        return mean, NAN, NAN, NAN, NAN, k
    se = float(ok.std(ddof=1)) / math.sqrt(k)
    half = float(stats.t.ppf(0.5 + confidence / 2, k - 1)) * se
    return mean, mean - half, mean + half, se, float(k - 1), k


def _same_sign(values: np.ndarray, mean: float) -> float:
    ok = values[np.isfinite(values)]
    sign = np.sign(mean) if np.isfinite(mean) and mean != 0 else 0
    return float(np.mean(np.sign(ok) == sign)) if sign and ok.size else NAN


def estimate_many(members: Sequence[Member], stats_: Mapping[str, Stat | Statistic], *,
                  n_resamples: int = N_RESAMPLES, seed: int = 0, confidence: float = CONFIDENCE,
                  resample_units: bool = True, resample_examples: bool = True, unit_name: str = "heads",
                  df: Mapping[str, DfSpec] | None = None, keep_resamples: bool = False
                  ) -> dict[str, PopulationEstimate]:
    """Several statistics over a population, every statistic on the same resamples (see the
    module docstring for the rules).

    ``stats_``: name -> ``Stat`` (or a plain statistic, wrapped by ``as_stat``). ``df``: name ->
    ``DfSpec`` (default: n - 3 for correlations, n - 1 otherwise). ``resample_units=False``:
    only examples are resampled (steering contrasts: one unit, prompts as examples; n = prompts).
    ``keep_resamples``: keep every seed's bootstrap values in ``resamples``."""

    if not members:
        raise ValueError("a population needs at least one member")
    stats_ = {k: as_stat(s) for k, s in stats_.items()}
    df = dict(df or {})
    rng = np.random.default_rng(seed)
    clustered = resample_units and any(m.clusters is not None for m in members)
    levels = " -> ".join([x for x, on in ((f"{unit_name} in clusters" if clustered else unit_name, resample_units),
                                           ("examples", resample_examples and any(m.per_example for m in members)))
                          if on]) or "nothing"
    per_member = [_resample(m, stats_, n_resamples, rng, resample_units, resample_examples) for m in members]
    picks = rng.integers(0, len(members), (n_resamples, len(members)))
    cols = rng.integers(0, n_resamples, (n_resamples, len(members)))
    out = {}
    for key, stat in stats_.items():
        values = np.array([_safe(stat, m.per_unit, m.per_example) for m in members])
        boots = np.stack([b[key] for b in per_member])
        seed_est = []
        for m, v, row in zip(members, values, boots):
            n = m.n_independent if resample_units else max(m.n_examples, 1)
            e = scaled_interval(v, row, n, _df_of(df.get(key), stat, m, n), confidence=confidence, fisher=stat.fisher)
            seed_est.append(e)
        lows = tuple(float(e.low) for e in seed_est)
        highs = tuple(float(e.high) for e in seed_est)
        ses = tuple(float(e.se) for e in seed_est)
        dfs = tuple(float(e.df) if np.isfinite(e.low) else NAN for e in seed_est)
        mean, low, high, se, d, k = _across(values, confidence)
        hier_low = hier_high = NAN
        if len(members) == 1:
            low, high, se, d = lows[0], highs[0], ses[0], dfs[0]
        elif k >= 2:
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                means = np.nanmean(boots[picks, cols], axis=1)
            means = means[np.isfinite(means)]
            if means.size >= n_resamples / 2:
                hse = float(np.std(means, ddof=1)) * math.sqrt(k / (k - 1))
                half = float(stats.t.ppf(0.5 + confidence / 2, k - 1)) * hse
                hier_low, hier_high = mean - half, mean + half
        out[key] = PopulationEstimate(
            mean, float(low), float(high), tuple(float(v) for v in values), lows, highs,
            tuple(m.seed for m in members), _same_sign(values, mean), tuple(m.n_units for m in members),
            tuple(m.n_examples for m in members),
            scheme(len(members), k, levels, n_resamples, stat.fisher, dfs),
            se=float(se), df=float(d), fisher=stat.fisher, hier_low=float(hier_low), hier_high=float(hier_high),
            per_seed_se=ses, per_seed_df=dfs, n_resamples=n_resamples,
            resamples=tuple(boots) if keep_resamples else ())
    return out


def estimate(members: Sequence[Member], stat: Stat | Statistic, **kwargs) -> PopulationEstimate:
    """``estimate_many`` for one statistic; ``df`` (if given) is that statistic's ``DfSpec``."""
    if "df" in kwargs:
        kwargs["df"] = {"_": kwargs["df"]}
    return estimate_many(members, {"_": stat}, **kwargs)["_"]


def from_values(values: Sequence[float], seeds: Sequence[int | None], n_units: Sequence[int],
                per_seed_low: Sequence[float] | None = None, per_seed_high: Sequence[float] | None = None,
                *, what: str, confidence: float = CONFIDENCE) -> PopulationEstimate:
    """The across-seed estimate from per-seed values computed elsewhere (calibrated thresholds,
    layer-level r): mean ± t(k-1) x SD / sqrt(k) over the seeds with a value, the verdict rule
    of ``estimate_many``; one seed: its own interval (``per_seed_low/high``, ``what`` says how
    it was computed; p-values from it use a normal approximation), if any."""
    v = np.array(values, dtype=float)
    lows = tuple(float(x) for x in per_seed_low) if per_seed_low is not None else (NAN,) * len(v)
    highs = tuple(float(x) for x in per_seed_high) if per_seed_high is not None else (NAN,) * len(v)
    mean, low, high, se, d, k = _across(v, confidence)
    if len(v) == 1:
        low, high = lows[0], highs[0]
        text = f"one seed: {what}; describes this model only"
    elif k >= 2:
        text = f"{k} seeds: mean ± t({k - 1}) x SD/sqrt({k}) of the seeds' values (per seed: {what})"
    else:
        text = f"{k} of {len(v)} seeds with a value: no across-seed interval"
    return PopulationEstimate(mean, float(low), float(high), tuple(float(x) for x in v), lows, highs, tuple(seeds),
                              _same_sign(v, mean), tuple(int(n) for n in n_units), (0,) * len(v), text,
                              se=float(se), df=float(d), per_seed_se=(NAN,) * len(v), per_seed_df=(NAN,) * len(v))


# --- reading an estimate --------------------------------------------------------------------

def _z(x: float) -> float:
    c = 1 - 1e-12
    return math.atanh(min(max(x, -c), c))


def p_value(e: PopulationEstimate, target: float, side: str = "two-sided") -> float:
    """p-value of "statistic = target" against ``side`` ('above': the statistic is > target;
    'below': < target; 'two-sided'), from the verdict interval's SE and df (on Fisher's z scale
    where the interval is): p < 0.025 one-sided exactly when the 95 % interval lies on that side
    of the target. An interval without SE and df (one seed's interval from elsewhere, e.g. a
    percentile interval): a normal approximation from its half-width on that side."""
    if side not in ("above", "below", "two-sided"):
        raise ValueError(f"side must be 'above', 'below' or 'two-sided', got {side!r}")
    v = e.value
    if not (np.isfinite(v) and np.isfinite(target)):
        return NAN
    if np.isfinite(e.se) and np.isfinite(e.df) and e.df >= 1:
        d = (_z(v) - _z(target)) if e.on_z else (v - target)
        dist = stats.t(e.df)
        if e.se <= 0:
            if side == "two-sided":
                return 0.0 if d != 0 else 1.0
            return 0.0 if (d > 0) == (side == "above") and d != 0 else 1.0
    else:
        lo, hi = e.low, e.high
        if not (np.isfinite(lo) and np.isfinite(hi)):
            return NAN
        if side == "two-sided":
            return min(1.0, 2 * min(p_value(e, target, "above"), p_value(e, target, "below")))
        half = (v - lo) if side == "above" else (hi - v)
        d = v - target
        if half <= 0:
            edge = lo if side == "above" else hi
            return 0.0 if ((edge > target) if side == "above" else (edge < target)) else 1.0
        dist, se = stats.norm, half / stats.norm.ppf(0.5 + CONFIDENCE / 2)
        return float(dist.sf((d if side == "above" else -d) / se))
    if side == "two-sided":
        return float(min(1.0, 2 * dist.sf(abs(d) / e.se)))
    return float(dist.sf((d if side == "above" else -d) / e.se))


def interval_at(e: PopulationEstimate, confidence: float) -> tuple[float, float]:
    """The verdict interval at another confidence level (same SE and df; normal scaling of the
    given interval where there are none), within the estimate's ``bounds``."""
    v, lo, hi = e.value, e.low, e.high
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return NAN, NAN
    if np.isfinite(e.se) and np.isfinite(e.df) and e.df >= 1:
        q = float(stats.t.ppf(0.5 + confidence / 2, e.df)) * e.se
        a, b = ((math.tanh(_z(v) - q), math.tanh(_z(v) + q)) if e.on_z else (v - q, v + q))
    else:
        f = stats.norm.ppf(0.5 + confidence / 2) / stats.norm.ppf(0.5 + CONFIDENCE / 2)
        a, b = v - f * (v - lo), v + f * (hi - v)
    return float(max(e.bounds[0], a)), float(min(e.bounds[1], b))


def clip(e: PopulationEstimate, lo_bound: float, hi_bound: float) -> PopulationEstimate:
    """The intervals (verdict, hierarchical, per seed) bounded to the statistic's range for
    display (a t-interval over few seeds can reach beyond it); the scheme says so when that
    changed the verdict interval. SE, df and so p-values are those before clipping."""
    def c(x: float, bound: float, f) -> float:
        return float(f(bound, x)) if np.isfinite(x) else x

    out = replace(e, low=c(e.low, lo_bound, max), high=c(e.high, hi_bound, min),
                  hier_low=c(e.hier_low, lo_bound, max), hier_high=c(e.hier_high, hi_bound, min),
                  per_seed_low=tuple(c(x, lo_bound, max) for x in e.per_seed_low),
                  per_seed_high=tuple(c(x, hi_bound, min) for x in e.per_seed_high), bounds=(lo_bound, hi_bound))
    if (out.low, out.high) != (e.low, e.high) and np.isfinite(e.low) and np.isfinite(e.high):
        out = replace(out, scheme=e.scheme + f"; clipped to [{lo_bound:g}, {hi_bound:g}]")
    return out


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN and is not counted as a test)."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, NAN)
    ok = np.flatnonzero(np.isfinite(p))
    if ok.size == 0:
        return out
    order = ok[np.argsort(p[ok])]
    m = ok.size
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def across_seeds(values: Sequence[float], fisher: bool = False, confidence: float = CONFIDENCE
                 ) -> tuple[float, float, float, float, float, int]:
    """(value, low, high, se, df, k) of the t-interval ``mean ± t(k-1) x SD / sqrt(k)`` over the
    finite values (the seeds' values of one statistic); with ``fisher`` on Fisher's z =
    atanh(r), value and bounds mapped back with tanh, se on z. Fewer than 2 values: no interval."""
    v = np.array([x for x in values if np.isfinite(x)], dtype=float)
    k = v.size
    if fisher:
        v = np.arctanh(np.clip(v, -0.999, 0.999))
    back = np.tanh if fisher else (lambda y: y)
    if k < 2:
        return (float(back(v.mean())) if k else NAN), NAN, NAN, NAN, NAN, k
    se = float(v.std(ddof=1)) / math.sqrt(k)
    half = float(stats.t.ppf(0.5 + confidence / 2, k - 1)) * se
    return float(back(v.mean())), float(back(v.mean() - half)), float(back(v.mean() + half)), se, float(k - 1), k


def holm_claims(rows: Sequence[Mapping]) -> tuple[np.ndarray, np.ndarray, int]:
    """Holm-adjusted p-values of the PASS claims (``p_above``) and of the FAIL claims (``p_below``)
    across ``rows``, each family on its own, and how many rows have a test."""
    above, below = [r["p_above"] for r in rows], [r["p_below"] for r in rows]
    return holm(above), holm(below), int(sum(np.isfinite(p) for p in above))


def pooled_mean(means: Sequence[float], ses: Sequence[float], dfs: Sequence[float]) -> tuple[float, float, float]:
    """(mean, se, df) of the mean of P populations' means: a fixed-effect summary of these
    populations, SE sqrt(sum se_p^2) / P with Welch-Satterthwaite degrees of freedom
    (sum v_p)^2 / sum (v_p^2 / df_p), v_p = se_p^2 / P^2. All NaN when a population has no interval."""
    m, s, d = (np.asarray(x, dtype=float) for x in (means, ses, dfs))
    if m.size == 0 or not (np.all(np.isfinite(m)) and np.all(np.isfinite(s)) and np.all(np.isfinite(d))):
        return NAN, NAN, NAN
    v = s ** 2 / m.size ** 2
    var = float(v.sum())
    denominator = float((v ** 2 / d).sum())
    return float(m.mean()), math.sqrt(var), (var ** 2 / denominator if denominator > 0 else float(d.sum()))


def one_sided_t(mean: float, se: float, df: float) -> tuple[float, float]:
    """(p of "mean > 0", p of "mean < 0") from the t with ``se`` and ``df`` (``across_seeds``);
    NaN without an interval, 0/1 when the seeds agree exactly (se 0)."""
    if not (np.isfinite(se) and np.isfinite(df)):
        return NAN, NAN
    if se == 0:
        return float(mean <= 0), float(mean >= 0)
    return float(stats.t.sf(mean / se, df)), float(stats.t.cdf(mean / se, df))
