"""Injection: ``coefficient[l] * vector[l]`` added to the residual entering block ``l`` at the
chosen positions, through scoped edits of the adapter (the same code for GPT-NeoX, Llama and
GPT-2)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from spectral.errors import UsageError

Positions = Literal["all", "last"] | int
"""Where a vector is added: every position, each prompt's last real token only, or one token
index (0-based; sequences shorter than that are left alone)."""


@dataclass(frozen=True)
class Injection:
    """``coefficients[l] * vectors[l]`` added to the residual entering block ``l``."""

    vectors: Mapping[int, Tensor]
    coefficients: Mapping[int, float]
    positions: Positions = "all"

    def __post_init__(self):
        for layer, c in self.coefficients.items():
            if not np.isfinite(c):
                raise UsageError(f"coefficient of layer {layer} is not finite ({c})")
            if layer not in self.vectors:
                raise UsageError(f"no steering vector for layer {layer}")

    def with_positions(self, positions: Positions) -> Injection:
        """The same vectors and coefficients at other positions (``measure.heldout_loss``: 'all')."""
        return replace(self, positions=positions)

    def edits(self, last: Tensor | None = None) -> dict[tuple[int, str], object]:
        """Adapter edits (scoped to one ``trace``). ``last``: each row's last real position,
        needed for ``positions='last'`` on full prompts."""
        def make(layer: int, coefficient: float):
            def edit(x: Tensor) -> Tensor:
                return add_at(x, (coefficient * self.vectors[layer]).to(x.device, x.dtype), self.positions, last)
            return edit
        return {(l, "resid_pre"): make(l, c) for l, c in self.coefficients.items() if c != 0}


def add_at(x: Tensor, delta: Tensor, positions: Positions, last: Tensor | None) -> Tensor:
    """``x`` (batch, pos, d) with ``delta`` ((d,) or one row per batch item, (batch, d)) added at
    ``positions``: every position ('all'; also when ``last`` is None or there is one position, as
    in a generation step), each row's ``last`` position ('last'), or one token index (rows shorter
    than it are left alone)."""
    per_row = delta.dim() == 2
    if isinstance(positions, int):
        if positions >= x.shape[1]:
            return x
        x = x.clone()
        x[:, positions] += delta
        return x
    if positions == "all" or last is None or x.shape[1] == 1:
        return x + (delta[:, None] if per_row else delta)
    x = x.clone()
    rows = torch.arange(x.shape[0], device=x.device)
    x[rows, last.to(x.device)] += delta
    return x
