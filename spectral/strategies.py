"""Where and how hard to steer: the strategies the steering benchmark compares, and the
matched side-effect budget that makes the comparison fair.

A strategy gives a *profile*: relative coefficients per layer. Its strength is then one
scalar, chosen per strategy so that the mean KL divergence on neutral prompts equals the
same budget for every strategy (``match_budget``): no strategy wins by pushing harder.

- ``baseline``: ActAdd at one fixed layer given by the user, coefficient 1.
- ``random``: one layer drawn with a seeded generator.
- ``spectral``: from the scan alone, no behavioural search. The ``k = ceil(L / 3)`` layers
  with the smallest per-layer minimum gap ("weakest link") are chosen; layer ``l`` gets the
  relative coefficient ``(1 / g_min(l)) / sum_j (1 / g_min(j))`` over the chosen layers, so a
  smaller gap (a less stable layer) takes more of the push. Ties are broken by mean gap,
  then by layer index.
- ``all``: every layer, equal coefficients ``1 / L``.
- ``oracle``: exhaustive search: every single layer at the budget (and the grid of layers x
  coefficients); the best layer by mean effect is the expert's choice.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from spectral.errors import UsageError

STRATEGIES = ("baseline", "oracle", "random", "spectral", "all")


def layer_gaps(scan_rows: Sequence[Mapping]) -> dict[int, tuple[float, float]]:
    """Per layer (min gap, mean gap) over heads with a finite gap, from scan rows."""
    by_layer: dict[int, list[float]] = {}
    for r in scan_rows:
        if r["gap"] is not None and math.isfinite(r["gap"]):
            by_layer.setdefault(int(r["layer"]), []).append(float(r["gap"]))
    if not by_layer:
        raise ValueError("the scan has no finite gap: the spectral strategy cannot choose layers")
    return {l: (min(g), float(np.mean(g))) for l, g in sorted(by_layer.items())}


def spectral_profile(gaps: Mapping[int, tuple[float, float]], k: int | None = None) -> dict[int, float]:
    """The spectral-guided rule (module docstring): weakest ``k`` layers, weights ∝ 1 / min gap."""
    n = len(gaps)
    k = k or max(1, math.ceil(n / 3))
    chosen = sorted(gaps, key=lambda l: (gaps[l][0], gaps[l][1], l))[:k]
    inv = {l: 1.0 / max(gaps[l][0], 1e-12) for l in chosen}
    total = sum(inv.values())
    return {l: inv[l] / total for l in sorted(chosen)}


def profiles(n_layers: int, *, baseline_layer: int, gaps: Mapping[int, tuple[float, float]] | None, seed: int = 0,
             spectral_k: int | None = None) -> dict[str, dict[int, float]]:
    """Relative per-layer coefficients of every non-search strategy."""
    if not 0 <= baseline_layer < n_layers:
        raise UsageError(f"--layer: layer {baseline_layer} out of range (the model has layers 0..{n_layers - 1})")
    out = {"baseline": {baseline_layer: 1.0},
           "random": {random.Random(seed).randrange(n_layers): 1.0},
           "all": {l: 1.0 / n_layers for l in range(n_layers)}}
    if gaps is not None:
        out["spectral"] = spectral_profile(gaps, spectral_k)
    return out


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
