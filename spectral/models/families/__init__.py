"""The model families eigengap supports: one module per family, one line each in ``FAMILIES``.

Each module (``gpt_neox.py``, ``llama.py``, ``gpt2.py``, ``bert.py``) defines ``FAMILY``, a
:class:`~spectral.models.families.family.Family` holding everything about that family: its
module paths, head split, weights, rotary function, ``hf_config`` builder, the
``config.model_type`` values it serves, its shipped architectures and their hub ids. The
shipped architectures (``ARCHITECTURES``), hub ids (``HUB_IDS``) and pip-packaged real weights
(``PACKAGED``) are views of this registry.

To add a family: write ``spectral/models/families/<name>.py`` after the others (its
``split_qkv``, ``qk_weights``, attribute names, ``rotary``, ``hf_config``, model types, shipped
architectures and hub ids) and add its module name to ``MODULES``, one line. The adapter
finds the layer list by structure. A tiny twin in ``tests/conftest.py::TINY`` puts a decoder
family through ``tests/test_adapter.py`` like the others (an encoder, BERT, has its own
``tests/test_bert.py``: those tests read next-token logits).
"""

from __future__ import annotations

from importlib import import_module

from spectral.errors import UsageError
from spectral.models.architectures import Architecture
from spectral.models.families.family import Family, PackagedWeights

MODULES = (
    "gpt_neox",
    "llama",
    "gpt2",
    "bert",
)
"""The family modules of this package, one line each; each defines ``FAMILY``."""


def _registry(*families: Family) -> dict[str, Family]:
    out: dict[str, Family] = {}
    for family in families:
        if family.name in out:
            raise ValueError(f"model family {family.name!r} is registered twice")
        out[family.name] = family
    return out


FAMILIES: dict[str, Family] = _registry(*(import_module(f"{__name__}.{m}").FAMILY for m in MODULES))
"""Family name -> family, in registry order."""


def _unique(pairs, what: str) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"{what} {key!r} is declared by two model families")
        out[key] = value
    return out


BY_MODEL_TYPE: dict[str, Family] = _unique(((t, f) for f in FAMILIES.values() for t in f.model_types), "model type")
"""``config.model_type`` -> the family that serves it."""
ARCHITECTURES: dict[str, Architecture] = _unique(
    ((a.name, a) for f in FAMILIES.values() for a in f.architectures), "architecture")
"""Every shipped architecture, by name (what follows ``random:`` in a model spec)."""
HUB_IDS: dict[str, str] = _unique(((h, a) for f in FAMILIES.values() for h, a in f.hub_ids.items()), "hub id")
"""Hub id -> the shipped architecture it has (planned offline)."""
PACKAGED: dict[str, PackagedWeights] = _unique(
    ((n, w) for f in FAMILIES.values() for n, w in f.packaged.items()), "packaged model name")
"""Model-spec name -> real weights a pip package ships (``minilm``: all-MiniLM-L6-v2)."""


def family_for(model_type: str | None) -> Family:
    """The family serving ``config.model_type``; a UsageError naming the supported types otherwise."""
    family = BY_MODEL_TYPE.get(model_type) if model_type is not None else None
    if family is None:
        raise UsageError(f"unsupported model type {model_type!r} (supported: {', '.join(sorted(BY_MODEL_TYPE))})")
    return family


def family_of(model) -> Family:
    """The family of a Hugging Face model, from ``config.model_type``."""
    return family_for(getattr(getattr(model, "config", None), "model_type", None))


__all__ = ["ARCHITECTURES", "BY_MODEL_TYPE", "FAMILIES", "HUB_IDS", "PACKAGED", "Family", "PackagedWeights",
           "family_for", "family_of"]
