"""eigengap's scan vs the earlier study's approach (target: same gaps, >= 50x faster).

The baseline, written plainly here: for every (layer, head), one forward pass over all
prompts capturing that head's keys, then the N x N centred Gram + ridge and eigvalsh.

    .venv/bin/python -m benchmarks.scan_vs_naive
"""

from __future__ import annotations

import time

import numpy as np
import torch

from benchmarks.common import prompts, record
from spectral.adapter import HeadAdapter
from spectral.loading import load_model
from spectral.scan import ScanSettings, ScanUnit, finalize, scan_unit, token_batches

MODEL = "random:pythia-410m?layers=2&hidden=128&heads=4&vocab=512"
RIDGE = 1e-2


def naive_gap(loaded, adapter, batches, layer: int, head: int) -> float:
    """One head: its own forward passes, an N x N Gram, a dense eigendecomposition."""
    pooled = []
    for ids, mask in batches:
        keys = adapter.run(ids, mask, sites=["keys_raw"], layers=[layer])[(layer, "keys_raw")]
        pooled.append(keys[:, :, head][mask.bool()].double().numpy())
    k = np.concatenate(pooled)
    k = k - k.mean(axis=0)
    gram = k @ k.T / k.shape[1] + RIDGE * np.eye(len(k))
    eig = np.linalg.eigvalsh(gram)[::-1]
    return (eig[0] - eig[1]) / eig[0]


def main(n_prompts: int = 56) -> None:
    loaded = load_model(MODEL)
    adapter = HeadAdapter(loaded.model)
    settings = ScanSettings(batch_size=8, ridge=RIDGE)
    unit = ScanUnit(0, tuple(prompts(n_prompts)), settings)
    batches = list(token_batches(loaded, unit.prompts, settings))
    n_tokens = int(sum(m.sum() for _, m in batches))
    start = time.perf_counter()
    result = finalize(scan_unit(loaded, unit), settings)
    t_scan = time.perf_counter() - start
    heads = [(l, h) for l in range(adapter.n_layers) for h in range(adapter.n_heads)]
    start = time.perf_counter()
    naive = {lh: naive_gap(loaded, adapter, batches, *lh) for lh in heads}
    t_naive = time.perf_counter() - start
    diff = max(abs(naive[(l, h)] - result.metrics.gap[l, h]) for l, h in heads)
    record("scan_vs_naive", {"model": MODEL, "heads": len(heads), "pooled_tokens": n_tokens,
                             "scan_s": round(t_scan, 3), "naive_s": round(t_naive, 2),
                             "speedup": round(t_naive / t_scan, 1), "max_abs_gap_difference": diff,
                             "target_speedup_min": 50})


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
