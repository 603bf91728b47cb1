"""The summary of one model's feature table (``eigengap features``): per kernel, the spread of
the heads' gaps, how many are at or below the instability threshold, and how the kernel's gaps
rank the heads compared with the key kernel's (one model: descriptive, no verdict; the
population-level comparison is ``analysis.kernel_agreement``)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from scipy import stats

from spectral.features.names import FEATURE_KERNELS


def kernel_rows(table: pa.Table, threshold: float) -> list[dict]:
    """One row per kernel: heads with a gap, its median, min and max, heads at or below
    ``threshold``, and the Spearman correlation of its gaps with key_raw's over the heads."""
    reference = np.asarray(table["key_raw.gap"].to_numpy(), float)
    rows = []
    for kernel in FEATURE_KERNELS:
        gaps = np.asarray(table[f"{kernel}.gap"].to_numpy(), float)
        ok = np.isfinite(gaps)
        both = ok & np.isfinite(reference)
        rho = float("nan")
        if both.sum() >= 3 and np.ptp(gaps[both]) > 0 and np.ptp(reference[both]) > 0:
            rho = float(stats.spearmanr(gaps[both], reference[both]).statistic)
        rows.append({
            "kernel": kernel, "n": int(ok.sum()),
            "median": float(np.median(gaps[ok])) if ok.any() else float("nan"),
            "min": float(gaps[ok].min()) if ok.any() else float("nan"),
            "max": float(gaps[ok].max()) if ok.any() else float("nan"),
            "unstable": int((gaps[ok] <= threshold).sum()), "spearman_key_raw": rho,
        })
    return rows


def kernel_summary(table: pa.Table, threshold: float) -> str:
    """Markdown: the rows of :func:`kernel_rows`."""
    model = table["model"][0].as_py() if table.num_rows else "?"
    lines = [f"# Features of {model}: {table.num_rows} heads", "",
             f"Gap of every kernel over the heads; unstable = gap <= {threshold:g}; rho = Spearman of the kernel's "
             "gaps with key_raw's over this model's heads (one model: descriptive).", "",
             "| kernel | heads | median gap | min | max | unstable | rho vs key_raw |", "|---|---|---|---|---|---|---|"]
    for r in kernel_rows(table, threshold):
        lines.append(f"| {r['kernel']} | {r['n']} | {r['median']:.3f} | {r['min']:.3f} | {r['max']:.3f} | "
                     f"{r['unstable']} | {r['spearman_key_raw']:.2f} |")
    return "\n".join(lines)
