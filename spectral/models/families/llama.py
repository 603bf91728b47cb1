"""Llama (and Mistral, same layout): module paths, head split, weights, rotary, config,
shipped architectures."""

from __future__ import annotations

from spectral.models.architectures import Architecture
from spectral.models.families.family import QKV, Family

NAME = "llama"


def split_qkv(attn, outs, heads, kv_heads, d_head) -> QKV:
    q = outs["q_proj"].unflatten(-1, (heads, d_head))
    k = outs["k_proj"].unflatten(-1, (kv_heads, d_head))
    v = outs["v_proj"].unflatten(-1, (kv_heads, d_head))
    return q, k, v


def qk_weights(attn, heads, kv_heads, d_head):
    wq = attn.q_proj.weight.view(heads, d_head, -1).transpose(1, 2)  # (heads, d_model, d_head)
    wk = attn.k_proj.weight.view(kv_heads, d_head, -1).transpose(1, 2)  # (kv_heads, d_model, d_head)
    return wq, wk


def ov_weights(attn, heads, kv_heads, d_head):
    wv = attn.v_proj.weight.view(kv_heads, d_head, -1).transpose(1, 2)  # (kv_heads, d_model, d_head)
    wo = attn.o_proj.weight  # (d_model, heads*d_head)
    return wv, wo.T.reshape(heads, d_head, wo.shape[0])


def rotary(q, k, cos, sin):
    """Llama's own rotation of all of d_head."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)


def hf_config(arch: Architecture):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=arch.vocab, hidden_size=arch.hidden, num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads, max_position_embeddings=arch.max_positions,
        intermediate_size=arch.intermediate, num_key_value_heads=arch.kv_heads or arch.heads,
        rope_theta=arch.rope_theta, rms_norm_eps=arch.norm_eps, tie_word_embeddings=False,
    )


FAMILY = Family(
    NAME, model_types=("llama", "mistral"),
    attention="self_attn", projections=("q_proj", "k_proj", "v_proj"), out_proj="o_proj", final_norm="model.norm",
    split_qkv=split_qkv, qk_weights=qk_weights, ov_weights=ov_weights, rotary=rotary, hf_config=hf_config,
    architectures=(
        Architecture("llama-2-7b", NAME, layers=32, heads=32, hidden=4096,
                     intermediate=11008, vocab=32000, max_positions=4096),
    ),
    hub_ids={"meta-llama/Llama-2-7b-hf": "llama-2-7b"},
)
