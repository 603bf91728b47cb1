"""The change-point detector of ``spectral.dynamics.changepoints`` on series with a known answer:
a planted mean shift is found within ±1 checkpoint, stationary series give false alarms at most
at the stated rates, the short (PELT) and long (KernelCPD) paths agree, long series are fast."""

import math
import time

import numpy as np
import pytest
import ruptures as rpt

from spectral.dynamics import changepoints as cp
from spectral.errors import UsageError

STEPS_60 = np.unique(np.round(np.logspace(1, 5, 60)))  # 60 log-spaced training steps, 10 .. 100,000


def ar1(rng, n: int, rho: float) -> np.ndarray:
    """(n,) stationary AR(1) noise of unit variance (burn-in 50)."""
    e = rng.normal(size=n + 50) * math.sqrt(1 - rho ** 2)
    x = np.empty(n + 50)
    x[0] = rng.normal()
    for i in range(1, n + 50):
        x[i] = rho * x[i - 1] + e[i]
    return x[50:]


def test_l2_cost_equals_ruptures_costl2():
    rng = np.random.default_rng(0)
    y = rng.normal(size=80) * 3 + 100  # an offset: the cumulative sums are taken centred
    fast, plain = cp.L2Cost().fit(y), rpt.costs.CostL2().fit(y)
    for start, end in rng.integers(0, 81, size=(200, 2)):
        if end - start >= 1:
            assert fast.error(int(start), int(end)) == pytest.approx(plain.error(int(start), int(end)), rel=1e-9,
                                                                     abs=1e-9)


def test_short_and_long_paths_agree(monkeypatch):
    """PELT over ``L2Cost`` (the short path), ruptures' own ``Pelt(model="l2")`` and KernelCPD with
    the linear kernel (the long path) minimise the same penalised cost: the same change-points."""
    rng = np.random.default_rng(1)
    cases = []
    for _ in range(40):
        n = int(rng.integers(30, 120))
        y = rng.normal(size=n)
        for k in rng.integers(3, n - 3, size=int(rng.integers(0, 4))):
            y[k:] += 3 * rng.normal()
        cases.append((y, np.arange(n)))
    short = [cp.change_points(y, s) for y, s in cases]
    assert {r.method for r in short} == {cp.PELT}
    for y, _ in cases[:10]:
        z = (y - np.median(y)) / cp.first_difference_scale(y)
        pen = cp.PENALTY_C * math.log(y.size)
        stock = rpt.Pelt(model="l2", min_size=cp.MIN_SIZE, jump=1).fit(z).predict(pen=pen)
        ours = rpt.Pelt(custom_cost=cp.L2Cost(), min_size=cp.MIN_SIZE, jump=1).fit(z).predict(pen=pen)
        assert ours == stock
    monkeypatch.setattr(cp, "SHORT_MAX", 0)
    long = [cp.change_points(y, s) for y, s in cases]
    assert {r.method for r in long} == {cp.KERNEL}
    assert [r.indices for r in long] == [r.indices for r in short]
    assert sum(len(r.indices) for r in short) > 20  # the cases do have change-points


def test_planted_shift_found_within_one_checkpoint():
    """Stated: a 3 sigma shift at a checkpoint in the middle half of a 30-60 checkpoint series
    is found within ±1 checkpoint in >= 95 % of draws (measured 96.1-97.2 % over 3,000 draws per
    length; here 300 draws of random length, scale, offset and sign)."""
    rng = np.random.default_rng(2)
    hits, draws = 0, 300
    for _ in range(draws):
        n = int(rng.integers(30, 61))
        k = int(rng.integers(n // 4, 3 * n // 4 + 1))
        sigma = 10 ** rng.uniform(-2, 2)
        y = rng.normal(size=n) * sigma + rng.uniform(-5, 5)
        y[k:] += 3 * sigma * rng.choice([-1, 1])
        found = cp.change_points(y, STEPS_60[:n]).indices
        hits += any(abs(i - k) <= 1 for i in found)
    assert hits / draws >= 0.95, f"found {hits} of {draws}"


@pytest.mark.parametrize("rho, stated", [(0.0, 0.01), (0.3, 0.05)])
def test_false_alarm_rate_on_stationary_series(rho, stated):
    """Stated: any change-point on a stationary 30-60 checkpoint series in <= 1 % of draws of
    white noise and <= 5 % of AR(1) noise with rho = 0.3 (measured <= 0.17 % and <= 3.5 % over 3,000 draws
    per length)."""
    rng = np.random.default_rng(3)
    draws = 400
    alarms = sum(bool(cp.change_points(ar1(rng, n, rho), STEPS_60[:n]).indices)
                 for n in rng.integers(30, 61, size=draws))
    assert alarms / draws <= stated, f"{alarms} false alarms in {draws} draws (rho {rho})"


def test_long_series_takes_the_fast_path():
    rng = np.random.default_rng(4)
    y = rng.normal(size=5000)
    y[1500:] += 2.0
    y[3800:] -= 3.0
    start = time.perf_counter()
    r = cp.change_points(y, np.arange(5000))
    elapsed = time.perf_counter() - start
    assert r.method == cp.KERNEL
    assert len(r.indices) == 2 and abs(r.indices[0] - 1500) <= 3 and abs(r.indices[1] - 3800) <= 3
    assert r.shifts[0] == pytest.approx(2.0, abs=0.15) and r.shifts[1] == pytest.approx(-3.0, abs=0.15)
    assert elapsed < 2.0, f"{elapsed:.2f} s at 5,000 points"


def test_noise_free_step_and_reported_positions():
    steps = STEPS_60[:40]
    y = np.r_[np.zeros(20), np.ones(20) * 2.5]
    r = cp.change_points(y, steps)
    assert r.indices == (20,) and r.steps == (steps[20],) and r.shifts == (2.5,)
    expected = (math.log10(1 + steps[19]) + math.log10(1 + steps[20])) / 2
    assert r.log_steps == (pytest.approx(expected, abs=1e-12),)
    f = cp.first_change(y, steps)
    assert (f.index, f.step, f.shift) == (20, steps[20], 2.5) and f.log_step == pytest.approx(expected, abs=1e-12)
    assert r.penalty == pytest.approx(cp.PENALTY_C * r.sigma ** 2 * math.log(40))


def test_constant_and_stationary_series_have_no_first_change():
    assert cp.change_points(np.full(30, 0.7), np.arange(30)).indices == ()
    assert cp.first_change(np.full(30, 0.7), np.arange(30)) is None
    assert cp.first_change(np.random.default_rng(5).normal(size=50), STEPS_60[:50]) is None


def test_saturated_plateau_uses_the_documented_scale():
    """More than half the differences 0 (accuracy saturated at 1): the MAD is 0 and pass 1 uses
    SD(differences)/sqrt(2); the rise is still found."""
    rng = np.random.default_rng(6)
    y = np.r_[0.25 + 0.02 * rng.normal(size=12), np.ones(28)]
    d = np.diff(y)
    assert np.median(np.abs(d - np.median(d))) == 0
    assert cp.first_difference_scale(y) == pytest.approx(d.std(ddof=1) / math.sqrt(2))
    assert cp.first_change(y, STEPS_60[:40]).index == 12


@pytest.mark.parametrize("series, steps, phrase", [
    ([1.0, 2.0], [1, 2], "at least 6 checkpoints"),
    ([1.0, 2.0, 3.0, 4.0, 5.0], [1, 2, 3, 4, 5], "at least 6 checkpoints"),
    ([0.1, 0.2, float("nan"), 0.3, 0.2, 0.1, 0.0], range(7), "non-finite"),
    ([0.1] * 8, range(7), "7 steps for a series of 8"),
    ([0.1] * 8, [0, 1, 2, 2, 3, 4, 5, 6], "strictly increasing"),
    ([0.1] * 8, [-1, 1, 2, 3, 4, 5, 6, 7], ">= 0"),
    (np.zeros((8, 2)), range(8), "1-D"),
])
def test_bad_input_is_one_line(series, steps, phrase):
    with pytest.raises(UsageError, match=phrase) as err:
        cp.change_points(series, steps)
    assert "\n" not in str(err.value)


def test_planted_shift_on_the_organisms_checkpoint_grid():
    """The setting of real runs: organism-xs's 30 checkpoints (steps 1 .. 1,840, log-spaced,
    ``checkpoint_steps(1840, 30)``), a 3 sigma shift planted at checkpoint 8-22: found within ±1
    checkpoint in 95.6 % of 3,000 draws (stated: >= 95 %); here 400 draws, asserted >= 95 % - 3
    binomial SEs (92.7 %); the reported step is the checkpoint's at the found index."""
    from spectral.organisms.checkpoints import checkpoint_steps

    steps = checkpoint_steps(1840, 30)
    rng = np.random.default_rng(5)
    hits, draws = 0, 400
    for _ in range(draws):
        k = int(rng.integers(8, 23))
        y = rng.normal(size=30)
        y[k:] += 3.0
        found = cp.change_points(y, steps)
        hits += any(abs(i - k) <= 1 for i in found.indices)
        assert list(found.steps) == [steps[i] for i in found.indices]
    assert hits / draws >= 0.95 - 3 * math.sqrt(0.95 * 0.05 / draws), f"found {hits} of {draws}"
