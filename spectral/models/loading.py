"""Load a model and its tokenizer from any model spec, through one function.

Decoders load as ``AutoModelForCausalLM``; encoders (a family with ``causal=False``: BERT) as
``AutoModel``, the bare encoder without a task head.

Security: weights are read from safetensors only (``use_safetensors=True``: a checkpoint
that only has pickle weights is refused), and ``trust_remote_code`` is off unless the
caller asks for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import (
    AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase,
)

from spectral.errors import UsageError
from spectral.models.architectures import Architecture
from spectral.models.families import BY_MODEL_TYPE, FAMILIES, Family, family_for
from spectral.models.specs import ModelSpec, parse_spec
from spectral.models.tokenizer import byte_tokenizer
from spectral.net import unreachable

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass
class LoadedModel:
    """A model ready for hooks: in eval mode, gradients off."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: ModelSpec


def load_model(
    spec: str | ModelSpec,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    offload_folder: str | Path | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> LoadedModel:
    """Load model + tokenizer for ``spec`` (see ``spectral.models.specs`` for the forms).

    ``device_map`` is handed to ``from_pretrained`` (accelerate sharding over GPUs, CPU and
    disk; ``offload_folder`` holds the weights a map sends to "disk"); ``device`` moves a
    model that was loaded whole. Raises UsageError with one line naming the spec and what
    was tried when it cannot be resolved. ``revision`` (a hub model only) picks a branch, tag or
    commit of the hub repository, e.g. Pythia's intermediate checkpoints ``step1000``.
    """
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if revision is not None and spec.kind != "hub":
        raise UsageError(f"model spec {spec.text!r}: a revision ({revision!r}) applies to hub models only")
    if spec.kind == "random":
        model, tokenizer = _build_random(spec, dtype or torch.float32)
    elif spec.kind == "organism":
        from spectral.organisms import organism_dir  # local import: organisms import loading

        path = organism_dir(spec.name, spec.seed)
        model, tokenizer = _from_pretrained(spec, str(path), dtype, device_map, trust_remote_code, local=True, offload=offload_folder)
    elif spec.kind == "local":
        _check_checkpoint_dir(spec)
        model, tokenizer = _from_pretrained(spec, spec.name, dtype, device_map, trust_remote_code, local=True, offload=offload_folder)
    else:
        model, tokenizer = _from_pretrained(spec, spec.name, dtype, device_map, trust_remote_code, local=False,
                                            offload=offload_folder, revision=revision)
    if device is not None and device_map is None:
        model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, spec)


def hf_config(arch: Architecture):
    """A Hugging Face config with the exact shape of ``arch``, built by its family."""
    return FAMILIES[arch.family].hf_config(arch)


def model_class(model_type: str | None):
    """The transformers auto class a model type loads with: ``AutoModel`` for an encoder family,
    ``AutoModelForCausalLM`` otherwise (decoders, and types no family serves, which the adapter
    refuses later)."""
    family = BY_MODEL_TYPE.get(model_type)
    return AutoModel if family is not None and not family.causal else AutoModelForCausalLM


def resolve_device(device: str | torch.device | None) -> str | torch.device:
    """Where a model runs: ``"auto"`` (or None) is a CUDA GPU when there is one, else the CPU;
    any other device is kept."""
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _build_random(spec: ModelSpec, dtype: torch.dtype):
    arch = spec.architecture()
    tokenizer = byte_tokenizer()
    if arch.vocab < len(tokenizer):
        raise UsageError(f"model spec {spec.text!r}: vocab={arch.vocab} is smaller than the byte tokenizer ({len(tokenizer)})")
    config = hf_config(arch)
    config.pad_token_id = tokenizer.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = model_class(config.model_type).from_config(config, dtype=dtype)
    return model, tokenizer


def _check_checkpoint_dir(spec: ModelSpec) -> None:
    path = Path(spec.name)
    if not (path / "config.json").is_file():
        raise UsageError(f"checkpoint directory {spec.text!r} has no config.json")
    if not any(path.glob("*.safetensors")):
        pickled = any(path.glob("*.bin")) or any(path.glob("*.pt"))
        why = " (only pickle weights found; eigengap loads safetensors only)" if pickled else ""
        raise UsageError(f"checkpoint directory {spec.text!r} has no safetensors weights{why}")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise UsageError(f"checkpoint directory {spec.text!r} has no tokenizer files (looked for {', '.join(_TOKENIZER_FILES)})")


def _from_pretrained(spec, source, dtype, device_map, trust_remote_code, *, local: bool, offload=None, revision=None):
    """from_pretrained for directories and hub ids; the cache is tried first for hub ids (at
    ``revision`` when given)."""
    at = {"revision": revision} if revision is not None else {}
    kwargs = dict(use_safetensors=True, trust_remote_code=trust_remote_code, **at)
    if offload is not None:
        kwargs["offload_folder"] = str(offload)
    offline = local or _hub_offline()
    try:
        AutoConfig.from_pretrained(source, local_files_only=True, trust_remote_code=trust_remote_code, **at)
        cached = True
    except (OSError, ValueError):
        cached = False
    if not cached and offline:
        where = "the directory" if local else "the local Hugging Face cache (HF_HUB_OFFLINE is set)"
        raise UsageError(f"cannot load model spec {spec.text!r}: no usable config.json in {where}")
    if not cached and not _hub_reachable():
        raise UsageError(
            f"cannot load model spec {spec.text!r} (tried: the local Hugging Face cache, then "
            f"{_hub_endpoint()}, which is unreachable)"
        )
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=cached, trust_remote_code=trust_remote_code, **at)
        model = model_class(config.model_type).from_pretrained(
            source, dtype=dtype or "auto", device_map=device_map, local_files_only=cached, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=cached, trust_remote_code=trust_remote_code,
                                                  **at)
    except (OSError, ValueError) as err:
        tried = "local checkpoint directory" if local else ("hub cache" if cached else "hub cache, then the hub")
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot load model spec {spec.text!r} (tried: {tried}): {first}") from err
    return model, tokenizer


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe, so an offline machine fails in seconds instead of retrying for minutes."""
    url = urlparse(_hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    return unreachable(url.hostname, port, timeout) is None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def model_shape(spec: str | ModelSpec) -> tuple[int, int]:
    """(layers, heads) from the architecture or config alone, without loading weights."""
    layers, heads, _ = model_heads(spec)
    return layers, heads


def model_heads(spec: str | ModelSpec) -> tuple[int, int, int]:
    """(layers, query heads, key/value heads) from the architecture or config alone. Grouped-
    query models share one key head among heads / kv_heads query heads: their key kernels are
    identical, so statistics across heads must resample the key groups, not the heads.

    Also the driver's check that the model can be served at all: a checkpoint directory that
    lacks a file, or a model type no family serves, is a UsageError here, before any work."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if spec.kind == "random":
        arch = spec.architecture()
        return arch.layers, arch.heads, arch.kv_heads or arch.heads
    config = _config(spec)
    heads = config.num_attention_heads
    return config.num_hidden_layers, heads, getattr(config, "num_key_value_heads", None) or heads


def model_family(spec: str | ModelSpec) -> Family:
    """The family of a model spec, from its architecture or config alone (no weights)."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if spec.kind == "random":
        return FAMILIES[spec.architecture().family]
    return family_for(_config(spec).model_type)


def require_causal_lm(spec: str | ModelSpec, what: str) -> None:
    """A UsageError, before any work, when ``spec`` is an encoder: ``what`` (a job that reads
    next-token logits: patching, steering, circuits) needs a causal language model."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    family = model_family(spec)
    if not family.causal:
        raise UsageError(f"{what} needs a causal language model's next-token logits; model spec "
                         f"{spec.text!r} is a {family.name} encoder (it can be scanned: eigengap scan)")


def _config(spec: ModelSpec):
    """The config of an organism, local or hub spec (cache first), its model type checked."""
    if spec.kind == "organism":
        from spectral.organisms import organism_dir

        source = str(organism_dir(spec.name, spec.seed))
    elif spec.kind == "local":
        _check_checkpoint_dir(spec)
        source = spec.name
    else:
        source = spec.name
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=spec.kind != "hub" or _hub_offline() or not _hub_reachable())
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read the config of model spec {spec.text!r}: {str(err).splitlines()[0]}") from err
    try:
        family_for(config.model_type)
    except UsageError as err:
        raise UsageError(f"model spec {spec.text!r}: {err}") from None
    return config


def checkpoint_path(loaded: LoadedModel) -> Path | None:
    """The directory a model was loaded from (organisms and local checkpoints), else None."""
    if loaded.spec.kind == "local":
        return Path(loaded.spec.name)
    if loaded.spec.kind == "organism":
        from spectral.organisms import organism_dir

        return organism_dir(loaded.spec.name, loaded.spec.seed)
    return None
