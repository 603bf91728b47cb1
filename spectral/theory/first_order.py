"""First-order (linearised) predictions of a steering injection, computed on the real model.

An injection adds ``alpha * v`` to the residual stream entering block ``layer`` (the steering
``Injection``). To first order in ``alpha`` every quantity downstream moves along the tangent
``d/dalpha`` at ``alpha = 0``: ``linearize`` computes that tangent for the next-token logits of
each prompt (``t = J v``, J the layer-to-logit Jacobian) and for the final query's attention
logits and probabilities of chosen layers, in one forward-mode pass (``torch.autograd.forward_ad``:
one forward pass carrying a tangent, no backward), batched over prompts. From it
(docs/THEORY.md for the derivations and their assumptions):

- the effect slope: d(set score)/d alpha = g . t, with g the gradient of the concept's set score
  (``spectral.steering.measure.set_score``) with respect to the logits;
- the first-order KL: KL(alpha) = 0.5 alpha^2 t^T F t, F = diag(p) - p p^T (so t^T F t = Var_p(t)),
  and the coefficient reaching a KL budget, alpha* = sqrt(2 KL / mean t^T F t);
- the Fisher-metric bound: |g . t| <= sqrt(t^T F t) sqrt(g^T F^+ g), so
  |delta score| <= sqrt(2 KL) sqrt(g^T F^+ g) on the same prompt, where g^T F^+ g = sum g^2 / p
  (g sums to 0, so it lies in the range of F).

Forward-mode AD needs attention that supports it: ``linearize`` switches the model to eager
attention for the call (``eager_attention``) and restores the previous implementation after.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
from jaxtyping import Float
from torch import Tensor

from spectral.errors import UsageError
from spectral.models.adapter import HeadAdapter
from spectral.steering.concepts import Concept, single_token_ids
from spectral.steering.injection import Injection, Positions, add_at
from spectral.steering.vectors import Batch


@contextmanager
def eager_attention(model) -> Iterator[None]:
    """The model's attention switched to the eager implementation (which forward-mode AD can
    differentiate; fused SDPA kernels cannot) for one block of code, then restored."""
    before = getattr(model.config, "_attn_implementation", None)
    if before in (None, "eager"):
        yield
        return
    model.set_attn_implementation("eager")
    if model.config._attn_implementation != "eager":
        raise RuntimeError(f"cannot switch this {type(model).__name__} to eager attention for forward-mode AD")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


class _LinearTangent(torch.autograd.Function):
    """``F.linear`` whose forward-mode tangent is one product, ``x_t W^T``. PyTorch's own formula
    for ``addmm`` also multiplies the input by the weight's tangent, materialised as zeros when the
    weight carries none: twice the work for nothing. Used only where no weight is dual
    (``linear_tangents`` checks that)."""

    @staticmethod
    def forward(x, weight, bias):
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(inputs[1])

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t):
        (weight,) = ctx.saved_tensors
        return torch.nn.functional.linear(x_t, weight)


class _LayerNormTangent(torch.autograd.Function):
    """``F.layer_norm`` over the last dimension with its tangent in closed form,
    gamma * (x_t - mean(x_t) - xhat * mean(x_t * xhat)) / sigma (xhat the normalised input, sigma
    the standard deviation with eps). PyTorch computes this tangent through a decomposition of
    several small operations per call."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        out, mean, rstd = torch.native_layer_norm(x, x.shape[-1:], weight, bias, eps)
        ctx.save_for_forward(x, weight, mean, rstd)
        return out

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t, eps_t):
        x, weight, mean, rstd = ctx.saved_tensors
        xhat = (x - mean) * rstd
        out = (x_t - x_t.mean(-1, keepdim=True) - xhat * (x_t * xhat).mean(-1, keepdim=True)) * rstd
        return out if weight is None else out * weight


def _tangent_forward(layer: torch.nn.Module):
    """The replacement ``forward`` of a plain ``Linear`` or last-dimension ``LayerNorm``, or None."""
    if type(layer) is torch.nn.Linear:
        return lambda x, _w=layer.weight, _b=layer.bias: _LinearTangent.apply(x, _w, _b)
    if type(layer) is torch.nn.LayerNorm and len(layer.normalized_shape) == 1:
        return lambda x, _l=layer: _LayerNormTangent.apply(x, _l.weight, _l.bias, _l.eps)
    return None


@contextmanager
def linear_tangents(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Every plain ``torch.nn.Linear`` and ``torch.nn.LayerNorm`` under ``modules`` computes its
    forward-mode tangent in closed form (``_LinearTangent``, ``_LayerNormTangent``) for one block
    of code, then gets its own ``forward`` back. The values are the same (tested to 1e-12 in
    float64); layers whose ``forward`` something else has replaced (accelerate's offloading
    hooks) and subclasses are left alone. The weights must carry no tangent (checked)."""
    patched = []
    for module in modules:
        for layer in module.modules():
            forward = _tangent_forward(layer)
            if forward is None or "forward" in vars(layer):
                continue
            if any(p is not None and fwAD.unpack_dual(p).tangent is not None for p in (layer.weight, layer.bias)):
                raise RuntimeError("linear_tangents: a weight carries a tangent; its product would be dropped")
            layer.forward = forward
            patched.append(layer)
    try:
        yield
    finally:
        for layer in patched:
            del layer.forward


@dataclass
class Linearization:
    """Values at ``alpha = 0`` and their tangents d/d alpha, at each prompt's last real token."""

    logprobs: Float[Tensor, "n vocab"]
    """Unsteered next-token log-probabilities (float64)."""
    tangent: Float[Tensor, "n vocab"]
    """d logits / d alpha: ``J v`` per prompt (float64). Log-probs move by it minus its p-mean."""
    attention_layers: tuple[int, ...]
    """The layers whose final-query attention was recorded (in this order below)."""
    probs: Float[Tensor, "n layer head pos"]
    """Unsteered attention probabilities of the final query (0 on masked keys)."""
    score_tangent: Float[Tensor, "n layer head pos"]
    """d (attention logits q.k * scaling) / d alpha at the final query (0 on masked keys)."""
    prob_tangent: Float[Tensor, "n layer head pos"]
    """d (attention probabilities) / d alpha at the final query."""
    resid_norm: Float[Tensor, "n"]
    """Norm of the unsteered residual entering the injected layer at each prompt's last real
    token: ``alpha ||v|| / resid_norm`` says how far from alpha = 0 a coefficient reaches."""


def linearize(adapter: HeadAdapter, batch: Batch, layer: int, vector: Float[Tensor, "d_model"],
              positions: Positions = "all", attention_layers: Sequence[int] = ()) -> Linearization:
    """One forward-mode pass: the tangent of the next-token logits (and of the final query's
    attention in ``attention_layers``) for ``alpha * vector`` added to the residual entering
    ``layer`` at ``positions`` (as ``Injection`` adds it), at ``alpha = 0``."""
    adapter.require_causal_lm("the first-order steering prediction")
    adapter.check_layers([layer])
    attention_layers = tuple(adapter.check_layers(attention_layers)) if attention_layers else ()
    if vector.shape != (adapter.d_model,):
        raise UsageError(f"steering vector has shape {tuple(vector.shape)}, expected ({adapter.d_model},)")
    rows = torch.arange(batch.ids.shape[0], device=batch.ids.device)
    last = batch.last.to(batch.ids.device)
    seen: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}

    def keep(l: int, site: str, t: Tensor) -> None:
        primal, tangent = fwAD.unpack_dual(t)
        if site == "resid_pre":
            if l == layer:  # seen before the edit: the unsteered residual
                seen[(l, site)] = (primal[rows, last].detach().double().norm(dim=-1), None)
            return
        if l not in attention_layers:
            return
        seen[(l, site)] = _final_query(primal, tangent, rows, last)

    final_norm = adapter.model.get_submodule(adapter.family.final_norm)
    with (torch.no_grad(), eager_attention(adapter.model), linear_tangents([*adapter.blocks, final_norm]),
          fwAD.dual_level()):
        weight = adapter.model.get_input_embeddings().weight
        v = vector.detach().to(weight.device, weight.dtype)
        dual = fwAD.make_dual(torch.zeros_like(v), v)
        injection = Injection({layer: dual}, {layer: 1.0}, positions)
        sites = ["resid_pre", "scores", "probs"] if attention_layers else ["resid_pre"]
        with adapter.trace(sites, keep, layers=sorted({layer, *attention_layers}), attention_mask=batch.mask,
                           edits=injection.edits(batch.last)):
            out = adapter.model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False).logits
        logits, tangent = fwAD.unpack_dual(out)
        logits, tangent = logits[rows, last].double(), tangent[rows, last].double()
    probs, score_t, prob_t = ([torch.stack([seen[(l, site)][i] for l in attention_layers], 1)
                               for site, i in (("probs", 0), ("scores", 1), ("probs", 1))]
                              if attention_layers else [torch.zeros(len(rows), 0, adapter.n_heads, 0)] * 3)
    return Linearization(torch.log_softmax(logits, -1), tangent, attention_layers, probs, score_t, prob_t,
                         seen[(layer, "resid_pre")][0])


def _final_query(primal: Tensor, tangent: Tensor | None, rows: Tensor, last: Tensor) -> tuple[Tensor, Tensor]:
    """An attention site's (n, head, k_pos) row of each prompt's final query, and its tangent
    (zero where the site carries none), both float64."""
    row = primal[rows, :, last]
    tan = torch.zeros_like(row) if tangent is None else tangent[rows, :, last]
    return row.detach().double(), tan.detach().double()


def record_blocks(adapter: HeadAdapter, batch: Batch, layers: Sequence[int]) -> tuple[Tensor, dict[int, Tensor], list]:
    """One plain forward pass over ``batch``: its logits, the residual entering each block in
    ``layers``, and every block's other arguments (``keep_block_kwargs``), so that blocks can be
    run again from any of those residuals (``run_blocks``)."""
    from spectral.causal.patching import keep_block_kwargs

    resid: dict[int, Tensor] = {}
    kwargs: list = [None] * adapter.n_layers
    handles = keep_block_kwargs(adapter, kwargs)
    try:
        with adapter.trace(["resid_pre"], lambda l, site, t: resid.__setitem__(l, t.detach()), layers=layers):
            logits = adapter.model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return logits, resid, kwargs


def run_blocks(adapter: HeadAdapter, hidden: Tensor, kwargs: list, start: int) -> Tensor:
    """Blocks ``start`` .. L-1 on ``hidden``, with the arguments ``record_blocks`` kept."""
    for b in range(start, adapter.n_layers):
        result = adapter.blocks[b](hidden, **kwargs[b])
        hidden = result[0] if isinstance(result, tuple) else result
    return hidden


def linearize_layers(adapter: HeadAdapter, batch: Batch, vectors: Mapping[int, Tensor],
                     positions: Positions = "all") -> dict[int, Linearization]:
    """``linearize`` for each layer's own vector (``vectors``: layer -> d_model vector), its
    attention recorded at the injected layer, sharing one plain forward pass: the tangent of an
    injection at layer l is zero before block l, so each layer's forward-mode pass starts from the
    residual entering block l (kept from the plain pass, with every block's other arguments) and
    runs blocks l .. L-1, the final norm and the unembedding at the last real tokens only. For L
    layers that is 1 plain pass plus L (L+1) / 2 blocks carrying a tangent instead of L full
    passes (L^2 blocks): about half the work on deep models. Linear layers and LayerNorms carry the
    tangent in closed form (``linear_tangents``). On organism-l (6 layers, 64 prompts, warm, 2
    threads, interleaved rounds) 0.49-0.53 s, against 0.58-0.61 s one layer at a time and
    0.64-0.71 s with PyTorch's own tangent formulas. The values equal ``linearize``'s (tested to
    1e-9 in float64)."""
    adapter.require_causal_lm("the first-order steering prediction")
    layers = adapter.check_layers(sorted(vectors))
    for l in layers:
        if vectors[l].shape != (adapter.d_model,):
            raise UsageError(f"steering vector of layer {l} has shape {tuple(vectors[l].shape)}, "
                             f"expected ({adapter.d_model},)")
    model = adapter.model
    rows = torch.arange(batch.ids.shape[0], device=batch.ids.device)
    last = batch.last.to(batch.ids.device)
    norm = model.get_submodule(adapter.family.final_norm)
    out: dict[int, Linearization] = {}
    with torch.no_grad(), eager_attention(model):
        logits, resid, kwargs = record_blocks(adapter, batch, layers)
        logprobs = torch.log_softmax(logits[rows, last].double(), -1)
        with linear_tangents([*adapter.blocks, norm]):
            for l in layers:
                seen: dict[str, tuple[Tensor, Tensor]] = {}

                def keep(layer: int, site: str, t: Tensor) -> None:
                    seen[site] = _final_query(*fwAD.unpack_dual(t), rows, last)

                start = resid[l]
                v = vectors[l].detach().to(start.device, start.dtype)
                with fwAD.dual_level():
                    hidden = fwAD.make_dual(start, add_at(torch.zeros_like(start), v, positions, last))
                    with adapter.trace(["scores", "probs"], keep, layers=[l], attention_mask=batch.mask):
                        hidden = run_blocks(adapter, hidden, kwargs, l)
                    final = model.get_output_embeddings()(norm(hidden[rows, last]))
                    tangent = fwAD.unpack_dual(final).tangent.double()
                out[l] = Linearization(logprobs, tangent, (l,), seen["probs"][0][:, None], seen["scores"][1][:, None],
                                       seen["probs"][1][:, None], start[rows, last].double().norm(dim=-1))
    return out


# ---------------------------------------------------------------- the output distribution
def fisher_quadratic(logprobs: Float[Tensor, "n vocab"], tangent: Float[Tensor, "n vocab"]) -> Float[Tensor, "n"]:
    """Per prompt ``t^T F t`` with F = diag(p) - p p^T: the variance of t under p (twice the
    first-order KL per unit alpha^2)."""
    p = logprobs.exp()
    mean = (p * tangent).sum(-1, keepdim=True)
    return (p * (tangent - mean) ** 2).sum(-1)


def score_gradient(logprobs: Float[Tensor, "n vocab"], target: Sequence[int],
                   opposite: Sequence[int]) -> Float[Tensor, "n vocab"]:
    """Per prompt the gradient of ``set_score`` (log P(target set) - log P(opposite set)) with
    respect to the logits: p restricted to the target set and renormalised, minus the same for
    the opposite set (the log-normaliser cancels, so each row sums to 0)."""
    g = torch.zeros_like(logprobs)
    for words, sign in ((list(target), 1.0), (list(opposite), -1.0)):
        idx = torch.tensor(words, device=logprobs.device)
        g.index_add_(1, idx, sign * torch.softmax(logprobs[:, idx], -1))
    return g


def fisher_dual_norm(logprobs: Float[Tensor, "n vocab"], gradient: Float[Tensor, "n vocab"]) -> Float[Tensor, "n"]:
    """Per prompt ``sqrt(g^T F^+ g)``. For g summing to 0 (in the range of F, whose null space is
    the constant vector) g^T F^+ g = sum_w g_w^2 / p_w: y = g / p solves F y = g. For the set
    score with disjoint sets this is sqrt(1/P(target) + 1/P(opposite))."""
    if not torch.allclose(gradient.sum(-1), torch.zeros(1, dtype=gradient.dtype, device=gradient.device), atol=1e-9):
        raise ValueError("the gradient does not sum to 0: it is not in the range of the softmax Fisher")
    return (gradient ** 2 / logprobs.exp()).sum(-1).sqrt()


# ---------------------------------------------------------------- attention heads
def attention_summary(lin: Linearization) -> tuple[Float[Tensor, "n layer head"], Float[Tensor, "n layer head"]]:
    """Per prompt, recorded layer and head, per unit alpha: the attention-weighted spread of the
    logit change, sqrt(Var_a(delta l)) (a common shift of all logits changes nothing, so only the
    spread counts; 0.5 x its square is the first-order KL of the attention row), and the total
    variation of the probability change, 0.5 ||delta a||_1."""
    a, dl = lin.probs, lin.score_tangent
    mean = (a * dl).sum(-1, keepdim=True)
    spread = (a * (dl - mean) ** 2).sum(-1).sqrt()
    return spread, 0.5 * lin.prob_tangent.abs().sum(-1)


# ---------------------------------------------------------------- one layer's prediction
@dataclass
class FirstOrder:
    """The first-order prediction for one layer's vector on one concept (per unit alpha)."""

    layer: int
    slope: np.ndarray
    """Per evaluation prompt: d(set score)/d alpha (the predicted effect is alpha x slope)."""
    fisher_prompts: np.ndarray
    """Per evaluation prompt: t^T F t (its own first-order KL is 0.5 alpha^2 x this)."""
    fisher_neutral: np.ndarray
    """Per neutral prompt: t^T F t (the budget is matched on their mean KL)."""
    dual_norm: np.ndarray
    """Per evaluation prompt: sqrt(g^T F^+ g), the bound's constant."""
    attention_layers: tuple[int, ...]
    logit_spread: np.ndarray
    """(evaluation prompt, recorded layer, head): sqrt(Var_a(delta attention logits)) per unit alpha."""
    prob_change: np.ndarray
    """(evaluation prompt, recorded layer, head): 0.5 ||delta attention probs||_1 per unit alpha."""
    relative_norm: float
    """||v|| / the mean residual norm at the injection (last tokens of all prompts): a coefficient
    alpha moves the residual by alpha x this, relatively; the first-order terms hold only while
    that is small (docs/THEORY.md gives the measured range)."""

    def predicted_kl(self, alpha: float) -> float:
        """Mean KL on the neutral prompts at coefficient ``alpha``, to first order."""
        return 0.5 * alpha ** 2 * float(self.fisher_neutral.mean())

    def alpha_star(self, kl: float) -> float:
        """The coefficient whose first-order neutral KL equals ``kl``: sqrt(2 KL / mean t^T F t)."""
        if not kl > 0:
            raise UsageError(f"the KL budget must be positive, got {kl}")
        curvature = float(self.fisher_neutral.mean())
        if not curvature > 0:
            raise ValueError(f"layer {self.layer}: the vector does not move the neutral prompts' output (t^T F t = 0)")
        return float(np.sqrt(2.0 * kl / curvature))

    def predicted_effect(self, alpha: float) -> float:
        """Mean change of the set score at ``alpha``, to first order."""
        return alpha * float(self.slope.mean())

    def effect_at_budget(self, kl: float) -> float:
        """The predicted mean effect at the coefficient matching the neutral KL budget."""
        return self.predicted_effect(self.alpha_star(kl))

    def bound(self, kl_per_prompt: np.ndarray) -> np.ndarray:
        """Per evaluation prompt: the first-order bound sqrt(2 KL_i) sqrt(g_i^T F_i^+ g_i) on
        |delta score_i|, given that prompt's own KL."""
        return np.sqrt(2.0 * np.asarray(kl_per_prompt)) * self.dual_norm


def first_order_layers(adapter: HeadAdapter, tokenizer, concept: Concept, vectors: Mapping[int, Tensor],
                       positions: Positions = "all", source: str = "concept") -> dict[int, FirstOrder]:
    """``first_order`` of every layer's vector (attention recorded at the injected layer), from one
    plain pass and one forward-mode pass from each layer on (``linearize_layers``): the same values
    as calling ``first_order`` per layer, for less work (its docstring gives the figures)."""
    target = single_token_ids(tokenizer, concept.target, "target", source)
    opposite = single_token_ids(tokenizer, concept.opposite, "opposite", source)
    device = adapter.model.get_input_embeddings().weight.device
    batch = Batch.of(tokenizer, list(concept.prompts) + list(concept.neutral), device, f"{source}: prompts and neutral")
    lins = linearize_layers(adapter, batch, vectors, positions)
    return {l: _first_order_of(lin, l, vectors[l], len(concept.prompts), target, opposite) for l, lin in lins.items()}


def _first_order_of(lin: Linearization, layer: int, vector: Tensor, n: int, target, opposite) -> FirstOrder:
    fisher = fisher_quadratic(lin.logprobs, lin.tangent)
    lp, t = lin.logprobs[:n], lin.tangent[:n]
    g = score_gradient(lp, target, opposite)
    spread, change = attention_summary(lin)
    return FirstOrder(layer, (g * t).sum(-1).cpu().numpy(), fisher[:n].cpu().numpy(), fisher[n:].cpu().numpy(),
                      fisher_dual_norm(lp, g).cpu().numpy(), lin.attention_layers,
                      spread[:n].cpu().numpy(), change[:n].cpu().numpy(),
                      float(vector.double().norm().cpu() / lin.resid_norm.mean().cpu()))


def first_order(adapter: HeadAdapter, tokenizer, concept: Concept, layer: int, vector: Float[Tensor, "d_model"],
                positions: Positions = "all", attention_layers: Sequence[int] | None = None,
                source: str = "concept") -> FirstOrder:
    """The first-order prediction of ``vector`` at ``layer`` on ``concept``: one forward-mode
    pass over the evaluation and neutral prompts together. ``attention_layers`` (default: the
    injected layer) are the layers whose heads' final-query attention change is recorded."""
    device = adapter.model.get_input_embeddings().weight.device
    target = single_token_ids(tokenizer, concept.target, "target", source)
    opposite = single_token_ids(tokenizer, concept.opposite, "opposite", source)
    texts = list(concept.prompts) + list(concept.neutral)
    batch = Batch.of(tokenizer, texts, device, f"{source}: prompts and neutral")
    lin = linearize(adapter, batch, layer, vector, positions, [layer] if attention_layers is None else attention_layers)
    return _first_order_of(lin, layer, vector, len(concept.prompts), target, opposite)
