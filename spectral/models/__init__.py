"""Model access: specs, loading, tokenizers, the per-family layout and the head adapter."""

from typing import Literal

Device = Literal["auto", "cpu", "cuda"]
"""Where a model runs ('auto': a CUDA GPU when there is one; ``loading.resolve_device``)."""
DType = Literal["float32", "bfloat16", "float16"]
"""Weights dtype (statistics are always accumulated in float64)."""
