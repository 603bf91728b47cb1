"""Activation patching of attention heads: exact (batched, from cached residuals),
attribution (gradient), and ablations (zero, mean, resample).

The unit of patching is a head's result before the output projection, at all positions.
A patch at layer L replays only blocks L..end, starting from the base run's cached residual
stream entering L (the blocks are the model's own modules, called with the arguments the
model itself passed them), and many head patches share one batched replay.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from spectral.adapter import HeadAdapter
from spectral.tasks import EncodedTask

Direction = Literal["denoise", "noise"]
Method = Literal["exact", "attribution", "ablate-zero", "ablate-mean", "resample"]


@dataclass
class RunCache:
    """One forward pass over a task's prompts, with what patching needs from it."""

    metric: Tensor  # (n,) logit difference answer - distractor at the final position
    results: list[Tensor]  # per layer: (n, pos, head, d_head)
    resid_pre: list[Tensor]  # per layer: (n, pos, d_model)
    block_kwargs: list[dict]  # per layer: the keyword arguments the model passed the block


def logit_diff(logits: Tensor, task: EncodedTask) -> Tensor:
    """(copies * n, pos, vocab) logits, or (copies * n, vocab) logits already taken at each
    example's last position -> (copies * n,) answer minus distractor at the last position."""
    n = len(task)
    copies = logits.shape[0] // n
    if logits.dim() == 2:
        final = logits.float()
    else:
        last = task.last.to(logits.device).repeat(copies)
        final = logits[torch.arange(logits.shape[0], device=logits.device), last].float()  # (copies * n, vocab)
    answer = task.answer.to(logits.device).repeat(copies)
    distractor = task.distractor.to(logits.device).repeat(copies)
    return final.gather(1, answer[:, None]).squeeze(1) - final.gather(1, distractor[:, None]).squeeze(1)


@torch.no_grad()
def cache_run(adapter: HeadAdapter, ids: Tensor, task: EncodedTask) -> RunCache:
    """Run ``ids`` once, keeping every layer's per-head result, residual input and block kwargs."""
    n_layers = adapter.n_layers
    results: list[Tensor | None] = [None] * n_layers
    resid: list[Tensor | None] = [None] * n_layers
    kwargs: list[dict | None] = [None] * n_layers

    def keep(layer, site, t):
        (results if site == "result" else resid)[layer] = t.detach().clone()

    handles = [block.register_forward_pre_hook(_kwargs_keeper(kwargs, l), with_kwargs=True)
               for l, block in enumerate(adapter.blocks)]
    try:
        with adapter.trace(["result", "resid_pre"], keep):
            logits = adapter.model(input_ids=ids, attention_mask=task.mask.to(ids.device), use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return RunCache(logit_diff(logits, task), results, resid, kwargs)


def _kwargs_keeper(store: list, layer: int):
    def hook(module, args, kwargs):
        store[layer] = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "layer_past")}
    return hook


def _repeat(value, copies: int, n: int):
    """Repeat batch-leading tensors (first dim n) ``copies`` times, copy-major; recurse into tuples."""
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n:
        return value.repeat(copies, *([1] * (value.dim() - 1)))
    if isinstance(value, (tuple, list)):
        return type(value)(_repeat(v, copies, n) for v in value)
    return value


def replay(adapter: HeadAdapter, base: RunCache, layer: int, copies: int,
           edit: Callable[[Tensor], Tensor], last: Tensor | None = None) -> Tensor:
    """Logits of ``copies`` copies of the base run, recomputed from the residual entering
    ``layer`` with ``edit`` applied to that layer's per-head result: (copies * n, pos, vocab),
    or (copies * n, vocab) at positions ``last`` (n,) only, when given (the unembedding of
    the other positions is skipped)."""
    n = base.resid_pre[layer].shape[0]
    hidden = _repeat(base.resid_pre[layer], copies, n)
    with adapter.trace([], edits={(layer, "result"): edit}):
        for l in range(layer, adapter.n_layers):
            kwargs = {k: _repeat(v, copies, n) for k, v in base.block_kwargs[l].items()}
            out = adapter.blocks[l](hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
    if last is not None:
        hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device).repeat(copies)]
    norm = adapter.model.get_submodule(adapter.family.final_norm)
    return adapter.model.get_output_embeddings()(norm(hidden))


@torch.no_grad()
def patch_layer(adapter: HeadAdapter, base: RunCache, task: EncodedTask, layer: int, heads: Sequence[int],
                source: Tensor) -> Tensor:
    """Metric (len(heads), n) of the base run with each head's result replaced by ``source``
    (n, pos, head, d_head): one batched replay for all the heads."""
    k, n = len(heads), len(task)
    index = torch.tensor(list(heads), device=source.device)

    def edit(result: Tensor) -> Tensor:  # (k * n, pos, head, d_head)
        result = result.clone().view(k, n, *result.shape[1:])
        copies = torch.arange(k, device=result.device)
        result[copies, :, :, index] = source[:, :, index].permute(2, 0, 1, 3).to(result.dtype)
        return result.view(k * n, *result.shape[2:])

    return logit_diff(replay(adapter, base, layer, k, edit, last=task.last), task).view(k, n)


def ablation_source(method: Method, clean: RunCache, task: EncodedTask, layer: int, seed: int = 0) -> Tensor:
    """Replacement of every head's result at ``layer`` for an ablation of the clean run."""
    result = clean.results[layer]  # (n, pos, head, d_head)
    if method == "ablate-zero":
        return torch.zeros_like(result)
    if method == "ablate-mean":
        mask = task.mask.to(result.device).bool()
        mean = result[mask].mean(dim=0)  # (head, d_head) over every real token of every example
        return mean.expand_as(result).clone()
    if method == "resample":
        gen = torch.Generator().manual_seed(seed + layer)
        n = result.shape[0]
        perm = (torch.arange(n) + 1 + torch.randint(0, max(n - 1, 1), (1,), generator=gen)) % n  # no fixed points
        return result[perm.to(result.device)]
    raise ValueError(f"{method!r} is not an ablation")


def attribution(adapter: HeadAdapter, clean: RunCache, corrupt: RunCache, task: EncodedTask,
                ids_corrupt: Tensor, direction: Direction = "denoise") -> Tensor:
    """First-order estimate (layers, heads, n) of M_patched - M_base for every head at once:
    (source - base) . dM/d(result), the gradient taken on the base run."""
    base_ids, base, source = (ids_corrupt, corrupt, clean) if direction == "denoise" else (None, clean, corrupt)
    if base_ids is None:
        base_ids = task.clean.to(ids_corrupt.device)
    deltas = {}

    def make_edit(layer):
        def edit(t):
            deltas[layer] = torch.zeros_like(t, requires_grad=True)
            return t + deltas[layer]
        return edit

    edits = {(l, "result"): make_edit(l) for l in range(adapter.n_layers)}
    with torch.enable_grad(), adapter.trace([], edits=edits):
        logits = adapter.model(input_ids=base_ids, attention_mask=task.mask.to(base_ids.device), use_cache=False).logits
        logit_diff(logits, task).sum().backward()
    out = []
    for l in range(adapter.n_layers):
        diff = (source.results[l] - base.results[l]).float()  # (n, pos, head, d_head)
        out.append((diff * deltas[l].grad.float()).sum(dim=(1, 3)).T)  # (head, n)
    return torch.stack(out)


@dataclass(frozen=True)
class PatchUnit:
    """One work unit: patch ``heads`` of ``layer`` (every layer for attribution) on a task."""

    examples: tuple  # tuple[Example, ...]
    method: Method
    direction: Direction
    layer: int
    heads: tuple[int, ...]
    seed: int = 0


def task_caches(loaded, examples) -> tuple[HeadAdapter, EncodedTask, RunCache, RunCache]:
    """Clean and corrupt runs of a task, memoised on the loaded model (a worker serves many units)."""
    from spectral.tasks import encode

    memo = loaded.__dict__.setdefault("_patch_memo", {})
    key = hash(examples)
    if key not in memo:
        memo.clear()
        adapter = HeadAdapter(loaded.model)
        task = encode(loaded.tokenizer, list(examples))
        device = loaded.model.get_input_embeddings().weight.device
        clean = cache_run(adapter, task.clean.to(device), task)
        corrupt = cache_run(adapter, task.corrupt.to(device), task)
        memo[key] = (adapter, task, clean, corrupt)
    return memo[key]


def patch_unit(loaded, unit: PatchUnit) -> list[dict]:
    """Per-example rows ``layer, head, example, metric_clean, metric_corrupt, metric_patched``."""
    adapter, task, clean, corrupt = task_caches(loaded, unit.examples)
    if unit.method == "attribution":
        device = clean.metric.device
        base = corrupt if unit.direction == "denoise" else clean
        estimate = attribution(adapter, clean, corrupt, task, task.corrupt.to(device), unit.direction)
        patched = {(l, h): base.metric + estimate[l, h] for l in range(adapter.n_layers) for h in unit.heads}
    elif unit.method == "exact":
        base, source = (corrupt, clean) if unit.direction == "denoise" else (clean, corrupt)
        metrics = patch_layer(adapter, base, task, unit.layer, unit.heads, source.results[unit.layer])
        patched = {(unit.layer, h): metrics[i] for i, h in enumerate(unit.heads)}
    else:  # ablations act on the clean run
        source = ablation_source(unit.method, clean, task, unit.layer, unit.seed)
        metrics = patch_layer(adapter, clean, task, unit.layer, unit.heads, source)
        patched = {(unit.layer, h): metrics[i] for i, h in enumerate(unit.heads)}
    rows = []
    for (layer, head), values in patched.items():
        for i, value in enumerate(values.tolist()):
            rows.append({"layer": layer, "head": head, "example": i, "metric_clean": float(clean.metric[i]),
                         "metric_corrupt": float(corrupt.metric[i]), "metric_patched": float(value)})
    return rows


def restoration(patched: Tensor | float, clean: Tensor | float, corrupt: Tensor | float):
    """(M_patched - M_corrupt) / (M_clean - M_corrupt), as DEFINITIONS.md states it."""
    return (patched - corrupt) / (clean - corrupt)


@torch.no_grad()
def patch_set(adapter: HeadAdapter, ids: Tensor, task: EncodedTask, heads: Sequence[tuple[int, int]],
              sources: Sequence[Tensor]) -> Tensor:
    """Metric (n,) of a run of ``ids`` with every (layer, head) in ``heads`` replaced at once,
    each by ``sources[layer]`` (n, pos, head, d_head)."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)

    def make(layer):
        index = torch.tensor(by_layer[layer])

        def edit(t):
            t = t.clone()
            t[:, :, index] = sources[layer][:, :, index].to(t.dtype)
            return t
        return edit

    with adapter.trace([], edits={(l, "result"): make(l) for l in by_layer}):
        logits = adapter.model(input_ids=ids, attention_mask=task.mask.to(ids.device), use_cache=False).logits
    return logit_diff(logits, task)


@dataclass
class Circuit:
    """The smallest prefix of a head ranking whose joint patch restores ``target`` of the effect."""

    heads: list[tuple[int, int]]
    restoration: float
    """Joint restoration of the set (clean values patched into the corrupt run)."""
    removed: float
    """Fraction of the clean logit difference removed by mean-ablating the set on the clean run."""


def minimal_circuit(adapter: HeadAdapter, task: EncodedTask, clean: RunCache, corrupt: RunCache,
                    ranking: Sequence[tuple[int, int]], target: float = 0.8) -> Circuit | None:
    """Grow the set along ``ranking`` until its joint restoration reaches ``target``."""
    device = clean.metric.device
    m_clean, m_corrupt = clean.metric.mean().item(), corrupt.metric.mean().item()
    means = [ablation_source("ablate-mean", clean, task, l) for l in range(adapter.n_layers)]
    for size in range(1, len(ranking) + 1):
        heads = list(ranking[:size])
        patched = patch_set(adapter, task.corrupt.to(device), task, heads, clean.results).mean().item()
        value = restoration(patched, m_clean, m_corrupt)
        if value >= target:
            ablated = patch_set(adapter, task.clean.to(device), task, heads, means).mean().item()
            return Circuit(heads, value, 1.0 - ablated / m_clean)
    return None
