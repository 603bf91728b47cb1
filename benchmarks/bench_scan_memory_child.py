"""The child process of ``bench_scan_memory``: one streamed scan (or plain forward passes)
of N tokens in a fresh interpreter; prints one JSON line.

    .venv/bin/python -m benchmarks.bench_scan_memory_child N [scan|forward]

Kept apart from ``bench_scan_memory`` so that the parent never imports torch: Linux carries
the forking process's peak RSS into the child's ``ru_maxrss`` across exec, so a big parent
would inflate the figure. ``VmHWM`` (the peak of the child's own address space) is reported
beside it as a cross-check.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from benchmarks.bench_scan_memory import BATCH_SIZE, MODEL, PROMPT_TOKENS, SHARD_SIZE, TOKENS
from benchmarks.common import token_prompts
from spectral.kernels.key import KeyStats
from spectral.models.loading import LoadedModel, load_model
from spectral.kernels.scan import ScanSettings, ScanUnit, finalize, scan_unit, shard, token_batches

CHUNK = 256  # prompts generated at a time


def peak_rss_mb() -> float:
    """Peak resident set size so far, MB, from ``getrusage`` (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmHWM``: peak RSS, ``VmRSS``: current), MB."""
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def units(tokenizer, settings: ScanSettings, n_prompts: int) -> Iterator[ScanUnit]:
    """ScanUnits over ``n_prompts`` prompts of ``PROMPT_TOKENS`` tokens, built a chunk at a time."""
    index = 0
    for first in range(0, n_prompts, CHUNK):
        chunk = token_prompts(tokenizer, min(CHUNK, n_prompts - first), PROMPT_TOKENS, first=first)
        for unit in shard(chunk, settings, SHARD_SIZE):
            yield dataclasses.replace(unit, index=index)
            index += 1


def push(loaded: LoadedModel, unit: ScanUnit, mode: str, total: KeyStats | None) -> KeyStats | None:
    """One unit: ``scan`` adds its ``scan_unit`` partial to ``total``; ``forward`` only runs
    plain forward passes over the same batches (and returns None)."""
    if mode == "forward":
        with torch.no_grad():
            for ids, mask in token_batches(loaded, unit.prompts, unit.settings):
                loaded.model(input_ids=ids, attention_mask=mask, use_cache=False)
        return None
    part = scan_unit(loaded, unit)
    return part if total is None else total + part


def stream(loaded: LoadedModel, settings: ScanSettings, n_tokens: int, mode: str) -> tuple[KeyStats | None, dict]:
    """Push ``n_tokens`` tokens through unit by unit. Returns the summed partial (None for
    ``forward``) and a trace: peak RSS by the time each N of ``TOKENS`` had been passed,
    current RSS after the first unit, after the last, and the largest after any unit."""
    total, done, peaks = None, 0, {}
    first = last = largest = 0.0
    for unit in units(loaded.tokenizer, settings, -(-n_tokens // PROMPT_TOKENS)):
        total = push(loaded, unit, mode, total)
        done += len(unit.prompts) * PROMPT_TOKENS
        peaks.update({n: round(peak_rss_mb(), 1) for n in TOKENS if n <= done and n not in peaks})
        last = status_mb("VmRSS")
        first, largest = first or last, max(largest, last)
    return total, {"peak_rss_mb_by_tokens": peaks, "rss_after_first_unit_mb": round(first, 1),
                   "rss_after_last_unit_mb": round(last, 1), "rss_after_unit_max_mb": round(largest, 1)}


def partial_bytes(stats: KeyStats) -> int:
    """Bytes held by a KeyStats partial (the only scan state that lives across batches)."""
    return int(sum(a.nbytes for a in (stats.ktk, stats.ksum, stats.count, stats.n_prompts, stats.nonfinite)))


def main(n_tokens: int, mode: str = "scan") -> dict:
    """Load the model, warm up on one batch, stream ``n_tokens`` tokens; print the figures."""
    loaded = load_model(MODEL)
    settings = ScanSettings(kernel="key", batch_size=BATCH_SIZE, max_tokens=PROMPT_TOKENS)
    warm = token_prompts(loaded.tokenizer, BATCH_SIZE, PROMPT_TOKENS)
    scan_unit(loaded, ScanUnit(-1, tuple(warm), settings))  # allocator, thread pools
    after_load = peak_rss_mb()
    start = time.perf_counter()
    total, trace = stream(loaded, settings, n_tokens, mode)
    result = finalize(total, settings) if total is not None else None
    seconds = time.perf_counter() - start
    tokens = int(result.n_tokens[0, 0]) if result is not None else -(-n_tokens // PROMPT_TOKENS) * PROMPT_TOKENS
    row = {"mode": mode, "tokens_requested": n_tokens, "tokens": tokens,
           "peak_rss_mb": round(peak_rss_mb(), 1), "vm_hwm_mb": round(status_mb("VmHWM"), 1),
           "peak_rss_after_load_mb": round(after_load, 1), **trace,
           "partial_bytes": partial_bytes(total) if total is not None else None,
           "seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds),
           "all_heads_ok": bool((result.status == "ok").all()) if result is not None else None,
           "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main(int(sys.argv[1]), *sys.argv[2:3])
