"""Per-family module paths: the only place eigengap knows how a model family is laid out.

To add a family: write its ``split_qkv`` (projection outputs -> per-head q, k, v) and
``qk_weights`` (per-head W_Q, W_K), name its attention and output-projection attributes,
point ``rotary`` at the family's own ``apply_rotary_pos_emb`` (or None), and add it to
``FAMILIES`` under every ``config.model_type`` it serves. The adapter finds the layer list
by structure. Then run ``tests/test_adapter.py`` with a small random model of the family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from transformers.models.gpt_neox import modeling_gpt_neox
from transformers.models.llama import modeling_llama

# (batch, pos, heads, d_head) for q; (batch, pos, kv_heads, d_head) for k and v
QKV = tuple[Tensor, Tensor, Tensor]


@dataclass(frozen=True)
class Family:
    """How to reach the per-head quantities of one model family."""

    name: str
    attention: str
    """Attribute of a block (decoder layer) holding its self-attention module."""
    projections: tuple[str, ...]
    """Attributes of the attention module whose outputs hold q, k, v."""
    out_proj: str
    """Attribute of the attention module whose input is the per-head result (pre-projection)."""
    split_qkv: Callable[[nn.Module, dict[str, Tensor], int, int, int], QKV]
    """(attention module, projection outputs by name, heads, kv_heads, d_head) -> q, k, v."""
    qk_weights: Callable[[nn.Module, int, int, int], tuple[Tensor, Tensor]]
    """(attention module, heads, kv_heads, d_head) -> W_Q (heads, d_model, d_head), W_K (kv_heads, d_model, d_head)."""
    rotary: Callable | None
    """The family's own ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)``; None if unrotated."""
    final_norm: str
    """Dotted path, from the CausalLM model, of the norm applied after the last block."""


def _neox_split(attn, outs, heads, kv_heads, d_head) -> QKV:
    qkv = outs["query_key_value"]
    qkv = qkv.view(*qkv.shape[:-1], heads, 3 * d_head)  # (batch, pos, heads, 3*d_head)
    q, k, v = qkv.chunk(3, dim=-1)
    return q, k, v


def _neox_weights(attn, heads, kv_heads, d_head):
    w = attn.query_key_value.weight  # (3*d_model, d_model), rows per head [q | k | v]
    w = w.view(heads, 3, d_head, w.shape[-1])  # (heads, 3, d_head, d_model)
    return w[:, 0].transpose(1, 2), w[:, 1].transpose(1, 2)


def _llama_split(attn, outs, heads, kv_heads, d_head) -> QKV:
    q = outs["q_proj"].unflatten(-1, (heads, d_head))
    k = outs["k_proj"].unflatten(-1, (kv_heads, d_head))
    v = outs["v_proj"].unflatten(-1, (kv_heads, d_head))
    return q, k, v


def _llama_weights(attn, heads, kv_heads, d_head):
    wq = attn.q_proj.weight.view(heads, d_head, -1).transpose(1, 2)
    wk = attn.k_proj.weight.view(kv_heads, d_head, -1).transpose(1, 2)
    return wq, wk


def _gpt2_split(attn, outs, heads, kv_heads, d_head) -> QKV:
    q, k, v = outs["c_attn"].split(heads * d_head, dim=-1)
    return tuple(t.unflatten(-1, (heads, d_head)) for t in (q, k, v))


def _gpt2_weights(attn, heads, kv_heads, d_head):
    w = attn.c_attn.weight  # Conv1D: (d_model, 3*d_model), out = x @ w
    d_model = w.shape[0]
    wq, wk, _ = w.split(heads * d_head, dim=1)
    return (wq.view(d_model, heads, d_head).permute(1, 0, 2), wk.view(d_model, heads, d_head).permute(1, 0, 2))


GPT_NEOX = Family("gpt_neox", "attention", ("query_key_value",), "dense", _neox_split, _neox_weights,
                  modeling_gpt_neox.apply_rotary_pos_emb, "gpt_neox.final_layer_norm")
LLAMA = Family("llama", "self_attn", ("q_proj", "k_proj", "v_proj"), "o_proj", _llama_split, _llama_weights,
               modeling_llama.apply_rotary_pos_emb, "model.norm")
GPT2 = Family("gpt2", "attn", ("c_attn",), "c_proj", _gpt2_split, _gpt2_weights, None, "transformer.ln_f")

FAMILIES: dict[str, Family] = {
    "gpt_neox": GPT_NEOX,
    "llama": LLAMA,
    "mistral": LLAMA,
    "gpt2": GPT2,
}


def family_of(model: nn.Module) -> Family:
    """The family of a Hugging Face model, from ``config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model type {model_type!r} (supported: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[model_type]


def expand_kv(t: Tensor, heads: int) -> Tensor:
    """(batch, pos, kv_heads, d) -> (batch, pos, heads, d): query head h reads kv head h // group."""
    kv_heads = t.shape[2]
    return t if kv_heads == heads else torch.repeat_interleave(t, heads // kv_heads, dim=2)
