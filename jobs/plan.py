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

import sys
from pathlib import Path

from pydantic import Field

from jobs import registry
from jobs.config import JobConfig, validate
from spectral.models import DType

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class PlanConfig(JobConfig):
    model: str
    """Model spec (hub id of a shipped architecture, random:..., directory, organism-NAME)."""
    gpus_per_actor: int = Field(1, ge=1)
    """GPUs each Ray actor spreads the model over."""
    gpu_memory: float = Field(80.0, gt=0)
    """GiB per GPU."""
    dtype: DType = "bfloat16"
    """Weight dtype."""
    sweep: Path | None = None
    """A sweep config: estimate its forward passes and time."""
    tflops: float = Field(100.0, gt=0)
    """Effective TFLOP/s per GPU for the estimate."""


def device_plan(model, gpus: int, gpu_memory_gb: float) -> tuple[dict, dict[str, float]]:
    """The accelerate device map over ``gpus`` devices of ``gpu_memory_gb`` each, and the
    parameter memory (GiB) placed on each device."""
    import logging

    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes

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


def sweep_tokens(experiments, facts: registry.ModelFacts) -> list[tuple[str, float]]:
    """(experiment kind, token-forward equivalents) for one model, from each kind's cost model."""
    return [(e.kind, float(registry.experiment(e.kind).cost(e.params, facts))) for e in experiments]


def run(model: str, gpus_per_actor: int = 1, gpu_memory: float = 80.0, dtype: str = "bfloat16",
        sweep: str | Path | None = None, tflops: float = 100.0, echo=print) -> dict:
    options = validate(PlanConfig, {"model": model, "gpus_per_actor": gpus_per_actor, "gpu_memory": gpu_memory,
                                    "dtype": dtype, "sweep": sweep, "tflops": tflops})
    return plan(options, echo)


def plan(options: PlanConfig, echo=print) -> dict:
    import torch

    from spectral.models.facts import config_of, meta_model

    model, gpus_per_actor, gpu_memory, dtype = options.model, options.gpus_per_actor, options.gpu_memory, options.dtype
    sweep, tflops = options.sweep, options.tflops
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
        rows = sweep_tokens(config_sweep.experiments, registry.ModelFacts(int(params), int(layers), int(heads)))
        total = 0.0
        for kind, tokens in rows:
            seconds = 2 * params * tokens / (tflops * 1e12)
            total += seconds
            echo(f"  {kind:9s} ~{tokens:,.0f} token-forwards, ~{seconds / 60:.1f} GPU-min at {tflops:g} TFLOP/s")
        actors = config_sweep.workers
        echo(f"  sweep on this model: ~{total / 60:.1f} GPU-min; with {actors} actors of {gpus_per_actor} GPU(s): "
             f"~{total / 60 / actors:.1f} min wall (work units spread evenly)")
        result["sweep_gpu_minutes"] = total / 60
    return result


def add_parser(sub) -> None:
    from jobs.config import add_arguments, parse_config

    parser = sub.add_parser("plan", help="memory, device map and cost from the architecture alone",
                            description=__doc__.splitlines()[0])
    add_arguments(parser, PlanConfig)
    parser.set_defaults(handler=lambda ns: plan(parse_config(PlanConfig, ns)))


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import main as cli_main

    return cli_main(["plan", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    from jobs.cli import exit_now

    exit_now(main())
