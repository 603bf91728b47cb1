"""GPT-2: module paths, head split, weights (Conv1D layout), config, shipped architectures.
Unrotated: raw and rotated keys are the same tensor."""

from __future__ import annotations

from spectral.models.architectures import Architecture
from spectral.models.families.family import QKV, Family

NAME = "gpt2"


def split_qkv(attn, outs, heads, kv_heads, d_head) -> QKV:
    q, k, v = outs["c_attn"].split(heads * d_head, dim=-1)
    return tuple(t.unflatten(-1, (heads, d_head)) for t in (q, k, v))


def qk_weights(attn, heads, kv_heads, d_head):
    w = attn.c_attn.weight  # Conv1D: (d_model, 3*d_model), out = x @ w
    d_model = w.shape[0]
    wq, wk, _ = w.split(heads * d_head, dim=1)
    return (wq.view(d_model, heads, d_head).permute(1, 0, 2), wk.view(d_model, heads, d_head).permute(1, 0, 2))


def ov_weights(attn, heads, kv_heads, d_head):
    w = attn.c_attn.weight  # Conv1D: (d_model, 3*d_model)
    d_model = w.shape[0]
    wv = w.split(heads * d_head, dim=1)[2]
    wo = attn.c_proj.weight  # Conv1D: (heads*d_head, d_model), out = x @ wo
    return wv.view(d_model, heads, d_head).permute(1, 0, 2), wo.view(heads, d_head, wo.shape[1])


def hf_config(arch: Architecture):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=arch.vocab, n_embd=arch.hidden, n_layer=arch.layers, n_head=arch.heads,
        n_positions=arch.max_positions, n_inner=arch.intermediate, layer_norm_epsilon=arch.norm_eps,
        bos_token_id=0, eos_token_id=0,
    )


FAMILY = Family(
    NAME, model_types=("gpt2",),
    attention="attn", projections=("c_attn",), out_proj="c_proj", final_norm="transformer.ln_f",
    split_qkv=split_qkv, qk_weights=qk_weights, ov_weights=ov_weights, rotary=None, hf_config=hf_config,
    architectures=(
        Architecture("gpt2", NAME, layers=12, heads=12, hidden=768,
                     intermediate=3072, vocab=50257, max_positions=1024),
    ),
    hub_ids={"openai-community/gpt2": "gpt2", "gpt2": "gpt2"},
)
