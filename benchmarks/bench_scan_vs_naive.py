"""eigengap's scan vs the earlier study's approach (target: same gaps, >= 50x faster).

The baseline, written plainly here: for every (layer, head) separately, one forward pass
over all prompts capturing that layer's raw keys, that head's real-token keys pooled into K
(N x d_head), centred, the N x N Gram (1/d_head) K K^T + 1e-2 I formed and handed to
``numpy.linalg.eigvalsh``; gap = (l1 - l2) / l1. eigengap's side is ``scan_unit`` +
``finalize`` on the same model and prompts (median of 3 after a warm-up).

By default every head is run through the baseline. ``--heads K`` times only the first K
(layer, head) pairs and extrapolates the baseline time linearly to all heads; the output
then says so (``naive_heads_timed`` < ``heads``, ``naive_extrapolated``: true).

    .venv/bin/python -m benchmarks.bench_scan_vs_naive [--heads K]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from benchmarks.common import count_tokens, prompts, record, timed, times
from spectral.models.adapter import HeadAdapter
from spectral.models.loading import LoadedModel, load_model
from spectral.kernels.scan import ScanSettings, ScanUnit, finalize, scan_unit, token_batches

MODEL = "random:pythia-410m?layers=2&hidden=128&heads=4&vocab=512"
N_PROMPTS = 44  # ~4,200 pooled tokens of demo prompts
MIN_TOKENS = 4000
BATCH_SIZE = 8
RIDGE = 1e-2
TARGET_SPEEDUP_MIN = 50.0


def naive_gap(adapter: HeadAdapter, batches, layer: int, head: int) -> float:
    """One head the old way: its own forward passes, an N x N Gram, a dense eigvalsh."""
    pooled = []
    for ids, mask in batches:
        keys = adapter.run(ids, mask, sites=["keys_raw"], layers=[layer])[(layer, "keys_raw")]
        pooled.append(keys[:, :, head][mask.bool()].to(torch.float64).numpy())  # (real tokens, d_head)
    k = np.concatenate(pooled)
    k = k - k.mean(axis=0)
    gram = k @ k.T / k.shape[1] + RIDGE * np.eye(len(k))
    eig = np.linalg.eigvalsh(gram)[::-1]
    return float((eig[0] - eig[1]) / eig[0])


def scan_gaps(loaded: LoadedModel, unit: ScanUnit) -> np.ndarray:
    """eigengap's way: one scan of all heads, then the d x d reduction; (layers, heads) gaps."""
    return finalize(scan_unit(loaded, unit), unit.settings).metrics.gap


def main(n_heads: int | None = None) -> dict:
    """Time both ways, compare the gaps, record ``results/scan_vs_naive.json``."""
    loaded = load_model(MODEL)
    adapter = HeadAdapter(loaded.model)
    settings = ScanSettings(kernel="key", keys="raw", ridge=RIDGE, center=True, batch_size=BATCH_SIZE)
    unit = ScanUnit(0, tuple(prompts(N_PROMPTS)), settings)
    batches = list(token_batches(loaded, unit.prompts, settings))
    n_tokens = count_tokens(batches)
    assert n_tokens >= MIN_TOKENS, f"only {n_tokens} pooled tokens (need >= {MIN_TOKENS})"

    scan_runs = times(lambda: scan_gaps(loaded, unit), repeats=3, warmup=1)
    t_scan = statistics.median(scan_runs)
    gaps = scan_gaps(loaded, unit)

    heads = [(l, h) for l in range(adapter.n_layers) for h in range(adapter.n_heads)]
    timed_heads = heads[:n_heads] if n_heads else heads
    naive, t_timed = timed(lambda: {lh: naive_gap(adapter, batches, *lh) for lh in timed_heads})
    t_naive = t_timed * len(heads) / len(timed_heads)
    diff = max(abs(naive[(l, h)] - float(gaps[l, h])) for l, h in timed_heads)
    speedup = t_naive / t_scan
    result = {
        "benchmark": "scan_vs_naive", "model": MODEL, "prompts": N_PROMPTS, "pooled_tokens": n_tokens,
        "heads": len(heads), "naive_heads_timed": len(timed_heads),
        "naive_extrapolated": len(timed_heads) < len(heads),
        "scan_s_runs": [round(t, 4) for t in scan_runs], "scan_s": round(t_scan, 4),
        "naive_s_timed": round(t_timed, 2), "naive_s": round(t_naive, 2),
        "naive_s_per_head": round(t_timed / len(timed_heads), 2),
        "speedup": round(speedup, 1), "target_speedup_min": TARGET_SPEEDUP_MIN,
        "target_met": speedup >= TARGET_SPEEDUP_MIN,
        "max_abs_gap_difference": diff, "gap_agreement_met": diff < 1e-6,
        "gap_range": [float(np.min(gaps)), float(np.max(gaps))],
    }
    extrapolated = " (extrapolated linearly from %d heads)" % len(timed_heads) if result["naive_extrapolated"] else ""
    print(f"N={n_tokens} tokens, {len(heads)} heads: scan {t_scan:.3f}s, naive {t_naive:.1f}s{extrapolated}, "
          f"speed-up {speedup:.0f}x (target >= {TARGET_SPEEDUP_MIN:.0f}x: {'met' if result['target_met'] else 'MISSED'}), "
          f"max |gap difference| {diff:.2e}", flush=True)
    record("scan_vs_naive", result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=None, help="time only the first K heads and extrapolate")
    main(parser.parse_args().heads)
