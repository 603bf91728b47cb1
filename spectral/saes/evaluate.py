"""Every trained SAE of one run measured on held-out prompts (issue 16, point 2): one row each.

``evaluate_saes`` streams the evaluation prompts' ``z`` once (one forward pass per batch feeds
every SAE's ``SAEStats``), then measures the CE splice of every SAE on the first prompts
(``spectral.saes.splice.splice_scores``: the clean loss once, the zero-ablated loss once per
target, the spliced loss once per SAE). Per-target quantities across the run's values of ``k``
(the explained-variance-vs-L0 area) are added by ``with_ev_l0_area``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from spectral.errors import UsageError
from spectral.kernels.scan import ScanSettings
from spectral.models.adapter import HeadAdapter
from spectral.models.loading import LoadedModel
from spectral.saes.activations import SaeTargets, head_name, z_stream
from spectral.saes.metrics import (SAEStats, TopKSAE, attribution_entropy, ev_l0_area, feature_dimensionality,
                                   head_attribution)
from spectral.saes.splice import SpliceTarget, splice_scores

NAN = float("nan")


@dataclass(frozen=True)
class SaeEntry:
    """One trained SAE and what it reads."""

    name: str
    """``L3H5_k8`` or ``L3_k8``."""
    target: str
    layer: int
    head: int | None
    """None: the layer's SAE on all heads' ``z`` concatenated in head order."""
    k: int
    sae: TopKSAE

    @property
    def sources(self) -> tuple[str, ...]:
        return (head_name(self.layer, self.head),) if self.head is not None else ()


def entries_targets(entries: Sequence[SaeEntry], n_heads: int, d_head: int) -> SaeTargets:
    """The stream targets that feed ``entries``."""
    heads = tuple(sorted({(e.layer, e.head) for e in entries if e.head is not None}))
    layers = tuple(sorted({e.layer for e in entries if e.head is None}))
    return SaeTargets(heads, layers, n_heads, d_head)


def _inputs(rows: Mapping[str, torch.Tensor], entry: SaeEntry, n_heads: int) -> torch.Tensor:
    if entry.head is not None:
        return rows[head_name(entry.layer, entry.head)]
    return torch.cat([rows[head_name(entry.layer, h)] for h in range(n_heads)], dim=1)


@torch.no_grad()
def evaluate_saes(loaded: LoadedModel, entries: Sequence[SaeEntry], prompts: Sequence[str], settings: ScanSettings,
                  *, eval_tokens: int, splice_prompts: int) -> list[dict]:
    """One dict per entry (in order): the metrics of ``spectral.saes.metrics`` on at most
    ``eval_tokens`` tokens of ``prompts`` (whole batches; at least one), the CE splice on the
    first ``splice_prompts`` prompts, the decoder's feature dimensionality and, for a layer SAE,
    the head attribution entropy."""
    if not entries:
        raise UsageError("no SAEs to evaluate")
    if eval_tokens < 1 or splice_prompts < 1:
        raise UsageError(f"eval_tokens ({eval_tokens}) and splice_prompts ({splice_prompts}) must be >= 1")
    adapter = HeadAdapter(loaded.model)
    targets = entries_targets(entries, adapter.n_heads, adapter.d_head)
    stats = [SAEStats(e.sae) for e in entries]
    seen = 0
    for rows in z_stream(loaded, prompts, settings, targets):
        for entry, st in zip(entries, stats):
            st.update(entry.sae.normalise(_inputs(rows, entry, adapter.n_heads)))
        seen += len(next(iter(rows.values())))
        if seen >= eval_tokens:
            break
    splices = splice_scores(loaded, list(prompts[:splice_prompts]),
                            [SpliceTarget(e.sae, e.layer, e.head) for e in entries],
                            batch_size=settings.batch_size, max_tokens=settings.max_tokens)
    out = []
    for entry, st, splice in zip(entries, stats, splices):
        m = st.result()
        dims = feature_dimensionality(entry.sae.raw_decoder())  # model units (layer SAEs: per-head scales)
        live = m.density > 0
        row = {
            "eval_tokens": m.tokens, "l0": m.l0, "fvu": m.fvu, "explained_variance": m.explained_variance,
            "ce_clean": splice.ce_clean, "ce_zero": splice.ce_zero, "ce_spliced": splice.ce_spliced,
            "ce_score": splice.score, "ce_status": splice.status, "ce_tokens": splice.tokens,
            "dead": m.dead, "dense": m.dense, "dead_fraction": m.dead / entry.sae.d_sae,
            "dense_fraction": m.dense / entry.sae.d_sae,
            "density_histogram": [int(c) for c in m.histogram.counts],
            "superposition_index": m.superposition_index,
            "features_90": float(m.features_90) if m.features_90 is not None else NAN,
            "components_90": float(m.components_90) if m.components_90 is not None else NAN,
            "superposition_status": m.superposition_status,
            "feature_dimensionality_mean": _nanmean(dims[live]),
            "feature_dimensionality_median": _nanmedian(dims[live]),
            "attribution_entropy_mean": NAN,
        }
        if entry.head is None:
            ent = attribution_entropy(head_attribution(entry.sae.raw_decoder(), adapter.n_heads))
            row["attribution_entropy_mean"] = _nanmean(ent[live])
        out.append(row)
    return out


def with_ev_l0_area(rows: Sequence[dict]) -> list[dict]:
    """``rows`` (with ``target``, ``l0``, ``explained_variance``) with ``ev_l0_area`` per target
    over its SAEs of different ``k`` (NaN for a target with fewer than two distinct L0s)."""
    by_target: dict[str, list[dict]] = {}
    for r in rows:
        by_target.setdefault(r["target"], []).append(r)
    area = {}
    for target, group in by_target.items():
        l0 = [r["l0"] for r in group]
        ev = [r["explained_variance"] for r in group]
        ok = [i for i in range(len(group)) if l0[i] > 0 and math.isfinite(ev[i])]
        area[target] = (ev_l0_area([l0[i] for i in ok], [ev[i] for i in ok])
                        if len({round(l0[i], 12) for i in ok}) >= 2 else NAN)
    return [{**r, "ev_l0_area": area[r["target"]]} for r in rows]


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, float)
    return float(np.nanmean(x)) if np.isfinite(x).any() else NAN


def _nanmedian(x: np.ndarray) -> float:
    x = np.asarray(x, float)
    return float(np.nanmedian(x)) if np.isfinite(x).any() else NAN
