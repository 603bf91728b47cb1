"""analysis.population: per-seed and across-seed intervals, clusters, Holm."""

import numpy as np
import pytest
from scipy import stats

from analysis.population import Member, estimate, holm


def _mean_stat(per_unit, per_example):
    return float(per_unit["x"].mean())


def test_one_seed_uses_its_own_interval_and_says_so():
    rng = np.random.default_rng(0)
    m = Member(0, {"x": rng.normal(1.0, 1.0, 40)})
    e = estimate([m], _mean_stat, n_resamples=500, seed=1)
    assert e.n_seeds == 1 and (e.low, e.high) == (e.per_seed_low[0], e.per_seed_high[0])
    assert "describes this model only" in e.scheme
    se = m.per_unit["x"].std(ddof=1) / np.sqrt(40)
    assert e.high - e.low == pytest.approx(2 * 1.96 * se, rel=0.2)


def test_across_seed_interval_is_t_scaled_and_widens_with_between_seed_spread():
    rng = np.random.default_rng(2)
    offsets = [-0.5, 0.3, 0.1, 0.6, -0.2]
    members = [Member(s, {"x": rng.normal(o, 0.1, 30)}) for s, o in enumerate(offsets)]
    e = estimate(members, _mean_stat, n_resamples=2000, seed=3)
    means = np.array(e.per_seed)
    assert e.value == pytest.approx(means.mean())
    # about the t interval of the seed means: the between-seed spread dominates
    half = stats.t.ppf(0.975, 4) * means.std(ddof=1) / np.sqrt(5)
    assert (e.high - e.low) / 2 == pytest.approx(half, rel=0.25)
    assert e.same_sign == pytest.approx(3 / 5) and e.n_units == (30,) * 5
    assert "5 seeds: hierarchical bootstrap seeds -> heads" in e.scheme


def test_clusters_are_resampled_whole():
    """Four clusters of five identical units: the interval must be that of four values, not 20."""
    values = np.repeat([0.0, 1.0, 2.0, 3.0], 5)
    clustered = Member(0, {"x": values}, clusters=np.repeat(np.arange(4), 5))
    naive = Member(0, {"x": values})
    wide = estimate([clustered], _mean_stat, n_resamples=1000, seed=0)
    narrow = estimate([naive], _mean_stat, n_resamples=1000, seed=0)
    assert (wide.high - wide.low) > 1.8 * (narrow.high - narrow.low)


def test_undefined_statistic_gives_nan_interval_not_a_number():
    m = Member(0, {"x": np.ones(6)})
    e = estimate([m, m], lambda pu, pe: np.corrcoef(pu["x"], pu["x"])[0, 1], n_resamples=50)
    assert np.isnan(e.value) and np.isnan(e.low) and np.isnan(e.high)


def test_holm_against_a_hand_computation():
    p = [0.01, 0.04, 0.03, float("nan"), 0.005]
    # sorted 0.005, 0.01, 0.03, 0.04 (m = 4): 0.02, 0.03, 0.06, 0.06 (monotone)
    np.testing.assert_allclose(holm(p), [0.03, 0.06, 0.06, np.nan, 0.02])
