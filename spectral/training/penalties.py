"""A differentiable key-kernel gap and a gap penalty (issue 20, point 1: "a direct differentiable gap
penalty on chosen heads' key kernels").

``key_gap`` is the scan's gap (docs: DEFINITIONS, ``spectral.kernels.key``) of one head's key kernel
over a batch's real tokens, G = scale x Kc Kc^T + ridge x I (N x N, Kc the centred keys, scale
1 / d_head), computed in the dual form: the non-zero eigenvalues of Kc Kc^T are those of Kc^T Kc
(d_head x d_head), so lambda_i(G) = scale x mu_i + ridge and

    gap = (lambda_1 - lambda_2) / lambda_1 = scale (mu_1 - mu_2) / (scale mu_1 + ridge),

with mu from ``torch.linalg.eigvalsh`` (differentiable; its gradient is undefined where mu_1 = mu_2,
where the gap is 0 and a penalty pushing it down has nothing left to push). ``gap_penalty`` pushes a
gap toward a target from one side: ``up`` penalises gap < target, ``down`` gap > target (squared
hinge), so a head already past its target is left alone.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from spectral.errors import UsageError

Direction = Literal["up", "down"]


def key_gap(keys: Tensor, mask: Tensor | None = None, *, ridge: float = 1e-2, scale: float | None = None,
            center: bool = True) -> Tensor:
    """The gap of the key kernel of ``keys`` (..., pos, d_head) over the positions where ``mask``
    (..., pos) is true, pooled over every leading batch position: one kernel per call, a scalar.
    ``keys`` may be (batch, pos, d_head) for one head."""
    d = keys.shape[-1]
    x = keys.reshape(-1, d) if mask is None else keys[mask.bool()].reshape(-1, d)
    if x.shape[0] < 2:
        raise UsageError(f"key_gap: a kernel needs at least 2 keys, got {x.shape[0]}")
    x = x.double() if x.dtype != torch.float64 else x
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    mu = torch.linalg.eigvalsh(x.T @ x)  # ascending
    s = 1.0 / d if scale is None else scale
    return s * (mu[-1] - mu[-2]) / (s * mu[-1] + ridge)


def gap_penalty(gap: Tensor, target: float, direction: Direction) -> Tensor:
    """Squared hinge toward ``target`` in (0, 1): (target - gap)_+^2 for ``up``, (gap - target)_+^2 for ``down``."""
    if not 0 < target < 1:
        raise UsageError(f"the target gap must lie in (0, 1), got {target}")
    if direction == "up":
        return torch.clamp(target - gap, min=0) ** 2
    if direction == "down":
        return torch.clamp(gap - target, min=0) ** 2
    raise UsageError(f"the penalty's direction must be 'up' or 'down', got {direction!r}")
