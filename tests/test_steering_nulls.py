"""Null simulations of the steering verdicts (issue 12): when the strategies' true effects are
equal, "spectral improves on the baseline" (and "spectral beats the random control") must
PASS at or below the nominal one-sided rate of a 95 % interval, 2.5 %.

Per-prompt effects are simulated (no model): 32 evaluation prompts of two kinds (positive and
negative contexts, like the organisms' sentiment concept) with a prompt effect shared by every
strategy, split half/half by ``selection_split`` exactly as the job splits them; the verdicts
come from ``analysis.steering.verdicts``, the function the job calls, with its default 2,000
bootstrap resamples. Everything is seeded, so the counts are fixed numbers.

Monte-Carlo allowance: with N simulations the PASS count must not exceed the 99th percentile
of Binomial(N, 0.025), i.e. a count that a rule with a true rate of exactly 2.5 % exceeds with
probability < 1 %. Measured (seeded) rates are printed with ``-s``.
"""

import numpy as np
import pytest
from scipy import stats

from analysis.steering import Comparison, selection_split, verdicts

NOMINAL = 0.025
N_PROMPTS = 32
SPLIT = selection_split(N_PROMPTS, 0.5, 0, np.arange(N_PROMPTS) % 2)
HELD = list(SPLIT.heldout)


def allowance(n_sims: int) -> int:
    """The largest PASS count consistent with a true rate of 2.5 % (exact binomial, 99 %)."""
    return int(stats.binom.ppf(0.99, n_sims, NOMINAL))


def _arm(name, family, k, effects, profile):
    return {"name": name, "family": family, "k": k,
            "runs": [{"profile": p, "effect": e} for p, e in zip(profile, effects)]}


def prompt_effects(rng, kind="mixture"):
    """Per-prompt effect every strategy shares: two kinds of context with different means."""
    if kind == "lognormal":  # skewed
        return rng.lognormal(1.0, 0.8, N_PROMPTS)
    return np.where(np.arange(N_PROMPTS) % 2, 8.0, 2.0) + rng.normal(0, 2.0, N_PROMPTS)


def simulate(n_sims, seed, make, keys):
    """PASS counts of the verdict rows ``keys`` over ``n_sims`` simulated runs; ``make(rng)``
    gives the arms (effects on every prompt)."""
    rng = np.random.default_rng(seed)
    counts = dict.fromkeys(keys, 0)
    for i in range(n_sims):
        arms = make(rng)
        groups = {a["name"]: np.array([np.asarray(r["effect"])[HELD] for r in a["runs"]]) for a in arms}
        cmp = Comparison.of(groups, seed=i)
        rows = {r["key"]: r for r in verdicts(arms, {}, {}, SPLIT, cmp, seed=i)}
        for key in keys:
            counts[key] += rows[key]["verdict"] == "PASS"
    return counts


def one_layer(factor=1.0, kind="mixture"):
    """spectral-1 and baseline at different layers; spectral's true effect = factor x baseline's."""
    def make(rng):
        prompt = prompt_effects(rng, kind)
        baseline = prompt + rng.normal(0, 1.5, N_PROMPTS)
        spectral = factor * prompt + rng.normal(0, 1.5, N_PROMPTS)
        return [_arm("baseline", "baseline", 1, [baseline], [{1: 1.0}]),
                _arm("spectral", "spectral", 1, [spectral], [{0: 1.0}])]
    return make


def against_random(rng):
    """spectral at k = 2 layers whose true effect equals the random control's mean over draws
    (each draw a set of 2 layers with an effect offset of its own, mean 0)."""
    prompt = prompt_effects(rng)
    spectral = prompt + rng.normal(0, 1.5, N_PROMPTS)
    draws = prompt[None] + rng.normal(0, 1.0, (20, 1)) + rng.normal(0, 1.5, (20, N_PROMPTS))
    return [_arm("spectral", "spectral", 2, [spectral], [{0: 0.6, 2: 0.4}]),
            _arm("random", "random", 2, list(draws), [{1: 0.5, 3: 0.5}] * 20)]


def report(name, counts, n):
    print(f"\n{name}: " + ", ".join(f"{k} PASS {c}/{n} = {c / n:.3f}" for k, c in counts.items())
          + f" (allowance {allowance(n)}/{n} = {allowance(n) / n:.3f})")


@pytest.mark.parametrize("kind, n_sims, seed", [("mixture", 600, 0), ("lognormal", 300, 1)])
def test_equal_effects_pass_at_or_below_the_nominal_rate(kind, n_sims, seed):
    """spectral-1 and the baseline steer equally: neither the difference (one-sided 2.5 %) nor
    the 25 % improvement (stricter) may PASS more often than the nominal rate allows."""
    counts = simulate(n_sims, seed, one_layer(1.0, kind), ("steering_difference", "steering_improvement"))
    report(f"equal effects ({kind})", counts, n_sims)
    assert counts["steering_difference"] <= allowance(n_sims)
    assert counts["steering_improvement"] <= counts["steering_difference"]


def test_an_improvement_of_exactly_25_percent_passes_at_or_below_the_nominal_rate():
    """The least favourable null of 'improves by >= 25 %': a true improvement of exactly 25 %."""
    n_sims = 400
    counts = simulate(n_sims, 2, one_layer(1.25), ("steering_improvement",))
    report("improvement exactly 25 %", counts, n_sims)
    assert counts["steering_improvement"] <= allowance(n_sims)


def test_spectral_equal_to_the_random_average_passes_at_or_below_the_nominal_rate():
    n_sims = 300
    counts = simulate(n_sims, 3, against_random, ("spectral_vs_random",))
    report("spectral = mean of random draws", counts, n_sims)
    assert counts["spectral_vs_random"] <= allowance(n_sims)


def test_the_rule_has_power():
    """Not conservative to uselessness: a true doubling PASSes in most runs."""
    n_sims = 100
    counts = simulate(n_sims, 4, one_layer(2.0), ("steering_improvement", "steering_difference"))
    report("true doubling", counts, n_sims)
    assert counts["steering_improvement"] >= 0.8 * n_sims and counts["steering_difference"] >= 0.9 * n_sims
