"""Path patching: a sender head's clean-minus-corrupt write, added only along the paths into
chosen receivers (a head's query, key or value input, or the final residual stream).

For a sender ``s`` the patched run is the base run (the corrupt run when denoising, the clean
run when noising) in which every receiver input reads ``resid + (w_s(source) - w_s(base))``,
``w_s`` being the sender's write into the residual stream (its result through its slice of
the output projection, as ``split.head_writes``). Everything else is computed normally: no other
component sees the sender's change, and the receivers' own changes flow on downstream. The
change is added before the receiver's norm (``split.receiver_deltas``).

Batched over senders like exact patching: senders x examples are stacked along the batch, and
each chunk is one replay from the cached residual entering the first receiver layer,
recomputing only the positions from the first clean/corrupt difference on (before it the
sender's change is zero, so the base run's cached keys and values are reused).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Union

import numpy as np
import torch
from torch import Tensor

from spectral.causal.patching import (
    CACHE_PARAMS, Direction, RunCache, _block_signature, _repeat, _suffix_kwargs, first_difference, logit_diff,
    replay, restoration,
)
from spectral.causal.tasks import EncodedTask
from spectral.circuits.split import RECEIVER_INPUTS, affine, receiver_deltas
from spectral.errors import UsageError
from spectral.models.adapter import HeadAdapter

Sender = Union[tuple[int, int], Literal["embed"]]
"""A head (layer, head), or ``"embed"``: the token embeddings (entering layer 0)."""
Receiver = Union[tuple[int, int, str], tuple[str]]
"""(layer, head, "q" | "k" | "v"), or ``("logits",)``: the final residual stream."""
LOGITS = ("logits",)


@dataclass
class PathPatch:
    """Path patching of each sender into one set of receivers, per example."""

    senders: list[Sender]
    receivers: list[Receiver]
    direction: Direction
    """"denoise": clean sender values into the corrupt run; "noise": corrupt into the clean run."""
    patched: Tensor
    """(senders, n) logit difference (answer - distractor, final position) of each patched run."""
    clean: Tensor
    """(n,) of the clean run."""
    corrupt: Tensor
    """(n,) of the corrupt run."""

    @property
    def restoration(self) -> Tensor:
        """(senders, n): (patched - corrupt) / (clean - corrupt) per example."""
        return restoration(self.patched, self.clean, self.corrupt)

    def mean_restoration(self) -> Tensor:
        """(senders,): the same ratio of the means over examples (stable where one example's
        clean and corrupt metrics are close)."""
        return restoration(self.patched.mean(1), self.clean.mean(), self.corrupt.mean())


def sender_layer(sender: Sender) -> int:
    """The layer a sender writes in (-1 for the embeddings)."""
    return -1 if sender == "embed" else sender[0]


def receiver_layer(adapter: HeadAdapter, receiver: Receiver) -> int:
    """The layer a receiver reads in (``n_layers`` for the logits)."""
    return adapter.n_layers if tuple(receiver) == LOGITS else receiver[0]


def check_paths(adapter: HeadAdapter, senders: Sequence[Sender], receivers: Sequence[Receiver]) -> list[Receiver]:
    """Normalised receivers; a UsageError for a malformed sender or receiver, or a receiver
    not in a later layer than a sender."""
    if not receivers:
        raise UsageError("path patching needs at least one receiver")
    out: list[Receiver] = []
    for r in receivers:
        r = ("logits",) if r == "logits" else tuple(r)
        if r != LOGITS:
            if len(r) != 3 or r[2] not in RECEIVER_INPUTS:
                raise UsageError(f"receiver {r!r}: expected (layer, head, q|k|v) or ('logits',)")
            adapter.check_layers([r[0]])
            adapter.check_heads([r[1]])
        out.append(r)
    for s in senders:
        if s != "embed":
            if len(s) != 2:
                raise UsageError(f"sender {s!r}: expected (layer, head) or 'embed'")
            adapter.check_layers([s[0]])
            adapter.check_heads([s[1]])
        for r in out:
            if receiver_layer(adapter, r) <= sender_layer(s):
                raise UsageError(f"receiver {r!r} is not in a later layer than sender {s!r}")
    return out


def _replay_start(adapter: HeadAdapter, base: RunCache, task: EncodedTask, layer: int) -> int:
    """The first recomputed position: the first clean/corrupt difference where a suffix
    replay from ``layer`` is exact for this model (``patching.replay``'s condition), else 0."""
    start = min(first_difference(task.clean, task.corrupt), int(task.last.min()))
    if start == 0 or layer >= adapter.n_layers:
        return start
    has_cache = any(c in _block_signature(adapter.blocks[0]).parameters for c in CACHE_PARAMS)
    mask = task.mask.to(base.resid_pre[0].device)
    ok = has_cache and all(_suffix_kwargs(adapter, base.block_kwargs[l], start, mask) is not None
                           for l in range(layer, adapter.n_layers))
    return start if ok else 0


def _sender_change(adapter: HeadAdapter, source: RunCache, base: RunCache, sender: Sender) -> Tensor:
    """(n, pos, d_model): the sender's write in the source run minus in the base run."""
    if sender == "embed":
        return source.resid_pre[0] - base.resid_pre[0]
    layer, head = sender
    weight, _ = affine(getattr(adapter.attentions[layer], adapter.family.out_proj))  # (heads * d_head, d_model)
    w = weight.view(adapter.n_heads, adapter.d_head, -1)[head]  # (d_head, d_model)
    diff = source.results[layer][:, :, head] - base.results[layer][:, :, head]  # (n, pos, d_head)
    return diff.to(w.dtype) @ w


def _deltas(adapter: HeadAdapter, receivers: list[Receiver], change: Tensor, task: EncodedTask, copies: int,
            start: int, logits_at_last: bool = True) -> dict[tuple[int, str], Tensor]:
    """Receiver deltas for a batch of ``copies`` senders: ``change`` (copies * n, pos', d_model);
    the logits delta at each example's last position only (what a replay normalises) unless
    ``logits_at_last`` is False (a full forward pass). A grouped-query key/value head gets the
    change once, however many of its group are named."""
    rows, pos, d_model = change.shape
    deltas: dict[tuple[int, str], Tensor] = {}
    fed: set[tuple[int, str, int]] = set()
    group = adapter.n_heads // adapter.n_kv_heads
    for r in receivers:
        if r == LOGITS and not logits_at_last:
            deltas[(adapter.n_layers, "logits")] = change
            continue
        if r == LOGITS:
            last = task.last.to(change.device).repeat(copies) - start
            deltas[(adapter.n_layers, "logits")] = change[torch.arange(rows, device=change.device), last]
            continue
        layer, head, kind = r
        unit = head // group if kind != "q" else head
        if (layer, kind, unit) in fed:
            continue
        fed.add((layer, kind, unit))
        if (layer, kind) not in deltas:
            deltas[(layer, kind)] = change.new_zeros(rows, pos, adapter.n_heads, d_model)
        deltas[(layer, kind)][:, :, head] += change
    return deltas


@torch.no_grad()
def path_patch(adapter: HeadAdapter, task: EncodedTask, clean: RunCache, corrupt: RunCache,
               senders: Sequence[Sender], receivers: Sequence[Receiver], direction: Direction = "denoise",
               rows: int = 256) -> PathPatch:
    """Path-patch every sender into ``receivers`` (see the module docstring), batched: chunks
    of senders x examples of about ``rows`` rows, one replay each. ``clean`` and ``corrupt``
    are ``patching.cache_run`` runs of the task (``patching.task_caches`` memoises them)."""
    if direction not in ("denoise", "noise"):
        raise UsageError(f"direction {direction!r}: expected denoise or noise")
    senders = list(senders)
    receivers = check_paths(adapter, senders, receivers)
    base, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    first = min(receiver_layer(adapter, r) for r in receivers)
    start = _replay_start(adapter, base, task, first)
    n = len(task)
    entering = base.resid_pre[first] if first < adapter.n_layers else base.resid_post[-1]
    per_chunk = max(1, rows // n)
    out = []
    for i in range(0, len(senders), per_chunk):
        chunk = senders[i:i + per_chunk]
        k = len(chunk)
        change = torch.stack([_sender_change(adapter, source, base, s)[:, start:] for s in chunk])  # (k, n, pos', d_model)
        change = change.reshape(k * n, *change.shape[2:]).to(entering.dtype)
        hidden = _repeat(entering[:, start:], k, n)
        with receiver_deltas(adapter, _deltas(adapter, receivers, change, task, k, start)):
            logits = replay(adapter, base, first, k, None, last=task.last, start=start, mask=task.mask, hidden=hidden)
        out.append(logit_diff(logits, task).view(k, n))
    patched = torch.cat(out) if out else torch.empty(0, n)
    return PathPatch(senders, receivers, direction, patched, clean.metric, corrupt.metric)


def path_scores_into(adapter: HeadAdapter, task: EncodedTask, clean: RunCache, corrupt: RunCache,
                     receivers: Sequence[Receiver], senders: Sequence[tuple[int, int]] | None = None,
                     direction: Direction = "denoise", rows: int = 256) -> np.ndarray:
    """(layers, heads) mean restoration of path patching each sender head into ``receivers``
    (e.g. the name movers' queries, to find S-inhibition heads); ``senders`` defaults to every
    head in a layer before the first receiver; NaN for heads not patched."""
    receivers = [("logits",) if r == "logits" else tuple(r) for r in receivers]
    if senders is None:
        first = min(receiver_layer(adapter, r) for r in receivers)
        senders = [(l, h) for l in range(min(first, adapter.n_layers)) for h in range(adapter.n_heads)]
    scores = np.full((adapter.n_layers, adapter.n_heads), np.nan)
    if not senders:
        return scores
    result = path_patch(adapter, task, clean, corrupt, senders, receivers, direction, rows)
    for (layer, head), value in zip(result.senders, result.mean_restoration().tolist()):
        scores[layer, head] = value
    return scores
