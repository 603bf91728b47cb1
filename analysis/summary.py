"""Per-layer summaries of a scan table (reads results only)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from spectral.kernels.metrics import UNSTABLE_GAP


@dataclass(frozen=True)
class LayerSummary:
    """The gap landscape of one layer."""

    layer: int
    min_gap: float
    """Smallest gap over the layer's heads (the 'weakest link')."""
    mean_gap: float
    weakest_head: int
    """Head with the smallest gap."""
    n_unstable: int
    """Heads with gap <= the threshold."""
    n_heads: int
    """Heads with a finite gap."""
    n_flagged: int
    """Heads whose status is not ok (see the scan's status column)."""


def layer_summaries(table: pa.Table, threshold: float = UNSTABLE_GAP) -> list[LayerSummary]:
    layer = table["layer"].to_numpy()
    head = table["head"].to_numpy()
    gap = table["gap"].to_numpy(zero_copy_only=False).astype(float)
    status = np.asarray(table["status"].to_pylist())
    out = []
    for l in np.unique(layer):
        sel = layer == l
        g, h = gap[sel], head[sel]
        finite = np.isfinite(g)
        flagged = int((status[sel] != "ok").sum())
        if not finite.any():
            out.append(LayerSummary(int(l), float("nan"), float("nan"), -1, 0, 0, flagged))
            continue
        i = int(np.nanargmin(g))
        out.append(LayerSummary(int(l), float(np.nanmin(g)), float(np.nanmean(g)), int(h[i]),
                                int((g[finite] <= threshold).sum()), int(finite.sum()), flagged))
    return out
