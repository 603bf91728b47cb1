"""Statistics over populations of models: seeds -> heads (or layers) -> examples.

A verdict about "organism-s" is a claim about the *recipe*, not about one training draw: two
trainings of the same recipe can give correlations of opposite sign. The unit of replication
is therefore the training seed. For a statistic computed on one model (a correlation across
its heads, a difference of group means) this module gives

- per seed: the value and an interval that resamples heads (or layers) *and* examples
  jointly (the association across heads is what varies, not only how precisely each head's
  importance is known);
- across seeds: the mean of the per-seed values with a hierarchical bootstrap (seeds with
  replacement, then heads, then examples inside each drawn seed), and the fraction of seeds
  whose value has the sign of the mean.

Interval rule across seeds (documented in ``SCHEME``): the hierarchical bootstrap gives the
standard error of the mean; the interval is ``mean ± t(n_seeds - 1) x SE x sqrt(n/(n-1))``.
A percentile interval of a bootstrap over 5 seeds covers far less than 95 % (it behaves like a
z-interval with the (n-1)/n variance): the null simulations in ``tests/test_nulls.py``
showed it; the t-scaled interval keeps the one-sided PASS rate under 2.5 %. With one seed
the interval is the per-seed (heads x examples) percentile interval and describes that model
only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

NAN = float("nan")
CONFIDENCE = 0.95
N_RESAMPLES = 2000

Arrays = Mapping[str, np.ndarray]
Statistic = Callable[[Arrays, Arrays], float]
"""f(per_unit, per_example) -> float: ``per_unit`` holds (n,) arrays (one entry per head or
layer), ``per_example`` (n, n_examples) arrays; both already resampled."""


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
    same key kernel): the bootstrap then draws whole clusters, not units."""

    @property
    def n_units(self) -> int:
        return len(next(iter(self.per_unit.values())))

    @property
    def n_examples(self) -> int:
        return next(iter(self.per_example.values())).shape[1] if self.per_example else 0


@dataclass(frozen=True)
class PopulationEstimate:
    """A statistic over a population of models with its intervals."""

    value: float
    """Mean over seeds of the per-seed statistic."""
    low: float
    high: float
    """Across-seed interval (t-scaled hierarchical bootstrap); with one seed, that seed's."""
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

    @property
    def n_seeds(self) -> int:
        return len(self.per_seed)


def scheme(n_seeds: int, levels: str, n_resamples: int) -> str:
    """The resampling scheme as the report prints it."""
    if n_seeds <= 1:
        return f"one seed: percentile bootstrap over {levels} ({n_resamples}); describes this model only"
    return (f"{n_seeds} seeds: hierarchical bootstrap seeds -> {levels} ({n_resamples}), "
            f"mean ± t({n_seeds - 1}) x SE x sqrt(n/(n-1))")


def _draw(member: Member, rng: np.random.Generator, units: bool, examples: bool) -> tuple[dict, dict]:
    n = member.n_units
    if not units:
        u = np.arange(n)
    elif member.clusters is None:
        u = rng.integers(0, n, n)
    else:
        labels = np.unique(member.clusters)
        drawn = labels[rng.integers(0, labels.size, labels.size)]
        u = np.concatenate([np.flatnonzero(member.clusters == c) for c in drawn])
    per_unit = {k: v[u] for k, v in member.per_unit.items()}
    if not member.per_example:
        return per_unit, {}
    m = member.n_examples
    e = rng.integers(0, m, m) if examples else np.arange(m)
    return per_unit, {k: v[u][:, e] for k, v in member.per_example.items()}


def _safe(stat: Statistic, per_unit, per_example) -> float:
    with np.errstate(all="ignore"):
        try:
            value = float(stat(per_unit, per_example))
        except (ValueError, ZeroDivisionError, FloatingPointError):
            return NAN
    return value if np.isfinite(value) else NAN


def estimate(members: Sequence[Member], stat: Statistic, *, n_resamples: int = N_RESAMPLES, seed: int = 0,
             confidence: float = CONFIDENCE, resample_units: bool = True, resample_examples: bool = True,
             unit_name: str = "heads") -> PopulationEstimate:
    """The statistic on every member, per-seed intervals and the across-seed interval.

    Resamples on which the statistic is undefined (NaN: a constant column, an empty group)
    are dropped; when more than half of them are, the interval is NaN (undefined)."""
    if not members:
        raise ValueError("a population needs at least one member")
    rng = np.random.default_rng(seed)
    alpha = 1 - confidence
    values = np.array([_safe(stat, m.per_unit, m.per_example) for m in members])
    levels = " -> ".join([x for x, on in ((unit_name, resample_units),
                                           ("examples", resample_examples and any(m.per_example for m in members)))
                          if on]) or "nothing"
    # per seed: heads (layers) and examples jointly
    boots = np.full((len(members), n_resamples), NAN)
    for i, m in enumerate(members):
        for b in range(n_resamples):
            boots[i, b] = _safe(stat, *_draw(m, rng, resample_units, resample_examples))
    lows, highs = [], []
    for row in boots:
        ok = row[np.isfinite(row)]
        if ok.size < n_resamples / 2:
            lows.append(NAN), highs.append(NAN)
        else:
            lows.append(float(np.quantile(ok, alpha / 2))), highs.append(float(np.quantile(ok, 1 - alpha / 2)))
    finite = np.isfinite(values)
    n = int(finite.sum())
    mean = float(values[finite].mean()) if n else NAN
    if n == 0:
        low = high = NAN
    elif len(members) == 1:
        low, high = lows[0], highs[0]
    else:
        # seeds with replacement; inside each drawn seed one of its own head x example resamples
        picks = rng.integers(0, len(members), (n_resamples, len(members)))
        cols = rng.integers(0, n_resamples, (n_resamples, len(members)))
        draws = boots[picks, cols]
        with np.errstate(all="ignore"):
            means = np.nanmean(draws, axis=1)
        means = means[np.isfinite(means)]
        if n < 2 or means.size < n_resamples / 2:
            low = high = NAN
        else:
            se = float(np.std(means, ddof=1)) * np.sqrt(n / (n - 1))
            t = float(stats.t.ppf(1 - alpha / 2, n - 1))
            low, high = mean - t * se, mean + t * se
    sign = np.sign(mean) if np.isfinite(mean) and mean != 0 else 0
    same = float(np.mean(np.sign(values[finite]) == sign)) if sign and n else NAN
    return PopulationEstimate(
        mean, float(low), float(high), tuple(float(v) for v in values), tuple(lows), tuple(highs),
        tuple(m.seed for m in members), same, tuple(m.n_units for m in members),
        tuple(m.n_examples for m in members), scheme(len(members), levels, n_resamples))


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
