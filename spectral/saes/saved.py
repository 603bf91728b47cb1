"""A trained SAE as saved by ``spectral.saes.train`` (SAELens' layout, the per-head
normalisation folded into the weights, its statistics in ``cfg.json``'s ``metadata.eigengap``)
read back as the plain-tensor ``spectral.saes.metrics.TopKSAE`` the metrics and the splice
take: the normalisation unfolded again, so metrics are measured in the normalised space the SAE
was trained in."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from spectral.errors import UsageError
from spectral.saes.metrics import TopKSAE

WEIGHTS = "sae_weights.safetensors"
CONFIG = "cfg.json"


def folded_stats(cfg: dict, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (d_in,), scale (d_in,)) of a saved SAE: each source head's scale repeated over its
    dimensions, in source order (a layer SAE concatenates its heads' z)."""
    meta = (cfg.get("metadata") or {}).get("eigengap")
    if not meta or "mean" not in meta or "scale" not in meta:
        raise UsageError("saved SAE: cfg.json has no metadata.eigengap mean/scale (not trained by eigengap)")
    mean = torch.tensor(meta["mean"], dtype=torch.float32)
    scales = meta["scale"]
    if len(mean) != d_in or d_in % len(scales):
        raise UsageError(f"saved SAE: {len(mean)} means and {len(scales)} scales do not fit d_in {d_in}")
    scale = torch.tensor(scales, dtype=torch.float32).repeat_interleave(d_in // len(scales))
    return mean, scale


def load_topk(path: str | Path) -> TopKSAE:
    """The SAE saved in directory ``path`` as a normalised-space ``TopKSAE``."""
    path = Path(path)
    if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
        raise UsageError(f"{path}: not a saved SAE (needs {WEIGHTS} and {CONFIG})")
    cfg = json.loads((path / CONFIG).read_text())
    w = load_file(str(path / WEIGHTS))
    d_in = w["W_enc"].shape[0]
    mean, scale = folded_stats(cfg, d_in)
    return TopKSAE.from_folded(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], int(cfg["k"]), mean, scale,
                               bool(cfg.get("apply_b_dec_to_input", True)))
