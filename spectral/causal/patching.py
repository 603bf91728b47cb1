"""Activation patching of attention heads: exact (batched, from cached residuals),
attribution (gradient), and ablations (zero, mean, resample).

The unit of patching is a head's result before the output projection, at all positions.
A patch at layer L replays only blocks L..end, starting from the base run's cached residual
stream entering L (the blocks are the model's own modules, called with the arguments the
model itself passed them), and many head patches share one batched replay.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from spectral.models.adapter import HeadAdapter
from spectral.causal.tasks import EncodedTask

Direction = Literal["denoise", "noise"]
Method = Literal["exact", "attribution", "ablate-zero", "ablate-mean", "resample"]


@dataclass
class RunCache:
    """One forward pass over a task's prompts, with what patching needs from it."""

    metric: Tensor  # (n,) logit difference answer - distractor at the final position
    results: list[Tensor]  # per layer: (n, pos, head, d_head)
    resid_pre: list[Tensor]  # per layer: (n, pos, d_model)
    block_kwargs: list[dict]  # per layer: every argument the model passed the block, by name
    keys: list[Tensor]  # per layer: (n, kv_head, pos, d_head), rotated, as the attention caches them
    values: list[Tensor]  # per layer: (n, kv_head, pos, d_head)
    resid_post: list[Tensor] | None = None  # per layer: (n, pos, d_model)


CACHE_PARAMS = ("layer_past", "past_key_values", "past_key_value", "cache")
"""Names a family's block uses for its key/value cache argument."""


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
    """Run ``ids`` once, keeping every layer's per-head result, residual input, keys and values,
    and the arguments of each block call."""
    n_layers = adapter.n_layers
    store: dict[str, list] = {site: [None] * n_layers
                              for site in ("result", "resid_pre", "resid_post", "keys_rotated", "values")}
    kwargs: list[dict | None] = [None] * n_layers
    group = adapter.n_heads // adapter.n_kv_heads

    def keep(layer, site, t):
        if site in ("keys_rotated", "values"):  # back to the cache layout, one entry per kv head
            t = t.transpose(1, 2)[:, ::group]
        store[site][layer] = t.detach().clone()

    handles = keep_block_kwargs(adapter, kwargs)
    try:
        with adapter.trace(list(store), keep, attention_mask=task.mask.to(ids.device)):
            logits = adapter.model(input_ids=ids, attention_mask=task.mask.to(ids.device), use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return RunCache(logit_diff(logits, task), store["result"], store["resid_pre"], kwargs,
                    store["keys_rotated"], store["values"], store["resid_post"])


def keep_block_kwargs(adapter: HeadAdapter, store: list) -> list:
    """Pre-hooks (remove them after the forward pass) that keep in ``store[l]`` every argument
    the model passes block ``l`` except its hidden states and key/value cache: what a block
    needs to be called again on other hidden states (``replay``)."""
    return [block.register_forward_pre_hook(_kwargs_keeper(store, l, block), with_kwargs=True)
            for l, block in enumerate(adapter.blocks)]


def _kwargs_keeper(store: list, layer: int, block: torch.nn.Module):
    signature = _block_signature(block)

    def hook(module, args, kwargs):
        bound = signature.bind_partial(module, *args, **kwargs).arguments
        named = {}
        for name, value in list(bound.items())[1:]:  # past self
            if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                named.update(value)
            else:
                named[name] = value
        named.pop("hidden_states", None)
        for name in CACHE_PARAMS:
            named.pop(name, None)
        store[layer] = named
    return hook


def _block_signature(block: torch.nn.Module) -> inspect.Signature:
    """The signature of the block class's own forward (tools such as nnsight may wrap the
    instance's ``forward``; the class keeps the real one)."""
    return inspect.signature(inspect.unwrap(type(block).forward))


def _repeat(value, copies: int, n: int):
    """Repeat batch-leading tensors (first dim n) ``copies`` times, copy-major; recurse into tuples."""
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n:
        return value.repeat(copies, *([1] * (value.dim() - 1)))
    if isinstance(value, (tuple, list)):
        return type(value)(_repeat(v, copies, n) for v in value)
    return value


class PrefixKV:
    """A key/value cache holding the base run's keys and values of positions ``< start``: the
    block's attention prepends them to the suffix it computes (duck-types ``Cache.update``)."""

    def __init__(self, keys: dict[int, Tensor], values: dict[int, Tensor]):
        self.keys, self.values = keys, values

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return (torch.cat([self.keys[layer_idx].to(key_states.dtype), key_states], dim=2),
                torch.cat([self.values[layer_idx].to(value_states.dtype), value_states], dim=2))


def first_difference(a: Tensor, b: Tensor) -> int:
    """The first position at which any row of ``a`` and ``b`` differ (their width if none)."""
    differs = (a != b).any(dim=0).nonzero()
    return int(differs[0]) if len(differs) else a.shape[1]


def _suffix_kwargs(adapter: HeadAdapter, kwargs: dict, start: int, mask: Tensor) -> dict | None:
    """A block's arguments for positions ``start..`` only; None where this cannot be done exactly."""
    out = dict(kwargs)
    width = mask.shape[1]
    am = out.get("attention_mask")
    if isinstance(am, Tensor) and am.dim() == 4 and am.shape[-2] == width:
        out["attention_mask"] = am[:, :, start:, :]
    elif am is None and getattr(adapter.model.config, "_attn_implementation", None) == "sdpa":
        rows = torch.arange(start, width, device=mask.device)[:, None]
        causal = torch.arange(width, device=mask.device)[None, :] <= rows  # (width - start, width)
        out["attention_mask"] = causal[None, None] & mask.bool()[:, None, None, :]
    else:
        return None
    for name in ("position_ids", "cache_position"):
        if isinstance(out.get(name), Tensor):
            out[name] = out[name][..., start:]
    if out.get("position_embeddings") is not None:
        out["position_embeddings"] = tuple(t[..., start:, :] for t in out["position_embeddings"])
    return out


def replay(adapter: HeadAdapter, base: RunCache, layer: int, copies: int,
           edit: Callable[[Tensor], Tensor] | None, last: Tensor | None = None, start: int = 0,
           mask: Tensor | None = None, hidden: Tensor | None = None) -> Tensor:
    """Logits of ``copies`` copies of the base run, recomputed from the residual entering
    ``layer`` with ``edit`` applied to that layer's per-head result: (copies * n, pos, vocab),
    or (copies * n, vocab) at positions ``last`` (n,) only, when given (the unembedding of
    the other positions is skipped). ``hidden`` (copies * n, pos - start, d_model): the
    residual entering ``layer`` to start from instead of the cached one (``edit`` None).

    ``start > 0`` (the caller guarantees the change touches nothing before it): only positions
    ``start..`` are recomputed, attending to the base run's cached keys and values of the
    earlier positions (``mask``, the (n, pos) padding mask, is then required).
    """
    n = base.resid_pre[0].shape[0]
    n_layers = adapter.n_layers
    kwargs_by_layer = list(base.block_kwargs)
    cache_name = next((c for c in CACHE_PARAMS if c in _block_signature(adapter.blocks[0]).parameters), None)
    if start > 0 and layer < n_layers:
        suffix = [_suffix_kwargs(adapter, kw, start, mask.to(base.resid_pre[0].device)) if l >= layer else kw
                  for l, kw in enumerate(kwargs_by_layer)]
        if cache_name is None or any(x is None for x in suffix[layer:]):
            if hidden is not None:
                raise ValueError("this model cannot replay a suffix of positions")
            start = 0  # the exact full replay instead
        else:
            kwargs_by_layer = suffix
            prefix = PrefixKV({l: _repeat(base.keys[l][:, :, :start], copies, n) for l in range(layer, n_layers)},
                              {l: _repeat(base.values[l][:, :, :start], copies, n) for l in range(layer, n_layers)})
    if hidden is None:
        hidden = _repeat(base.resid_pre[layer][:, start:], copies, n)
    edits = {(layer, "result"): edit} if edit is not None else {}
    with adapter.trace([], edits=edits):
        for l in range(layer, n_layers):
            kwargs = {k: _repeat(v, copies, n) for k, v in kwargs_by_layer[l].items()}
            if start > 0:
                kwargs[cache_name] = prefix
            out = adapter.blocks[l](hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
    if last is not None:
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        hidden = hidden[rows, last.to(hidden.device).repeat(copies) - start]
    elif start > 0:
        raise ValueError("a replay from start > 0 gives the last positions only: pass last")
    norm = adapter.model.get_submodule(adapter.family.final_norm)
    return adapter.model.get_output_embeddings()(norm(hidden))


def _parallel_residual(adapter: HeadAdapter, layer: int) -> bool:
    """GPT-NeoX with a parallel residual: the block's MLP reads the block's input, not the
    attention output, so a change of head results only adds ``W_O`` times the change."""
    return bool(getattr(adapter.blocks[layer], "use_parallel_residual", False))


@torch.no_grad()
def patch_layer(adapter: HeadAdapter, base: RunCache, task: EncodedTask, layer: int, heads: Sequence[int],
                source: Tensor, start: int = 0) -> Tensor:
    """Metric (len(heads), n) of the base run with each head's result replaced by ``source``
    (n, pos, head, d_head): one batched replay for all the heads. ``start``: the first
    position at which ``source`` may differ from the base run's result (earlier positions are
    reused from the base run, not recomputed).

    With a parallel residual (Pythia), block ``layer`` itself is not recomputed either: its
    output is the cached one plus the output projection of the change of the patched head
    (unless accelerate has offloaded that projection's weights: then the block is replayed).
    """
    k, n = len(heads), len(task)
    start = min(start, int(task.last.min()))  # every example's last position is recomputed
    index = torch.tensor(list(heads), device=source.device)
    source = source[:, start:]
    out_proj = getattr(adapter.attentions[layer], adapter.family.out_proj)
    offloaded = out_proj.weight.device.type == "meta"  # accelerate brings it in only inside forward
    if _parallel_residual(adapter, layer) and base.resid_post is not None and not offloaded:
        weight = out_proj.weight.view(adapter.d_model, adapter.n_heads, adapter.d_head)[:, index]  # (d_model, k, d_head)
        diff = (source[:, :, index] - base.results[layer][:, start:, index]).to(weight.dtype)  # (n, pos', k, d_head)
        delta = torch.einsum("npkd,mkd->knpm", diff, weight).reshape(k * n, diff.shape[1], adapter.d_model)
        hidden = _repeat(base.resid_post[layer][:, start:], k, n) + delta.to(base.resid_post[layer].dtype)
        logits = replay(adapter, base, layer + 1, k, None, last=task.last, start=start, mask=task.mask, hidden=hidden)
        return logit_diff(logits, task).view(k, n)

    def edit(result: Tensor) -> Tensor:  # (k * n, pos - start, head, d_head)
        result = result.clone().view(k, n, *result.shape[1:])
        copies = torch.arange(k, device=result.device)
        result[copies, :, :, index] = source[:, :, index].permute(2, 0, 1, 3).to(result.dtype)
        return result.view(k * n, *result.shape[2:])

    logits = replay(adapter, base, layer, k, edit, last=task.last, start=start, mask=task.mask)
    return logit_diff(logits, task).view(k, n)


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
    """One work unit: patch ``heads`` of every layer in ``layers`` on the task ``examples``.

    ``first_example`` is the index of ``examples[0]`` in the whole task, so units holding
    consecutive chunks of one task (data-parallel units) number their rows like one run.
    Attribution units estimate all ``layers`` from one backward pass.
    """

    examples: tuple  # tuple[Example, ...]
    method: Method
    direction: Direction
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    seed: int = 0
    first_example: int = 0


def task_caches(loaded, examples) -> tuple[HeadAdapter, EncodedTask, RunCache, RunCache]:
    """Clean and corrupt runs of a task, memoised on the loaded model (a worker serves many units)."""
    from spectral.causal.tasks import encode

    memo = loaded.__dict__.setdefault("_patch_memo", {})
    key = hash(examples)
    if key not in memo:
        memo.clear()
        adapter = HeadAdapter(loaded.model)
        adapter.require_causal_lm("activation patching")
        task = encode(loaded.tokenizer, list(examples))
        device = loaded.model.get_input_embeddings().weight.device
        clean = cache_run(adapter, task.clean.to(device), task)
        corrupt = cache_run(adapter, task.corrupt.to(device), task)
        memo[key] = (adapter, task, clean, corrupt)
    return memo[key]


def patch_unit(loaded, unit: PatchUnit) -> list[dict]:
    """Per-example rows ``layer, head, example, metric_clean, metric_corrupt, metric_patched``."""
    adapter, task, clean, corrupt = task_caches(loaded, unit.examples)
    patched: dict[tuple[int, int], Tensor] = {}
    if unit.method == "attribution":
        device = clean.metric.device
        base = corrupt if unit.direction == "denoise" else clean
        estimate = attribution(adapter, clean, corrupt, task, task.corrupt.to(device), unit.direction)
        patched = {(l, h): base.metric + estimate[l, h] for l in unit.layers for h in unit.heads}
    for layer in unit.layers if unit.method != "attribution" else ():
        if unit.method == "exact":
            base, source = (corrupt, clean) if unit.direction == "denoise" else (clean, corrupt)
            start = first_difference(task.clean, task.corrupt)  # clean and corrupt runs agree before it
            metrics = patch_layer(adapter, base, task, layer, unit.heads, source.results[layer], start)
        else:  # ablations act on the clean run
            source = ablation_source(unit.method, clean, task, layer, unit.seed)
            metrics = patch_layer(adapter, clean, task, layer, unit.heads, source)
        patched.update({(layer, h): metrics[i] for i, h in enumerate(unit.heads)})
    rows = []
    for (layer, head), values in patched.items():
        for i, value in enumerate(values.tolist()):
            rows.append({"layer": layer, "head": head, "example": unit.first_example + i,
                         "metric_clean": float(clean.metric[i]), "metric_corrupt": float(corrupt.metric[i]),
                         "metric_patched": float(value)})
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
