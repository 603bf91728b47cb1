"""SAE features and steering (issue 16, point 4): which features of a head's (or a layer's heads')
result predict how far ActAdd moves a prompt, and steering along the features chosen for a concept
against ActAdd at the same side-effect budget.

Everything is measured as the ``steer`` job measures it, with its own pieces
(``spectral.steering``): the concept's ``Evaluator`` (effect = change of ``log P(target) - log
P(opposite)`` at each evaluation prompt's next token; side effect = mean KL on the neutral prompts),
the ActAdd vector read at the first contrast pair's last token (``read_at``), an ``Injection`` into
the residual stream entering block ``layer`` (``resid_pre``) at ``positions`` ('all' by default, as
the job), and ``match_budget`` for the scale at which the mean neutral KL equals ``kl_budget``.

Where features are read (``READ_POSITION``): the unsteered model's result ``z`` (before ``W_O``) at
each evaluation prompt's last real token, the position whose next-token prediction the effect is
measured on. A head SAE reads ``z[head]`` (d_head); a layer SAE (``head=None``) reads every head's
``z`` concatenated in head order (heads x d_head), as ``spectral.saes.splice``.

``feature_steerability``: per tested feature, the Spearman of its activation with the per-prompt
ActAdd effect over the chosen evaluation prompts (all by default: nothing is selected on them), the
two-sided p of the t approximation (as ``scipy.stats.spearmanr``), and Benjamini-Hochberg adjusted
p over every tested feature of every SAE (``CORRECTION``). Dead features (never active on those
prompts) are skipped and counted.

``feature_aware_steering``: the features are chosen on the *selection* split only (``select``:
the ``m`` features with the largest |standardised mean difference| between the selection prompts
whose unsteered score is positive and those where it is negative, the steer job's strata); the
direction is ``sum_i sign_i (raw decoder row_i) @ W_O[head]`` (a layer SAE's row split per head,
each block through its head's ``W_O``, summed; the out-projection bias is no direction and is left
out), rescaled to the ActAdd vector's norm (so scales are comparable; the budget fixes the strength
anyway), injected where ActAdd at the SAE's layer is, matched to the same budget. Both arms are
measured on every evaluation prompt; ``analysis.sae_steering`` reports the held-out split with the
steer job's intervals (the analysis layer owns them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np
import torch
from jaxtyping import Float
from scipy import stats
from torch import Tensor

from spectral.errors import UsageError
from spectral.models.adapter import HeadAdapter
from spectral.saes.metrics import TopKSAE
from spectral.steering.injection import Injection, Positions
from spectral.steering.measure import Evaluator, Measurement
from spectral.steering.strategies import match_budget
from spectral.steering.vectors import Batch, ReadAt, actadd

if TYPE_CHECKING:
    from spectral.steering.concepts import Concept

READ_POSITION = "each evaluation prompt's last real token (the next-token prediction the effect is read on)"
CORRECTION = ("Benjamini-Hochberg over every tested feature of every SAE (false discovery rate 0.05): a screen "
              "of hundreds to thousands of features wants a list of which to trust at a known error rate; Holm's "
              "family-wise control has almost no power at that many tests")
FDR = 0.05
"""Adjusted p below this: significant."""
FEATURES = 4
"""``m``: features chosen for a concept (``select``)."""
MIN_PER_CLASS = 2
"""Selection prompts needed on each side (unsteered score > 0 and <= 0) for a standardised difference."""


class SAEEntry(NamedTuple):
    """An SAE and the site it reads: ``head`` None for a layer SAE over all heads' z."""

    layer: int
    head: int | None
    sae: TopKSAE


class SplitLike(Protocol):
    """The steer job's split of the evaluation prompts (``analysis.steering.Split``)."""

    selection: Sequence[int]
    heldout: Sequence[int]


# ---------------------------------------------------------------------------- checks and sites
def check_entry(adapter: HeadAdapter, name: str, entry) -> SAEEntry:
    """The entry as an ``SAEEntry``, its layer, head and width checked against the model."""
    try:
        layer, head, sae = entry
    except (TypeError, ValueError):
        raise UsageError(f"SAE {name!r}: expected (layer, head or None, TopKSAE)") from None
    if not isinstance(sae, TopKSAE):
        raise UsageError(f"SAE {name!r}: expected a TopKSAE, got {type(sae).__name__}")
    adapter.check_layers([layer])
    if head is not None:
        adapter.check_heads([head])
    d_in = adapter.d_head if head is not None else adapter.n_heads * adapter.d_head
    if sae.d_in != d_in:
        what = f"head {head}'s result" if head is not None else f"layer {layer}'s heads' results"
        raise UsageError(f"SAE {name!r} reads d_in={sae.d_in}; {what} has {d_in} dimensions")
    return SAEEntry(int(layer), None if head is None else int(head), sae)


def site_inputs(z: Float[Tensor, "n head d_head"], head: int | None) -> Float[Tensor, "n d_in"]:
    """What an SAE reads from a layer's results: one head's z, or all heads' z in head order."""
    return z[:, head] if head is not None else z.flatten(1)


def z_to_residual(adapter: HeadAdapter, layer: int, head: int | None,
                  z: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_model"]:
    """z-space vectors through ``W_O``: ``z @ W_O[head]`` for a head, ``sum_h z_h @ W_O[h]`` over
    the per-head blocks of a layer vector (no out-projection bias)."""
    _, wo = adapter.ov_weights(layer)  # (head, d_head, d_model)
    wo = wo.detach().float().to(z.device)
    if head is not None:
        return z.float() @ wo[head]
    return z.float() @ wo.flatten(0, 1)  # (heads * d_head, d_model), head-major as the blocks


def residual_direction(adapter: HeadAdapter, entry: SAEEntry, features: Sequence[int],
                       signs: Sequence[float]) -> Float[Tensor, " d_model"]:
    """``sum_i sign_i (raw decoder row_i) @ W_O``: what the features write to the residual stream."""
    raw = entry.sae.raw_decoder().detach().float()  # (d_sae, d_in), model units
    z = (torch.as_tensor(list(signs), dtype=raw.dtype)[:, None] * raw[list(features)]).sum(0)
    return z_to_residual(adapter, entry.layer, entry.head, z)


@torch.no_grad()
def last_token_results(adapter: HeadAdapter, batch: Batch, layers: Sequence[int]) -> dict[int, Tensor]:
    """Per layer the unsteered result z at each prompt's last real token: (n, head, d_head), one pass."""
    out: dict[int, Tensor] = {}
    rows = torch.arange(batch.ids.shape[0], device=batch.ids.device)

    def keep(layer, site, z):  # z: (batch, pos, head, d_head)
        out[layer] = z[rows, batch.last.to(z.device)].detach().float().clone()

    with adapter.trace(["result"], keep, layers=sorted(set(layers))):
        adapter.model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False)
    return out


def feature_activations(adapter: HeadAdapter, batch: Batch, saes: Mapping[str, SAEEntry]) -> dict[str, np.ndarray]:
    """Per SAE its features' activations (n_prompts, d_sae) at ``READ_POSITION``, one forward pass."""
    z = last_token_results(adapter, batch, [e.layer for e in saes.values()])
    out = {}
    for name, e in saes.items():
        x = site_inputs(z[e.layer], e.head)
        sae = e.sae.to(x.device)
        out[name] = sae.encode(sae.normalise(x)).cpu().numpy().astype(np.float64)
    return out


# ---------------------------------------------------------------------------- steering at the budget
@dataclass(frozen=True)
class ArmRun:
    """One steering vector at the budget, measured on every prompt of the concept."""

    name: str
    layer: int
    """Added to the residual stream entering this block (``resid_pre``)."""
    positions: Positions
    budget: float
    scale: float
    """Coefficient on the vector at which the mean neutral KL meets the budget."""
    effect: np.ndarray
    """(n_prompts,) per evaluation prompt."""
    kl: np.ndarray
    """(n_neutral,) per neutral prompt."""
    loss_increase: np.ndarray
    """(n_heldout,) per held-out text (empty without held-out text)."""
    vector: Tensor = field(repr=False)
    """(d_model,) the unscaled vector added at ``resid_pre`` of its layer."""


def at_budget(ev: Evaluator, name: str, layer: int, vector: Tensor, budget: float, positions: Positions) -> ArmRun:
    """``vector`` at ``layer`` scaled to the budget (``match_budget``, as the steer job's ``steer_unit``)."""
    vectors = {layer: vector}

    def injection(scale: float) -> Injection:
        return Injection(vectors, {layer: scale}, positions)

    try:
        scale, _ = match_budget(lambda s: ev.kl(injection(s)), budget)
    except ValueError as err:
        raise UsageError(f"--kl-budget: {name}: {err}; give a smaller --kl-budget") from None
    m: Measurement = ev.measure(injection(scale))
    return ArmRun(name, int(layer), positions, float(budget), float(scale), m.effect, m.kl, m.loss_increase, vector)


def actadd_vector(ev: Evaluator, layer: int, read_at: ReadAt) -> Tensor:
    """ActAdd's vector at ``layer`` (the concept's first contrast pair, read at ``read_at``)."""
    device = ev.adapter.model.get_input_embeddings().weight.device
    return actadd(ev.adapter, ev.tokenizer, ev.concept, [layer], device, read_at)[layer]


def actadd_at_budget(ev: Evaluator, layer: int, kl_budget: float, *, positions: Positions = "all",
                     read_at: ReadAt = "last", reuse: ArmRun | None = None) -> ArmRun:
    """ActAdd at ``layer`` matched to the budget; ``reuse``: one measured before (one ActAdd per
    layer serves every SAE there), checked to be that layer, budget and positions."""
    if reuse is not None:
        if (reuse.layer, reuse.budget, reuse.positions) != (layer, kl_budget, positions):
            raise UsageError(f"the ActAdd run passed is at layer {reuse.layer}, budget {reuse.budget}, positions "
                             f"{reuse.positions!r}; needed layer {layer}, budget {kl_budget}, positions {positions!r}")
        return reuse
    return at_budget(ev, f"actadd at layer {layer}", layer, actadd_vector(ev, layer, read_at), kl_budget, positions)


def evaluator_for(loaded, concept: Concept, evaluator: Evaluator | None) -> Evaluator:
    if evaluator is not None:
        if evaluator.concept != concept:
            raise UsageError("the evaluator passed measures another concept")
        return evaluator
    return Evaluator(HeadAdapter(loaded.model), loaded.tokenizer, concept)


def _check_budget(kl_budget: float) -> None:
    if not (np.isfinite(kl_budget) and kl_budget > 0):
        raise UsageError(f"--kl-budget must be a positive number, got {kl_budget}")


# ---------------------------------------------------------------------------- which features predict it
@dataclass(frozen=True)
class Steerability:
    """``feature_steerability``'s result."""

    model: str
    layer: int
    """ActAdd's layer."""
    actadd: ArmRun
    prompts: tuple[int, ...]
    """Evaluation prompts correlated over (indices into the concept's prompts)."""
    activations: dict[str, np.ndarray] = field(repr=False)
    """SAE name -> (len(prompts), d_sae) activations at ``READ_POSITION``."""
    rows: list[dict] = field(repr=False)
    """One per tested feature (``spectral.tables.SAE_STEERABILITY``), smallest p first."""
    dead: dict[str, int]
    """SAE name -> features never active on ``prompts`` (not tested)."""

    @property
    def effect(self) -> np.ndarray:
        return self.actadd.effect[list(self.prompts)]


def spearman_many(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spearman rho of each column of ``x`` (n, f) with ``y`` (n,) (average ranks) and the two-sided
    p of ``t = rho sqrt((n-2)/(1-rho^2))`` on n-2 df (``scipy.stats.spearmanr``'s); NaN for a
    constant column."""
    n = len(y)
    rx = stats.rankdata(x, axis=0)
    ry = stats.rankdata(y)
    rx, ry = rx - rx.mean(0), ry - ry.mean()
    den = np.sqrt((rx * rx).sum(0) * (ry * ry).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(den > 0, (rx * ry[:, None]).sum(0) / np.where(den > 0, den, 1.0), np.nan)
        rho = np.clip(rho, -1.0, 1.0)
        t = rho * np.sqrt((n - 2) / np.maximum(1.0 - rho * rho, 1e-300))
    return rho, np.where(np.isfinite(rho), 2 * stats.t.sf(np.abs(t), n - 2), np.nan)


def correlation_rows(effect: np.ndarray, activations: Mapping[str, np.ndarray],
                     sites: Mapping[str, tuple[int, int | None]], *, alpha: float = FDR) -> tuple[list[dict], dict]:
    """Per live feature of every SAE: Spearman with ``effect``, p, BH-adjusted p over all of them,
    significant; and the dead count per SAE. ``sites``: SAE name -> (layer, head); a row's head is
    -1 for a layer SAE (as ``spectral.tables.SAES``)."""
    effect = np.asarray(effect, dtype=float)
    if effect.ndim != 1 or len(effect) < 3 or not np.all(np.isfinite(effect)):
        raise UsageError(f"feature steerability needs at least 3 finite per-prompt effects, got {effect.shape}")
    rows, dead = [], {}
    for name, acts in activations.items():
        acts = np.asarray(acts, dtype=float)
        if acts.shape[0] != len(effect):
            raise UsageError(f"SAE {name!r}: {acts.shape[0]} prompts of activations for {len(effect)} effects")
        live = np.flatnonzero((acts != 0).any(0))
        dead[name] = int(acts.shape[1] - live.size)
        rho, p = spearman_many(acts[:, live], effect)
        layer, head = sites[name]
        for j, f in enumerate(live):
            rows.append(dict(sae=name, layer=layer, head=-1 if head is None else head, feature=int(f),
                             d_sae=int(acts.shape[1]), n_dead=dead[name], n_prompts=len(effect),
                             n_active=int((acts[:, f] != 0).sum()), mean_activation=float(acts[:, f].mean()),
                             spearman=float(rho[j]), p_value=float(p[j])))
    ps = np.array([r["p_value"] for r in rows])
    tested = np.isfinite(ps)
    adjusted = np.full(ps.shape, np.nan)
    if tested.any():
        adjusted[tested] = stats.false_discovery_control(ps[tested], method="bh")
    for r, q in zip(rows, adjusted):
        r.update(p_adjusted=float(q), significant=bool(q < alpha), n_tests=int(tested.sum()), correction=CORRECTION)
    rows.sort(key=lambda r: (not np.isfinite(r["p_value"]), r["p_value"], r["sae"], r["feature"]))
    return rows, dead


def feature_steerability(loaded, saes: Mapping[str, tuple], concept: Concept, *, layer: int, kl_budget: float,
                         prompts: Sequence[int] | None = None, positions: Positions = "all", read_at: ReadAt = "last",
                         alpha: float = FDR, evaluator: Evaluator | None = None,
                         actadd: ArmRun | None = None) -> Steerability:
    """Which SAE features' activations (unsteered, at ``READ_POSITION``) rank the evaluation prompts
    as ActAdd at ``layer``, matched to ``kl_budget``, moves them (module docstring).
    ``saes``: name -> (layer, head or None, TopKSAE); ``prompts``: indices of the evaluation prompts
    to correlate over (default all; e.g. the steer job's held-out split); ``actadd``: ActAdd at
    ``layer`` measured before (``actadd_at_budget``), reused."""
    if not saes:
        raise UsageError("feature steerability: no SAE given")
    _check_budget(kl_budget)
    ev = evaluator_for(loaded, concept, evaluator)
    adapter = ev.adapter
    adapter.check_layers([layer])
    entries = {name: check_entry(adapter, name, e) for name, e in saes.items()}
    n = len(concept.prompts)
    chosen = tuple(range(n)) if prompts is None else tuple(int(i) for i in prompts)
    if len(chosen) < 3 or not all(0 <= i < n for i in chosen):
        raise UsageError(f"feature steerability: prompts must be at least 3 indices in 0..{n - 1}")
    arm = actadd_at_budget(ev, layer, kl_budget, positions=positions, read_at=read_at, reuse=actadd)
    acts = {k: a[list(chosen)] for k, a in feature_activations(adapter, ev.prompts, entries).items()}
    rows, dead = correlation_rows(arm.effect[list(chosen)], acts, {k: (e.layer, e.head) for k, e in entries.items()},
                                  alpha=alpha)
    model = loaded.spec.text
    common = dict(model=model, steer_layer=int(layer), kl_budget=float(kl_budget), scale=arm.scale,
                  kl=float(arm.kl.mean()), position=READ_POSITION)
    rows = [{**common, **r} for r in rows]
    return Steerability(model, int(layer), arm, chosen, acts, rows, dead)


# ---------------------------------------------------------------------------- feature-aware steering
@dataclass(frozen=True)
class Selection:
    """Features chosen for a concept on the selection split."""

    features: tuple[int, ...]
    signs: tuple[int, ...]
    """+1: more active where the unsteered score is positive (added), -1: where negative (subtracted)."""
    separation: tuple[float, ...]
    """Their standardised mean differences (positive - negative prompts, pooled SD)."""
    n_positive: int
    n_negative: int


def select(acts: np.ndarray, positive: np.ndarray, m: int = FEATURES) -> Selection:
    """The ``m`` features with the largest |standardised mean difference| between ``positive`` and
    the other prompts (``(mean_pos - mean_neg) / pooled SD``, ddof 1; features with SD 0 are not
    candidates); ties by feature index. Fewer when fewer are candidates; none is a UsageError."""
    acts, positive = np.asarray(acts, dtype=float), np.asarray(positive, dtype=bool)
    a, b = acts[positive], acts[~positive]
    if len(a) < MIN_PER_CLASS or len(b) < MIN_PER_CLASS:
        raise UsageError(f"feature selection needs {MIN_PER_CLASS} selection prompts with a positive and with a "
                         f"non-positive unsteered score; got {len(a)} and {len(b)}")
    pooled = np.sqrt(((len(a) - 1) * a.var(0, ddof=1) + (len(b) - 1) * b.var(0, ddof=1)) / (len(a) + len(b) - 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(pooled > 0, (a.mean(0) - b.mean(0)) / np.where(pooled > 0, pooled, 1.0), np.nan)
    candidates = np.flatnonzero(np.isfinite(d) & (d != 0))
    if candidates.size == 0:
        raise UsageError("no SAE feature separates the selection prompts (every feature is constant on them)")
    top = candidates[np.lexsort((candidates, -np.abs(d[candidates])))][:m]
    return Selection(tuple(int(f) for f in top), tuple(int(np.sign(d[f])) for f in top),
                     tuple(float(d[f]) for f in top), int(len(a)), int(len(b)))


@dataclass(frozen=True)
class FeatureSteering:
    """``feature_aware_steering``'s result: both arms on every evaluation prompt."""

    model: str
    sae: str
    layer: int
    head: int | None
    kl_budget: float
    selection_split: tuple[int, ...]
    heldout: tuple[int, ...]
    chosen: Selection
    cosine: float
    """Cosine of the feature direction with the ActAdd vector at the layer."""
    feature: ArmRun
    actadd: ArmRun

    def difference(self) -> np.ndarray:
        """Per held-out prompt: feature-aware effect - ActAdd effect."""
        h = list(self.heldout)
        return self.feature.effect[h] - self.actadd.effect[h]


def _check_split(split: SplitLike, n: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    sel, held = tuple(int(i) for i in split.selection), tuple(int(i) for i in split.heldout)
    if set(sel) & set(held) or not all(0 <= i < n for i in sel + held) or len(held) < 2:
        raise UsageError(f"the split must be disjoint selection / held-out indices in 0..{n - 1}, "
                         "with at least 2 held out")
    return sel, held


def feature_aware_steering(loaded, sae_entry: tuple, concept: Concept, *, kl_budget: float, split: SplitLike,
                           name: str = "sae", m: int = FEATURES, positions: Positions = "all",
                           read_at: ReadAt = "last", evaluator: Evaluator | None = None,
                           actadd: ArmRun | None = None) -> FeatureSteering:
    """Steer along the decoder directions of the concept's features (chosen on ``split.selection``)
    through ``W_O`` vs ActAdd at the SAE's layer, both at ``kl_budget`` (module docstring).
    ``split``: the steer job's split (``analysis.steering.selection_split`` stratified by the sign
    of the unsteered score); ``actadd``: ActAdd at the SAE's layer measured before, reused."""
    _check_budget(kl_budget)
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise UsageError(f"m (features to steer along) must be a positive integer, got {m!r}")
    ev = evaluator_for(loaded, concept, evaluator)
    entry = check_entry(ev.adapter, name, sae_entry)
    sel, held = _check_split(split, len(concept.prompts))
    acts = feature_activations(ev.adapter, ev.prompts, {name: entry})[name]
    positive = (ev.base_score > 0).cpu().numpy()
    chosen = select(acts[list(sel)], positive[list(sel)], m)
    plain = actadd_at_budget(ev, entry.layer, kl_budget, positions=positions, read_at=read_at, reuse=actadd)
    base = plain.vector
    direction = residual_direction(ev.adapter, entry, chosen.features, chosen.signs).to(base.device)
    norm = float(direction.norm())
    if not norm > 0:
        raise UsageError(f"SAE {name!r}: the chosen features' directions sum to zero through W_O")
    direction = direction * (float(base.norm()) / norm)
    cosine = float(torch.nn.functional.cosine_similarity(direction, base.float(), dim=0))
    feature = at_budget(ev, f"features of {name}", entry.layer, direction, kl_budget, positions)
    return FeatureSteering(loaded.spec.text, name, entry.layer, entry.head, float(kl_budget), sel, held, chosen,
                           cosine, feature, plain)
