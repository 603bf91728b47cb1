"""Spectra token by token during generation (research plan 3.2; issue 17, point 3).

At every generation step, for every selected head of every prompt: the key kernel of the
context so far, from statistics that the step's new key updates, and the attention of the
step's query over that context. ``generate_trajectories`` returns the generated tokens and one
row per (prompt, step, layer, head): the ``TRAJECTORIES`` table (``trajectories.parquet``).

Steps. Step 0 reads the prompt (the prefill) and produces generated token 0; step s >= 1 reads
generated token s - 1 and produces token s. A row of step s describes the context its token was
predicted from: ``n_keys`` = prompt length + s real tokens, and the step's query (the context's
last position). The last generated token's key is never computed (plain ``generate`` never
computes it either). A prompt that emits an end-of-sequence token stops there: its EOS step has
a row, later steps have none (``generate`` feeds it padding until the batch ends).

Key kernel. Per prompt, layer and key head the streamed statistics of ``spectral.kernels.key``
(sum of k k^T, sum of k, n; float64) over the context's real keys, updated by the keys of the new
positions only: after the prefill, one key per step, a rank-one update costing d_head^2 per head.
The spectrum comes from them through ``key_kernel_spectra``, the scan's own finalize, with the
scan's ridge, centring and scale: exactly the numbers a scan of the context alone gives (the tests
check every step against the N x N Gram of all the context's keys). Keys are "raw" (before the
rotary rotation, the scan's default) or "rotated" (what the KV cache holds and the scores use);
the ``keys`` column says which. Query heads of one key group (grouped-query models) read the same
keys, so their kernel is computed once per key head and repeated on each query head's row.

Attention of the step. The step's query has one score row s = q K^T x scaling over the context's
n real keys (1 x n): as a matrix it has a single singular value, its norm, so "the spectrum of the
step's scores" is degenerate, and the full n x n causal score matrix of the context would cost an
O(n^3) decomposition per head per step (the scan's ``scores`` kernel computes it once per prompt,
for that use). What a step does have is the query's attention distribution p = softmax(s) over the
context, the spectrum of diag(p); its columns (``spectral.tables.STEP_ATTENTION_METRICS``):
``attn_entropy`` (-sum p log p, nats), ``attn_effective_keys`` (exp of it: how many keys the
query spreads over), ``attn_top1`` (p1), ``attn_gap`` ((p1 - p2) / p1, the top-2 margin: the
key gap's analogue, NaN with one key) and ``attn_score_norm`` (||s||, the row's singular value).
They come from the rotated query and keys with the module's scaling, the adapter's ``scores``
(what the three families' attention computes), the dot products and the softmax in float64.

Padding. A batch is left-padded (generation appends on the right); position ids count real
tokens only (as ``generate`` does), padding never enters the statistics or a score row.

Cost. The statistics cost d_head^2 per head and step; the spectra cost a d_head x d_head
eigendecomposition per head and step, about as much as the forward pass itself for a small model
(organism-l: 24,576 float64 20 x 20 ``eigvalsh`` for 8 prompts x 64 steps take about as long as
``generate`` itself). The generation loop only runs the model and copies each step's new keys,
rotated keys and query into per-batch buffers (hooks); everything else happens per chunk of
``SPECTRA_CHUNK`` steps, once those steps are past: each step's statistics as the chunk's base
plus a cumulative sum of its keys' outer products (the rank-one updates, batched), all the
chunk's spectra in one ``key_kernel_spectra`` call and all its step attention in one batched
op. Chunks run on worker threads (one per usable CPU core but one, by default) while the model
computes the next steps (LAPACK and torch release the GIL), or in the loop
(``spectra_threads=0``): the same numbers either way (the tests compare them;
``benchmarks/bench_generation_dynamics.py`` times both against plain ``generate``).

Cache. With ``use_cache`` (the default) every step after the prefill runs the new token alone
against the KV cache; without it every step reruns the whole context (the reference path; the
statistics still take only the new position's key). The rotated keys of the context are kept
beside the model's cache for the score rows (the size of the cache's keys, once per query head),
each position's as computed when the position was first read (the rerun path recomputes them
each step; they agree to rounding).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from operator import attrgetter
from typing import get_args

import numpy as np
import pyarrow as pa
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from spectral.errors import UsageError
from spectral.kernels.key import KeyStats, key_kernel_spectra
from spectral.kernels.metrics import METRICS
from spectral.kernels.registry import KeyKind, RidgeMode
from spectral.kernels.result import KernelResult
from spectral.models.adapter import HeadAdapter
from spectral.models.families import family_of
from spectral.models.loading import LoadedModel
from spectral.tables import STEP_ATTENTION_METRICS, TRAJECTORIES, conform
from spectral.tokens import pad_id

SPECTRA_CHUNK = 8
"""Steps whose key-kernel spectra one ``key_kernel_spectra`` call computes, at most (its fixed cost
is then paid once per chunk). A chunk's worker holds the statistics of each of its steps (prompts x
layers x key heads x d_head^2 float64 per step)."""
SPECTRA_IN_FLIGHT = 1
"""Chunks queued beyond one per worker thread before the generation waits for the oldest."""
SPECTRA_MEMORY = 256 * 2**20
"""Bytes of the chunks' per-step statistics aimed at: the chunk shrinks (to one step) for a large batch x model."""


@dataclass(frozen=True)
class GenerationSettings:
    """What a generation run computes (fields shared with ``ScanSettings`` mean the same)."""

    max_new_tokens: int = 32
    """Tokens generated per prompt (fewer where a prompt emits an end-of-sequence token first)."""
    keys: KeyKind = "raw"
    """Keys of the kernel: "raw" (before the rotary rotation, the scan's default) or "rotated"."""
    ridge: float = 1e-2
    center: bool = True
    ridge_mode: RidgeMode = "absolute"
    batch_size: int = 8
    """Prompts generated together (left-padded to the longest)."""
    use_cache: bool = True
    """Run each step against the KV cache; False reruns the whole context every step."""
    sample: bool = False
    """Greedy (argmax) when False; else a draw from softmax(logits / temperature), seeded by ``seed``
    (one generator for the whole run: the draws depend on ``batch_size``)."""
    temperature: float = 1.0
    seed: int = 0
    stop_at_eos: bool = True
    """Stop a prompt at the model's end-of-sequence token (``generation_config.eos_token_id``)."""
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    spectra_threads: int | None = None
    """Worker threads computing the key spectra while the model generates (module docstring): None
    for one per usable CPU core but one (at least one); 0 computes them in the generation loop."""

    def check(self) -> None:
        """A one-line UsageError for a value that cannot be used."""
        if self.max_new_tokens <= 0:
            raise UsageError(f"max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.keys not in get_args(KeyKind):
            raise UsageError(f"keys must be one of {', '.join(get_args(KeyKind))}, got {self.keys!r}")
        if self.ridge_mode not in get_args(RidgeMode):
            raise UsageError(f"ridge mode must be one of {', '.join(get_args(RidgeMode))}, got {self.ridge_mode!r}")
        if not self.ridge >= 0:
            raise UsageError(f"ridge must be >= 0, got {self.ridge}")
        if self.batch_size < 1:
            raise UsageError(f"batch size must be at least 1, got {self.batch_size}")
        if self.spectra_threads is not None and self.spectra_threads < 0:
            raise UsageError(f"spectra threads must be >= 0, got {self.spectra_threads}")
        if self.sample and not self.temperature > 0:
            raise UsageError(f"temperature must be > 0 for sampling, got {self.temperature}")


@dataclass(frozen=True)
class Generation:
    """What ``generate_trajectories`` returns."""

    prompt_tokens: list[list[int]]
    """Each prompt's token ids, as the model read them."""
    tokens: list[list[int]]
    """Each prompt's generated token ids (through its end-of-sequence token where it stopped)."""
    trajectories: pa.Table
    """One row per (prompt, step, layer, head), schema ``spectral.tables.TRAJECTORIES``."""
    pad_token: int
    """The id fed to a finished prompt while its batch goes on (``generate``'s ``pad_token_id``)."""


class ContextKeyStats:
    """Per prompt, layer and key head: sum of k k^T, sum of k and n over the context's real keys
    (float64, on the model's device). The same statistics as ``KeyStats``, kept per prompt."""

    def __init__(self, batch: int, layers: int, kv_heads: int, d_head: int, device: torch.device, eps: float):
        shape = (batch, layers, kv_heads)
        self.ktk = torch.zeros(*shape, d_head, d_head, dtype=torch.float64, device=device)
        self.ksum = torch.zeros(*shape, d_head, dtype=torch.float64, device=device)
        self.count = torch.zeros(batch, dtype=torch.int64, device=device)
        self.nonfinite = torch.zeros(shape, dtype=torch.bool, device=device)
        self.eps = eps

    def add(self, keys: Float[Tensor, "batch new layer kv_head d_head"], real: Bool[Tensor, "batch new"]) -> None:
        """Add the keys of the real new positions: after the prefill one position, so a rank-one
        update (d_head^2 per head). Non-finite keys count as zero and mark their head (as in
        ``KeyStats.update``)."""
        x = keys.to(torch.float64)
        if x.shape[1] > 1 or not bool(real.all()):  # padding (prefill) or finished prompts
            x = torch.where(real[:, :, None, None, None], x, 0.0)
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            self.nonfinite |= ~finite.all(dim=-1).all(dim=1)
            x = torch.where(finite, x, 0.0)
        self.ktk += torch.einsum("bnlhd,bnlhe->blhde", x, x)
        self.ksum += x.sum(dim=1)
        self.count += real.sum(dim=1)

    def key_stats(self, prompts: Int[Tensor, " n"]) -> KeyStats:
        """The statistics of ``prompts`` as one ``KeyStats`` over (prompt x layer, key head)."""
        n, layers, heads, d = len(prompts), *self.ktk.shape[1:4]
        count = self.count[prompts].repeat_interleave(layers)[:, None].expand(n * layers, heads)
        return KeyStats(
            self.ktk[prompts].reshape(n * layers, heads, d, d).cpu().numpy(),
            self.ksum[prompts].reshape(n * layers, heads, d).cpu().numpy(),
            count.cpu().numpy().copy(), np.ones((n * layers, heads), np.int64),
            self.nonfinite[prompts].reshape(n * layers, heads).cpu().numpy(), self.eps)


def step_attention(
    queries: Float[Tensor, "batch layer head d_head"],
    keys: Float[Tensor, "batch layer head pos d_head"],
    scaling: Float[Tensor, " layer"],
    real: Bool[Tensor, "batch pos"],
) -> dict[str, np.ndarray]:
    """The step attention metrics (module docstring) of one query per (prompt, layer, head) over
    the real keys of its context; arrays of shape (batch, layer, head)."""
    scores = torch.einsum("blhd,blhtd->blht", queries, keys).to(torch.float64)
    return attention_metrics(scores * scaling[None, :, None, None], real)


def attention_metrics(scores: Float[Tensor, "row layer head pos"], real: Bool[Tensor, "row pos"]
                      ) -> dict[str, np.ndarray]:
    """The step attention metrics of scaled float64 score rows over their ``real`` keys; arrays
    of shape (row, layer, head)."""
    mask = real[:, None, None, :]
    p = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    entropy = -torch.special.xlogy(p, p).sum(dim=-1)
    top = p.topk(min(2, p.shape[-1]), dim=-1).values
    n_keys = real.sum(dim=-1)[:, None, None]
    second = top[..., 1] if top.shape[-1] > 1 else torch.zeros_like(top[..., 0])
    gap = torch.where(n_keys >= 2, (top[..., 0] - second) / top[..., 0], float("nan"))
    out = {"attn_entropy": entropy, "attn_effective_keys": entropy.exp(), "attn_top1": top[..., 0],
           "attn_gap": gap, "attn_score_norm": torch.where(mask, scores, 0.0).norm(dim=-1)}
    return {name: out[name].cpu().numpy() for name in STEP_ATTENTION_METRICS}


@dataclass
class _Buffers:
    """One batch's per-step tensors, written by the hooks and the loop, read by the spectra worker
    once their steps are past (never written again then)."""

    prefill: Tensor
    """(batch, prompt width, layer, kv head, d_head): the prompts' statistics keys (step 0)."""
    keys: Tensor
    """(batch, steps, layer, kv head, d_head): the statistics key of the position step s >= 1 reads."""
    queries: Tensor
    """(batch, steps, layer, head, d_head): the rotated query of each step."""
    rotated: Tensor
    """(batch, layer, head, pos, d_head): the rotated keys of the context (each position written
    once, when first computed: the score rows' keys)."""
    added: Tensor
    """(batch, steps) bool: step s added a real key to the statistics (s >= 1, prompt not stopped)."""
    live: Tensor
    """(batch, steps) bool: the prompt generates at step s (the step has its rows)."""
    tokens: Tensor
    """(batch, steps): the token chosen at each step."""


class _Capture:
    """The hook callback: writes this forward's keys for the statistics (new positions, one
    query head per key head), its new rotated keys and the last query into the batch's buffers
    (on their device: the layers of a sharded model may live elsewhere)."""

    def __init__(self, stat_site: str, kv_first: Tensor, heads: Tensor, layers: Sequence[int]):
        self.stat_site, self.kv_first, self.heads = stat_site, kv_first, heads
        self.index = {layer: i for i, layer in enumerate(layers)}
        self.buffers: _Buffers | None = None
        self.step = self.n_new = self.t = 0

    def __call__(self, layer: int, site: str, t: Tensor) -> None:  # t: (batch, pos, head, d_head)
        b, i = self.buffers, self.index[layer]
        if site == self.stat_site:
            new = t[:, -self.n_new:, self.kv_first.to(t.device)]
            if self.step == 0:
                b.prefill[:, :, i] = new
            else:
                b.keys[:, self.step, i] = new[:, -1]
        if site == "keys_rotated":
            b.rotated[:, i, :, self.t - self.n_new:self.t] = t[:, -self.n_new:, self.heads.to(t.device)].transpose(1, 2)
        if site == "queries_rotated":
            b.queries[:, self.step, i] = t[:, -1, self.heads.to(t.device)]


@dataclass(frozen=True)
class _Chunk:
    """Steps ``start`` .. ``stop`` - 1 of one batch, as the generation loop hands them to the
    spectra worker: the statistics before ``start`` and views of the batch's buffers."""

    first: int
    """Index of the batch's first prompt."""
    start: int
    stop: int
    width: int
    """The batch's prompt width (step s's context: positions < width + s)."""
    base: tuple[Tensor, Tensor, Tensor, Tensor]
    """(ktk, ksum, count, nonfinite) of the statistics before step ``start`` (copies)."""
    eps: float
    buffers: _Buffers
    mask: Tensor
    """(batch, pos) the whole context's attention mask (1 on real tokens)."""


@dataclass
class _Run:
    """One model prepared for generation: selected layers and heads, hooks' capture, cache names."""

    loaded: LoadedModel
    settings: GenerationSettings
    adapter: HeadAdapter = field(init=False)

    def __post_init__(self) -> None:
        model, s = self.loaded.model, self.settings
        self.adapter = adapter = HeadAdapter(model)
        adapter.require_causal_lm("generation dynamics")
        self.layers = adapter.check_layers(s.layers)
        heads = adapter.check_heads(s.heads)
        group = adapter.n_heads // adapter.n_kv_heads
        self.kv_heads = sorted({h // group for h in heads})
        self.heads = np.array(heads)
        self.head_kv = self.heads // group  # (head,) key head of each query head
        self.kv_pos = np.array([self.kv_heads.index(h // group) for h in heads])  # into the statistics' kv axis
        self.device = model.get_input_embeddings().weight.device
        self.dtype = model.get_input_embeddings().weight.dtype
        self.capture = _Capture(f"keys_{s.keys}", torch.tensor(self.kv_heads, device=self.device) * group,
                                torch.tensor(heads, device=self.device), self.layers)
        self.scaling = torch.tensor([float(attrgetter(adapter.family.scaling)(adapter.attentions[l]))
                                     for l in self.layers], dtype=torch.float64, device=self.device)
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.pad = pad_id(self.loaded.tokenizer)
        eos = model.generation_config.eos_token_id if s.stop_at_eos else None
        self.eos = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos),
                                dtype=torch.long, device=self.device)

    @property
    def sites(self) -> set[str]:
        return {f"keys_{self.settings.keys}", "keys_rotated", "queries_rotated"}

    def batch(self, rows: list[list[int]], first: int, generator: torch.Generator | None, spectra: "_Spectra"
              ) -> list[list[int]]:
        """Generate for one batch of prompts (``first``: the index of its first prompt), handing
        its steps to ``spectra`` in chunks; returns the generated tokens."""
        s, model = self.settings, self.loaded.model
        all_ids, all_mask, all_positions, t0 = self._context(rows)
        batch, d_head, steps = len(rows), self.adapter.d_head, s.max_new_tokens
        n_layers, n_kv, n_heads = len(self.layers), len(self.kv_heads), len(self.heads)
        stats = ContextKeyStats(batch, n_layers, n_kv, d_head, self.device, float(torch.finfo(self.dtype).eps))
        new = partial(torch.zeros, dtype=self.dtype, device=self.device)
        flags = partial(torch.zeros, dtype=torch.bool, device=self.device)
        buffers = self.capture.buffers = _Buffers(
            new(batch, t0, n_layers, n_kv, d_head), new(batch, steps, n_layers, n_kv, d_head),
            new(batch, steps, n_layers, n_heads, d_head), new(batch, n_layers, n_heads, all_ids.shape[1], d_head),
            flags(batch, steps), flags(batch, steps), torch.zeros(batch, steps, dtype=torch.long, device=self.device))
        alive = torch.ones(batch, dtype=torch.bool, device=self.device)
        mask_bool = all_mask.bool()
        cache, start, step = None, 0, 0
        for step in range(steps):
            t = t0 + step
            ids, mask, positions = all_ids[:, :t], all_mask[:, :t], all_positions[:, :t]
            whole = step == 0 or not s.use_cache
            self.capture.step, self.capture.n_new, self.capture.t = step, (t0 if step == 0 else 1), t
            out = model(input_ids=ids if whole else ids[:, -1:], attention_mask=mask,
                        position_ids=positions if whole else positions[:, -1:], use_cache=s.use_cache,
                        logits_to_keep=1, **{self.cache_arg: cache})
            cache = out[self.cache_arg] if s.use_cache else None
            if step == 0:
                stats.add(buffers.prefill, mask_bool[:, :t0])
            else:
                buffers.added[:, step] = alive
            buffers.live[:, step] = alive
            token = torch.where(alive, self._choose(out.logits[:, -1], generator), self.pad)
            buffers.tokens[:, step] = token
            if step + 1 < steps:
                all_ids[:, t] = token
            if step + 1 - start >= spectra.chunk:
                spectra.add(self._chunk(first, start, step + 1, t0, stats, buffers, mask_bool))
                start = step + 1
            if len(self.eos):
                alive = alive & ~torch.isin(token, self.eos)
                if not bool(alive.any()):
                    break
        if start < step + 1:
            spectra.add(self._chunk(first, start, step + 1, t0, stats, buffers, mask_bool))
        return _trim(buffers.tokens[:, :step + 1].tolist(), self.eos.tolist())

    def _chunk(self, first: int, start: int, stop: int, width: int, stats: ContextKeyStats, buffers: _Buffers,
               mask: Tensor) -> _Chunk:
        """Steps ``start`` .. ``stop`` - 1 for the worker; then their keys enter ``stats`` (summed:
        the worker forms each step's own statistics)."""
        base = (stats.ktk.clone(), stats.ksum.clone(), stats.count.clone(), stats.nonfinite.clone())
        chunk = _Chunk(first, start, stop, width, base, stats.eps, buffers, mask)
        stats.add(buffers.keys[:, start:stop], buffers.added[:, start:stop])
        return chunk

    def _context(self, rows: list[list[int]]) -> tuple[Tensor, Tensor, Tensor, int]:
        """Ids, attention mask and position ids (real tokens counted from 0) of the whole context
        to come, left-padded prompts then room for the new tokens (each step reads a view of its
        first columns), and the prompts' width."""
        new = self.settings.max_new_tokens
        ids, mask = left_padded(rows, self.pad, self.device)
        ids = torch.cat([ids, ids.new_full((len(rows), new), self.pad)], dim=1)
        mask = torch.cat([mask, mask.new_ones(len(rows), new)], dim=1)
        return ids, mask, (mask.cumsum(dim=-1) - 1).clamp(min=0), ids.shape[1] - new

    def _choose(self, logits: Float[Tensor, "batch vocab"], generator: torch.Generator | None) -> Int[Tensor, " batch"]:
        if not self.settings.sample:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits.float() / self.settings.temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    def columns(self, chunk: _Chunk) -> dict[str, np.ndarray]:
        """The rows of one chunk's steps (prompt, then step, layer, head order): each step's
        statistics by a cumulative sum of its keys' outer products onto the chunk's base, all their
        spectra in one ``key_kernel_spectra`` call, all their step attention in one batched op."""
        s, b = self.settings, chunk.buffers
        sl = slice(chunk.start, chunk.stop)
        live = b.live[:, sl]
        x, bad = _float_keys(b.keys[:, sl], b.added[:, sl])  # (batch, step, layer, kv, d)
        ktk, ksum, count, nonfinite = chunk.base
        ktk = torch.einsum("bslhd,bslhe->bslhde", x, x).cumsum_(dim=1).add_(ktk[:, None])  # the rank-one updates
        ksum = x.cumsum(dim=1).add_(ksum[:, None])
        count = b.added[:, sl].cumsum(dim=1).add_(count[:, None])
        nonfinite = nonfinite[:, None] | (bad.cumsum(dim=1) > 0)
        every = bool(live.all())
        prompt_idx, step_idx = live.nonzero(as_tuple=True)  # rows: prompt-major, then step

        def rows(t: Tensor) -> Tensor:  # (batch, step, ...) -> (row, ...): a view while every prompt generates
            return t.flatten(0, 1) if every else t[prompt_idx, step_idx]

        ktk, ksum, count, nonfinite = rows(ktk), rows(ksum), rows(count), rows(nonfinite)
        n, n_layers, n_kv, d = len(prompt_idx), *ktk.shape[1:4]
        stats = KeyStats(ktk.reshape(n * n_layers, n_kv, d, d).cpu().numpy(),
                         ksum.reshape(n * n_layers, n_kv, d).cpu().numpy(),
                         count.repeat_interleave(n_layers)[:, None].expand(n * n_layers, n_kv).cpu().numpy().copy(),
                         np.ones((n * n_layers, n_kv), np.int64), nonfinite.reshape(n * n_layers, n_kv).cpu().numpy(),
                         chunk.eps)
        result = key_kernel_spectra(stats, ridge=s.ridge, center=s.center, ridge_mode=s.ridge_mode)
        # attention: every step's query against the context before it (positions < width + step)
        context = chunk.width + torch.arange(chunk.start, chunk.stop, device=x.device)  # (step,)
        t_max = int(context[-1])
        scores = rows(torch.einsum("bslhd,blhtd->bslht", b.queries[:, sl].to(torch.float64),
                                   b.rotated[..., :t_max, :].to(torch.float64)))  # float64 dot products
        scores = scores * self.scaling[None, :, None, None]
        real = chunk.mask[prompt_idx, :t_max] & (torch.arange(t_max, device=x.device) < context[step_idx, None])
        attention = attention_metrics(scores, real)
        steps = (chunk.start + step_idx).cpu().numpy()
        prompts = (chunk.first + prompt_idx).cpu().numpy()
        return self._rows(steps, prompts, b.tokens[prompt_idx, chunk.start + step_idx].cpu().numpy(),
                          count.cpu().numpy(), result, attention)

    def _rows(self, steps: np.ndarray, prompts: np.ndarray, tokens: np.ndarray, n_keys: np.ndarray,
              result: KernelResult, attention: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """(row,) per-row values and ``result``'s (row x layer, kv head) entries as the table's
        columns, one row per (row, layer, head)."""
        n, n_layers, n_heads = len(steps), len(self.layers), len(self.heads)
        shape = (n, n_layers, n_heads)

        def per_head(values: np.ndarray) -> np.ndarray:  # (row x layer, kv head) -> rows
            return values.reshape(n, n_layers, -1)[:, :, self.kv_pos].ravel()

        def grid(values, axis: int) -> np.ndarray:  # one value per row, layer or head -> rows
            expand = [1, 1, 1]
            expand[axis] = -1
            return np.broadcast_to(np.asarray(values).reshape(expand), shape).ravel()

        columns = {
            "prompt": grid(prompts, 0).astype(np.int64), "step": grid(steps, 0).astype(np.int64),
            "token": grid(tokens, 0).astype(np.int64), "n_keys": grid(n_keys, 0).astype(np.int64),
            "layer": grid(self.layers, 1).astype(np.int32), "head": grid(self.heads, 2).astype(np.int32),
            "kv_head": grid(self.head_kv, 2).astype(np.int32), "ridge": per_head(result.ridge),
        }
        columns |= {name: per_head(result.metrics[name]) for name in METRICS}
        columns |= {"entropy_dhead": per_head(result.entropy_dhead), "rank": per_head(result.rank).astype(np.int64),
                    "status": per_head(result.status)}
        return columns | {name: values.ravel() for name, values in attention.items()}


def _float_keys(keys: Tensor, added: Tensor) -> tuple[Tensor, Tensor]:
    """Keys in float64, zero where not added or not finite, and (batch, step, layer, kv) where
    an added key was not finite (as ``ContextKeyStats.add``)."""
    x = torch.where(added[:, :, None, None, None], keys.to(torch.float64), 0.0)
    finite = torch.isfinite(x)
    bad = ~finite.all(dim=-1)
    return torch.where(finite, x, 0.0), bad


class _Spectra:
    """The chunks' rows: on ``pool``'s ``threads`` worker threads with at most
    ``threads + SPECTRA_IN_FLIGHT`` chunks queued, or in the caller's thread when ``pool`` is
    None. ``columns`` waits for all, in order (a worker's error is raised there)."""

    def __init__(self, run: _Run, pool: ThreadPoolExecutor | None, threads: int, step_bytes: int):
        self.run, self.pool = run, pool
        self.in_flight = threads + SPECTRA_IN_FLIGHT
        self.chunk = int(np.clip(SPECTRA_MEMORY // ((self.in_flight + 1) * step_bytes), 1, SPECTRA_CHUNK))
        self.futures: list[Future] = []

    def add(self, chunk: _Chunk) -> None:
        if self.pool is None:
            self.futures.append(Future())
            self.futures[-1].set_result(self.run.columns(chunk))
        else:
            self.futures.append(self.pool.submit(self.run.columns, chunk))
        if len(self.futures) > self.in_flight:
            self.futures[-self.in_flight - 1].result()

    def columns(self) -> list[dict[str, np.ndarray]]:
        return [future.result() for future in self.futures]


def left_padded(rows: Sequence[Sequence[int]], pad: int, device: torch.device
                ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Token-id rows as one batch padded on the left (generation appends on the right), and its
    attention mask (1 on real tokens)."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def _trim(rows: list[list[int]], eos: list[int]) -> list[list[int]]:
    """Each row up to and including its first end-of-sequence token."""
    out = []
    for row in rows:
        stop = next((i for i, t in enumerate(row) if t in eos), len(row) - 1)
        out.append(row[:stop + 1])
    return out


def _table(columns: list[dict[str, np.ndarray]], model: str, settings: GenerationSettings) -> pa.Table:
    if not columns:
        return TRAJECTORIES.empty_table()
    joined = {name: np.concatenate([c[name] for c in columns]) for name in columns[0]}
    n = len(joined["prompt"])
    table = {"model": [model] * n, "keys": [settings.keys] * n, "ridge_mode": [settings.ridge_mode] * n,
             "center": np.full(n, settings.center)}
    table |= {name: values.tolist() if values.dtype == object else values for name, values in joined.items()}
    return conform(pa.table(table), TRAJECTORIES, "trajectories")


def spectra_threads(settings: GenerationSettings) -> int:
    """Worker threads for the key spectra: ``settings.spectra_threads``, or one per CPU core this
    process may use but one (for the model), at least one."""
    if settings.spectra_threads is not None:
        return settings.spectra_threads
    return max(1, len(os.sched_getaffinity(0)) - 1)


def prompt_token_rows(loaded: LoadedModel, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt's token ids (special tokens as the scan adds them: none for a decoder); a
    UsageError for an empty list or a prompt without tokens."""
    if not prompts:
        raise UsageError("generation needs at least one prompt")
    special = family_of(loaded.model).special_tokens
    rows = [loaded.tokenizer(p, add_special_tokens=special)["input_ids"] for p in prompts]
    empty = next((i for i, row in enumerate(rows) if not row), None)
    if empty is not None:
        raise UsageError(f"prompt {empty} has no tokens")
    return rows


@torch.no_grad()
def generate_trajectories(loaded: LoadedModel, prompts: Sequence[str],
                          settings: GenerationSettings = GenerationSettings()) -> Generation:
    """Generate up to ``settings.max_new_tokens`` tokens for each prompt and record, at every step,
    each selected head's key-kernel spectrum of the context so far and its step attention
    (module docstring). Prompts run in batches of ``settings.batch_size``, in their order."""
    settings.check()
    run = _Run(loaded, settings)
    rows = prompt_token_rows(loaded, prompts)
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    longest = max(range(len(rows)), key=lambda i: len(rows[i]))
    if limit is not None and len(rows[longest]) + settings.max_new_tokens > limit:
        raise UsageError(f"prompt {longest} has {len(rows[longest])} tokens: with {settings.max_new_tokens} new "
                         f"tokens the context exceeds the model's {limit} positions")
    generator = torch.Generator(device=run.device).manual_seed(settings.seed) if settings.sample else None
    tokens = []
    threads = spectra_threads(settings)
    workers = ThreadPoolExecutor(threads, thread_name_prefix="eigengap-spectra") if threads else nullcontext()
    with workers as pool, run.adapter.trace(run.sites, run.capture, layers=run.layers):
        d = run.adapter.d_head
        step_bytes = 8 * min(settings.batch_size, len(rows)) * len(run.layers) * len(run.kv_heads) * d * (d + 1)
        spectra = _Spectra(run, pool, threads, step_bytes)
        for start in range(0, len(rows), settings.batch_size):
            tokens += run.batch(rows[start:start + settings.batch_size], start, generator, spectra)
        columns = spectra.columns()
    return Generation(rows, tokens, _table(columns, loaded.spec.text, settings), run.pad)
