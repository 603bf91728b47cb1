"""What every kernel's ``finalize`` produces and shares: ``KernelResult`` (metrics per layer and
head, with a status), the status values, the rank tolerance, and metrics of spectra of unequal
length. The kernels themselves: ``key.py`` (key Gram), ``attention.py`` (scores and
probabilities), ``weights.py`` (W_Q W_K^T); their registry: ``registry.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spectral.kernels.metrics import METRICS, SpectrumMetrics, spectrum_metrics


def rank_tolerance(largest: np.ndarray, size: int, eps: float) -> np.ndarray:
    """numpy's matrix_rank convention: values below largest x size x eps of the input dtype
    are not resolved by the data (keys, scores and probabilities arrive in the model's
    dtype), so they count as zero: rank-deficient, condition number inf."""
    return largest * size * eps

STATUS_OK = "ok"
STATUS_FEW_TOKENS = "too_few_tokens"
STATUS_RANK = "rank_deficient"
STATUS_NONFINITE = "non_finite"


@dataclass
class KernelResult:
    """Spectral metrics per (layer, head) of one kernel over a prompt set."""

    metrics: SpectrumMetrics
    """Arrays of shape (layers, heads); NaN where ``status`` is not ok/rank_deficient."""
    n_tokens: np.ndarray
    """(layers, heads) tokens that entered the kernel (pooled N, or summed T)."""
    n_prompts: np.ndarray
    """(layers, heads) prompts that entered it."""
    rank: np.ndarray
    """(layers, heads) numerical rank of the kernel before the ridge."""
    status: np.ndarray
    """(layers, heads) strings: ok, too_few_tokens, rank_deficient, non_finite."""
    ridge: np.ndarray | None = None
    """(layers, heads) the ridge added (key kernel; per head under the relative ridge)."""
    entropy_dhead: np.ndarray | None = None
    """(layers, heads) entropy over the d_head eigenvalues alone (key kernel; see
    ``spectral.kernels.metrics.dhead_entropy``)."""


def metrics_with_padding(top: np.ndarray, fill_value: float | np.ndarray, fill_count: np.ndarray) -> SpectrumMetrics:
    """spectrum_metrics for rows whose trailing entries are NaN (fewer than k values)."""
    n_valid = (~np.isnan(top)).sum(-1)
    fill_value = np.broadcast_to(np.asarray(fill_value, dtype=np.float64), top.shape[:-1])
    out: dict[str, np.ndarray] = {name: np.full(top.shape[:-1], np.nan) for name in METRICS}
    for m in np.unique(n_valid):
        if m < 1:
            continue
        sel = n_valid == m
        res = spectrum_metrics(top[sel][:, :m], fill_value[sel], fill_count[sel])
        for name, values in res.as_dict().items():
            out[name][sel] = values
    return SpectrumMetrics(out)


def blank(metrics: SpectrumMetrics, where: np.ndarray) -> None:
    """Set every metric to NaN where ``where`` (a failed head is no number, never a made-up one)."""
    for values in metrics.as_dict().values():
        values[where] = np.nan
