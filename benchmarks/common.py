"""Shared helpers for benchmarks: timing, prompts, result records."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
DEMO_PROMPTS = Path(__file__).parent.parent / "spectral" / "data" / "demo_prompts.txt"


def median_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prompts(n: int) -> list[str]:
    """``n`` English prompts, cycling the demo prompt file."""
    base = [line for line in DEMO_PROMPTS.read_text().splitlines() if line.strip()]
    return [base[i % len(base)] for i in range(n)]


def machine() -> dict:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (StopIteration, OSError):
        cpu = platform.processor()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__}


def record(name: str, result: dict) -> Path:
    """Write ``benchmarks/results/NAME.json`` (atomically) and print it."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**result, "machine": machine()}, indent=2) + "\n")
    tmp.replace(path)
    print(json.dumps(result, indent=2))
    return path
