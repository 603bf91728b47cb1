"""The CE score of an SAE spliced into the forward pass (issue 16, point 2).

``(CE_zero - CE_spliced) / (CE_zero - CE_clean)``: the model's mean next-token cross-entropy
over pairs of real tokens with the head's (or the layer's heads') result unedited (clean), set
to 0 (zero), or replaced by the SAE's reconstruction (spliced); 1 for a perfect reconstruction,
0 for one no better than removing the head. NaN with a status when zero ablation moves the loss
by less than ``max(1e-6, 1e-4 * CE_clean)``, or when a loss is not finite.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from spectral.errors import UsageError
from spectral.kernels.scan import ScanSettings, input_device, token_batches
from spectral.models.adapter import HeadAdapter
from spectral.saes.metrics import TopKSAE

_ABLATION_ABS, _ABLATION_REL = 1e-6, 1e-4


@dataclass(frozen=True)
class SpliceResult:
    ce_clean: float
    ce_zero: float
    ce_spliced: float
    """Mean next-token cross-entropy (nats) over real tokens: unedited, zero-ablated, spliced."""
    tokens: int
    """Next-token predictions averaged over."""
    score: float
    """(CE_zero - CE_spliced) / (CE_zero - CE_clean); NaN unless status is "ok"."""
    status: str
    """"ok", "no_ablation_effect" (zero ablation leaves the loss unchanged) or "non_finite"."""


def splice_score(loaded, prompts: Sequence[str], sae: TopKSAE, layer: int, head: int | None = None, *,
                 batch_size: int = 8, max_tokens: int | None = None) -> SpliceResult:
    """The CE score of ``sae`` spliced in for head ``head`` of ``layer`` (its result, d_in =
    d_head), or for all the layer's heads together when ``head`` is None (d_in = heads * d_head)."""
    return splice_scores(loaded, prompts, [SpliceTarget(sae, layer, head)], batch_size=batch_size,
                         max_tokens=max_tokens)[0]


@dataclass(frozen=True)
class SpliceTarget:
    """One SAE and where it is spliced: head ``head`` of ``layer``, or the whole layer (None)."""

    sae: TopKSAE
    layer: int
    head: int | None = None


def splice_scores(loaded, prompts: Sequence[str], targets: Sequence[SpliceTarget], *, batch_size: int = 8,
                  max_tokens: int | None = None) -> list[SpliceResult]:
    """``splice_score`` of many SAEs on the same prompts, each result equal to its own call: per
    batch the clean loss once, the zero-ablated loss once per distinct (layer, head) and the
    spliced loss once per SAE."""
    adapter = HeadAdapter(loaded.model)
    adapter.require_causal_lm("the SAE CE splice")
    adapter.check_layers(sorted({t.layer for t in targets}))
    adapter.check_heads(sorted({t.head for t in targets if t.head is not None}))
    for t in targets:
        d_in = adapter.d_head if t.head is not None else adapter.n_heads * adapter.d_head
        if t.sae.d_in != d_in:
            what = f"head {t.head}'s result" if t.head is not None else f"layer {t.layer}'s heads' results"
            raise UsageError(f"SAE reads d_in={t.sae.d_in}; {what} has {d_in} dimensions")
    device = input_device(loaded.model)
    saes = [t.sae.to(device) for t in targets]
    sites = sorted({(t.layer, t.head) for t in targets}, key=lambda lh: (lh[0], -1 if lh[1] is None else lh[1]))
    clean, zero, spliced, count = 0.0, dict.fromkeys(sites, 0.0), [0.0] * len(targets), 0
    for ids, mask in token_batches(loaded, list(prompts), ScanSettings(batch_size=batch_size, max_tokens=max_tokens)):
        ids, mask = ids.to(device), mask.to(device)
        total, n = _nll(adapter, ids, mask, {})
        clean += total
        count += n
        for site in sites:
            zero[site] += _nll(adapter, ids, mask, _edits(*site, torch.zeros_like))[0]
        for i, t in enumerate(targets):
            fn = (lambda sae: lambda x: sae.reconstruct(x.float()).to(x.dtype))(saes[i])
            spliced[i] += _nll(adapter, ids, mask, _edits(t.layer, t.head, fn))[0]
    if count == 0:
        raise UsageError("SAE CE splice: the prompts give no next-token predictions")
    out = []
    for i, t in enumerate(targets):
        c, z, s = clean / count, zero[(t.layer, t.head)] / count, spliced[i] / count
        out.append(SpliceResult(c, z, s, count, *ce_score(c, z, s)))
    return out


def ce_score(clean: float, zero: float, spliced: float) -> tuple[float, str]:
    """(score, status) with the guard described in the module docstring."""
    if not all(np.isfinite([clean, zero, spliced])):
        return float("nan"), "non_finite"
    if abs(zero - clean) < max(_ABLATION_ABS, _ABLATION_REL * abs(clean)):
        return float("nan"), "no_ablation_effect"
    return (zero - spliced) / (zero - clean), "ok"


def _edits(layer: int, head: int | None, replace_fn: Callable[[Tensor], Tensor]) -> dict:
    def edit(z: Tensor) -> Tensor:  # (batch, pos, head, d_head)
        if head is None:
            return replace_fn(z.flatten(-2)).unflatten(-1, z.shape[-2:])
        out = z.clone()
        out[..., head, :] = replace_fn(z[..., head, :])
        return out
    return {(layer, "result"): edit}


@torch.no_grad()
def _nll(adapter: HeadAdapter, ids: Tensor, mask: Tensor, edits: dict) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over pairs of real tokens, and their count."""
    with adapter.trace([], edits=edits):
        logits = adapter.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    valid = mask[:, 1:].bool()
    return float(nll[valid].sum()), int(valid.sum())
