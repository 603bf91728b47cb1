"""Plain reference implementations, straight from DEFINITIONS.md, for checking fast code."""

from __future__ import annotations

import numpy as np


def brute_key_kernel_metrics(keys: np.ndarray, ridge: float = 1e-2, center: bool = True) -> dict[str, float]:
    """Form the N x N Gram of one head's keys (N, d) and take its eigenvalues directly."""
    k = np.asarray(keys, dtype=np.float64)
    if center:
        k = k - k.mean(axis=0)
    gram = k @ k.T / k.shape[1] + ridge * np.eye(k.shape[0])
    eig = np.sort(np.linalg.eigvalsh(gram))[::-1]
    return brute_metrics(eig)


def brute_metrics(values: np.ndarray) -> dict[str, float]:
    values = np.asarray(values, dtype=np.float64)
    p = values / values.sum()
    p = p[p > 0]
    entropy = float(-(p * np.log(p)).sum())
    return {
        "lambda1": values[0], "lambda2": values[1],
        "gap": (values[0] - values[1]) / values[0], "instability": values[1] / values[0],
        "entropy": entropy, "effective_rank": float(np.exp(entropy)),
        "condition_number": values[0] / values[-1],
        "lambda3_ratio": values[2] / values[0] if len(values) > 2 else float("nan"),
        "participation_ratio": values.sum() ** 2 / (values ** 2).sum(),
        "stable_rank": values.sum() / values[0],
        "lambda1_share": values[0] / values.sum(),
    }
