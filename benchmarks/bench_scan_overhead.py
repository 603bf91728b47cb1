"""Scan time vs one plain forward pass over the same token batches (target: ratio <= 1.5).

The scan is ``scan_unit`` on one ScanUnit holding every prompt (key kernel, all layers and
heads); the baseline is ``model(input_ids, attention_mask, use_cache=False)`` under
``torch.no_grad`` over exactly the batches ``token_batches`` builds for the scan. After one
warm-up of each (on the first two batches), the two are timed in alternation, 3 rounds, so
that background load on the machine falls on both alike; the figures are medians.

    .venv/bin/python -m benchmarks.bench_scan_overhead
"""

from __future__ import annotations

import statistics

import torch

from benchmarks.common import count_tokens, interleaved_times, prompts, record
from spectral.models.loading import load_model
from spectral.kernels.scan import ScanSettings, ScanUnit, scan_unit, token_batches

MODELS = (
    "random:pythia-410m?layers=6&hidden=512&heads=8",
    "random:pythia-410m?layers=6&hidden=256&heads=8&vocab=512",
)
N_PROMPTS = 200
BATCH_SIZE = 8
REPEATS = 3
TARGET_RATIO_MAX = 1.5


def forward_all(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """The baseline: one plain forward pass per batch, nothing captured."""
    with torch.no_grad():
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask, use_cache=False)


def measure(spec: str) -> dict:
    """Median forward and scan times (and their ratio) for one model."""
    loaded = load_model(spec)
    settings = ScanSettings(kernel="key", batch_size=BATCH_SIZE)
    unit = ScanUnit(0, tuple(prompts(N_PROMPTS)), settings)
    batches = list(token_batches(loaded, unit.prompts, settings))
    # warm-up: the first two batches through each path
    forward_all(loaded.model, batches[:2])
    scan_unit(loaded, ScanUnit(0, unit.prompts[:2 * BATCH_SIZE], settings))
    runs = interleaved_times({"forward": lambda: forward_all(loaded.model, batches),
                              "scan": lambda: scan_unit(loaded, unit)}, REPEATS)
    t_forward, t_scan = statistics.median(runs["forward"]), statistics.median(runs["scan"])
    ratio = t_scan / t_forward
    return {"model": spec, "prompts": N_PROMPTS, "batch_size": BATCH_SIZE, "batches": len(batches),
            "tokens": count_tokens(batches), "padded_positions": int(sum(m.numel() for _, m in batches)),
            "forward_s_runs": [round(t, 3) for t in runs["forward"]],
            "scan_s_runs": [round(t, 3) for t in runs["scan"]],
            "forward_s": round(t_forward, 3), "scan_s": round(t_scan, 3),
            "ratio_per_round": [round(s / f, 3) for s, f in zip(runs["scan"], runs["forward"])],
            "ratio": round(ratio, 3), "target_met": ratio <= TARGET_RATIO_MAX}


def main() -> dict:
    """Measure every model, record ``results/scan_overhead.json``, print a summary line each."""
    rows = []
    for spec in MODELS:
        rows.append(measure(spec))
        row = rows[-1]
        print(f"{spec}: forward {row['forward_s']:.2f}s, scan {row['scan_s']:.2f}s, "
              f"ratio {row['ratio']:.2f} (target <= {TARGET_RATIO_MAX}: "
              f"{'met' if row['target_met'] else 'MISSED'})", flush=True)
    result = {"benchmark": "scan_overhead", "target_ratio_max": TARGET_RATIO_MAX, "repeats": REPEATS, "rows": rows}
    record("scan_overhead", result)
    return result


if __name__ == "__main__":
    main()
