"""Applying a training arm (``spectral.training.arms``) to a GPT-NeoX organism during training.

``Regularizer(model, spec)`` installs the arm on the freshly initialised model (before the optimizer
is built, so sigma-reparam's ``gamma`` parameters are trained), ``penalty(input_ids, mask)`` runs
the training forward pass and returns ``(outputs, extra_loss)`` for the arms that add a loss term,
and ``finish()`` leaves a plain GPT-NeoX model (sigma-reparam's weights materialised), so the saved
organism is read by every tool like any other.

The gap and entropy arms read the heads with their own hooks on each GPT-NeoX attention module (the
graph kept): the raw keys, split from ``query_key_value``'s output as the scan's adapter splits them
(``spectral.models.families.gpt_neox``; this package sits below ``spectral.models`` in the layering,
so the few lines are repeated here and ``tests/test_regularize.py`` checks them equal to the
adapter's), and the attention probabilities recomputed from the rotated queries and keys with the
causal and padding masks (the model's own attention, in whatever implementation, is unchanged).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from spectral.errors import UsageError
from spectral.training.arms import ArmSpec
from spectral.training.penalties import gap_penalty, key_gap


class SigmaReparamQK(nn.Module):
    """Parametrization of a GPT-NeoX ``query_key_value`` weight (rows per head ``[q | k | v]``):
    the query rows (all heads, a d_model x d_model matrix) and the key rows each become
    ``gamma x W / sigma(W)``; the value rows are unchanged. ``sigma = u^T W v`` with ``v = W^T u /
    |W^T u|`` and ``u`` updated by one power iteration per training forward pass (no gradient
    through ``u`` and ``v``, as in Zhai et al. 2023); at construction ``u`` is ``W``'s exact top left
    singular vector and ``gamma = sigma(W)``, so the initial forward pass is the baseline's."""

    def __init__(self, weight: Tensor, n_heads: int, d_head: int):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_head
        parts = self._parts(weight.detach())
        for name, m in zip(("q", "k"), parts[:2]):
            u, s, _ = torch.linalg.svd(m.double(), full_matrices=False)
            self.register_buffer(f"u_{name}", u[:, 0].to(weight.dtype).contiguous())
            self.register_parameter(f"gamma_{name}", nn.Parameter(s[0].to(weight.dtype).reshape(())))

    def _parts(self, weight: Tensor) -> list[Tensor]:
        w = weight.view(self.n_heads, 3, self.d_head, weight.shape[-1])
        return [w[:, i].reshape(self.n_heads * self.d_head, weight.shape[-1]) for i in range(3)]

    def sigma(self, m: Tensor, name: str) -> Tensor:
        u = getattr(self, f"u_{name}")
        with torch.no_grad():
            if self.training:
                v = nn.functional.normalize(m.T @ u, dim=0)
                u.copy_(nn.functional.normalize(m @ v, dim=0))
            v = nn.functional.normalize(m.T @ u, dim=0)
        return u @ m @ v

    def forward(self, weight: Tensor) -> Tensor:
        q, k, v = self._parts(weight)
        q = self.gamma_q * q / self.sigma(q, "q")
        k = self.gamma_k * k / self.sigma(k, "k")
        stacked = torch.stack([x.view(self.n_heads, self.d_head, -1) for x in (q, k, v)], dim=1)
        return stacked.reshape(weight.shape)


def _require_neox(model: nn.Module) -> None:
    if getattr(model.config, "model_type", "") != "gpt_neox":
        raise UsageError(f"training arms apply to GPT-NeoX organisms, not {model.config.model_type!r} models")


class Regularizer:
    """One arm installed on one model (module docstring)."""

    def __init__(self, model: nn.Module, spec: ArmSpec):
        _require_neox(model)
        self.model, self.spec = model, spec
        self.attentions = [layer.attention for layer in model.gpt_neox.layers]
        self.n_heads = model.config.num_attention_heads
        self.d_head = model.config.hidden_size // self.n_heads
        self.reparametrized: list[nn.Module] = []
        if spec.arm == "sigma-reparam":
            for attn in self.attentions:
                parametrize.register_parametrization(
                    attn.query_key_value, "weight", SigmaReparamQK(attn.query_key_value.weight, self.n_heads, self.d_head))
                self.reparametrized.append(attn.query_key_value)
        self.site = {"gap-penalty": "keys_raw", "controlled-instability": "keys_raw", "entropy": "probs"}.get(spec.arm)
        self.last: dict[str, float] = {}

    def no_decay(self) -> list[nn.Parameter]:
        """Parameters the optimizer should not decay (sigma-reparam's gammas)."""
        return [p for m in self.reparametrized for n, p in m.parametrizations.weight.named_parameters() if "gamma" in n]

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> tuple[Tensor, Tensor | None]:
        """The training forward pass: (the language-model loss, the arm's extra loss or None)."""
        if self.site is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss, None
        with capture(self.attentions, self.spec.layers, self.n_heads, self.d_head) as seen:
            loss = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        mask = attention_mask.bool()
        # Per layer first, per head after: slicing one head out of the layer's tensors before the
        # heavy work made autograd zero-fill a layer-sized gradient per head (the arm cost 1.7x a
        # baseline step); the per-head arithmetic is unchanged, so the trained bits are too.
        if self.site == "keys_raw":
            keys = {l: seen[l][1][mask] for l in seen}  # (real tokens, head, d_head), the raw keys
            gaps = torch.stack([key_gap(keys[l][:, h]) for l, h in self.spec.heads])
            extra = self.spec.weight * torch.stack(
                [gap_penalty(g, self.spec.target, self.spec.direction) for g in gaps]).mean()
            self.last = {"mean_gap": float(gaps.detach().mean()), "penalty": float(extra.detach())}
        else:
            per_query = {l: query_entropy(attention_probs(*seen[l], self.attentions[l].scaling, mask)) for l in seen}
            entropy = torch.stack([normalized_mean(per_query[l][:, h], mask) for l, h in self.spec.heads]).mean()
            sign = -1.0 if self.spec.direction == "up" else 1.0
            extra = sign * self.spec.weight * entropy.to(loss.dtype)
            self.last = {"mean_entropy": float(entropy.detach()), "penalty": float(extra.detach())}
        return loss, extra.to(loss.dtype)

    def finish(self) -> nn.Module:
        """Materialise sigma-reparam's weights: a plain GPT-NeoX model."""
        for module in self.reparametrized:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        self.reparametrized = []
        return self.model


class capture:
    """Context manager: per layer in ``layers``, ``(q, k, (cos, sin))`` of the forward pass run
    inside it, q and k the raw (unrotated) queries and keys (batch, pos, head, d_head) split from
    ``query_key_value``'s output with the graph kept."""

    def __init__(self, attentions, layers, n_heads: int, d_head: int):
        self.attentions, self.layers, self.n_heads, self.d_head = attentions, layers, n_heads, d_head
        self.seen: dict[int, tuple] = {}
        self.handles: list = []

    def __enter__(self) -> dict[int, tuple]:
        for l in self.layers:
            attn, rope = self.attentions[l], {}

            def pre(module, args, kwargs, rope=rope):
                rope["cos_sin"] = kwargs.get("position_embeddings")

            def post(module, args, output, l=l, rope=rope):
                qkv = output.view(*output.shape[:-1], self.n_heads, 3 * self.d_head)  # rows per head [q | k | v]
                q, k, _ = qkv.chunk(3, dim=-1)
                self.seen[l] = (q, k, rope.get("cos_sin"))

            self.handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
            self.handles.append(attn.query_key_value.register_forward_hook(post))
        return self.seen

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def attention_probs(q: Tensor, k: Tensor, cos_sin, scaling: float, mask: Tensor) -> Tensor:
    """(batch, head, query, key) attention probabilities of raw ``q``, ``k`` (batch, pos, head, d_head):
    GPT-NeoX's partial rotary, scores ``q k^T x scaling``, causal and padding keys masked, softmax
    (rows with no visible key are 0)."""
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

    if cos_sin is None:
        raise RuntimeError("the attention module received no position_embeddings to rotate with")
    q, k = apply_rotary_pos_emb(q, k, *cos_sin, unsqueeze_dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scaling
    t = q.shape[1]
    blocked = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)[None, None] | ~mask[:, None, None, :]
    probs = torch.softmax(scores.float().masked_fill(blocked, float("-inf")), dim=-1)
    if bool(mask[:, 0].all()):  # every query sees the first key: no row is all -inf, none is NaN
        return probs
    return probs.nan_to_num(0.0)


def normalized_entropy(probs: Tensor, mask: Tensor) -> Tensor:
    """Mean over (sequence, real query with >= 2 visible real keys) of the attention entropy
    divided by log(visible keys): ``probs`` (batch, query, key) of one head (rows over padded keys
    are 0), ``mask`` (batch, pos) real tokens."""
    return normalized_mean(query_entropy(probs), mask)


def query_entropy(probs: Tensor) -> Tensor:
    """The entropy of each query's attention row: ``probs`` (..., query, key) -> (..., query)."""
    p = probs.float()
    return -((p * torch.log(p.clamp_min(1e-12))).sum(-1))  # negated after the sum: the same bits, one pass less


def normalized_mean(h: Tensor, mask: Tensor) -> Tensor:
    """``normalized_entropy`` from one head's per-query entropies ``h`` (batch, query)."""
    visible = torch.cumsum(mask.long(), dim=1)  # right padding: real keys up to and including the query
    ok = mask & (visible >= 2)
    if not bool(ok.any()):
        raise UsageError("the entropy arm needs sequences of at least 2 real tokens")
    return (h[ok] / torch.log(visible[ok].float())).mean()
