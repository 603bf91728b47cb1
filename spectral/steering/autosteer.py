"""Automated steering (issue 18, point 3; success metric 5): strategies that choose where and how
hard to steer, each matched to the same side-effect budget and measured on the same prompts, and
the oracle grid they are judged against. ``jobs.autosteer`` runs them; ``analysis.autosteer`` reads
the measurements. This module never decides a verdict.

Every strategy yields an intervention with one free scale; the scale is set so that the mean
KL(unsteered || steered) of the next token over the concept's neutral prompts equals the budget
(``spectral.steering.strategies.match_budget``, 2 % tolerance): no strategy wins by pushing harder.
The evaluation prompts are split once (``analysis.steering.selection_split``, stratified by the
sign of the unsteered score) into a *selection* part, the only prompts any choice may look at, and a
*held-out* part, where every reported effect is measured.

Strategies (``spectral.steering.choices.STRATEGIES``; "the vector" is ``--vector``'s, CAA by default):

- ``oracle`` ("expert selection", the grid): every layer with the vector at the budget, the layer
  with the largest mean effect on the selection prompts. At a fixed budget the coefficient is the
  layer's matched one, so the grid over (layer, coefficient) at the budget is the grid over layers.
- ``probe`` (the system, ``SYSTEM``): a cheap calibration probe: every layer matched to the budget
  on ``probe_prompts`` neutral prompts only, its effect read on ``probe_prompts`` selection prompts;
  the best layer is kept, then matched to the budget on all neutral prompts like every strategy.
- ``probe-k``: the probe's ``k`` best layers (``k = ceil(L / 3)``, the spectral rule's), each at its
  probe-matched scale times a weight proportional to its probe effect (clipped at 0), then one
  common scale matched to the budget (multi-layer weights).
- ``theory``: the layer with the largest first-order predicted effect at the budget
  (``spectral.theory.first_order``) on the selection prompts: one forward-mode pass per layer, no
  steered forward pass.
- ``spectral`` / ``spectral-1``: the spectral rule of ``eigengap steer`` (weakest-link layers of a
  key-kernel scan held out from the evaluation prompts, weights proportional to 1 / min gap).
- ``adaptive``: the probe's layer with a coefficient scaled per prompt by the gaps:
  ``alpha_i = alpha x g_i / g_ref``, ``g_i`` the minimum over the layer's heads of the key-kernel
  gap of prompt i's own (unsteered) keys at that layer, ``g_ref`` the median of it over the neutral
  prompts (issue 17's rule g_t / g_0 for one next token: a prompt whose keys are less separated is
  pushed less).
- baselines at ``--layer`` (default the middle layer), the vector methods a practitioner would try
  first: ``actadd`` (the first contrast pair), ``caa`` (mean difference over the pairs at their last
  token), ``mean-diff`` (the mean difference of the pairs' token-mean residuals: repeng's mean
  aggregator over the whole prompt), ``pca-diff`` (repeng's pca_diff with its sign rule, last token),
  ``iti`` (Li et al. 2023: the top ``iti_heads`` heads of any layer by a probe's held-out accuracy
  on the contrast pairs, shifted by alpha x sigma x direction) and ``random`` (a seeded Gaussian
  direction at the CAA vector's norm at that layer, ``random_draws`` draws, each matched on its own;
  the row is the mean over draws).

Measures per strategy (``measure_strategy``): the scale, the neutral-prompt KL it reached, the
per-prompt effect (change of log P(target set) - log P(opposite set)) on every evaluation prompt
(the analysis reads the held-out ones), the held-out text's loss increase, and the per-prompt
effects at ``MULTIPLIERS`` x the matched scale for the steerability slope and the fraction of
anti-steerable prompts (Tan et al. 2024: a prompt whose effect falls as the multiplier grows).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from spectral.errors import UsageError
from spectral.kernels.key import KeyStats, key_kernel_spectra
from spectral.models.adapter import HeadAdapter
from spectral.steering.choices import MULTIPLIERS
from spectral.steering.concepts import Concept
from spectral.steering.injection import Injection, Positions, add_at
from spectral.steering.measure import Evaluator
from spectral.steering.strategies import match_budget, spectral_k, spectral_profile
from spectral.steering.vectors import Batch

MATCH_TOLERANCE = 0.02
"""``match_budget``'s relative tolerance: every strategy's neutral KL is within 2 % of the budget."""


# ---------------------------------------------------------------------------- interventions
@dataclass(frozen=True)
class RowScaled:
    """``factor_i x coefficient x vector`` added to the residual entering ``layer`` of text i,
    where the per-text factors are fixed per batch (``factors``: pairs of a batch's ``last``
    tensor, identified by identity, and its (n,) factors). Used with the batches it was built for
    only (a KeyError otherwise, never a silent factor 1)."""

    layer: int
    vector: Tensor
    factors: tuple[tuple[Tensor, Tensor], ...]
    coefficient: float = 1.0
    positions: Positions = "all"

    def scaled(self, coefficient: float) -> RowScaled:
        return replace(self, coefficient=coefficient)

    def with_positions(self, positions: Positions) -> RowScaled:
        return replace(self, positions=positions)

    def edits(self, last: Tensor | None = None) -> dict[tuple[int, str], object]:
        found = [f for batch_last, f in self.factors if batch_last is last]
        if not found:
            raise KeyError("RowScaled: no per-text factors for this batch")
        factor = found[0]
        if self.coefficient == 0:
            return {}

        def edit(x: Tensor) -> Tensor:
            delta = (self.coefficient * factor.to(x.device, torch.float64)[:, None]
                     * self.vector.to(x.device, torch.float64)[None]).to(x.dtype)  # (batch, d)
            return add_at(x, delta, self.positions, last)
        return {(self.layer, "resid_pre"): edit}


@torch.no_grad()
def prompt_gaps(adapter: HeadAdapter, batch: Batch, layer: int, ridge: float = 1e-2) -> np.ndarray:
    """(n,) per text: the minimum over ``layer``'s key heads of the key-kernel gap of the text's own
    raw keys (unsteered), the scan's definition (``spectral.kernels.key``: centred, ridge ``ridge``
    absolute, scale 1 / d_head)."""
    group = adapter.n_heads // adapter.n_kv_heads
    kv_first = torch.arange(adapter.n_kv_heads) * group
    keys: dict[str, Tensor] = {}

    def keep(layer_: int, site: str, t: Tensor) -> None:  # (batch, pos, head, d_head)
        keys["k"] = t[:, :, kv_first.to(t.device)]

    with adapter.trace(["keys_raw"], keep, layers=[layer]):
        adapter.model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False)
    n = batch.ids.shape[0]
    stats = KeyStats.zeros(n, adapter.n_kv_heads, adapter.d_head)
    for i in range(n):
        stats.update(i, keys["k"][i:i + 1], batch.mask[i:i + 1].bool())
    return key_kernel_spectra(stats, ridge=ridge).metrics["gap"].min(axis=1)


def adaptive_injection(adapter: HeadAdapter, ev: Evaluator, layer: int, vector: Tensor,
                       positions: Positions) -> tuple[RowScaled, dict]:
    """The ``adaptive`` strategy's intervention at coefficient 1 for the evaluator's batches: per
    text ``g_i / g_ref``, ``g_ref`` the median gap over the neutral prompts; and a summary."""
    batches = [b for b in (ev.prompts, ev.neutral, ev.heldout) if b is not None]
    gaps = [prompt_gaps(adapter, b, layer) for b in batches]
    for b, g in zip(("evaluation prompt", "neutral prompt", "held-out text"), gaps):
        bad = np.flatnonzero(~(np.isfinite(g) & (g > 0)))
        if bad.size:
            raise UsageError(f"adaptive: {b} {int(bad[0])} has key-kernel gap {g[bad[0]]:g} at layer {layer} "
                             "(too few tokens?): the rule alpha_i = alpha x g_i / g_ref needs a positive gap")
    ref = float(np.median(gaps[1]))
    factors = tuple((b.last, torch.as_tensor(g / ref)) for b, g in zip(batches, gaps))
    return (RowScaled(layer, vector, factors, 1.0, positions),
            {"g_ref": ref, "factor_min": float(min(g.min() for g in gaps) / ref),
             "factor_max": float(max(g.max() for g in gaps) / ref)})


# ---------------------------------------------------------------------------- strategies
@dataclass
class Choice:
    """One strategy's choice: what it steers (``make(scale)`` gives the intervention), which
    layers with which relative weights, and what choosing cost."""

    name: str
    family: str
    make: Callable[[float], Any] | None
    layers: dict[int, float]
    description: str
    seconds: float = 0.0
    draws: tuple[Callable[[float], Any], ...] = ()
    """Several interventions whose mean is the row (the random control)."""
    details: dict = field(default_factory=dict)


def vector_maker(vectors: Mapping[int, Tensor], profile: Mapping[int, float], positions: Positions
                 ) -> Callable[[float], Injection]:
    return lambda s: Injection(vectors, {l: c * s for l, c in profile.items()}, positions)


def match(ev: Evaluator, make: Callable[[float], Any], budget: float, name: str) -> tuple[float, float]:
    """(scale, KL) with the neutral mean KL at the budget; a one-line UsageError when out of reach."""
    try:
        return match_budget(lambda s: ev.kl(make(s)), budget, tol=MATCH_TOLERANCE)
    except ValueError as err:
        raise UsageError(f"--kl-budget: {name}: {err}; give a smaller --kl-budget") from None


def sub_concept(concept: Concept, prompts: Sequence[int], neutral: int | None = None) -> Concept:
    """The concept restricted to some evaluation prompts (and the first ``neutral`` neutral
    prompts), without held-out text: what a choice may look at."""
    return replace(concept, prompts=tuple(concept.prompts[i] for i in prompts),
                   neutral=concept.neutral if neutral is None else concept.neutral[:neutral], heldout=())


@dataclass
class LayerSearch:
    """Per layer, the vector matched to the budget on all neutral prompts and measured on every
    evaluation prompt (the oracle's grid); the effects the oracle reads are the selection ones.
    ``dropped``: layers the budget is out of reach for (the reason), left out of every choice."""

    scale: dict[int, float]
    kl: dict[int, float]
    effect: dict[int, np.ndarray]
    seconds: float
    dropped: dict[int, str] = field(default_factory=dict)


def layer_search(ev: Evaluator, vectors: Mapping[int, Tensor], budget: float, positions: Positions) -> LayerSearch:
    """The grid. A layer whose vector is zero (the pairs' residuals agree there, e.g. at layer 0 when
    every pair ends in the same token) or whose KL stays below the budget is dropped with its reason;
    none left is a UsageError."""
    t0 = time.perf_counter()
    scale, kl, effect, dropped = {}, {}, {}, {}
    for l in sorted(vectors):
        if not float(vectors[l].double().norm()) > 0:
            dropped[l] = "the steering vector is zero (the contrast pairs' residuals agree at this layer)"
            continue
        make = vector_maker(vectors, {l: 1.0}, positions)
        try:
            scale[l], kl[l] = match(ev, make, budget, f"layer {l}")
        except UsageError as err:
            dropped[l] = str(err).removeprefix("--kl-budget: ")
            continue
        effect[l] = ev.measure(make(scale[l]), with_loss=False).effect
    if not scale:
        raise UsageError("--kl-budget: no candidate layer can be steered to the budget ("
                         + "; ".join(f"{l}: {why}" for l, why in dropped.items()) + ")")
    return LayerSearch(scale, kl, effect, time.perf_counter() - t0, dropped)


def oracle(search: LayerSearch, vectors, positions, selection: Sequence[int]) -> Choice:
    sel = list(selection)
    means = {l: float(np.mean(e[sel])) for l, e in search.effect.items()}
    best = max(means, key=lambda l: (means[l], -l))
    return Choice("oracle", "oracle", vector_maker(vectors, {best: 1.0}, positions), {best: 1.0},
                  f"the best of {len(means)} layers at the budget on the selection prompts (grid)", search.seconds,
                  details={"selection_effect": means})


def probe(adapter: HeadAdapter, tokenizer, concept: Concept, vectors, budget: float, positions, selection,
          n_probe: int, source: str) -> tuple[Choice, Choice]:
    """The ``probe`` and ``probe-k`` choices (module docstring)."""
    t0 = time.perf_counter()
    small = Evaluator(adapter, tokenizer, sub_concept(concept, list(selection)[:n_probe], n_probe), source)
    scale, effect = {}, {}
    for l in sorted(vectors):
        make = vector_maker(vectors, {l: 1.0}, positions)
        scale[l], _ = match(small, make, budget, f"probe layer {l}")
        effect[l] = float(small.measure(make(scale[l]), with_loss=False).effect.mean())
    best = max(effect, key=lambda l: (effect[l], -l))
    seconds = time.perf_counter() - t0
    k = spectral_k(len(vectors))
    top = sorted(effect, key=lambda l: (-effect[l], l))[:k]
    positive = {l: max(effect[l], 0.0) for l in top}
    total = sum(positive.values())
    weights = {l: (positive[l] / total if total > 0 else 1.0 / k) for l in top}
    profile = {l: weights[l] * scale[l] for l in top}
    details = {"probe_effect": effect, "probe_scale": scale, "n_probe": n_probe}
    return (Choice("probe", "probe", vector_maker(vectors, {best: 1.0}, positions), {best: 1.0},
                   f"the best layer of a {n_probe}-prompt probe at the budget", seconds, details=details),
            Choice("probe-k", "probe", vector_maker(vectors, profile, positions), dict(sorted(weights.items())),
                   f"the probe's {k} best layers, weights proportional to their probe effects", seconds,
                   details=details))


def theory(predicted: Mapping[int, float], vectors, positions, seconds: float) -> Choice:
    """The layer with the largest first-order predicted effect at the budget (``predicted``: per
    layer ``spectral.theory.first_order(...).effect_at_budget`` on the selection prompts, which the
    caller computes: this package does not import the theory's)."""
    finite = {l: v for l, v in predicted.items() if math.isfinite(v)}
    if not finite:
        raise UsageError("theory: the first-order prediction is undefined at every layer (no KL to first order)")
    best = max(finite, key=lambda l: (finite[l], -l))
    return Choice("theory", "theory", vector_maker(vectors, {best: 1.0}, positions), {best: 1.0},
                  "the layer with the largest first-order effect at the budget (docs/THEORY.md)", seconds,
                  details={"predicted_effect": dict(predicted)})


def spectral(gaps: Mapping[int, tuple[float, float]], vectors, positions, seconds: float) -> list[Choice]:
    k = spectral_k(len(vectors))
    out = []
    for size, name in ((k, "spectral"), (1, "spectral-1")):
        profile = spectral_profile(gaps, size)
        out.append(Choice(name, "spectral", vector_maker(vectors, profile, positions), profile,
                          f"the {size} weakest-link layer(s) of the held-out scan, weights 1 / min gap", seconds))
    return out


def summarize(ev: Evaluator, choice: Choice, budget: float, multipliers: Sequence[float] = MULTIPLIERS) -> dict:
    """Match ``choice`` (or each of its draws) to the budget and measure it (module docstring):
    per draw the scale, KL, per-prompt effects, loss increases and effects at the multipliers."""
    makes = choice.draws or (choice.make,)
    draws = []
    for i, make in enumerate(makes):
        t0 = time.perf_counter()
        scale, kl = match(ev, make, budget, choice.name + (f" draw {i}" if choice.draws else ""))
        m = ev.measure(make(scale))
        at = np.stack([m.effect if x == 1.0 else np.zeros_like(m.effect) if x == 0.0
                       else ev.measure(make(x * scale), with_loss=False).effect for x in multipliers])
        draws.append({"scale": scale, "kl": float(np.mean(m.kl)), "effect": m.effect, "loss_increase": m.loss_increase,
                      "multiplier_effects": at, "seconds": time.perf_counter() - t0})
    return {"name": choice.name, "family": choice.family, "layers": choice.layers, "description": choice.description,
            "choice_seconds": choice.seconds, "details": choice.details, "draws": draws}
