"""Shared helpers for benchmarks: timing, deterministic prompts, machine facts, result records."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily: bench_scan_memory's parent process stays small
    import torch

RESULTS = Path(__file__).parent / "results"
DEMO_PROMPTS = Path(__file__).parent.parent / "spectral" / "data" / "demo_prompts.txt"


# ------------------------------------------------------------------ timing
def timed(fn: Callable[[], object]) -> tuple[object, float]:
    """``(fn(), wall seconds)`` measured with ``time.perf_counter``."""
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def times(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    return [timed(fn)[1] for _ in range(repeats)]


def median_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    return statistics.median(times(fn, repeats, warmup))


def best_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Best (smallest) wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    return min(times(fn, repeats, warmup))


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int = 3) -> dict[str, list[float]]:
    """Time each function once per round, ``repeats`` rounds, alternating between them, so
    that background load on a shared machine falls on all of them alike."""
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            out[name].append(timed(fn)[1])
    return out


# ------------------------------------------------------------------ prompts
@lru_cache(maxsize=1)
def demo_lines() -> tuple[str, ...]:
    """The non-empty lines of ``spectral/data/demo_prompts.txt``."""
    return tuple(line for line in DEMO_PROMPTS.read_text().splitlines() if line.strip())


def prompts(n: int) -> list[str]:
    """``n`` English prompts, cycling the demo prompt file."""
    base = demo_lines()
    return [base[i % len(base)] for i in range(n)]


def token_prompts(tokenizer, n_prompts: int, n_tokens: int, first: int = 0) -> list[str]:
    """``n_prompts`` deterministic prompts of ``n_tokens`` tokens each.

    Prompt ``j`` joins demo lines cyclically from line ``first + j`` and is cut to
    ``n_tokens`` tokens of ``tokenizer`` (exact for the byte-level tokenizer of ``random:``
    models; for a BPE tokenizer the decoded text may re-encode to a few tokens more or less).
    """
    lines = demo_lines()
    line_ids = [tokenizer(line + " ", add_special_tokens=False)["input_ids"] for line in lines]
    out = []
    for j in range(first, first + n_prompts):
        ids: list[int] = []
        i = j
        while len(ids) < n_tokens:
            ids += line_ids[i % len(lines)]
            i += 1
        out.append(tokenizer.decode(ids[:n_tokens]))
    return out


def count_tokens(batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Real (unpadded) tokens in a list of ``(input_ids, attention_mask)`` batches."""
    return int(sum(int(mask.sum()) for _, mask in batches))


# ------------------------------------------------------------------ machine and records
def machine() -> dict:
    """CPU model (``lscpu``), cores, torch threads, GPU, torch version, load average."""
    import torch

    try:
        cpu = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (StopIteration, OSError):
        cpu = platform.processor()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()]}


def record(name: str, result: dict) -> Path:
    """Write ``benchmarks/results/NAME.json`` atomically (temp file + rename) and print it."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**result, "machine": machine()}, indent=2) + "\n")
    tmp.replace(path)
    print(json.dumps(result, indent=2))
    return path
