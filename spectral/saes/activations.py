"""Per-head result activations ``z`` streamed from the model for SAE training.

One forward pass per token batch reads the ``result`` site (each head's output before the
output projection, ``(batch, pos, head, d_head)``, the site patching edits) of every requested
layer, keeps the real (non-padding) tokens and yields one row block per requested head. Every
SAE is fed from that one pass; nothing beyond a batch (plus the trainer's shuffle buffer) is
held in memory.

Normalisation (documented in docs, applied by ``spectral.saes.train``): each head's ``z`` is
mean-centred and divided by one scalar scale, both estimated on a calibration chunk taken from
the start of the stream. The mean matters: a head's ``z`` carries a large constant offset
(the value-bias and attention-sink part), and a TopK SAE without centring spends its first
features on that offset, leaving the rest to die; the scale puts every head on the same
footing so one learning rate serves them all.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain

import torch
from jaxtyping import Float
from torch import Tensor

from spectral.errors import UsageError
from spectral.kernels.scan import ScanSettings, input_device, token_batches
from spectral.models.adapter import HeadAdapter
from spectral.models.loading import LoadedModel

Rows = dict[str, Float[Tensor, "n d"]]
"""One block of activation rows per source name, all with the same rows (tokens)."""


def head_name(layer: int, head: int) -> str:
    """The source (and per-head SAE) name of one head, e.g. ``L3H5``."""
    return f"L{layer}H{head}"


def layer_name(layer: int) -> str:
    """The per-layer SAE name (all heads' ``z`` concatenated), e.g. ``L3``."""
    return f"L{layer}"


@dataclass(frozen=True)
class SaeTargets:
    """Which SAEs to train on one model."""

    heads: tuple[tuple[int, int], ...]
    """(layer, head) pairs, one per-head SAE each (input ``d_head``)."""
    layers: tuple[int, ...]
    """Layers with a per-layer SAE on the concatenation of all their heads (input ``heads * d_head``)."""
    n_heads: int
    """Heads per layer of the model."""
    d_head: int

    @property
    def read_layers(self) -> list[int]:
        """Layers whose ``result`` the stream must read."""
        return sorted({layer for layer, _ in self.heads} | set(self.layers))

    def sources(self) -> list[tuple[int, int]]:
        """Every head whose rows the stream yields (the per-head targets and all heads of the
        per-layer targets), sorted."""
        return sorted(set(self.heads) | {(layer, h) for layer in self.layers for h in range(self.n_heads)})

    def groups(self) -> dict[str, tuple[str, ...]]:
        """SAE name -> the source names its input concatenates, in order."""
        out = {head_name(*lh): (head_name(*lh),) for lh in self.heads}
        out.update({layer_name(layer): tuple(head_name(layer, h) for h in range(self.n_heads))
                    for layer in self.layers})
        return out

    def hooks(self) -> dict[str, dict]:
        """SAE target -> where it reads, for SAELens' metadata (``hook_name``, ``hook_head_index``;
        the index is None for a per-layer SAE)."""
        out = {head_name(layer, h): {"hook_name": f"layers.{layer}.result", "hook_head_index": h}
               for layer, h in self.heads}
        out.update({layer_name(layer): {"hook_name": f"layers.{layer}.result", "hook_head_index": None}
                    for layer in self.layers})
        return out


def resolve_targets(adapter: HeadAdapter, heads: Iterable[tuple[int, int]] | None = None,
                    layers: Iterable[int] | None = None, per_layer: bool = True) -> SaeTargets:
    """Check a selection against the model: ``heads`` (all heads when None) get per-head SAEs;
    ``layers`` (the layers of the chosen heads when None) get per-layer SAEs if ``per_layer``.
    An unknown layer or head is a UsageError."""
    if heads is None:
        chosen = [(layer, h) for layer in adapter.check_layers(layers) for h in range(adapter.n_heads)]
    else:
        chosen = sorted({(int(layer), int(h)) for layer, h in heads})
        adapter.check_layers([layer for layer, _ in chosen])
        adapter.check_heads([h for _, h in chosen])
    if not chosen:
        raise UsageError("no heads chosen for SAE training")
    layer_list = adapter.check_layers(layers) if layers is not None else sorted({lh[0] for lh in chosen})
    return SaeTargets(tuple(chosen), tuple(layer_list) if per_layer else (), adapter.n_heads, adapter.d_head)


STREAM_CHUNK_BATCHES = 16
"""Prompts are batched by length (less padding) only within chunks of this many batches, taken in
the prompts' order: sorting the whole set would feed the trainer the shortest prompts first and
the longest last (a drift the shuffle buffer cannot undo)."""


@torch.no_grad()
def z_stream(loaded: LoadedModel, prompts: Sequence[str], settings: ScanSettings,
             targets: SaeTargets) -> Iterator[Rows]:
    """One forward pass per token batch; yields ``{head_name: (real tokens, d_head)}`` float32
    rows for every source head of ``targets`` (``SaeTargets.sources``), chunk by chunk of
    ``STREAM_CHUNK_BATCHES`` batches in the prompts' order."""
    adapter = HeadAdapter(loaded.model)
    device = input_device(loaded.model)
    wanted: dict[int, list[int]] = {}
    for layer, head in targets.sources():
        wanted.setdefault(layer, []).append(head)
    chunk = STREAM_CHUNK_BATCHES * settings.batch_size
    batches = (batch for start in range(0, len(prompts), chunk)
               for batch in token_batches(loaded, prompts[start:start + chunk], settings))
    for ids, mask in batches:
        ids, mask = ids.to(device), mask.to(device)
        real = mask.bool()
        rows: Rows = {}

        def keep(layer: int, site: str, z: Tensor) -> None:
            picked = z[real].float().cpu()  # (real tokens, head, d_head)
            for head in wanted[layer]:
                rows[head_name(layer, head)] = picked[:, head].clone()

        with adapter.trace(["result"], keep, layers=sorted(wanted), attention_mask=mask):
            loaded.model(input_ids=ids, attention_mask=mask, use_cache=False)
        yield rows


def take_rows(stream: Iterator[Rows], n_rows: int) -> tuple[Rows, Iterator[Rows]]:
    """The first ``n_rows`` rows of every source (fewer if the stream ends first) and the rest
    of the stream (the split batch's remainder first)."""
    taken: list[Rows] = []
    count = 0
    for block in stream:
        n = len(next(iter(block.values())))
        if count + n >= n_rows:
            cut = n_rows - count
            taken.append({k: v[:cut] for k, v in block.items()})
            rest = {k: v[cut:] for k, v in block.items()}
            stream = chain([rest] if cut < n else [], stream)
            count = n_rows
            break
        taken.append(block)
        count += n
    if not taken:
        raise UsageError("the prompts gave no tokens to train SAEs on")
    return {k: torch.cat([b[k] for b in taken]) for k in taken[0]}, stream


@dataclass(frozen=True)
class Normalisation:
    """``(x - mean) / scale`` per source head: ``mean`` per coordinate, one scalar scale
    chosen so that the centred rows have mean squared norm ``d`` (unit variance per coordinate
    on average)."""

    mean: Float[Tensor, "d"]
    scale: float

    @staticmethod
    def estimate(rows: Float[Tensor, "n d"]) -> Normalisation:
        mean = rows.mean(0)
        spread = (rows - mean).pow(2).sum(-1).mean().div(rows.shape[1]).sqrt().item()
        if not spread > 0:
            raise UsageError("a head's activations are constant on the calibration tokens; cannot scale them")
        return Normalisation(mean, spread)

    def apply(self, rows: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
        return (rows - self.mean) / self.scale


def normalised(stream: Iterable[Rows], norms: dict[str, Normalisation]) -> Iterator[Rows]:
    """The stream with every source normalised by its statistics."""
    for block in stream:
        yield {k: norms[k].apply(v) for k, v in block.items()}


def rechunk(stream: Iterable[Rows], min_rows: int) -> Iterator[Rows]:
    """The same rows in blocks of at least ``min_rows`` (the last may be shorter): fewer, larger
    blocks for the shuffle buffer, which copies itself once per block it takes in."""
    pending: list[Rows] = []
    count = 0
    for block in stream:
        pending.append(block)
        count += len(next(iter(block.values())))
        if count >= min_rows:
            yield {k: torch.cat([b[k] for b in pending]) for k in pending[0]}
            pending, count = [], 0
    if pending:
        yield {k: torch.cat([b[k] for b in pending]) for k in pending[0]}
