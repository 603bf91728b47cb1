"""A model's size facts from its architecture alone: no weights loaded, nothing downloaded.

The model is built on PyTorch's meta device from its config (the shipped architectures for
their hub ids and ``random:`` specs, else the config of a local checkpoint or organism), so
parameter counts are exact. ``eigengap plan`` and the sweep's ``model.json`` read them.
"""

from __future__ import annotations

import torch

from spectral.errors import UsageError
from spectral.models.families import ARCHITECTURES, HUB_IDS
from spectral.models.loading import hf_config, model_class
from spectral.models.specs import parse_spec


def config_of(text: str):
    """The Hugging Face config of a model spec, offline."""
    from transformers import AutoConfig

    spec = parse_spec(text)
    if spec.kind == "random":
        return hf_config(spec.architecture())
    if spec.kind == "hub" and spec.name in HUB_IDS:
        return hf_config(ARCHITECTURES[HUB_IDS[spec.name]])
    if spec.kind == "organism":
        from spectral.organisms import organism_dir

        source = str(organism_dir(spec.name, spec.seed))
    else:
        source = spec.name
    try:
        return AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError):
        raise UsageError(f"cannot plan {text!r} offline: not a shipped architecture ({', '.join(HUB_IDS)}), "
                         "and no config.json in a local directory or the Hugging Face cache") from None


def meta_model(config, dtype: torch.dtype):
    """The model built on the meta device (shapes only), with the class it loads with."""
    with torch.device("meta"):
        return model_class(config.model_type).from_config(config, dtype=dtype)


def model_facts(text: str) -> dict:
    """Size facts of a model from its architecture alone (no weights): parameter count, layers,
    heads per layer, d_model, d_head, family; what cross-model scaling fits need."""
    config = config_of(text)
    params = sum(p.numel() for p in meta_model(config, torch.float32).parameters())
    heads = config.num_attention_heads
    return {"model": text, "family": config.model_type, "parameters": int(params),
            "layers": int(config.num_hidden_layers), "heads": int(heads), "d_model": int(config.hidden_size),
            "d_head": int(config.hidden_size // heads)}
