"""``eigengap plan``: memory, device map and cost of a model (and a sweep) from the architecture
alone: no weights are loaded, nothing is downloaded.

The model is built on PyTorch's meta device from its config (the shipped architectures of
Pythia-410M/1B/2.8B and Llama-2-7B for their hub ids and ``random:`` specs, else the config of
a local checkpoint or organism), so the parameter count and the ``accelerate`` device map are
exact. The sweep estimate counts token-forwards per experiment and converts them to time with
FLOPs ~= 2 x parameters x tokens (3x that for a backward pass) at ``--tflops`` effective
throughput per GPU: an order of magnitude, not a promise.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import infer_auto_device_map
from accelerate.utils import compute_module_sizes
from transformers import AutoConfig, AutoModelForCausalLM

from spectral.models.architectures import ARCHITECTURES
from spectral.errors import UsageError
from spectral.models.loading import hf_config
from spectral.models.specs import parse_spec

KNOWN = {"EleutherAI/pythia-410m": "pythia-410m", "EleutherAI/pythia-1b": "pythia-1b",
         "EleutherAI/pythia-2.8b": "pythia-2.8b", "meta-llama/Llama-2-7b-hf": "llama-2-7b",
         "openai-community/gpt2": "gpt2", "gpt2": "gpt2"}
"""Hub ids whose architecture eigengap ships (planned offline)."""

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PROMPT_TOKENS = 24
"""Tokens per prompt assumed for task prompts (IOI and steering prompts are 10-30 tokens)."""


def config_of(text: str):
    spec = parse_spec(text)
    if spec.kind == "random":
        return hf_config(spec.architecture())
    if spec.kind == "hub" and spec.name in KNOWN:
        return hf_config(ARCHITECTURES[KNOWN[spec.name]])
    if spec.kind == "organism":
        from spectral.organisms import organism_dir

        source = str(organism_dir(spec.name, spec.seed))
    else:
        source = spec.name
    try:
        return AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError):
        raise UsageError(f"cannot plan {text!r} offline: not a shipped architecture ({', '.join(KNOWN)}), "
                         "and no config.json in a local directory or the Hugging Face cache") from None


def model_facts(text: str) -> dict:
    """Size facts of a model from its architecture alone (no weights): parameter count, layers,
    heads per layer, d_model, d_head, family; what cross-model scaling fits need."""
    config = config_of(text)
    params = sum(p.numel() for p in meta_model(config, torch.float32).parameters())
    heads = config.num_attention_heads
    return {"model": text, "family": config.model_type, "parameters": int(params),
            "layers": int(config.num_hidden_layers), "heads": int(heads), "d_model": int(config.hidden_size),
            "d_head": int(config.hidden_size // heads)}


def meta_model(config, dtype: torch.dtype):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def device_plan(model, gpus: int, gpu_memory_gb: float) -> tuple[dict, dict[str, float]]:
    """The accelerate device map over ``gpus`` devices of ``gpu_memory_gb`` each, and the
    parameter memory (GiB) placed on each device."""
    import logging

    max_memory = {i: f"{gpu_memory_gb}GiB" for i in range(gpus)}
    quiet = logging.getLogger("accelerate.utils.modeling")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "device N is not available": planning happens off the cluster
    try:
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=model._no_split_modules)
    finally:
        quiet.setLevel(level)
    sizes = compute_module_sizes(model)
    per_device: dict[str, float] = {}
    for name, device in device_map.items():
        per_device[str(device)] = per_device.get(str(device), 0.0) + sizes[name] / 2 ** 30
    return device_map, per_device


def sweep_tokens(experiments, layers: int, heads: int) -> list[tuple[str, float]]:
    """(experiment, token-forward equivalents) for one model."""
    out = []
    for e in experiments:
        p = e.params
        n = p.get("n_examples", 64)
        if e.kind == "scan":
            prompts = p.get("prompts")
            count = sum(1 for line in Path(prompts).read_text().splitlines() if line.strip()) if prompts and Path(prompts).is_file() else 256
            tokens = count * p.get("max_tokens", 256)
        elif e.kind == "patch" and p.get("method") == "attribution":
            tokens = 2 * n * PROMPT_TOKENS + 3 * n * PROMPT_TOKENS + (2 + heads * (layers + 1) / 2) * n * PROMPT_TOKENS
        elif e.kind in ("patch", "validate"):
            tokens = (3 + heads * (layers + 1) / 2) * n * PROMPT_TOKENS  # scan + 2 caches + replays
        else:  # steer: ~15 budget evaluations per strategy and layer, the grid, 64 prompts each
            evaluations = 15 * (4 + layers) + 6 * layers
            tokens = evaluations * 64 * PROMPT_TOKENS
        out.append((e.kind, tokens))
    return out


def run(model: str, gpus_per_actor: int = 1, gpu_memory: float = 80.0, dtype: str = "bfloat16",
        sweep: str | None = None, tflops: float = 100.0, echo=print) -> dict:
    if gpus_per_actor < 1 or gpu_memory <= 0 or tflops <= 0:
        raise UsageError("--gpus-per-actor, --gpu-memory and --tflops must be positive")
    config = config_of(model)
    torch_dtype = getattr(torch, dtype)
    m = meta_model(config, torch_dtype)
    params = sum(p.numel() for p in m.parameters())
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    device_map, per_device = device_plan(m, gpus_per_actor, gpu_memory)
    total_gb = params * BYTES[dtype] / 2 ** 30
    echo(f"{model}: {params / 1e6:,.1f}M parameters, {layers} layers x {heads} heads; "
         f"{total_gb:.2f} GiB of {dtype} weights")
    for device, gb in per_device.items():
        blocks = sorted({int(k.split(".")[-1]) for k, d in device_map.items() if str(d) == device and k.split(".")[-1].isdigit()})
        whole = any(k == "" for k, d in device_map.items() if str(d) == device)
        span = "the whole model" if whole else f"layers {blocks[0]}-{blocks[-1]}" if blocks else "embeddings / head only"
        echo(f"  device {device}: {gb:.2f} GiB of parameters ({span})")
    if any(d in ("cpu", "disk") for d in map(str, device_map.values())):
        echo(f"  the model does not fit on {gpus_per_actor} x {gpu_memory:g} GiB: parts are offloaded (slow); "
             f"ask for more --gpus-per-actor")
    result = {"model": model, "parameters": params, "layers": layers, "heads": heads, "weights_gib": total_gb,
              "per_device_gib": per_device, "device_map": {k: str(v) for k, v in device_map.items()}}
    if sweep:
        from jobs.sweep import read_sweep

        config_sweep = read_sweep(sweep)
        rows = sweep_tokens(config_sweep.experiments, layers, heads)
        total = 0.0
        for kind, tokens in rows:
            seconds = 2 * params * tokens / (tflops * 1e12)
            total += seconds
            echo(f"  {kind:9s} ~{tokens:,.0f} token-forwards, ~{seconds / 60:.1f} GPU-min at {tflops:g} TFLOP/s")
        actors = config_sweep.workers
        echo(f"  sweep on this model: ~{total / 60:.1f} GPU-min; with {actors} actors of {gpus_per_actor} GPU(s): "
             f"~{total / 60 / actors:.1f} min wall (units spread evenly)")
        result["sweep_gpu_minutes"] = total / 60
    return result


def add_parser(sub) -> None:
    parser = sub.add_parser("plan", help="memory, device map and cost from the architecture alone",
                            description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model spec (hub id of a shipped architecture, random:..., directory, organism-NAME)")
    parser.add_argument("--gpus-per-actor", type=int, default=1, help="GPUs each Ray actor spreads the model over (default 1)")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    parser.add_argument("--dtype", choices=list(BYTES), default="bfloat16", help="weight dtype (default bfloat16)")
    parser.add_argument("--sweep", default=None, help="a sweep config: estimate its forward passes and time")
    parser.add_argument("--tflops", type=float, default=100.0, help="effective TFLOP/s per GPU for the estimate (default 100)")
    parser.set_defaults(handler=lambda ns: run(ns.model, ns.gpus_per_actor, ns.gpu_memory, ns.dtype, ns.sweep, ns.tflops))
