"""Metrics of a TopK sparse autoencoder on attention-head results (issue 16, point 2).

The SAE is plain tensors (:class:`TopKSAE`), so an SAE from any trainer can be measured. Its
encode is SAELens 6's ``TopKSAE.encode``: ``pre = (x - b_dec) @ W_enc + b_enc`` (``b_dec``
subtracted when ``apply_b_dec_to_input``, SAELens's default), keep the ``k`` largest entries of
``pre``, ReLU the kept values, zero the rest; decode is ``f @ W_dec + b_dec``. SAELens's
``rescale_acts_by_decoder_norm`` is not modelled: fold it into the weights first (SAELens folds
it when it saves an SAE). Inputs are normalised before the SAE, ``x_n = (x - mean) / scale``
(``scale`` a number or one per input dimension); every reconstruction metric below is taken in
that normalised space (the CE splice, ``spectral.saes.splice``, maps them back to the model's units).

Definitions (``n`` evaluation tokens, ``f`` the feature activations, ``W_i`` decoder row ``i``):

- ``l0``: mean number of non-zero features per token (at most ``k``).
- ``fvu``: fraction of variance unexplained, ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``.
- ``density``: per feature, the fraction of tokens on which it is non-zero. Dead: never fires on
  the evaluation tokens (``density == 0``); dense: ``density > DENSE_THRESHOLD`` (10 %).
  The histogram bins ``log10(density)`` of the live features on ``LOG_DENSITY_EDGES``.
- superposition index: ``features_90 / components_90``. ``components_90``: principal components
  of the inputs needed for ``EV_TARGET`` (90 %) of their variance. ``features_90``: features,
  taken in decreasing order of their reconstruction energy ``sum_t f_ti^2 * ||W_i||^2`` (ties
  by index), needed before the reconstruction from those features alone (plus ``b_dec``)
  first explains 90 % of the variance. That curve is exact, from streamed sums
  (``c_i = sum_t f_ti (x_t - b_dec).W_i``, ``G_ij = sum_t f_ti f_tj``), at ``d_sae^2`` float64s
  of memory (``pairs=False`` skips it).
- feature dimensionality (Elhage et al. 2022): ``D_i = ||W_i||^2 / sum_j (W_i_hat . W_j)^2``
  over decoder rows, ``W_i_hat = W_i / ||W_i||``; NaN for a zero row.
- EV-L0 area: trapezoid of explained variance (``1 - fvu``) over ``log2(l0)`` across SAEs of one
  input at different ``k``, divided by the ``log2(l0)`` range: the mean explained variance
  over that range (comparable between sweeps of the same ``k`` grid).
- head attribution (layer SAE, input = the layer's heads' results concatenated): per feature,
  the norms of its decoder row's per-head blocks, normalised to sum 1; its entropy
  ``-sum_h a_h ln a_h`` (nats; 0 = one head, ``ln(heads)`` = spread evenly).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from spectral.errors import UsageError

DENSE_THRESHOLD = 0.1
"""A feature firing on more than this fraction of tokens is dense."""
EV_TARGET = 0.9
"""Explained-variance level of the superposition index."""
LOG_DENSITY_EDGES = np.arange(-10.0, 0.25, 0.5)
"""Bin edges of the log10 feature-density histogram (density 1e-10 .. 1)."""


# ------------------------------------------------------------------------------------- the SAE
@dataclass(frozen=True)
class TopKSAE:
    """A TopK SAE as plain tensors (numpy arrays are converted)."""

    W_enc: Float[Tensor, "d_in d_sae"]
    b_enc: Float[Tensor, " d_sae"]
    W_dec: Float[Tensor, "d_sae d_in"]
    b_dec: Float[Tensor, " d_in"]
    k: int
    mean: Float[Tensor, " d_in"] | None = None
    """Per-input normalisation: subtracted before the SAE (None: 0)."""
    scale: Tensor | float = 1.0
    """Per-input normalisation: divides after the mean (a number or one per input dimension)."""
    apply_b_dec_to_input: bool = True

    def __post_init__(self):
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "mean", "scale"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, torch.as_tensor(value))
        if self.W_enc.ndim != 2:
            raise UsageError(f"SAE: W_enc must be (d_in, d_sae); got shape {tuple(self.W_enc.shape)}")
        d_in, d_sae = self.W_enc.shape
        expected = {"b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
        if self.mean is not None:
            expected["mean"] = (d_in,)
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise UsageError(f"SAE: {name} has shape {tuple(getattr(self, name).shape)}; "
                                 f"expected {shape} (d_in={d_in}, d_sae={d_sae})")
        if tuple(self.scale.shape) not in ((), (d_in,)):
            raise UsageError(f"SAE: scale must be a number or ({d_in},); got shape {tuple(self.scale.shape)}")
        if not bool(torch.all(torch.isfinite(self.scale) & (self.scale > 0))):
            raise UsageError("SAE: scale must be finite and positive")
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)) or not 1 <= self.k <= d_sae:
            raise UsageError(f"SAE: k must be an integer in 1..d_sae={d_sae}; got {self.k!r}")

    @classmethod
    def from_folded(cls, W_enc, b_enc, W_dec, b_dec, k: int, mean, scale,
                    apply_b_dec_to_input: bool = True) -> TopKSAE:
        """The normalised-space SAE behind weights that read raw inputs, with ``(x - mean) /
        scale`` folded in as SAELens's ``fold_activation_whitening(mean, diag(1 / scale))``
        does (``W_enc' = W_enc / scale``, ``W_dec' = W_dec * scale``, ``b_dec' = b_dec * scale +
        mean``, and ``b_enc' = b_enc - mean @ W_enc'`` without ``apply_b_dec_to_input``)."""
        f = cls(W_enc, b_enc, W_dec, b_dec, k, mean, scale, apply_b_dec_to_input)  # checks the shapes
        if f.mean is None:
            raise UsageError("SAE: from_folded needs the folded mean")
        b_enc = f.b_enc if apply_b_dec_to_input else f.b_enc + f.mean @ f.W_enc
        col = f.scale[:, None] if f.scale.ndim else f.scale
        return cls(col * f.W_enc, b_enc, f.W_dec / f.scale, (f.b_dec - f.mean) / f.scale, k, f.mean, f.scale,
                   apply_b_dec_to_input)

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def to(self, device=None, dtype: torch.dtype | None = torch.float32) -> TopKSAE:
        move = {name: getattr(self, name).to(device=device, dtype=dtype)
                for name in ("W_enc", "b_enc", "W_dec", "b_dec", "mean", "scale") if getattr(self, name) is not None}
        return replace(self, **move)

    def check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise UsageError(f"SAE input has last dimension {x.shape[-1]}; the SAE reads d_in={self.d_in}")

    def normalise(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_in"]:
        self.check_input(x)
        return (x - self.mean if self.mean is not None else x) / self.scale

    def denormalise(self, x_n: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_in"]:
        x = x_n * self.scale
        return x + self.mean if self.mean is not None else x

    def encode(self, x_n: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Feature activations of normalised inputs (SAELens's TopK: top-k of pre, then ReLU)."""
        self.check_input(x_n)
        sae_in = x_n - self.b_dec if self.apply_b_dec_to_input else x_n
        pre = sae_in @ self.W_enc + self.b_enc
        top = torch.topk(pre, k=self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())

    def decode(self, f: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]:
        return f @ self.W_dec + self.b_dec

    def reconstruct(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_in"]:
        """Model units in, model units out: normalise, encode, decode, map back."""
        return self.denormalise(self.decode(self.encode(self.normalise(x))))

    def raw_decoder(self) -> Float[Tensor, "d_sae d_in"]:
        """Decoder rows in the model's units (what a feature adds to the head's result)."""
        return self.W_dec * self.scale


# ----------------------------------------------------------------------------- streamed metrics
@dataclass(frozen=True)
class DensityHistogram:
    edges: np.ndarray
    """``LOG_DENSITY_EDGES``: log10 density bin edges."""
    counts: np.ndarray
    """Live features per bin."""
    dead: int
    """Features never firing (not in any bin)."""


@dataclass(frozen=True)
class SAEMetrics:
    """One SAE on one set of evaluation tokens (normalised space)."""

    tokens: int
    l0: float
    fvu: float
    """NaN when the inputs have no variance."""
    density: np.ndarray = field(repr=False)
    """(d_sae,) firing fraction per feature."""
    dead: int
    dense: int
    histogram: DensityHistogram = field(repr=False)
    ev_curve: np.ndarray | None = field(repr=False)
    """EV of the first m features in energy order, m = 0 .. live features (None without pairs)."""
    features_90: int | None
    components_90: int | None
    superposition_index: float
    superposition_status: str
    """"ok", "below_target" (the SAE never explains 90 %), "no_variance" or "not_tracked"."""

    @property
    def explained_variance(self) -> float:
        return 1.0 - self.fvu


class SAEStats:
    """Streamed evaluation: ``update`` with batches of normalised inputs, then ``result``."""

    def __init__(self, sae: TopKSAE, *, pairs: bool = True):
        self.sae = sae
        dev, d_in, d_sae = sae.W_dec.device, sae.d_in, sae.d_sae
        f64 = {"device": dev, "dtype": torch.float64}
        self.n, self.l0_sum, self.sse, self.r2 = 0, 0.0, 0.0, 0.0
        self.fires = torch.zeros(d_sae, device=dev, dtype=torch.int64)
        self.energy = torch.zeros(d_sae, **f64)
        self.shift: Tensor | None = None  # first batch's mean: sums of (x - shift) lose less to rounding
        self.sum_x = torch.zeros(d_in, **f64)
        self.scatter = torch.zeros(d_in, d_in, **f64)
        self.c = torch.zeros(d_sae, **f64)
        self.gram = torch.zeros(d_sae, d_sae, **f64) if pairs else None

    @torch.no_grad()
    def update(self, x_n: Float[Tensor, "n d_in"]) -> None:
        sae = self.sae
        sae.check_input(x_n)
        x_n = x_n.reshape(-1, sae.d_in).to(sae.W_dec)
        if x_n.shape[0] == 0:
            return
        f = sae.encode(x_n)  # (n, d_sae)
        err = (x_n - sae.decode(f)).double()
        active = f != 0
        self.n += x_n.shape[0]
        self.l0_sum += float(active.sum())
        self.sse += float((err * err).sum())
        self.fires += active.sum(0)
        self.energy += (f.double() ** 2).sum(0)
        x = x_n.double()
        if self.shift is None:
            self.shift = x.mean(0)
        centred = x - self.shift
        self.sum_x += centred.sum(0)
        self.scatter += centred.T @ centred
        r = x - sae.b_dec.double()
        self.r2 += float((r * r).sum())
        self.c += (f.double() * (r @ sae.W_dec.double().T)).sum(0)
        if self.gram is not None:
            self._add_pairs(f)

    def _add_pairs(self, f: Tensor) -> None:
        """G += f^T f through each token's non-zero entries only (at most k^2 per token)."""
        top = torch.topk(f, k=self.sae.k, dim=-1, sorted=False)  # the non-zeros lie among these
        idx, val = top.indices, top.values.double()  # (n, k)
        flat = (idx[:, :, None] * self.sae.d_sae + idx[:, None, :]).reshape(-1)
        self.gram.view(-1).index_add_(0, flat, (val[:, :, None] * val[:, None, :]).reshape(-1))

    def result(self) -> SAEMetrics:
        if self.n == 0:
            raise UsageError("SAE metrics: no evaluation tokens")
        centred_scatter = self.scatter - torch.outer(self.sum_x, self.sum_x) / self.n
        total = float(torch.trace(centred_scatter))
        fvu = self.sse / total if total > 0 else float("nan")
        density = (self.fires.double() / self.n).cpu().numpy()
        curve, features_90, components_90, index, status = None, None, None, float("nan"), "not_tracked"
        if total <= 0:
            status = "no_variance"
        elif self.gram is not None:
            curve = self.ev_curve(total)
            components_90 = components_needed(torch.linalg.eigvalsh(centred_scatter).cpu().numpy())
            features_90 = first_reaching(curve)
            if features_90 is None:
                status = "below_target"
            else:
                index, status = features_90 / components_90, "ok"
        return SAEMetrics(
            tokens=self.n, l0=self.l0_sum / self.n, fvu=fvu, density=density,
            dead=int((density == 0).sum()), dense=int((density > DENSE_THRESHOLD).sum()),
            histogram=density_histogram(density), ev_curve=curve, features_90=features_90,
            components_90=components_90, superposition_index=index, superposition_status=status)

    def ev_curve(self, total: float) -> np.ndarray:
        """EV of the reconstruction from the first m live features in energy order (plus b_dec),
        m = 0 .. live: ``SSE(S) = sum||r||^2 - 2 sum_S c_i + sum_{S x S} G_ij (W_i . W_j)``."""
        W = self.sae.W_dec.double()
        score = self.energy * (W * W).sum(1)
        live = torch.nonzero(self.fires > 0).squeeze(1)
        order = live[torch.argsort(-score[live], stable=True)]
        Wo = W[order]
        pair = self.gram[order][:, order] * (Wo @ Wo.T)  # (live, live)
        added = -2 * self.c[order] + 2 * torch.tril(pair, -1).sum(1) + torch.diagonal(pair)
        sse = self.r2 + torch.cat([added.new_zeros(1), torch.cumsum(added, 0)])
        return (1.0 - sse / total).cpu().numpy()


def evaluate(sae: TopKSAE, batches, *, pairs: bool = True) -> SAEMetrics:
    """``SAEStats`` over an iterable of normalised input batches (each (..., d_in))."""
    stats = SAEStats(sae, pairs=pairs)
    for x_n in batches:
        stats.update(x_n)
    return stats.result()


def first_reaching(curve: np.ndarray, target: float = EV_TARGET) -> int | None:
    """The first m with ``curve[m] >= target`` (``curve[0]`` is m = 0); None if never."""
    hits = np.nonzero(np.asarray(curve) >= target - 1e-12)[0]
    return int(hits[0]) if hits.size else None


def components_needed(eigenvalues: np.ndarray, target: float = EV_TARGET) -> int:
    """Principal components (largest eigenvalues first) needed for ``target`` of the variance."""
    lam = np.clip(np.sort(np.asarray(eigenvalues, dtype=float))[::-1], 0, None)
    share = np.cumsum(lam) / lam.sum()
    return int(np.nonzero(share >= target - 1e-12)[0][0]) + 1


def density_histogram(density: np.ndarray) -> DensityHistogram:
    density = np.asarray(density, dtype=float)
    live = density[density > 0]
    counts, _ = np.histogram(np.log10(live), bins=LOG_DENSITY_EDGES)
    return DensityHistogram(LOG_DENSITY_EDGES, counts, int((density == 0).sum()))


# ---------------------------------------------------------------------------- decoder geometry
@torch.no_grad()
def feature_dimensionality(W_dec: Float[Tensor, "d_sae d_in"], chunk: int = 1024) -> np.ndarray:
    """``D_i = ||W_i||^4 / sum_j (W_i . W_j)^2`` (= the definition above), rows in chunks."""
    W = torch.as_tensor(W_dec).double()
    if W.ndim != 2:
        raise UsageError(f"feature dimensionality: W_dec must be (d_sae, d_in); got shape {tuple(W.shape)}")
    sq = (W * W).sum(1)
    out = torch.empty_like(sq)
    for start in range(0, W.shape[0], chunk):
        dots = W[start:start + chunk] @ W.T  # (chunk, d_sae)
        out[start:start + chunk] = sq[start:start + chunk] ** 2 / (dots * dots).sum(1)
    out[sq == 0] = float("nan")
    return out.cpu().numpy()


def head_attribution(W_dec: Float[Tensor, "d_sae d_in"], n_heads: int) -> np.ndarray:
    """(d_sae, heads): the norms of each decoder row's per-head blocks (``d_in = heads *
    d_head``, head-major), normalised to sum 1; a zero row is NaN. Pass the raw-unit decoder
    (``TopKSAE.raw_decoder``) when the normalisation scale differs between dimensions."""
    W = torch.as_tensor(W_dec).double()
    if W.ndim != 2 or n_heads < 1 or W.shape[1] % n_heads:
        raise UsageError(f"head attribution: W_dec of shape {tuple(W.shape)} does not split into {n_heads} heads")
    norms = W.unflatten(1, (n_heads, -1)).norm(dim=-1)  # (d_sae, heads)
    totals = norms.sum(1, keepdim=True)
    return torch.where(totals > 0, norms / totals, float("nan")).cpu().numpy()


def attribution_entropy(attribution: np.ndarray) -> np.ndarray:
    """Per feature, ``-sum_h a_h ln a_h`` (nats, ``0 ln 0 = 0``); NaN rows stay NaN."""
    a = np.asarray(attribution, dtype=float)
    terms = np.where(a > 0, -a * np.log(np.where(a > 0, a, 1.0)), 0.0)
    return np.where(np.isnan(a).any(1), np.nan, terms.sum(1))


def ev_l0_area(l0: Sequence[float], explained: Sequence[float]) -> float:
    """Trapezoid of explained variance over log2(L0), divided by the log2(L0) range."""
    l0, ev = np.asarray(l0, dtype=float), np.asarray(explained, dtype=float)
    if l0.shape != ev.shape or l0.ndim != 1:
        raise UsageError(f"EV-L0 area: {l0.shape} L0 values for {ev.shape} explained variances")
    if not (np.all(np.isfinite(l0)) and np.all(l0 > 0) and np.all(np.isfinite(ev))):
        raise UsageError("EV-L0 area: L0 values must be positive and every value finite")
    x = np.log2(l0)
    order = np.argsort(x, kind="stable")
    x, ev = x[order], ev[order]
    if x[-1] == x[0]:
        raise UsageError("EV-L0 area: needs SAEs at two or more different L0")
    return float(np.sum((x[1:] - x[:-1]) * (ev[1:] + ev[:-1]) / 2) / (x[-1] - x[0]))
