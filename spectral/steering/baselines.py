"""Baseline steering methods beside ActAdd and CAA (``spectral.steering.vectors``), in the forms
the steer machinery takes, so each can be matched to a KL budget
(``spectral.steering.strategies.match_budget``) and measured (``spectral.steering.measure``):

- ``mean_difference_vectors``: per layer, the mean over contrast pairs of resid_pre(positive) -
  resid_pre(negative) (the "mean" aggregator of repeng / steering-vectors; at the same read
  position it is CAA).
- ``pca_difference_vectors``: per layer, the first principal component of the pairs'
  differences, as repeng's ``pca_diff`` (``read_representations``): ``sklearn.decomposition.PCA``
  on the difference rows, which *centres* them (subtracts their mean) before the SVD; a unit
  vector. ``centre=False`` gives the uncentred variant (the top right singular vector of the raw
  differences). Sign rule (repeng's): the sign under which more pairs project their positive
  prompt above their negative one (``(pos - neg) . v > 0``); a tie (repeng keeps the SVD's
  arbitrary sign) is broken by the sign making the mean projection of the differences positive.
- ``random_vectors``: per layer, a seeded Gaussian direction scaled to the norm of a reference
  vector of that layer (``random_direction_vectors``: the ActAdd vector's).
- ``fit_iti`` / ``iti``: ITI-style head-level steering (Li et al. 2023, "Inference-Time
  Intervention"): a logistic-regression probe per head on its output ``z`` (the adapter's
  ``result`` site, before the output projection) separating the pairs' positive prompts from
  their negative ones, trained on a split of the pairs and scored by its accuracy on the
  held-out pairs; the top-K heads by held-out accuracy are shifted by ``alpha * sigma *
  direction`` (``HeadInjection``).

Per-layer vectors are ``{layer: (d_model,)}`` dicts like ``caa``'s, for ``Injection``. The
head-level intervention is a ``HeadInjection``: ``edits(last)`` as ``Injection``'s (so
``next_token_logprobs`` and ``Evaluator.kl``/``measure(with_loss=False)`` take it) and
``scaled(alpha)`` for ``match_budget``; ``measure.heldout_loss`` takes it too (through
``with_positions("all")``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from spectral.errors import UsageError
from spectral.models.adapter import HeadAdapter
from spectral.steering.concepts import Concept
from spectral.steering.injection import Positions
from spectral.steering.vectors import Batch, ReadAt, actadd, read_residuals, read_site


# ------------------------------------------------------------------ per-layer vectors
@dataclass(frozen=True)
class Contrast:
    """Each contrast pair's residuals entering each layer, one row per pair."""

    positive: dict[int, Float[Tensor, "pair d_model"]]
    negative: dict[int, Float[Tensor, "pair d_model"]]


def contrast_residuals(adapter: HeadAdapter, tokenizer, pairs: Sequence[tuple[str, str]], layers: Sequence[int],
                       device=None, at: ReadAt = "last") -> Contrast:
    """resid_pre of every pair's positive and of its negative prompt, read ``at`` (as ``caa``)."""
    layers = adapter.check_layers(layers)
    pos = read_residuals(adapter, Batch.of(tokenizer, [p for p, _ in pairs], device, "pairs"), layers, at)
    neg = read_residuals(adapter, Batch.of(tokenizer, [n for _, n in pairs], device, "pairs"), layers, at)
    return Contrast(pos, neg)


def mean_difference(positive: Float[Tensor, "pair d"], negative: Float[Tensor, "pair d"]) -> Float[Tensor, "d"]:
    """The "mean" aggregator: mean over pairs of positive - negative."""
    return (positive - negative).mean(0)


def pca_difference(positive: Float[Tensor, "pair d"], negative: Float[Tensor, "pair d"],
                   centre: bool = True) -> Float[Tensor, "d"]:
    """repeng's ``pca_diff``: the unit first principal component of the rows positive - negative
    (centred when ``centre``, as sklearn's PCA does), signed by the module's sign rule."""
    from sklearn.decomposition import PCA

    diffs = (positive - negative).double().cpu().numpy()  # (pair, d)
    if centre and diffs.shape[0] < 2:
        raise UsageError("PCA of centred differences needs at least 2 contrast pairs (one pair centres to zero)")
    spread = diffs - diffs.mean(0) if centre else diffs
    if not np.any(spread):
        raise UsageError("the contrast pairs' differences are all equal"
                         + (" (centred: zero)" if centre else " to zero") + ": no principal direction")
    if centre:
        direction = PCA(n_components=1, svd_solver="full").fit(diffs).components_[0]
    else:
        direction = np.linalg.svd(diffs, full_matrices=False)[2][0]
    direction = direction / np.linalg.norm(direction)
    proj = diffs @ direction  # (pair,): pos . v - neg . v
    above, below = int((proj > 0).sum()), int((proj < 0).sum())
    if below > above or (below == above and proj.mean() < 0):
        direction = -direction
    return torch.from_numpy(direction).to(positive.device, positive.dtype)


def mean_difference_vectors(adapter, tokenizer, concept: Concept, layers, device=None,
                            at: ReadAt = "last") -> dict[int, Tensor]:
    """Per layer: the mean over the concept's pairs of positive - negative residuals."""
    c = contrast_residuals(adapter, tokenizer, concept.pairs, layers, device, at)
    return {l: mean_difference(c.positive[l], c.negative[l]) for l in c.positive}


def pca_difference_vectors(adapter, tokenizer, concept: Concept, layers, device=None, at: ReadAt = "last",
                           centre: bool = True) -> dict[int, Tensor]:
    """Per layer: repeng's ``pca_diff`` direction of the concept's pairs (unit norm; the
    strength is set by ``match_budget``)."""
    c = contrast_residuals(adapter, tokenizer, concept.pairs, layers, device, at)
    return {l: pca_difference(c.positive[l], c.negative[l], centre) for l in c.positive}


def random_vectors(reference: Mapping[int, Tensor], seed: int = 0) -> dict[int, Tensor]:
    """Per layer: a standard Gaussian direction drawn from ``numpy.random.default_rng([seed,
    layer])`` (float64), scaled to ``reference[layer]``'s norm, in its dtype and device."""
    out = {}
    for layer, ref in reference.items():
        g = np.random.default_rng([seed, layer]).standard_normal(ref.shape[-1])
        v = g / np.linalg.norm(g) * float(ref.double().norm())
        out[layer] = torch.from_numpy(v).to(ref.device, ref.dtype)
    return out


def random_direction_vectors(adapter, tokenizer, concept: Concept, layers, device=None, at: ReadAt = "last",
                             seed: int = 0) -> dict[int, Tensor]:
    """Per layer: a seeded random direction at the norm of that layer's ActAdd vector."""
    return random_vectors(actadd(adapter, tokenizer, concept, layers, device, at), seed)


# ------------------------------------------------------------------ ITI: head-level steering
Direction = Literal["mass-mean", "probe"]
"""ITI's shift direction per head: the difference of the class means of ``z`` (mass mean; the
paper's best) or the probe's weight vector; both normalised to unit length."""
DIRECTIONS: tuple[str, ...] = ("mass-mean", "probe")


@dataclass(frozen=True)
class HeadInjection:
    """``coefficient * shifts[(layer, head)]`` added to that head's output ``z`` (the adapter's
    ``result`` site, before the output projection) at ``positions`` (as ``Injection``)."""

    shifts: Mapping[tuple[int, int], Float[Tensor, "d_head"]]
    coefficient: float = 1.0
    positions: Positions = "all"

    def __post_init__(self):
        if not np.isfinite(self.coefficient):
            raise UsageError(f"ITI coefficient is not finite ({self.coefficient})")

    def scaled(self, coefficient: float) -> HeadInjection:
        """The same heads and shifts at another coefficient (for ``match_budget``)."""
        return replace(self, coefficient=coefficient)

    def with_positions(self, positions: Positions) -> HeadInjection:
        return replace(self, positions=positions)

    def edits(self, last: Tensor | None = None) -> dict[tuple[int, str], object]:
        """Adapter edits of the ``result`` site, one per layer with a shifted head."""
        if self.coefficient == 0:
            return {}
        by_layer: dict[int, dict[int, Tensor]] = {}
        for (layer, head), shift in self.shifts.items():
            by_layer.setdefault(layer, {})[head] = shift

        def make(heads: dict[int, Tensor]):
            index = sorted(heads)
            delta = self.coefficient * torch.stack([heads[h] for h in index])  # (k, d_head)

            def edit(z: Tensor) -> Tensor:  # (batch, pos, head, d_head)
                d = delta.to(z.device, z.dtype)
                z = z.clone()
                if isinstance(self.positions, int):
                    if self.positions < z.shape[1]:
                        z[:, self.positions, index] += d
                elif self.positions == "all" or last is None or z.shape[1] == 1:
                    z[:, :, index] += d
                else:
                    rows = torch.arange(z.shape[0], device=z.device)
                    for i, h in enumerate(index):
                        z[rows, last.to(z.device), h] += d[i]
                return z
            return edit
        return {(layer, "result"): make(heads) for layer, heads in sorted(by_layer.items())}


@dataclass(frozen=True)
class HeadProbe:
    """One head's probe and shift."""

    layer: int
    head: int
    train_accuracy: float
    heldout_accuracy: float
    """Accuracy of the probe on the held-out pairs' prompts (what the top-K ranks by)."""
    heldout_log_loss: float
    """Mean negative log-likelihood of the held-out prompts' labels under the probe (nats): the
    first tie-break of the ranking (few held-out pairs leave many heads at accuracy 1)."""
    direction: Float[Tensor, "d_head"]
    """Unit shift direction (``ItiProbes.direction``), pointing to the positive class."""
    sigma: float
    """Standard deviation (ddof 0) of the training prompts' ``z`` projected on ``direction``."""


@dataclass(frozen=True)
class ItiProbes:
    """Every probed head, in (layer, head) order, and the split they were fitted on."""

    probes: tuple[HeadProbe, ...]
    direction: str
    train_pairs: tuple[int, ...]
    heldout_pairs: tuple[int, ...]

    def top(self, k: int) -> list[HeadProbe]:
        """The ``k`` heads with the highest held-out accuracy (ITI's ranking; ties: lower
        held-out log loss, then higher training accuracy, then lower (layer, head))."""
        if not 1 <= k <= len(self.probes):
            raise UsageError(f"ITI: top-K heads must be 1..{len(self.probes)} (heads probed), got {k}")
        return sorted(self.probes, key=lambda p: (-p.heldout_accuracy, p.heldout_log_loss, -p.train_accuracy,
                                                  p.layer, p.head))[:k]

    def injection(self, k: int, alpha: float = 1.0, positions: Positions = "all") -> HeadInjection:
        """ITI's intervention: ``alpha * sigma * direction`` on each of the top ``k`` heads."""
        return HeadInjection({(p.layer, p.head): p.sigma * p.direction for p in self.top(k)}, alpha, positions)

    def rows(self) -> list[dict]:
        """One row per probed head (for a table)."""
        return [{"layer": p.layer, "head": p.head, "train_accuracy": p.train_accuracy,
                 "heldout_accuracy": p.heldout_accuracy, "heldout_log_loss": p.heldout_log_loss, "sigma": p.sigma}
                for p in self.probes]


def read_head_outputs(adapter: HeadAdapter, batch: Batch, layers: Sequence[int],
                      at: ReadAt = "last") -> dict[int, Float[Tensor, "n head d_head"]]:
    """Each head's output ``z`` (before the output projection) per layer, one row per prompt, at
    ``at`` (last real token, mean over real tokens, or a token index)."""
    return read_site(adapter, batch, layers, "result", at)


def split_pairs(n_pairs: int, heldout_fraction: float = 0.2, seed: int = 0) -> tuple[list[int], list[int]]:
    """Training and held-out pair indices (sorted): a ``numpy.random.default_rng(seed)``
    permutation, its first ``max(1, round(fraction * n))`` entries held out. Pairs are split
    whole, so a pair's two prompts never straddle the split."""
    if not 0 < heldout_fraction < 1:
        raise UsageError(f"ITI: the held-out fraction must lie in (0, 1), got {heldout_fraction}")
    if n_pairs < 2:
        raise UsageError(f"ITI needs at least 2 contrast pairs (one to train, one held out), got {n_pairs}")
    order = np.random.default_rng(seed).permutation(n_pairs)
    n_out = min(n_pairs - 1, max(1, round(heldout_fraction * n_pairs)))
    return sorted(order[n_out:].tolist()), sorted(order[:n_out].tolist())


def _probe_head(x_train: np.ndarray, y_train: np.ndarray, x_out: np.ndarray, y_out: np.ndarray,
                direction: str, seed: int) -> tuple[float, float, float, np.ndarray, float]:
    """(train accuracy, held-out accuracy, held-out log loss, unit direction, sigma) of one head."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    probe = LogisticRegression(max_iter=1000, random_state=seed).fit(x_train, y_train)
    if direction == "probe":
        d = probe.coef_[0].copy()
    else:
        d = x_train[y_train == 1].mean(0) - x_train[y_train == 0].mean(0)
    norm = np.linalg.norm(d)
    if norm == 0:
        raise UsageError(f"ITI: a head's {direction} direction is zero (its outputs do not separate the pairs)")
    d = d / norm
    loss = log_loss(y_out, probe.predict_proba(x_out), labels=probe.classes_)
    return probe.score(x_train, y_train), probe.score(x_out, y_out), loss, d, float(np.std(x_train @ d))


def fit_iti(adapter: HeadAdapter, tokenizer, concept: Concept, layers: Sequence[int] | None = None, *,
            direction: Direction = "mass-mean", heldout_fraction: float = 0.2, seed: int = 0, device=None,
            at: ReadAt = "last") -> ItiProbes:
    """A probe per head of ``layers`` (all when None) on ``z`` read ``at`` each pair's prompts,
    positive prompts labelled 1 and negative 0: ``sklearn.linear_model.LogisticRegression``
    (``max_iter=1000``, ``random_state=seed``, unstandardised float64 ``z``) fitted on the
    training pairs (``split_pairs``), scored on the held-out pairs (accuracy, then log loss to
    break ties: ``ItiProbes.top``). The direction and sigma use the training pairs only (ITI's
    code uses every example for them; here the held-out pairs serve only the score that ranks
    heads)."""
    if direction not in DIRECTIONS:
        raise UsageError(f"ITI direction: expected one of {', '.join(DIRECTIONS)}, got {direction!r}")
    layers = adapter.check_layers(layers)
    train, held = split_pairs(len(concept.pairs), heldout_fraction, seed)
    pos = read_head_outputs(adapter, Batch.of(tokenizer, [p for p, _ in concept.pairs], device, "pairs"), layers, at)
    neg = read_head_outputs(adapter, Batch.of(tokenizer, [n for _, n in concept.pairs], device, "pairs"), layers, at)

    def xy(l: int, h: int, idx: list[int]) -> tuple[np.ndarray, np.ndarray]:
        x = torch.cat([pos[l][idx, h], neg[l][idx, h]]).double().cpu().numpy()  # (2 * pairs, d_head)
        return x, np.r_[np.ones(len(idx)), np.zeros(len(idx))]

    probes = []
    for l in layers:
        for h in range(adapter.n_heads):
            tr_acc, out_acc, loss, d, sigma = _probe_head(*xy(l, h, train), *xy(l, h, held), direction, seed)
            probes.append(HeadProbe(l, h, float(tr_acc), float(out_acc), float(loss), torch.from_numpy(d).float(),
                                    sigma))
    return ItiProbes(tuple(probes), direction, tuple(train), tuple(held))


def iti(adapter: HeadAdapter, tokenizer, concept: Concept, k: int, alpha: float = 1.0, *,
        layers: Sequence[int] | None = None, direction: Direction = "mass-mean", positions: Positions = "all",
        heldout_fraction: float = 0.2, seed: int = 0, device=None, at: ReadAt = "last") -> HeadInjection:
    """ITI: probes fitted by ``fit_iti``, the top ``k`` heads shifted by ``alpha * sigma * direction``."""
    probes = fit_iti(adapter, tokenizer, concept, layers, direction=direction, heldout_fraction=heldout_fraction,
                     seed=seed, device=device, at=at)
    return probes.injection(k, alpha, positions)
