"""Per-receiver inputs: add a change of the residual stream to what one receiver reads, and
nothing else; and each head's write into the residual stream.

A *receiver input* is one place where a component reads the residual stream: a head's query,
key or value input in a layer (``"q"``, ``"k"``, ``"v"``), a layer's MLP input (``"mlp"``), or
the final residual before the final norm (``"logits"``, keyed by layer ``n_layers``). The delta
is added *before* the norm that reads it, so the receiver sees ``norm(resid + delta)``.

How, in the unmodified Hugging Face modules:

- q/k/v: a pre-hook on the block's attention-input norm keeps the residual it normalises; a
  forward hook on each q/k/v projection recomputes, for every head with a delta, that head's
  slice ``norm(resid + delta_h) @ W_h + b_h`` and splices it into the projection's output. The
  per-head weight slices and output columns come from the family's own ``split_qkv`` applied
  to the projection's affine map (``nn.Linear`` or GPT-2's ``Conv1D``), so the fused layouts
  (GPT-NeoX's per-head ``[q|k|v]``, GPT-2's ``[Q|K|V]``) need no code of their own.
- mlp / logits: a forward hook on that norm returns ``norm(input + delta)``.

The norms are found by data flow, not by name: the attention-input norm is the block child
whose output the attention module receives (``input_layernorm`` in GPT-NeoX and Llama,
``ln_1`` in GPT-2); the MLP-input norm is the block's one other norm child
(``post_attention_layernorm``, ``ln_2``). With GPT-NeoX's parallel residual both read the
block's input; elsewhere the MLP norm reads the residual after attention.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from spectral.errors import UsageError
from spectral.models.adapter import HeadAdapter

RECEIVER_INPUTS = ("q", "k", "v")
"""Per-head receiver inputs; ``"mlp"`` (a layer's MLP input) and ``"logits"`` (layer
``n_layers``: the final residual) are the others."""
KINDS = (*RECEIVER_INPUTS, "mlp", "logits")


@dataclass(frozen=True)
class _HeadSlices:
    """Where one of q, k, v of one layer lives: its projection, output columns and weights."""

    projection: str  # attribute of the attention module
    columns: Tensor  # (heads_k, d_head) long: the projection output's columns of each head
    weight: Tensor  # (heads_k, d_model, d_head)
    bias: Tensor  # (heads_k, d_head)


@dataclass(frozen=True)
class _Norms:
    attention: str  # attribute of the block: the attention-input norm
    mlp: str  # attribute of the block: the MLP-input norm


_NORMS: "weakref.WeakKeyDictionary[nn.Module, _Norms]" = weakref.WeakKeyDictionary()


# ------------------------------------------------------------------ structure
def affine(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(W (in, out), b (out,) or None)`` of a projection with ``y = x @ W + b``."""
    if isinstance(module, nn.Linear):
        weight = module.weight.T
    elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 layer
        weight = module.weight
    else:
        raise UsageError(f"projection of type {type(module).__name__} is not supported (nn.Linear or Conv1D)")
    if weight.device.type == "meta":
        raise UsageError("projection weights are on the meta device (offloaded): load the model fully")
    return weight, module.bias


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.lower().endswith("norm")


def norms(adapter: HeadAdapter) -> _Norms:
    """The blocks' attention-input and MLP-input norms, found once per model by a one-token
    forward pass (see the module docstring); an error where the structure is not that."""
    model = adapter.model
    if model in _NORMS:
        return _NORMS[model]
    block, attn = adapter.blocks[0], adapter.attentions[0]
    children = {name: mod for name, mod in block.named_children() if _is_norm(mod)}
    outputs: dict[str, Tensor] = {}
    seen: dict[str, Tensor] = {}

    def keep(name):
        def hook(module, args, output):
            outputs[name] = output
        return hook

    def attn_input(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    handles = [mod.register_forward_hook(keep(name)) for name, mod in children.items()]
    handles.append(attn.register_forward_pre_hook(attn_input, with_kwargs=True))
    try:
        device = model.get_input_embeddings().weight.device
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    first = [name for name, out in outputs.items() if out is seen.get("x")]
    others = [name for name in children if name not in first]
    if len(first) != 1 or len(others) != 1:
        raise UsageError(f"cannot find the attention-input and MLP-input norms of this {adapter.family.name} "
                         f"block by data flow (norm children: {', '.join(children) or 'none'})")
    _NORMS[model] = found = _Norms(first[0], others[0])
    return found


def head_slices(adapter: HeadAdapter, layer: int) -> dict[str, _HeadSlices]:
    """q, k, v of ``layer``: the family's ``split_qkv`` applied to column numbers tells which
    projection output columns hold each head; the affine maps give its weights."""
    attn = adapter.attentions[layer]
    names = adapter.family.projections
    maps = {name: affine(getattr(attn, name)) for name in names}
    offsets, numbered, total = {}, {}, 0
    for name in names:
        width = maps[name][0].shape[1]
        offsets[name] = total
        numbered[name] = torch.arange(total, total + width, dtype=torch.float64)[None, None]  # (1, 1, out)
        total += width
    split = adapter.family.split_qkv(attn, numbered, adapter.n_heads, adapter.n_kv_heads, adapter.d_head)
    out = {}
    for kind, t in zip(RECEIVER_INPUTS, split):
        index = t[0, 0].long()  # (heads_k, d_head) global column numbers
        owner = [name for name in names if offsets[name] <= int(index.min()) < offsets[name] + maps[name][0].shape[1]]
        name = owner[0]
        columns = index - offsets[name]
        if int(columns.max()) >= maps[name][0].shape[1]:
            raise UsageError(f"{kind} of layer {layer} spans several projections: not supported")
        weight, bias = maps[name]
        w = weight[:, columns].permute(1, 0, 2)  # (heads_k, d_model, d_head)
        b = bias[columns] if bias is not None else torch.zeros(columns.shape, dtype=weight.dtype, device=weight.device)
        out[kind] = _HeadSlices(name, columns.to(weight.device), w, b)
    return out


# ------------------------------------------------------------------ deltas
@contextmanager
def receiver_deltas(adapter: HeadAdapter, deltas: dict[tuple[int, str], Tensor]) -> Iterator[None]:
    """While active, a forward pass adds ``deltas[(layer, kind)]`` to the residual stream *as
    seen by that receiver input only* (before its norm).

    - kind ``"q"``, ``"k"``, ``"v"``: (batch, pos, n_heads, d_model), head h's query / key /
      value input. Grouped-query models: a key/value head reads the *sum* of the deltas of the
      query heads of its group (give a delta to one head of a group to change it once).
    - kind ``"mlp"``: (batch, pos, d_model), layer ``layer``'s MLP input.
    - ``(n_layers, "logits")``: the final residual before the final norm, the shape of that
      norm's input: (batch, pos, d_model) in a forward pass of the model, (batch, d_model)
      where a replay calls the norm on chosen positions only (``patching.replay``).

    Deltas may require grad (EAP reads gradients w.r.t. zero deltas): then every head of that
    input is recomputed; otherwise only heads whose delta is nonzero somewhere.
    """
    plan = _check(adapter, deltas)
    found = norms(adapter)
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for layer, kinds in plan.items():
            if layer == adapter.n_layers:
                norm = adapter.model.get_submodule(adapter.family.final_norm)
                handles.append(norm.register_forward_hook(_norm_hook(deltas[(layer, "logits")], "logits")))
                continue
            block = adapter.blocks[layer]
            if "mlp" in kinds:
                norm = getattr(block, found.mlp)
                handles.append(norm.register_forward_hook(_norm_hook(deltas[(layer, "mlp")], f"layer {layer} mlp")))
            head_kinds = [k for k in kinds if k in RECEIVER_INPUTS]
            if head_kinds:
                handles += _attach_heads(adapter, layer, getattr(block, found.attention),
                                         {k: deltas[(layer, k)] for k in head_kinds})
        yield
    finally:
        for h in handles:
            h.remove()


def _check(adapter: HeadAdapter, deltas: dict) -> dict[int, list[str]]:
    plan: dict[int, list[str]] = {}
    for key in deltas:
        if not (isinstance(key, tuple) and len(key) == 2 and key[1] in KINDS):
            raise UsageError(f"receiver {key!r}: expected (layer, kind) with kind in {', '.join(KINDS)}")
        layer, kind = key
        if kind == "logits":
            if layer != adapter.n_layers:
                raise UsageError(f"the logits receiver is layer {adapter.n_layers} (n_layers), not {layer}")
        else:
            adapter.check_layers([layer])
        plan.setdefault(layer, []).append(kind)
    return plan


def _norm_hook(delta: Tensor, what: str):
    def hook(module, args, output):
        x = args[0]
        if delta.shape != x.shape:
            raise UsageError(f"{what} delta has shape {tuple(delta.shape)}, the input there {tuple(x.shape)}")
        return module.forward(x + delta.to(x.dtype))
    return hook


def _attach_heads(adapter: HeadAdapter, layer: int, norm: nn.Module, deltas: dict[str, Tensor]):
    slices = head_slices(adapter, layer)
    scratch: dict[str, Tensor] = {}

    def keep_resid(module, args):
        scratch["resid"] = args[0]

    def splice(name):
        def hook(module, args, output):
            for kind, delta in deltas.items():
                if slices[kind].projection == name:
                    output = _splice(adapter, norm, scratch["resid"], output, slices[kind], delta, f"layer {layer} {kind}")
            return output
        return hook

    handles = [norm.register_forward_pre_hook(keep_resid)]
    handles += [getattr(adapter.attentions[layer], name).register_forward_hook(splice(name))
                for name in {slices[k].projection for k in deltas}]
    return handles


def _splice(adapter: HeadAdapter, norm: nn.Module, resid: Tensor, output: Tensor, where: _HeadSlices,
            delta: Tensor, what: str) -> Tensor:
    """``output`` with the columns of every head with a delta replaced by ``norm(resid + delta_h) @ W_h + b_h``."""
    batch, pos, d_model = resid.shape
    if delta.shape != (batch, pos, adapter.n_heads, d_model):
        raise UsageError(f"{what} delta has shape {tuple(delta.shape)}, expected {(batch, pos, adapter.n_heads, d_model)}")
    heads_k = where.columns.shape[0]
    if heads_k != adapter.n_heads:  # grouped-query key/value: a kv head reads its group's summed delta
        delta = delta.view(batch, pos, heads_k, adapter.n_heads // heads_k, d_model).sum(3)
    if delta.requires_grad:
        active = torch.arange(heads_k, device=delta.device)
    else:
        active = delta.ne(0).flatten(0, 1).any(0).any(-1).nonzero().flatten()
        if len(active) == 0:
            return output
    x = norm.forward(resid[:, :, None, :] + delta[:, :, active].to(resid.dtype))  # (batch, pos, active, d_model)
    w = where.weight[active.to(where.weight.device)]
    new = torch.einsum("bpam,amd->bpad", x.to(w.dtype), w) + where.bias[active.to(w.device)]  # (batch, pos, active, d_head)
    columns = where.columns[active.to(where.columns.device)].flatten()
    return output.index_copy(output.dim() - 1, columns.to(output.device), new.flatten(-2).to(output.dtype))


# ------------------------------------------------------------------ head writes
def head_writes(adapter: HeadAdapter, layer: int,
                result: Float[Tensor, "batch pos head d_head"]) -> Float[Tensor, "batch pos head d_model"]:
    """Each head's write into the residual stream: its result through its slice of the output
    projection (the projection's bias, shared by all heads, is excluded)."""
    weight, _ = affine(getattr(adapter.attentions[layer], adapter.family.out_proj))  # (heads * d_head, d_model)
    w = weight.view(adapter.n_heads, adapter.d_head, -1)  # (head, d_head, d_model)
    return torch.einsum("bphd,hdm->bphm", result.to(w.dtype), w)


@torch.no_grad()
def head_outputs(adapter: HeadAdapter, ids: Int[Tensor, "batch pos"],
                 mask: Int[Tensor, "batch pos"] | None) -> Float[Tensor, "layer batch pos head d_model"]:
    """Every head's write into the residual stream on ``ids`` (one forward pass): (layers,
    batch, pos, heads, d_model); output-projection bias excluded (see ``head_writes``)."""
    mask = mask.to(ids.device) if mask is not None else None
    results = adapter.run(ids, mask, sites=("result",))
    return torch.stack([head_writes(adapter, l, results[(l, "result")]) for l in range(adapter.n_layers)])
