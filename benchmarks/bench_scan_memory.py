"""Peak memory of key-kernel scans of 62,500 / 250,000 / 1,000,000 tokens (must not grow with N).

Each N runs in a fresh Python process (``bench_scan_memory_child``) that builds prompts of
500 tokens a chunk at a time, splits each chunk into ScanUnits with ``shard``, streams the
units through ``scan_unit`` (batch size 16) and adds the partials, so no more than one
chunk of prompt strings and one batch of tensors exist at once, then finalizes. It reports
peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``, with ``VmHWM`` as a cross-check), the peak
already reached after loading the model and one warm-up batch, the peak by the time each
smaller N had been passed, tokens and tokens/s. A child doing only plain forward passes
over the same 1,000,000 tokens gives the model's own peak for reference.

The series runs twice: with glibc's default malloc, whose dynamic mmap threshold makes
the peak jump by tens of MB from run to run (transient heap growth within a batch), and
with ``MALLOC_MMAP_THRESHOLD_`` fixed at 1 MiB, which removes that noise (at some cost in
speed, so tokens/s are quoted from the default series).

This module imports neither torch nor the model code, so its own (small) RSS cannot leak
into the children's ``ru_maxrss``.

    .venv/bin/python -m benchmarks.bench_scan_memory
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from benchmarks.common import record

MODEL = "random:pythia-410m?layers=2&hidden=128&heads=4&vocab=512"
TOKENS = (62_500, 250_000, 1_000_000)
PROMPT_TOKENS = 500
BATCH_SIZE = 16
SHARD_SIZE = 64  # prompts per ScanUnit
FIXED_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def run_child(n_tokens: int, mode: str, env: dict[str, str] | None = None) -> dict:
    """Run the child in a fresh Python process (extra environment ``env``); its JSON line."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_scan_memory_child", str(n_tokens), mode],
                         capture_output=True, text=True, env={**os.environ, **(env or {})})
    if out.returncode:
        raise RuntimeError(f"child for N={n_tokens} ({mode}) failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def describe(r: dict) -> str:
    return (f"{r['mode']:>7} N={r['tokens']:>9,}: peak RSS {r['peak_rss_mb']:.1f} MB (VmHWM {r['vm_hwm_mb']:.1f}; "
            f"after load + warm-up {r['peak_rss_after_load_mb']:.1f}), RSS after first unit "
            f"{r['rss_after_first_unit_mb']:.0f} MB, after last {r['rss_after_last_unit_mb']:.0f} MB; "
            f"{r['seconds']:.1f}s, {r['tokens_per_s']:,} tokens/s")


def series(env: dict[str, str] | None, label: str) -> dict:
    """Scan children for every N, plus a plain-forward child at the largest N for reference."""
    print(f"-- allocator: {label}", flush=True)
    rows = []
    for n in TOKENS:
        rows.append(run_child(n, "scan", env))
        print(describe(rows[-1]), flush=True)
    forward = run_child(TOKENS[-1], "forward", env)
    print(describe(forward), flush=True)
    peaks = [r["peak_rss_mb"] for r in rows]
    return {"allocator": label, "env": env or {}, "rows": rows, "forward_only": forward,
            "peak_rss_spread_mb": round(max(peaks) - min(peaks), 1),
            "peak_rss_growth_1m_vs_62k_mb": round(peaks[-1] - peaks[0], 1),
            "scan_peak_minus_forward_peak_1m_mb": round(peaks[-1] - forward["peak_rss_mb"], 1)}


def main() -> dict:
    """Both allocator settings; record ``results/scan_memory.json``."""
    default = series(None, "glibc default")
    fixed = series(FIXED_THRESHOLD, "glibc, mmap threshold fixed at 1 MiB")
    result = {"benchmark": "scan_memory", "model": MODEL, "tokens": list(TOKENS),
              "prompt_tokens": PROMPT_TOKENS, "batch_size": BATCH_SIZE, "shard_size": SHARD_SIZE, "series": [default, fixed]}
    record("scan_memory", result)
    return result


if __name__ == "__main__":
    main()
