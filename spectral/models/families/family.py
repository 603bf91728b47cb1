"""The record one model-family module fills in: ``Family``.

A family module (``gpt_neox.py``, ``llama.py``, ``gpt2.py``, ``bert.py``) is the only place eigengap knows
how that family is laid out and what of it ships. Its heavy pieces (transformers' config
classes, the family's rotary function) are imported when first used, so that reading specs
and the shipped architectures stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from spectral.models.architectures import Architecture

if TYPE_CHECKING:
    from torch import Tensor, nn
    from transformers import PretrainedConfig

QKV = tuple["Tensor", "Tensor", "Tensor"]
"""q (batch, pos, heads, d_head); k and v (batch, pos, kv_heads, d_head)."""


@dataclass(frozen=True)
class PackagedWeights:
    """A real checkpoint shipped inside a pip package (an extra of ``make install``)."""

    module: str
    """The importable package holding it."""
    subdir: str
    """The checkpoint directory inside the package (config.json, safetensors, tokenizer)."""
    requirement: str
    """The pinned pip requirement that installs it."""
    architecture: str
    """Name of the shipped architecture it has (its ``random:`` twin)."""


@dataclass(frozen=True, eq=False)
class Family:
    """Everything eigengap knows about one model family: where its per-head quantities live
    in the unmodified Hugging Face modules, how to build a config of a given shape, and which
    architectures and hub ids of it are shipped."""

    name: str
    """The family's name, what ``Architecture.family`` holds."""
    model_types: tuple[str, ...]
    """Every ``config.model_type`` the family serves (Llama's layout also serves Mistral)."""
    attention: str
    """Attribute (dotted path) of a block holding its self-attention module."""
    projections: tuple[str, ...]
    """Attributes (dotted paths) of the attention module whose outputs hold q, k, v."""
    out_proj: str
    """Attribute (dotted path) of the attention module whose input is the per-head result (pre-projection)."""
    final_norm: str
    """Dotted path, from the CausalLM model, of the norm applied after the last block; empty for an
    encoder (no next-token head)."""
    split_qkv: Callable[[nn.Module, dict[str, Tensor], int, int, int], QKV]
    """(attention module, projection outputs by name, heads, kv_heads, d_head) -> q, k, v."""
    qk_weights: Callable[[nn.Module, int, int, int], tuple[Tensor, Tensor]]
    """(attention module, heads, kv_heads, d_head) -> W_Q (heads, d_model, d_head), W_K (kv_heads, d_model, d_head)."""
    ov_weights: Callable[[nn.Module, int, int, int], tuple[Tensor, Tensor]]
    """(attention module, heads, kv_heads, d_head) -> W_V (kv_heads, d_model, d_head), W_O (heads, d_head, d_model):
    a head writes ``(x W_V) W_O`` into the residual stream (biases excluded)."""
    rotary: Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]] | None
    """(q, k, cos, sin) -> rotated q, k, both (batch, pos, heads, d_head), by the family's own
    ``apply_rotary_pos_emb``; None for an unrotated family."""
    hf_config: Callable[[Architecture], PretrainedConfig]
    """A Hugging Face config with the exact shape of an architecture of this family."""
    causal: bool = True
    """Whether a query sees only earlier keys (decoders); False for bidirectional encoders."""
    scaling: str = "scaling"
    """Attribute (dotted path) of the attention module holding the factor q k^T is scaled by."""
    special_tokens: bool = False
    """Whether scanned prompts get the tokenizer's special tokens (BERT's ``[CLS] ... [SEP]``, what
    it was trained on); decoders read prompts as they are."""
    packaged: Mapping[str, PackagedWeights] = field(default_factory=dict)
    """Model-spec name -> real weights of this family that a pip package ships (``minilm``)."""
    architectures: tuple[Architecture, ...] = ()
    """The shipped architectures (``random:NAME`` twins, planned offline)."""
    hub_ids: Mapping[str, str] = field(default_factory=dict)
    """Hub id -> name of the shipped architecture it has."""

    def __post_init__(self) -> None:
        names = {a.name for a in self.architectures}
        for arch in self.architectures:
            if arch.family != self.name:
                raise ValueError(f"family {self.name!r}: architecture {arch.name!r} says family {arch.family!r}")
        for hub_id, arch_name in self.hub_ids.items():
            if arch_name not in names:
                raise ValueError(f"family {self.name!r}: hub id {hub_id!r} names no shipped architecture {arch_name!r}")
        for spec_name, weights in self.packaged.items():
            if weights.architecture not in names:
                raise ValueError(f"family {self.name!r}: packaged weights {spec_name!r} name no shipped "
                                 f"architecture {weights.architecture!r}")
