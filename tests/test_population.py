"""analysis.population (the one estimator): per-seed and across-seed intervals, batched and
plain statistics on the same resamples, clusters, p-values, Holm."""

import numpy as np
import pytest
from scipy import stats

from analysis.population import Member, Stat, clip, estimate, estimate_many, from_values, holm, interval_at, p_value


def _mean_stat(per_unit, per_example):
    return float(per_unit["x"].mean())


def test_one_seed_uses_its_own_interval_and_says_so():
    rng = np.random.default_rng(0)
    m = Member(0, {"x": rng.normal(1.0, 1.0, 40)})
    e = estimate([m], _mean_stat, n_resamples=500, seed=1)
    assert e.n_seeds == 1 and (e.low, e.high) == (e.per_seed_low[0], e.per_seed_high[0])
    assert "describes this model only" in e.scheme and "t-scaled, df 39" in e.scheme  # n - 1
    se = m.per_unit["x"].std(ddof=1) / np.sqrt(40)
    assert e.high - e.low == pytest.approx(2 * 1.96 * se, rel=0.2)
    assert np.isnan(e.hier_low) and e.df == 39 and e.se == pytest.approx((e.high - e.low) / (2 * stats.t.ppf(0.975, 39)))


def test_across_seed_interval_is_the_t_interval_of_the_seeds_values():
    rng = np.random.default_rng(2)
    offsets = [-0.5, 0.3, 0.1, 0.6, -0.2]
    members = [Member(s, {"x": rng.normal(o, 0.1, 30)}) for s, o in enumerate(offsets)]
    e = estimate(members, _mean_stat, n_resamples=2000, seed=3)
    means = np.array(e.per_seed)
    assert e.value == pytest.approx(means.mean())
    half = stats.t.ppf(0.975, 4) * means.std(ddof=1) / np.sqrt(5)
    assert (e.low, e.high) == pytest.approx((means.mean() - half, means.mean() + half), rel=1e-12)
    assert e.same_sign == pytest.approx(3 / 5) and e.n_units == (30,) * 5
    assert e.scheme.startswith("5 seeds: mean ± t(4) x SD/sqrt(5) of the seeds' values; per seed: value ± t(df)")
    assert "hierarchical bootstrap seeds -> heads (2000)" in e.scheme and "not the verdict's" in e.scheme
    # the hierarchical bootstrap beside it: here the between-seed spread dominates, so it is close
    assert e.hier_low < e.value < e.hier_high
    assert (e.hier_high - e.hier_low) / 2 == pytest.approx(half, rel=0.25)
    for v, lo, hi in zip(e.per_seed, e.per_seed_low, e.per_seed_high):  # per seed: t(29) over its 30 units
        assert lo < v < hi and (hi - lo) / 2 < 0.06


def test_hierarchical_interval_counts_within_seed_noise_twice():
    """Seeds without a training effect, each with within-seed noise: the seeds' values already
    vary by that noise, and the hierarchical draws add it again, so its interval is wider than
    the t-interval over the seeds by about sqrt(2) (the reason it is not the verdict's)."""
    rng = np.random.default_rng(5)
    ratios = []
    for i in range(20):
        members = [Member(s, {"x": rng.normal(0, 1, 12)}) for s in range(5)]
        e = estimate(members, _mean_stat, n_resamples=1000, seed=i)
        ratios.append((e.hier_high - e.hier_low) / (e.high - e.low))
    assert np.median(ratios) == pytest.approx(np.sqrt(2), rel=0.2)


def test_clusters_are_resampled_whole():
    """Four clusters of five identical units: the interval must be that of four values, not 20."""
    values = np.repeat([0.0, 1.0, 2.0, 3.0], 5)
    clustered = Member(0, {"x": values}, clusters=np.repeat(np.arange(4), 5))
    naive = Member(0, {"x": values})
    wide = estimate([clustered], _mean_stat, n_resamples=1000, seed=0)
    narrow = estimate([naive], _mean_stat, n_resamples=1000, seed=0)
    assert (wide.high - wide.low) > 1.8 * (narrow.high - narrow.low)


def test_grouped_query_clusters_take_df_from_the_clusters_in_batched_statistics():
    """A batched statistic sees cluster draws padded with NaN units; n and df count clusters."""
    values = np.repeat([0.0, 1.0, 2.0, 3.0, 5.0, 4.0], 3)
    stat = Stat("mean", batched=lambda pu, mu: np.nanmean(pu["x"], axis=1))
    m = Member(0, {"x": values}, clusters=np.repeat(np.arange(6), 3))
    batched = estimate([m], stat, n_resamples=2000, seed=0)
    plain = estimate([m], _mean_stat, n_resamples=2000, seed=0)
    assert batched.df == plain.df == 5 and batched.value == plain.value == pytest.approx(2.5)
    assert batched.high - batched.low == pytest.approx(plain.high - plain.low, rel=0.1)
    assert "heads in clusters" in batched.scheme


def test_batched_and_plain_statistics_agree_and_share_resamples():
    rng = np.random.default_rng(4)
    members = [Member(s, {"x": rng.normal(s, 1, 20)}, {"y": rng.normal(0, 1, (20, 16))}) for s in range(3)]
    batched = Stat("mean y", batched=lambda pu, mu: mu["y"].mean(1))
    plain = Stat("mean y", plain=lambda pu, pe: float(pe["y"].mean()))
    es = estimate_many(members, {"b": batched, "p": plain}, n_resamples=300, seed=1, keep_resamples=True)
    assert es["b"].per_seed == pytest.approx(es["p"].per_seed, rel=1e-12)
    for rb, rp in zip(es["b"].resamples, es["p"].resamples):  # the very same resamples
        np.testing.assert_allclose(rb, rp, rtol=1e-9)
    assert es["b"].low == pytest.approx(es["p"].low, rel=1e-12) and "heads -> examples" in es["b"].scheme


def test_p_values_agree_with_the_interval_and_clip_keeps_them():
    rng = np.random.default_rng(6)
    members = [Member(s, {"x": rng.normal(0.3, 1, 12)}) for s in range(4)]
    e = estimate(members, _mean_stat, n_resamples=400, seed=0)
    assert p_value(e, e.low, "above") == pytest.approx(0.025) and p_value(e, e.high, "below") == pytest.approx(0.025)
    assert p_value(e, e.low) == pytest.approx(0.05)
    lo, hi = interval_at(e, 0.99)
    assert lo < e.low and hi > e.high
    c = clip(e, 0.0, 1.0)
    assert c.low >= 0 and p_value(c, 0.0, "above") == p_value(e, 0.0, "above")
    one = from_values([0.4], [0], [8], [0.3], [0.6], what="elsewhere")  # no SE: normal from the half-width
    assert p_value(one, 0.3, "above") == pytest.approx(0.025)
    r = estimate([Member(0, {"x": np.linspace(0, 1, 10), "y": np.linspace(0, 1, 10) ** 2})],
                 Stat("r", plain=lambda pu, pe: float(np.corrcoef(pu["x"], pu["y"])[0, 1]), fisher=True),
                 n_resamples=400)
    assert r.on_z and r.df == 7 and p_value(r, r.low, "above") == pytest.approx(0.025) and -1 < r.low < r.high < 1


def test_undefined_statistic_gives_nan_interval_not_a_number():
    m = Member(0, {"x": np.ones(6)})
    e = estimate([m, m], lambda pu, pe: np.corrcoef(pu["x"], pu["x"])[0, 1], n_resamples=50)
    assert np.isnan(e.value) and np.isnan(e.low) and np.isnan(e.high)


def test_holm_against_a_hand_computation():
    p = [0.01, 0.04, 0.03, float("nan"), 0.005]
    # sorted 0.005, 0.01, 0.03, 0.04 (m = 4): 0.02, 0.03, 0.06, 0.06 (monotone)
    np.testing.assert_allclose(holm(p), [0.03, 0.06, 0.06, np.nan, 0.02])
