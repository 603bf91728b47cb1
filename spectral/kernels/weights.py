"""The weight kernel: W_Q W_K^T of each head, from the weights alone (no prompts, no forward pass)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from spectral.kernels.metrics import spectrum_metrics
from spectral.kernels.registry import KernelSteps
from spectral.kernels.result import STATUS_NONFINITE, STATUS_OK, STATUS_RANK, KernelResult, blank, rank_tolerance


def weight_spectra(wq: Float[Tensor, "head d_model d_head"], wk: Float[Tensor, "head d_model d_head"]) -> np.ndarray:
    """Singular values (head, d_head; descending) of W_Q W_K^T (d_model x d_model) per head.

    With W = Q R (thin QR), W_Q W_K^T = Q_q (R_q R_k^T) Q_k^T, whose singular values are
    those of the d_head x d_head core R_q R_k^T.
    """
    _, rq = torch.linalg.qr(wq.detach().to(torch.float64).cpu())
    _, rk = torch.linalg.qr(wk.detach().to(torch.float64).cpu())
    return torch.linalg.svdvals(rq @ rk.transpose(1, 2)).numpy()


def weight_kernel_result(singular_values: np.ndarray, eps: float = float(np.finfo(np.float32).eps)) -> KernelResult:
    """KernelResult from per-layer weight spectra (layers, heads, d_head); ``eps`` of the weights' dtype."""
    rank = (singular_values > rank_tolerance(singular_values[..., :1], singular_values.shape[-1], eps)).sum(-1)
    singular_values = np.where(np.arange(singular_values.shape[-1]) < rank[..., None], singular_values, 0.0)
    with np.errstate(divide="ignore"):
        metrics = spectrum_metrics(singular_values)
    status = np.where(rank < 2, STATUS_RANK, STATUS_OK).astype(object)
    status[~np.isfinite(singular_values).all(-1)] = STATUS_NONFINITE
    blank(metrics, status == STATUS_NONFINITE)
    zeros = np.zeros(rank.shape, np.int64)
    return KernelResult(metrics, zeros, zeros.copy(), rank, status)


@dataclass
class WeightSpectra:
    """Singular values of every head's W_Q W_K^T and the weights' dtype epsilon."""

    singular_values: np.ndarray  # (layers, heads, d_head) descending
    eps: float

    @classmethod
    def of(cls, adapter) -> WeightSpectra:
        spectra = np.stack([weight_spectra(*adapter.qk_weights(l)) for l in range(adapter.n_layers)])
        return cls(spectra, float(torch.finfo(adapter.qk_weights(0)[0].dtype).eps))


WEIGHTS = KernelSteps(
    site=None,
    start=lambda adapter, settings: WeightSpectra.of(adapter),
    finalize=lambda spectra, settings: weight_kernel_result(spectra.singular_values, eps=spectra.eps),
    keys=lambda settings: "none",
)
