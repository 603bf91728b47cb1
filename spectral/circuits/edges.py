"""Edge-level circuit discovery: the graph of components joined by residual edges, edge
attribution patching (EAP) and EAP with integrated gradients (EAP-IG), exact edge patching,
circuits at a range of sizes with their faithfulness curve, CPR and CMD.

**Graph.** Senders write into the residual stream: ``input`` (the residual entering block 0:
the token embeddings, plus the position embeddings where the family adds them), every head
``a{l}.h{h}`` and every MLP ``m{l}``. Receivers read it: a head's query, key or value input
(``q``/``k``/``v`` of ``a{l}.h{h}``), an MLP's input (``mlp`` of ``m{l}``) and the final
residual before the final norm (``logits``). An edge joins a sender to every receiver input that
reads the stream after the sender wrote: into layer l's q/k/v the input and every head and MLP
of layers < l; into layer l's MLP the same plus layer l's heads when the block is sequential
(GPT-2, Llama, GPT-NeoX with ``use_parallel_residual`` false; with a parallel residual, as in
Pythia, the MLP reads the block's input); into ``logits`` every sender. Attention output biases
are nobody's write (they are the same in every run, so they cancel in every difference below).

**Writes.** A head's write is its result through its slice of the output projection (bias
excluded), an MLP's write its module output, the input's write the residual entering block 0.

**Edge ablation.** Ablating edge s -> r changes r's input only: r reads its residual stream
with s's write ``w_s`` replaced by s's ablated write ``a_s``, i.e. plus ``a_s - w_s``, where
``w_s`` is s's write *in the same run* (so a sender whose own inputs were ablated upstream
passes on its changed write along its kept edges, as in ACDC and Hanna et al.'s evaluation).
Ablated writes (``Ablation``): ``corrupt`` - the write in the corrupt prompt's run;
``mean`` - the mean over the task's clean examples of the write at the same position (over
the examples that have a real token there); ``resample`` - the write in the clean run of another
example of the same length (a derangement within each length group, seeded).

**Metric.** m = mean over examples of the logit difference answer - distractor at each example's
final position (``spectral.causal.patching.logit_diff``).

**Scores.** An edge's score estimates the change of m when that edge alone is ablated (negative:
the edge carries the behaviour). EAP (Syed et al. 2023): ``(a_s - w_s) . dm/d(input of r)``
with the gradient taken in the *clean* run, for every edge at once from one forward and one
backward pass with zero deltas on every receiver input (``receiver_deltas``). EAP-IG (Hanna et
al. 2024, "EAP-IG inputs"): the same with the gradient averaged over m runs whose input write is
interpolated ``a_in + (k/m)(w_in - a_in)``, k = 1..m (the right-hand Riemann sum: k = m is the
clean run, so m = 1 is EAP exactly; Hanna et al.'s code uses k = 0..m-1). The exact score of an
edge is m(that edge alone ablated) - m(clean) by exact patching.

**Faithfulness.** A circuit C is a set of edges; its run ablates every edge not in C.
f(C) = (m(C) - m(empty)) / (m(N) - m(empty)) with m(N) the clean model's metric (every edge kept)
and m(empty) every edge ablated (with the ``corrupt`` ablation, the corrupt run's metric).
Circuits at size k: the k edges of largest |score| (ties by edge order). The curve f over
x = k / |E| is integrated by the trapezoidal rule over the measured sizes plus the two exact
endpoints (x = 0, f = 0) and (x = 1, f = 1): CPR = area under f, CMD = area under |1 - f|, both
on [0, 1].
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from spectral.causal.patching import logit_diff
from spectral.causal.tasks import EncodedTask
from spectral.errors import UsageError
from spectral.models.adapter import HeadAdapter

Kind = Literal["q", "k", "v", "mlp", "logits"]
KINDS: tuple[str, ...] = get_args(Kind)
HEAD_KINDS: tuple[str, ...] = ("q", "k", "v")
Ablation = Literal["corrupt", "mean", "resample"]
ABLATIONS: tuple[str, ...] = get_args(Ablation)
MLP_ATTRIBUTE = "mlp"
"""Attribute of a block holding its MLP module (the same in every supported family)."""


# ---------------------------------------------------------------------------- the graph
@dataclass(frozen=True)
class Group:
    """Receivers that read one delta tensor of ``receiver_deltas``: the q (or k, or v) inputs of
    every head of a layer, one MLP input, or the final residual. Its senders are the first
    ``n_senders`` of ``Graph.senders``."""

    layer: int
    """The receiver's layer; ``n_layers`` for ``logits``."""
    kind: str
    n_senders: int
    n_receivers: int
    """Heads per layer for q/k/v (key/value heads for k/v of a grouped-query model), else 1."""
    offset: int
    """Index of the group's first edge in the graph's edge order (receiver-major, then sender)."""
    stride: int = 1
    """Receiver r of a head group is read through head ``r * stride``'s delta: a grouped-query
    model's key/value head reads the summed deltas of its query heads (``receiver_deltas``), so
    its delta is given at the group's first head only."""

    @property
    def key(self) -> tuple[int, str]:
        return (self.layer, self.kind)

    @property
    def n_edges(self) -> int:
        return self.n_senders * self.n_receivers


@dataclass(frozen=True)
class Edge:
    """One row of the edge table."""

    sender: str
    """``input``, ``a{l}.h{h}`` or ``m{l}``."""
    receiver: str
    """``a{l}.h{h}``, ``m{l}`` or ``logits``; ``a{l}.kv{j}`` for the key/value input of key/value
    head j of a grouped-query model (shared by its query heads)."""
    input: str
    """The receiver's input: q, k, v, mlp or logits."""


@dataclass(frozen=True)
class Graph:
    """Nodes and residual edges of one model; edges are numbered group by group (``groups``),
    inside a group receiver by receiver, inside a receiver sender by sender."""

    n_layers: int
    n_heads: int
    senders: tuple[str, ...]
    """``input``, then per layer its heads ``a{l}.h0..`` and its MLP ``m{l}``."""
    groups: tuple[Group, ...]

    @property
    def n_edges(self) -> int:
        return sum(g.n_edges for g in self.groups)

    def receiver(self, group: Group, index: int) -> str:
        if group.kind in HEAD_KINDS:
            return f"a{group.layer}.kv{index}" if group.stride > 1 else f"a{group.layer}.h{index}"
        return "logits" if group.kind == "logits" else f"m{group.layer}"

    def edges(self) -> list[Edge]:
        return [Edge(self.senders[s], self.receiver(g, r), g.kind)
                for g in self.groups for r in range(g.n_receivers) for s in range(g.n_senders)]

    def index(self, sender: str, receiver: str, input: str) -> int:
        """The number of an edge; a UsageError for an edge the graph does not have."""
        for g in self.groups:
            if g.kind != input:
                continue
            for r in range(g.n_receivers):
                if self.receiver(g, r) == receiver:
                    if sender in self.senders[:g.n_senders]:
                        return g.offset + r * g.n_senders + self.senders.index(sender)
                    raise UsageError(f"{sender} does not write before {receiver}'s {input} input: no such edge")
        raise UsageError(f"no receiver input {receiver}<{input}> in this model")

    def split(self, flat: Tensor) -> list[Tensor]:
        """A per-edge tensor (..., n_edges) as one (..., n_receivers, n_senders) tensor per group."""
        return [flat[..., g.offset:g.offset + g.n_edges].unflatten(-1, (g.n_receivers, g.n_senders))
                for g in self.groups]


def mlp_reads_heads(adapter: HeadAdapter, layer: int) -> bool:
    """Whether layer ``layer``'s MLP reads the output of that layer's attention (sequential
    residual) rather than the block's input (GPT-NeoX ``use_parallel_residual``)."""
    return not bool(getattr(adapter.blocks[layer], "use_parallel_residual", False))


def build_graph(adapter: HeadAdapter) -> Graph:
    """The node/edge graph of ``adapter``'s model (see the module docstring)."""
    n_layers, n_heads = adapter.n_layers, adapter.n_heads
    senders = ["input"]
    for layer in range(n_layers):
        senders += [f"a{layer}.h{h}" for h in range(n_heads)] + [f"m{layer}"]
    groups, offset = [], 0

    group_size = n_heads // adapter.n_kv_heads

    def add(layer, kind, n_senders, n_receivers, stride=1):
        nonlocal offset
        groups.append(Group(layer, kind, n_senders, n_receivers, offset, stride))
        offset += n_senders * n_receivers

    for layer in range(n_layers):
        before = 1 + layer * (n_heads + 1)  # input and every node of the earlier layers
        add(layer, "q", before, n_heads)
        for kind in ("k", "v"):
            add(layer, kind, before, adapter.n_kv_heads, group_size)
        add(layer, "mlp", before + (n_heads if mlp_reads_heads(adapter, layer) else 0), 1)
    add(n_layers, "logits", len(senders), 1)
    return Graph(n_layers, n_heads, tuple(senders), tuple(groups))


# ---------------------------------------------------------------------------- writes
def out_matrices(adapter: HeadAdapter) -> list[Float[Tensor, "head d_head d_model"]]:
    """Per layer, each head's slice of the attention output projection, read from the module
    itself (its response to unit inputs minus its bias), so every family's layout is served."""
    out = []
    with torch.no_grad():
        for attn in adapter.attentions:
            proj = getattr(attn, adapter.family.out_proj)
            weight = next(proj.parameters())
            width = adapter.n_heads * adapter.d_head
            eye = torch.eye(width, device=weight.device, dtype=weight.dtype)
            matrix = proj(eye) - proj(torch.zeros_like(eye[:1]))  # (width, d_model)
            out.append(matrix.view(adapter.n_heads, adapter.d_head, -1))
    return out


def _mlps(adapter: HeadAdapter) -> list[torch.nn.Module]:
    missing = [l for l, b in enumerate(adapter.blocks) if not hasattr(b, MLP_ATTRIBUTE)]
    if missing:
        raise ValueError(f"block {missing[0]} of this {adapter.family.name} model has no {MLP_ATTRIBUTE!r} module")
    return [getattr(b, MLP_ATTRIBUTE) for b in adapter.blocks]


@contextmanager
def capture_writes(adapter: HeadAdapter, store: list, matrices: Sequence[Tensor] | None = None) -> Iterator[None]:
    """While active, a forward pass fills ``store`` (cleared first) with every sender's write,
    detached, in ``Graph.senders`` order, each (batch, pos, d_model); ``torch.stack(store)`` after
    the pass gives (senders, batch, pos, d_model)."""
    matrices = out_matrices(adapter) if matrices is None else matrices
    store.clear()
    n_heads = adapter.n_heads

    def keep(layer, site, t):
        if site == "resid_pre":
            store.append(t.detach())
        else:  # result (batch, pos, head, d_head) -> per-head writes
            writes = torch.einsum("bphd,hdm->hbpm", t.detach(), matrices[layer].to(t.dtype))
            store.extend(writes.unbind(0))

    def mlp_hook(module, args, output):
        store.append((output[0] if isinstance(output, tuple) else output).detach())

    with ExitStack() as stack:
        stack.enter_context(adapter.trace(["resid_pre"], keep, layers=[0]))
        stack.enter_context(adapter.trace(["result"], keep))
        for mlp in _mlps(adapter):
            handle = mlp.register_forward_hook(mlp_hook)
            stack.callback(handle.remove)
        yield
    if len(store) not in (0, 1 + adapter.n_layers * (n_heads + 1)):
        raise RuntimeError(f"captured {len(store)} writes; expected one per sender")


def _forward(adapter: HeadAdapter, ids: Tensor, mask: Tensor) -> Tensor:
    return adapter.model(input_ids=ids, attention_mask=mask, use_cache=False).logits


@torch.no_grad()
def run_writes(adapter: HeadAdapter, ids: Tensor, mask: Tensor,
               matrices: Sequence[Tensor] | None = None) -> Float[Tensor, "sender batch pos d_model"]:
    """Every sender's write in one forward pass of ``ids``."""
    store: list[Tensor] = []
    with capture_writes(adapter, store, matrices):
        _forward(adapter, ids, mask)
    return torch.stack(store)


def _rows(task: EncodedTask, rows: Tensor) -> EncodedTask:
    """The examples ``rows`` of a task, as a task."""
    picked = rows.tolist()
    return EncodedTask(task.clean[rows], task.corrupt[rows], task.mask[rows], task.last[rows], task.answer[rows],
                       task.distractor[rows], [task.examples[i] for i in picked])


def _batches(n: int, batch_size: int) -> list[Tensor]:
    if batch_size < 1:
        raise UsageError(f"batch size must be >= 1, not {batch_size}")
    return [torch.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def resample_order(task: EncodedTask, seed: int = 0) -> Tensor:
    """For each example, another example of the same length (a derangement within each length
    group): the source of its ``resample`` ablation. A UsageError when a length occurs once."""
    lengths = task.mask.sum(1)
    gen = torch.Generator().manual_seed(seed)
    order = torch.arange(len(task))
    for length in lengths.unique().tolist():
        members = (lengths == length).nonzero().squeeze(1)
        if len(members) < 2:
            raise UsageError(f"resample ablation: only one example of length {length}; "
                             "it needs two or more examples of each prompt length")
        shift = 1 + int(torch.randint(0, len(members) - 1, (1,), generator=gen))
        perm = torch.randperm(len(members), generator=gen)
        order[members[perm]] = members[perm.roll(-shift)]  # a cycle: no example is its own source
    return order


class AblatedWrites:
    """Each sender's ablated write for any rows of a task (see ``Ablation``)."""

    def __init__(self, adapter: HeadAdapter, task: EncodedTask, ablation: Ablation, batch_size: int = 32,
                 seed: int = 0, matrices: Sequence[Tensor] | None = None):
        if ablation not in ABLATIONS:
            raise UsageError(f"unknown ablation {ablation!r} (known: {', '.join(ABLATIONS)})")
        self.adapter, self.task, self.ablation = adapter, task, ablation
        self.matrices = out_matrices(adapter) if matrices is None else matrices
        self.device = adapter.model.get_input_embeddings().weight.device
        self.order = resample_order(task, seed) if ablation == "resample" else None
        self.mean = self._mean(batch_size) if ablation == "mean" else None

    def _mean(self, batch_size: int) -> Tensor:
        """(senders, pos, d_model): mean clean write at each position over the examples real there."""
        total, count = None, torch.zeros(self.task.clean.shape[1], device=self.device)
        for rows in _batches(len(self.task), batch_size):
            mask = self.task.mask[rows].to(self.device)
            writes = run_writes(self.adapter, self.task.clean[rows].to(self.device), mask, self.matrices)
            part = (writes * mask[None, :, :, None]).sum(1)  # (senders, pos, d_model)
            total = part if total is None else total + part
            count += mask.sum(0)
        return total / count.clamp(min=1)[None, :, None]

    def rows(self, rows: Tensor) -> Float[Tensor, "sender batch pos d_model"]:
        mask = self.task.mask[rows].to(self.device)
        if self.ablation == "mean":
            return self.mean[:, None].expand(-1, len(rows), -1, -1)
        if self.ablation == "corrupt":
            ids = self.task.corrupt[rows]
        else:  # resample: the clean run of each row's source (same length, so same mask)
            ids = self.task.clean[self.order[rows]]
        return run_writes(self.adapter, ids.to(self.device), mask, self.matrices)


# ---------------------------------------------------------------------------- attribution
def _zero_deltas(graph: Graph, batch: int, pos: int, d_model: int, like: Tensor) -> dict[tuple[int, str], Tensor]:
    """A zero delta requiring grad for every receiver input: (batch, pos, heads, d_model) for
    q/k/v, (batch, pos, d_model) for an MLP and the logits."""
    out = {}
    for g in graph.groups:
        shape = (batch, pos, graph.n_heads, d_model) if g.kind in HEAD_KINDS else (batch, pos, d_model)
        out[g.key] = torch.zeros(shape, dtype=like.dtype, device=like.device, requires_grad=True)
    return out


def receiver_gradients(adapter: HeadAdapter, graph: Graph, task: EncodedTask, ids: Tensor,
                       input_write: Tensor | None = None, store: list | None = None,
                       matrices: Sequence[Tensor] | None = None) -> tuple[dict[tuple[int, str], Tensor], float]:
    """The metric's sum over the examples, and d(that sum) of the logit difference)/d(every receiver input), from one forward
    and one backward pass of ``ids`` (rows of ``task``); each gradient has its delta's shape,
    a head receiver's last-but-one axis being the head. ``input_write`` (batch, pos, d_model):
    the residual entering block 0 to use instead of the embedding of ``ids``. ``store``: filled
    with every sender's write in this pass (``capture_writes``)."""
    from spectral.circuits.split import norms, receiver_deltas

    norms(adapter)  # found by a forward pass of its own: before any capture starts
    weight = adapter.model.get_input_embeddings().weight
    mask = task.mask.to(ids.device)
    deltas = _zero_deltas(graph, ids.shape[0], ids.shape[1], adapter.d_model, weight)
    edits = {(0, "resid_pre"): (lambda t: input_write.to(t.dtype))} if input_write is not None else {}
    with ExitStack() as stack:
        stack.enter_context(torch.enable_grad())
        if store is not None:
            stack.enter_context(capture_writes(adapter, store, matrices))
        stack.enter_context(adapter.trace([], edits=edits))
        stack.enter_context(receiver_deltas(adapter, deltas))
        metric = logit_diff(_forward(adapter, ids, mask), task).sum()
    keys = list(deltas)
    grads = torch.autograd.grad(metric, [deltas[k] for k in keys], allow_unused=True)
    return {k: (torch.zeros_like(deltas[k]) if g is None else g) for k, g in zip(keys, grads)}, float(metric.detach())


def _group_scores(graph: Graph, diff: Tensor, grads: Mapping[tuple[int, str], Tensor]) -> Tensor:
    """(n_edges,): sum over batch and positions of (a_s - w_s) . gradient at r, every edge."""
    out = []
    for g in graph.groups:
        d = diff[:g.n_senders].float()  # (senders, batch, pos, d_model)
        grad = grads[g.key].float()
        if g.kind in HEAD_KINDS:
            grad = grad[:, :, ::g.stride]  # a key/value head's gradient, at its group's first head
            out.append(torch.einsum("sbpm,bphm->hs", d, grad).flatten())
        else:
            out.append(torch.einsum("sbpm,bpm->s", d, grad))
    return torch.cat(out)


@dataclass
class EdgeScores:
    """Attribution scores of every edge of a graph, on one task."""

    graph: Graph
    scores: Float[Tensor, "edge"]
    """Estimated change of the mean logit difference when the edge alone is ablated."""
    method: str
    """``eap`` or ``eap-ig`` (with ``steps``)."""
    ablation: str
    steps: int
    metric_clean: float
    """Mean logit difference of the clean run."""


def eap_scores(adapter: HeadAdapter, task: EncodedTask, ablation: Ablation = "corrupt", steps: int = 1,
               batch_size: int = 32, seed: int = 0, graph: Graph | None = None) -> EdgeScores:
    """EAP (``steps`` = 1) or EAP-IG (``steps`` = m > 1) scores of every edge (module docstring).

    Per batch: the ablated writes (``corrupt``/``resample``: one forward pass without gradients;
    ``mean``: from a clean pass over the task made once), then one forward and one backward pass
    of the clean prompts that give every receiver input's gradient and every sender's clean
    write; EAP-IG adds m - 1 forward and backward passes with the input write interpolated."""
    if steps < 1:
        raise UsageError(f"EAP-IG steps must be >= 1, not {steps}")
    graph = build_graph(adapter) if graph is None else graph
    matrices = out_matrices(adapter)
    ablated = AblatedWrites(adapter, task, ablation, batch_size, seed, matrices)
    device = ablated.device
    total, metric = torch.zeros(graph.n_edges, device=device), 0.0
    for rows in _batches(len(task), batch_size):
        sub = _rows(task, rows)
        ids = sub.clean.to(device)
        a = ablated.rows(rows)
        store: list[Tensor] = []
        grads, clean_sum = receiver_gradients(adapter, graph, sub, ids, store=store, matrices=matrices)  # k = m: clean
        metric += clean_sum
        w = torch.stack(store)
        for k in range(1, steps):
            interpolated = a[0] + (k / steps) * (w[0] - a[0])
            more, _ = receiver_gradients(adapter, graph, sub, ids, input_write=interpolated)
            grads = {key: grads[key] + more[key] for key in grads}
        total += _group_scores(graph, a - w, grads) / steps
    return EdgeScores(graph, total.cpu() / len(task), "eap" if steps == 1 else "eap-ig", ablation, steps,
                      metric / len(task))


# ---------------------------------------------------------------------------- exact edge patching
@contextmanager
def _ablated_edges(adapter: HeadAdapter, graph: Graph, drops: list[Tensor], ablated: Tensor, copies: int,
                   matrices: Sequence[Tensor] | None = None) -> Iterator[None]:
    """While active, a forward pass of ``copies`` copies (copy-major) of a batch ablates, in copy
    c, the edges ``drops[g][c]`` (n_receivers, n_senders) of each group g: each receiver input
    reads ``sum over its dropped senders of (a_s - w_s)`` more, with ``w_s`` the sender's write
    in this same pass (captured as the pass goes) and ``ablated`` (senders, batch, pos, d_model)
    the a_s. The deltas handed to ``receiver_deltas`` are filled in place just before their
    receivers read them (a layer's q/k/v at the block's start, an MLP's input before its norm,
    the logits' before the final norm), when every sender of theirs has written."""
    from spectral.circuits.split import norms, receiver_deltas

    s_all, batch, pos, d_model = ablated.shape
    store: list[Tensor] = []
    deltas, fills = {}, {}
    for g, drop in zip(graph.groups, drops):
        if not bool(drop.any()):
            continue  # nothing ablated into this input in any copy
        shape = (copies * batch, pos, graph.n_heads, d_model) if g.kind in HEAD_KINDS else (copies * batch, pos, d_model)
        deltas[g.key] = torch.zeros(shape, dtype=ablated.dtype, device=ablated.device)
        fills[g.key] = (g, drop.to(ablated.device, ablated.dtype))

    def fill(key):
        g, drop = fills[key]
        s = g.n_senders
        current = torch.stack(store[:s]).view(s, copies, batch, pos, d_model)
        new = (torch.einsum("crs,sbpm->cbprm", drop, ablated[:s])
               - torch.einsum("crs,scbpm->cbprm", drop, current)).reshape(copies * batch, pos, g.n_receivers, d_model)
        if g.kind in HEAD_KINDS:
            deltas[key][:, :, ::g.stride].copy_(new)
        else:
            deltas[key].copy_(new[:, :, 0])

    def pre_hook(keys):
        def hook(module, *args):
            for key in keys:
                fill(key)
        return hook

    found = norms(adapter)
    with ExitStack() as stack:
        stack.enter_context(capture_writes(adapter, store, matrices))
        for layer, block in enumerate(adapter.blocks):
            keys = [(layer, k) for k in HEAD_KINDS if (layer, k) in fills]
            if keys:
                stack.callback(block.register_forward_pre_hook(pre_hook(keys)).remove)
            if (layer, "mlp") in fills:
                norm = getattr(block, found.mlp)
                stack.callback(norm.register_forward_pre_hook(pre_hook([(layer, "mlp")])).remove)
        if (graph.n_layers, "logits") in fills:
            norm = adapter.model.get_submodule(adapter.family.final_norm)
            stack.callback(norm.register_forward_pre_hook(pre_hook([(graph.n_layers, "logits")])).remove)
        stack.enter_context(receiver_deltas(adapter, deltas))
        yield


@torch.no_grad()
def patched_metrics(adapter: HeadAdapter, task: EncodedTask, ablated: AblatedWrites,
                    drops: Bool[Tensor, "circuit edge"], graph: Graph | None = None, batch_size: int = 32,
                    copies: int = 8) -> Float[Tensor, "circuit"]:
    """Mean logit difference of the task's clean prompts with, for each row of ``drops``, the
    edges marked True ablated (exact edge patching; ``copies`` rows share one forward pass)."""
    graph = build_graph(adapter) if graph is None else graph
    if drops.dim() != 2 or drops.shape[1] != graph.n_edges:
        raise ValueError(f"drops must be (circuits, {graph.n_edges}), not {tuple(drops.shape)}")
    device = ablated.device
    out = torch.zeros(drops.shape[0])
    for rows in _batches(len(task), batch_size):
        sub = _rows(task, rows)
        a = ablated.rows(rows)
        for start in range(0, drops.shape[0], copies):
            chunk = drops[start:start + copies]
            c = chunk.shape[0]
            ids = sub.clean.to(device).repeat(c, 1)
            with _ablated_edges(adapter, graph, graph.split(chunk), a, c, ablated.matrices):
                logits = _forward(adapter, ids, sub.mask.to(device).repeat(c, 1))
            out[start:start + c] += logit_diff(logits, sub).view(c, len(rows)).sum(1).cpu()
    return out / len(task)


@torch.no_grad()
def clean_metric(adapter: HeadAdapter, task: EncodedTask, batch_size: int = 32) -> float:
    """m(N): the mean logit difference of the unmodified model on the clean prompts."""
    device = adapter.model.get_input_embeddings().weight.device
    total = 0.0
    for rows in _batches(len(task), batch_size):
        sub = _rows(task, rows)
        total += float(logit_diff(_forward(adapter, sub.clean.to(device), sub.mask.to(device)), sub).sum())
    return total / len(task)


def exact_edge_scores(adapter: HeadAdapter, task: EncodedTask, ablated: AblatedWrites, edges: Sequence[int],
                      graph: Graph | None = None, batch_size: int = 32, copies: int = 8) -> Float[Tensor, "edge"]:
    """For each edge number in ``edges``: m(that edge alone ablated) - m(clean), exactly."""
    graph = build_graph(adapter) if graph is None else graph
    drops = torch.zeros(len(edges), graph.n_edges, dtype=torch.bool)
    drops[torch.arange(len(edges)), torch.as_tensor(list(edges), dtype=torch.long)] = True
    return patched_metrics(adapter, task, ablated, drops, graph, batch_size, copies) - clean_metric(adapter, task, batch_size)


# ---------------------------------------------------------------------------- circuits
def top_edges(scores: Tensor, size: int) -> Tensor:
    """The ``size`` edge numbers of largest |score| (ties: the lower edge number first)."""
    if not 0 <= size <= scores.numel():
        raise UsageError(f"circuit size {size} is out of range 0..{scores.numel()}")
    order = torch.sort(scores.abs(), descending=True, stable=True).indices
    return order[:size]


def circuit_nodes(graph: Graph, edges: Sequence[int]) -> list[str]:
    """Every node an edge set touches (senders and receivers), in graph order."""
    table = graph.edges()
    touched = {table[e].sender for e in edges} | {table[e].receiver for e in edges}
    order = list(graph.senders) + ["logits"]
    return [n for n in order if n in touched]


@dataclass
class Faithfulness:
    """Circuits of growing size along one score ranking, re-measured by exact edge patching."""

    sizes: list[int]
    """Edges in each circuit (the top ``size`` by |score|)."""
    metrics: list[float]
    """m(C) of each circuit."""
    faithfulness: list[float]
    """f(C) = (m(C) - m(empty)) / (m(N) - m(empty))."""
    metric_full: float
    """m(N): the clean model."""
    metric_empty: float
    """m(empty): every edge ablated."""
    n_edges: int
    ablation: str
    cpr: float
    """Area under f over x = size / n_edges on [0, 1] (trapezoid, endpoints f(0) = 0, f(1) = 1 added)."""
    cmd: float
    """Area under |1 - f| on the same axis."""


def areas(sizes: Sequence[int], f: Sequence[float], n_edges: int) -> tuple[float, float]:
    """(CPR, CMD) of a faithfulness curve (see ``Faithfulness``)."""
    points = dict(zip(sizes, f))
    points.setdefault(0, 0.0)
    points.setdefault(n_edges, 1.0)
    x = torch.tensor(sorted(points), dtype=torch.float64) / n_edges
    y = torch.tensor([points[k] for k in sorted(points)], dtype=torch.float64)
    return float(torch.trapezoid(y, x)), float(torch.trapezoid((1 - y).abs(), x))


def faithfulness_curve(adapter: HeadAdapter, task: EncodedTask, scores: EdgeScores, sizes: Sequence[int],
                       ablated: AblatedWrites | None = None, batch_size: int = 32, copies: int = 8) -> Faithfulness:
    """Exact faithfulness of the top-``size`` circuits of ``scores`` for every size, with the
    scores' ablation (every edge outside the circuit ablated)."""
    graph = scores.graph
    ablated = AblatedWrites(adapter, task, scores.ablation, batch_size) if ablated is None else ablated
    if ablated.ablation != scores.ablation:
        raise ValueError(f"ablated writes are {ablated.ablation!r}, the scores' ablation {scores.ablation!r}")
    sizes = [int(s) for s in sizes]
    drops = torch.ones(len(sizes) + 1, graph.n_edges, dtype=torch.bool)  # the last row: every edge ablated
    for i, size in enumerate(sizes):
        drops[i, top_edges(scores.scores, size)] = False
    metrics = patched_metrics(adapter, task, ablated, drops, graph, batch_size, copies).tolist()
    full, empty = clean_metric(adapter, task, batch_size), metrics.pop()
    if abs(full - empty) < 1e-6:
        raise UsageError("the clean and fully ablated runs have the same metric: faithfulness is undefined")
    f = [(m - empty) / (full - empty) for m in metrics]
    cpr, cmd = areas(sizes, f, graph.n_edges)
    return Faithfulness(sizes, metrics, f, full, empty, graph.n_edges, scores.ablation, cpr, cmd)


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a.double().numpy(), b.double().numpy()).statistic)


def agreement_subset(scores: Tensor, top: int = 50, random: int = 50, seed: int = 0) -> Tensor:
    """Edges to check against exact patching: the ``top`` edges of largest |score| and
    ``random`` others drawn uniformly (seeded) from the rest."""
    head = top_edges(scores, min(top, scores.numel()))
    rest = torch.ones(scores.numel(), dtype=torch.bool)
    rest[head] = False
    others = rest.nonzero().squeeze(1)
    gen = torch.Generator().manual_seed(seed)
    pick = others[torch.randperm(len(others), generator=gen)[:random]]
    return torch.cat([head, pick])


@dataclass
class Agreement:
    """Rank agreement of attribution scores with exact single-edge patching on chosen edges."""

    edges: list[int]
    """The edge numbers compared (``agreement_subset`` of the EAP scores, or every edge)."""
    exact: list[float]
    """m(edge alone ablated) - m(clean) for each."""
    spearman: dict[str, float]
    """Method (``eap``, ``eap-ig``) -> Spearman correlation of its scores with ``exact``."""


def edge_agreement(adapter: HeadAdapter, task: EncodedTask, scores: Sequence[EdgeScores],
                   edges: Sequence[int] | None = None, batch_size: int = 32, copies: int = 8) -> Agreement:
    """Spearman agreement of each score set with exact single-edge patching on ``edges``
    (every edge when None). The score sets must share one graph and ablation."""
    first = scores[0]
    if any(s.ablation != first.ablation or s.graph != first.graph for s in scores):
        raise ValueError("the score sets differ in graph or ablation")
    edges = list(range(first.graph.n_edges)) if edges is None else [int(e) for e in edges]
    ablated = AblatedWrites(adapter, task, first.ablation, batch_size)
    exact = exact_edge_scores(adapter, task, ablated, edges, first.graph, batch_size, copies)
    index = torch.tensor(edges, dtype=torch.long)
    rho = {s.method: spearman(s.scores[index], exact) for s in scores}
    return Agreement(edges, exact.tolist(), rho)
