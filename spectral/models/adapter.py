"""The per-head view of an unmodified Hugging Face model, through scoped hooks.

Every family (``spectral.models.families``) gets the same names and shapes for layer ``l``:

===================  =============================================  ============================
site                 what                                           shape
===================  =============================================  ============================
``queries``          queries before the rotary rotation             (batch, pos, head, d_head)
``queries_rotated``  queries after it (what the scores use)         (batch, pos, head, d_head)
``keys_raw``         keys before the rotary rotation                (batch, pos, head, d_head)
``keys_rotated``     keys after it                                  (batch, pos, head, d_head)
``values``           values                                         (batch, pos, head, d_head)
``result``           per-head output before the output projection   (batch, pos, head, d_head)
``scores``           q k^T * scaling, masked entries = -inf         (batch, head, q_pos, k_pos)
``probs``            softmax of the scores                          (batch, head, q_pos, k_pos)
``resid_pre``        residual stream entering the block             (batch, pos, d_model)
``resid_post``       residual stream leaving the block              (batch, pos, d_model)
===================  =============================================  ============================

Keys and values of grouped-query models are given per query head (head ``h`` reads kv head
``h // (heads / kv_heads)``). Unrotated families (GPT-2, BERT) give identical raw and rotated
tensors. The scores mask padding keys, and future keys in causal families (decoders); an
encoder (BERT) lets every query see every real key. Hooks exist only inside
:meth:`HeadAdapter.trace`; nothing stays attached.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from operator import attrgetter
from typing import Literal, get_args

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from spectral.errors import UsageError
from spectral.models.families import Family, family_of
from spectral.models.ranges import check_range

Site = Literal[
    "queries", "queries_rotated", "keys_raw", "keys_rotated", "values",
    "result", "scores", "probs", "resid_pre", "resid_post",
]
SITES: tuple[str, ...] = get_args(Site)
_ATTN_SITES = {"queries", "queries_rotated", "keys_raw", "keys_rotated", "values", "scores", "probs"}
EDITABLE: tuple[str, ...] = ("result", "resid_pre", "resid_post")

Callback = Callable[[int, str, Tensor], None]
"""(layer, site, tensor) -> None: called inside the forward pass; copy what must outlive it."""
Edit = Callable[[Tensor], Tensor]
"""A plain function of a tensor returning its replacement (same shape)."""


class HeadAdapter:
    """Uniform per-(layer, head) access to a GPT-NeoX, Llama, GPT-2 or BERT model."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.family: Family = family_of(model)
        cfg = model.config
        self.n_layers: int = cfg.num_hidden_layers
        self.n_heads: int = cfg.num_attention_heads
        self.n_kv_heads: int = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.d_model: int = cfg.hidden_size
        self.d_head: int = getattr(cfg, "head_dim", None) or self.d_model // self.n_heads
        self.blocks: nn.ModuleList = find_blocks(model, self.family, self.n_layers)
        self.attentions: list[nn.Module] = [attrgetter(self.family.attention)(b) for b in self.blocks]

    def require_causal_lm(self, what: str) -> None:
        """A UsageError when the model is an encoder: ``what`` (patching, steering) reads a causal
        language model's next-token logits."""
        if not self.family.causal:
            raise UsageError(f"{what} needs a causal language model's next-token logits; this "
                             f"{self.family.name} model is a bidirectional encoder (scans only)")

    # ------------------------------------------------------------------ hooks
    @contextmanager
    def trace(
        self,
        sites: Iterable[str],
        callback: Callback | None = None,
        *,
        layers: Iterable[int] | None = None,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        edits: Mapping[tuple[int, str], Edit] | None = None,
    ) -> Iterator[None]:
        """Attach hooks for one block of code: ``callback`` sees each requested site of each
        requested layer; ``edits`` replace ``result``/``resid_pre``/``resid_post`` tensors.
        ``attention_mask`` (1 = real token) is needed for ``scores``/``probs`` with padding.
        """
        sites = set(sites)
        self._check_sites(sites, edits or {})
        layer_list = self.check_layers(layers)
        handles: list[torch.utils.hooks.RemovableHandle] = []
        try:
            for layer in layer_list:
                handles += self._attach(layer, sites, callback, attention_mask, edits or {})
            for (layer, site), fn in (edits or {}).items():
                if layer not in layer_list:
                    handles += self._attach(layer, set(), None, attention_mask, {(layer, site): fn})
            yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def run(
        self,
        input_ids: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        sites: Iterable[str] = ("keys_raw",),
        layers: Iterable[int] | None = None,
    ) -> dict[tuple[int, str], Tensor]:
        """One forward pass; returns ``{(layer, site): tensor}`` for every requested pair."""
        out: dict[tuple[int, str], Tensor] = {}

        def keep(layer: int, site: str, t: Tensor) -> None:
            out[(layer, site)] = t.detach().clone()

        with self.trace(sites, keep, layers=layers, attention_mask=attention_mask):
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out

    def check_layers(self, layers: Iterable[int] | None) -> list[int]:
        """The chosen layers, sorted (all when None); a UsageError for one out of range."""
        return check_range("layer", layers, self.n_layers)

    def check_heads(self, heads: Iterable[int] | None) -> list[int]:
        """The chosen heads, sorted (all when None); a UsageError for one out of range."""
        return check_range("head", heads, self.n_heads)

    def _check_sites(self, sites: set[str], edits: Mapping) -> None:
        unknown = sites - set(SITES)
        if unknown:
            raise ValueError(f"unknown site {sorted(unknown)[0]!r} (known: {', '.join(SITES)})")
        for layer, site in edits:
            if site not in EDITABLE:
                raise ValueError(f"site {site!r} cannot be edited (editable: {', '.join(EDITABLE)})")
            self.check_layers([layer])

    def _attach(self, layer, sites, callback, attention_mask, edits):
        block, attn = self.blocks[layer], self.attentions[layer]
        handles = []
        if sites & _ATTN_SITES:
            handles += self._attach_attention(layer, attn, sites & _ATTN_SITES, callback, attention_mask)
        if "result" in sites or (layer, "result") in edits:
            handles.append(attrgetter(self.family.out_proj)(attn).register_forward_pre_hook(
                self._result_hook(layer, "result" in sites and callback, edits.get((layer, "result")))))
        if "resid_pre" in sites or (layer, "resid_pre") in edits:
            handles.append(block.register_forward_pre_hook(
                _resid_pre_hook(layer, "resid_pre" in sites and callback, edits.get((layer, "resid_pre"))),
                with_kwargs=True))
        if "resid_post" in sites or (layer, "resid_post") in edits:
            handles.append(block.register_forward_hook(
                _resid_post_hook(layer, "resid_post" in sites and callback, edits.get((layer, "resid_post")))))
        return handles

    def _result_hook(self, layer, callback, edit):
        def hook(module, args):
            x = args[0]
            heads = x.unflatten(-1, (self.n_heads, self.d_head))  # (batch, pos, head, d_head)
            if callback:
                callback(layer, "result", heads)
            if edit is not None:
                new = edit(heads)
                return (new.flatten(-2).to(x.dtype), *args[1:])
            return None
        return hook

    def _attach_attention(self, layer, attn, sites, callback, attention_mask):
        """Pre-hook keeps the rotary (cos, sin); projection hooks keep their outputs; the
        post-hook assembles q, k, v and hands each requested site to ``callback``."""
        scratch: dict[str, object] = {}

        def pre(module, args, kwargs):
            scratch["rope"] = kwargs.get("position_embeddings")

        def keep(name):
            def hook(module, args, output):
                scratch[name] = output
            return hook

        def post(module, args, output):
            outs = {name: scratch.pop(name) for name in self.family.projections}
            self._emit_attention(layer, attn, outs, scratch.pop("rope", None), sites, callback, attention_mask)

        handles = [attn.register_forward_pre_hook(pre, with_kwargs=True)]
        handles += [attrgetter(n)(attn).register_forward_hook(keep(n)) for n in self.family.projections]
        handles.append(attn.register_forward_hook(post))
        return handles

    def _emit_attention(self, layer, attn, outs, rope, sites, callback, attention_mask):
        q, k, v = self.family.split_qkv(attn, outs, self.n_heads, self.n_kv_heads, self.d_head)
        k, v = expand_kv(k, self.n_heads), expand_kv(v, self.n_heads)
        tensors = {"queries": q, "keys_raw": k, "values": v}
        if sites & {"queries_rotated", "keys_rotated", "scores", "probs"}:
            q_rot, k_rot = self._rotate(q, k, rope, layer)
            tensors.update(queries_rotated=q_rot, keys_rotated=k_rot)
            if sites & {"scores", "probs"}:
                scaling = attrgetter(self.family.scaling)(attn)
                scores = attention_scores(q_rot, k_rot, scaling, attention_mask, causal=self.family.causal)
                tensors["scores"] = scores
                if "probs" in sites:
                    tensors["probs"] = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0)
        if callback:
            for site in sorted(sites):
                callback(layer, site, tensors[site])

    def _rotate(self, q, k, rope, layer):
        if self.family.rotary is None:
            return q, k
        if rope is None:
            raise RuntimeError(f"layer {layer}: the attention module received no position_embeddings to rotate with")
        cos, sin = rope
        return self.family.rotary(q, k, cos, sin)

    # ------------------------------------------------------------- weights
    def qk_weights(self, layer: int) -> tuple[Float[Tensor, "head d_model d_head"], Float[Tensor, "head d_model d_head"]]:
        """Per-head W_Q and W_K (keys expanded to query heads) of one layer; biases excluded."""
        self.check_layers([layer])
        wq, wk = self.family.qk_weights(self.attentions[layer], self.n_heads, self.n_kv_heads, self.d_head)
        if wq.device.type == "meta":
            raise RuntimeError(f"layer {layer}: weights are on the meta device (offloaded); load them to read spectra")
        group = self.n_heads // self.n_kv_heads
        return wq, torch.repeat_interleave(wk, group, dim=0) if group > 1 else wk


    def ov_weights(self, layer: int) -> tuple[Float[Tensor, "head d_model d_head"], Float[Tensor, "head d_head d_model"]]:
        """Per-head W_V (values expanded to query heads) and W_O of one layer; biases excluded.
        The head's OV circuit is ``W_V W_O`` (d_model x d_model, rank <= d_head)."""
        self.check_layers([layer])
        wv, wo = self.family.ov_weights(self.attentions[layer], self.n_heads, self.n_kv_heads, self.d_head)
        if wv.device.type == "meta" or wo.device.type == "meta":
            raise RuntimeError(f"layer {layer}: weights are on the meta device (offloaded); load them to read spectra")
        group = self.n_heads // self.n_kv_heads
        return (torch.repeat_interleave(wv, group, dim=0) if group > 1 else wv), wo


def attention_scores(
    q: Float[Tensor, "batch pos head d_head"],
    k: Float[Tensor, "batch pos head d_head"],
    scaling: float,
    attention_mask: Int[Tensor, "batch pos"] | None,
    *,
    causal: bool = True,
) -> Float[Tensor, "batch head q_pos k_pos"]:
    """Pre-softmax scores; masked entries (padding keys, and future keys when ``causal``) are -inf."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scaling
    t = q.shape[1]
    blocked = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1 if causal else t)  # (q_pos, k_pos)
    blocked = blocked[None, None]
    if attention_mask is not None:
        blocked = blocked | (attention_mask[:, None, None, :].to(q.device) == 0)
    return scores.masked_fill(blocked, float("-inf"))


def expand_kv(t: Float[Tensor, "batch pos kv_head d"], heads: int) -> Float[Tensor, "batch pos head d"]:
    """Query head h reads kv head h // (heads / kv_heads)."""
    kv_heads = t.shape[2]
    return t if kv_heads == heads else torch.repeat_interleave(t, heads // kv_heads, dim=2)


def find_blocks(model: nn.Module, family: Family, n_layers: int) -> nn.ModuleList:
    """The layer list, found by structure (a ModuleList of ``n_layers`` blocks that each hold
    the family's attention module); an error if there is none or more than one."""
    found = [
        (name, mod) for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) == n_layers
        and all(_has_path(b, family.attention) for b in mod)
    ]
    if len(found) != 1:
        names = ", ".join(n for n, _ in found) or "none"
        raise ValueError(f"cannot find the layer list of this {family.name} model by structure (candidates: {names})")
    return found[0][1]


def _has_path(obj, path: str) -> bool:
    """Whether the dotted attribute path exists on ``obj``."""
    try:
        attrgetter(path)(obj)
    except AttributeError:
        return False
    return True


def _resid_pre_hook(layer, callback, edit):
    def hook(module, args, kwargs):
        if args:
            x = args[0]
        else:
            x = kwargs["hidden_states"]
        if callback:
            callback(layer, "resid_pre", x)
        if edit is None:
            return None
        new = edit(x).to(x.dtype)
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}
    return hook


def _resid_post_hook(layer, callback, edit):
    def hook(module, args, output):
        x = output[0] if isinstance(output, tuple) else output
        if callback:
            callback(layer, "resid_post", x)
        if edit is None:
            return None
        new = edit(x).to(x.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new
    return hook
