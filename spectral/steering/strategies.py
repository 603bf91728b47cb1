"""Where and how hard to steer: the strategies the steering benchmark compares, and the
matched side-effect budget that makes the comparison fair.

A strategy gives a *profile*: relative coefficients per layer. Its strength is then one
scalar, chosen per strategy so that the mean KL divergence on neutral prompts equals the
same budget for every strategy (``match_budget``): no strategy wins by pushing harder.

Strategies are compared at equal numbers of layers (``arms``). With ``L`` layers the spectral
rule uses ``k = ceil(L / 3)``; every k-layer strategy uses the same weight shape (the spectral
rule's weights, assigned in the strategy's own order of preference), so that only *which*
layers differ:

- ``baseline``: ActAdd at one fixed layer given by the user, coefficient 1 (k = 1).
- ``spectral``: from the scan alone, no behavioural search. The ``k`` layers with the smallest
  per-layer minimum gap ("weakest link") are chosen; layer ``l`` gets the relative coefficient
  ``(1 / g_min(l)) / sum_j (1 / g_min(j))`` over the chosen layers, so a smaller gap (a less
  stable layer) takes more of the push. Ties are broken by mean gap, then by layer index.
  ``spectral-1`` is the rule's single weakest layer: the one compared with the 1-layer baseline.
- ``random``: the control of the spectral rule at the same ``k``: ``draws`` (>= 20) seeded
  draws of ``k`` distinct layers, the spectral weights assigned to them in random order; each
  draw is matched to the budget on its own and the row is the mean over draws (``random-1``:
  one random layer per draw).
- ``oracle``: behavioural search, chosen on the *selection* split of the evaluation prompts
  only (``oracle_profile``): every single layer is run at the budget; ``oracle-1`` is the best
  layer, ``oracle`` (k layers) the ``k`` best single layers with the spectral weights assigned
  best first (a greedy top-k, not a search over all k-subsets).
- ``all``: every layer, equal coefficients ``1 / L`` (its own row: k = L).

When ``k = 1`` the 1-layer rows are the k-layer rows (no ``-1`` duplicates).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from spectral.errors import UsageError
from spectral.models.ranges import check_range

STRATEGIES = ("baseline", "oracle", "random", "spectral", "all")

MIN_RANDOM_DRAWS = 20
"""The random control is the mean over at least this many draws (one draw can land on the
baseline's layer, as it did on three organisms)."""


def layer_gaps(scan_rows: Sequence[Mapping]) -> dict[int, tuple[float, float]]:
    """Per layer (min gap, mean gap) over heads with a finite gap, from scan rows."""
    by_layer: dict[int, list[float]] = {}
    for r in scan_rows:
        if r["gap"] is not None and math.isfinite(r["gap"]):
            by_layer.setdefault(int(r["layer"]), []).append(float(r["gap"]))
    if not by_layer:
        raise ValueError("the scan has no finite gap: the spectral strategy cannot choose layers")
    return {l: (min(g), float(np.mean(g))) for l, g in sorted(by_layer.items())}


def spectral_k(n_layers: int) -> int:
    """The spectral rule's number of layers: ``ceil(L / 3)``, at least 1."""
    return max(1, math.ceil(n_layers / 3))


def spectral_profile(gaps: Mapping[int, tuple[float, float]], k: int | None = None) -> dict[int, float]:
    """The spectral-guided rule (module docstring): weakest ``k`` layers, weights ∝ 1 / min gap."""
    n = len(gaps)
    k = k or spectral_k(n)
    chosen = sorted(gaps, key=lambda l: (gaps[l][0], gaps[l][1], l))[:k]
    inv = {l: 1.0 / max(gaps[l][0], 1e-12) for l in chosen}
    total = sum(inv.values())
    return {l: inv[l] / total for l in sorted(chosen)}


@dataclass(frozen=True)
class Arm:
    """One row of the strategies table: a strategy family at ``k`` layers, as one profile per
    draw (several only for the random control)."""

    name: str
    family: str
    k: int
    profiles: tuple[dict[int, float], ...]


def spectral_weights(gaps: Mapping[int, tuple[float, float]], k: int) -> list[float]:
    """The spectral rule's k weights, largest first (the weight shape of every k-layer arm)."""
    return sorted(spectral_profile(gaps, k).values(), reverse=True)


def random_profiles(n_layers: int, weights: Sequence[float], draws: int, seed: int = 0) -> tuple[dict[int, float], ...]:
    """``draws`` seeded draws of ``len(weights)`` distinct layers, each given ``weights`` in a
    random order (draws are independent: two may coincide)."""
    k = len(weights)
    if not 1 <= k <= n_layers:
        raise ValueError(f"cannot draw {k} of {n_layers} layers")
    rng = random.Random(f"eigengap-random:{seed}:{k}")
    out = []
    for _ in range(draws):
        layers = rng.sample(range(n_layers), k)
        w = list(weights)
        rng.shuffle(w)
        out.append(dict(sorted(zip(layers, w))))
    return tuple(out)


def oracle_profile(selection_effects: Mapping[int, float], weights: Sequence[float]) -> dict[int, float]:
    """The oracle at ``len(weights)`` layers: the layers with the largest mean effect on the
    selection split (ties: lower layer first), the largest weight to the best layer."""
    ranked = sorted(selection_effects, key=lambda l: (-selection_effects[l], l))[:len(weights)]
    return dict(sorted(zip(ranked, sorted(weights, reverse=True))))


def arms(n_layers: int, *, baseline_layer: int, gaps: Mapping[int, tuple[float, float]], families: Sequence[str],
         seed: int = 0, draws: int = MIN_RANDOM_DRAWS) -> list[Arm]:
    """Every row of the comparison except the oracle's (chosen later, on the selection split:
    ``oracle_arms``), in report order: the 1-layer arms, then the k-layer arms, then ``all``."""
    check_range("layer", [baseline_layer], n_layers, option="--layer")
    if draws < MIN_RANDOM_DRAWS:
        raise UsageError(f"--random-draws: at least {MIN_RANDOM_DRAWS} draws, got {draws}")
    k = spectral_k(n_layers)
    out = []
    if "baseline" in families:
        out.append(Arm("baseline", "baseline", 1, ({baseline_layer: 1.0},)))
    for size in ([1, k] if k > 1 else [1]):
        suffix = "-1" if size == 1 and k > 1 else ""
        if "spectral" in families:
            out.append(Arm("spectral" + suffix, "spectral", size, (spectral_profile(gaps, size),)))
        if "random" in families:
            out.append(Arm("random" + suffix, "random", size,
                           random_profiles(n_layers, spectral_weights(gaps, size), draws, seed)))
    if "all" in families:
        out.append(Arm("all", "all", n_layers, ({l: 1.0 / n_layers for l in range(n_layers)},)))
    return out


def oracle_arms(n_layers: int, gaps: Mapping[int, tuple[float, float]],
                selection_effects: Mapping[int, float]) -> list[Arm]:
    """The oracle at 1 layer and at the spectral rule's k, from the single layers' mean
    effects on the selection split."""
    k = spectral_k(n_layers)
    return [Arm("oracle" + ("-1" if size == 1 and k > 1 else ""), "oracle", size,
                (oracle_profile(selection_effects, spectral_weights(gaps, size)),))
            for size in ([1, k] if k > 1 else [1])]


def order(rows: Sequence[Arm]) -> list[Arm]:
    """Report order: 1-layer arms (baseline, spectral, random, oracle), then k-layer, then all."""
    rank = {f: i for i, f in enumerate(("baseline", "spectral", "random", "oracle", "all"))}
    return sorted(rows, key=lambda a: (a.family == "all", a.k, rank[a.family]))


def match_budget(kl_of: Callable[[float], float], budget: float, *, start: float = 1.0, max_scale: float = 1e4,
                 tol: float = 0.02, max_steps: int = 40) -> tuple[float, float]:
    """The scale ``s >= 0`` at which ``kl_of(s)`` (mean KL, increasing in s) equals ``budget``
    within ``tol`` relative: bracket by doubling, then bisect. Returns ``(s, kl_of(s))``.
    Raises if even ``max_scale`` stays below the budget (the profile cannot spend it)."""
    if budget <= 0:
        raise ValueError("the side-effect budget must be positive")
    lo, hi = 0.0, start
    kl_hi = kl_of(hi)
    while kl_hi < budget:
        lo, hi = hi, hi * 2
        if hi > max_scale:
            raise ValueError(f"KL stays below the budget {budget} up to scale {max_scale}")
        kl_hi = kl_of(hi)
    best = (hi, kl_hi)
    for _ in range(max_steps):
        if abs(best[1] - budget) <= tol * budget:
            break
        mid = 0.5 * (lo + hi)
        kl_mid = kl_of(mid)
        if kl_mid < budget:
            lo = mid
        else:
            hi = mid
        if abs(kl_mid - budget) < abs(best[1] - budget):
            best = (mid, kl_mid)
    return best
