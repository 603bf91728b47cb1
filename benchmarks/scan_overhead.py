"""Scan time vs one plain forward pass over the same prompts (target: ratio <= 1.5).

    .venv/bin/python -m benchmarks.scan_overhead
"""

from __future__ import annotations

import torch

from benchmarks.common import median_time, prompts, record
from spectral.loading import load_model
from spectral.scan import ScanSettings, ScanUnit, scan_unit, token_batches

MODELS = ("random:pythia-410m?layers=6&hidden=512&heads=8", "random:pythia-410m?layers=6&hidden=256&heads=8&vocab=512")


def measure(spec: str, n_prompts: int = 200, batch_size: int = 8) -> dict:
    loaded = load_model(spec)
    settings = ScanSettings(batch_size=batch_size)
    unit = ScanUnit(0, tuple(prompts(n_prompts)), settings)
    batches = list(token_batches(loaded, unit.prompts, settings))

    @torch.no_grad()
    def forward():
        for ids, mask in batches:
            loaded.model(input_ids=ids, attention_mask=mask, use_cache=False)

    t_forward = median_time(forward)
    t_scan = median_time(lambda: scan_unit(loaded, unit))
    tokens = int(sum(m.sum() for _, m in batches))
    return {"model": spec, "prompts": n_prompts, "tokens": tokens, "forward_s": round(t_forward, 3),
            "scan_s": round(t_scan, 3), "ratio": round(t_scan / t_forward, 3)}


def main() -> None:
    rows = [measure(spec) for spec in MODELS]
    record("scan_overhead", {"target_ratio_max": 1.5, "rows": rows})


if __name__ == "__main__":
    main()
