"""GPT-NeoX (Pythia): module paths, head split, weights, rotary, config, shipped architectures."""

from __future__ import annotations

from spectral.models.architectures import Architecture
from spectral.models.families.family import QKV, Family

NAME = "gpt_neox"


def split_qkv(attn, outs, heads, kv_heads, d_head) -> QKV:
    qkv = outs["query_key_value"]
    qkv = qkv.view(*qkv.shape[:-1], heads, 3 * d_head)  # (batch, pos, heads, 3*d_head)
    q, k, v = qkv.chunk(3, dim=-1)
    return q, k, v


def qk_weights(attn, heads, kv_heads, d_head):
    w = attn.query_key_value.weight  # (3*d_model, d_model), rows per head [q | k | v]
    w = w.view(heads, 3, d_head, w.shape[-1])  # (heads, 3, d_head, d_model)
    return w[:, 0].transpose(1, 2), w[:, 1].transpose(1, 2)


def ov_weights(attn, heads, kv_heads, d_head):
    w = attn.query_key_value.weight
    w = w.view(heads, 3, d_head, w.shape[-1])  # (heads, 3, d_head, d_model)
    wo = attn.dense.weight  # (d_model, d_model), out = x @ wo.T; head h reads input columns h*d_head...
    return w[:, 2].transpose(1, 2), wo.T.reshape(heads, d_head, wo.shape[0])


def rotary(q, k, cos, sin):
    """GPT-NeoX's own rotation: only the first ``rotary_pct`` of d_head turns."""
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)


def hf_config(arch: Architecture):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=arch.vocab, hidden_size=arch.hidden, num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads, max_position_embeddings=arch.max_positions,
        intermediate_size=arch.intermediate, rotary_pct=arch.rotary_pct,
        rotary_emb_base=arch.rope_theta, layer_norm_eps=arch.norm_eps,
        use_parallel_residual=True, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0,
    )


FAMILY = Family(
    NAME, model_types=("gpt_neox",),
    attention="attention", projections=("query_key_value",), out_proj="dense", final_norm="gpt_neox.final_layer_norm",
    split_qkv=split_qkv, qk_weights=qk_weights, ov_weights=ov_weights, rotary=rotary, hf_config=hf_config,
    architectures=(
        Architecture("pythia-410m", NAME, layers=24, heads=16, hidden=1024,
                     intermediate=4096, vocab=50304, rotary_pct=0.25),
        Architecture("pythia-1b", NAME, layers=16, heads=8, hidden=2048,
                     intermediate=8192, vocab=50304, rotary_pct=0.25),
        Architecture("pythia-2.8b", NAME, layers=32, heads=32, hidden=2560,
                     intermediate=10240, vocab=50304, rotary_pct=0.25),
    ),
    hub_ids={"EleutherAI/pythia-410m": "pythia-410m", "EleutherAI/pythia-1b": "pythia-1b",
             "EleutherAI/pythia-2.8b": "pythia-2.8b"},
)
