"""Head classes with a score for every head: attention-pattern scores on repeated random
tokens, IOI role scores, and class labels from documented thresholds.

Attention-pattern scores (``PATTERNS``) are read from the adapter's ``probs`` site on
``[r; r]``: ``r`` is ``length`` (= T) distinct random tokens, the sequence is 2T long and
there is no BOS. In the "mul" form a score is ``sum(A * P) / sum(A)``, both sums over every
sequence, every query position i of the second copy (``T <= i <= 2T - 1``) and every key, where
A is the head's attention and P marks the pattern's key for query i:

- ``previous_token``: key ``i - 1``;
- ``duplicate_token``: key ``i - T``, the earlier copy of the same token (unique: r holds
  distinct tokens);
- ``induction``: key ``i - (T - 1)``, the token after the earlier copy.

Each attention row sums to 1, so a score is the head's mean attention to the pattern's key, in
[0, 1].

IOI role scores (``IOI_SCORES``, on the clean prompts of an IOI task; the IO is the task's
``answer``, S its ``distractor``): ``name_mover_attention`` is the attention from the final
position to the IO token's position(s) (summed over them), averaged over examples. The OV
scores take the head's write as if it attended fully to the IO token: the value at the IO
position (the mean over them if the IO occurs more than once) through the head's slice of the
output projection (bias excluded), then the final norm *linearised at the example's final
residual* (its scale frozen from the clean run's final residual, its bias excluded: direct
logit attribution as TransformerLens computes it) and the unembedding (bias excluded):

- ``copy_score``: fraction of examples where the IO token is in the top ``TOP_K`` of that
  direct logit contribution over the whole output vocabulary (fewer than ``TOP_K`` tokens
  strictly above it);
- ``negative_copy_score``: the same for the negated contribution (the IO in the bottom ``TOP_K``);
- ``copy_logit``: mean over examples of the IO's contribution minus the mean contribution to
  every name of the task (every answer and distractor token of its examples); signed: a
  negative name mover has a negative value.

No score is ever NaN: an example that leaves a role score undefined (its IO does not occur
before the final position, or S does not occur twice) is refused with a UsageError.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from spectral.errors import UsageError
from spectral.models.adapter import HeadAdapter

PATTERNS: tuple[str, ...] = ("previous_token", "duplicate_token", "induction")
"""Attention-pattern scores, in ``pattern_scores``' order."""
IOI_SCORES: tuple[str, ...] = ("name_mover_attention", "copy_score", "negative_copy_score", "copy_logit")
"""IOI role scores, in ``ioi_scores``' order."""
TOP_K = 5
"""The rank an IO token must reach in a head's direct logit contribution to count as copied
(Wang et al. 2022's copy score uses the top 5)."""
EXTRA_CLASSES: tuple[str, ...] = ("s_inhibition", "backup_name_mover")
"""Classes found by interventions elsewhere (path patching, ablation), passed to ``classify``
as boolean masks."""
PRIORITY: tuple[str, ...] = ("name_mover", "negative_name_mover", "s_inhibition", "backup_name_mover",
                             "induction", "duplicate_token", "previous_token")
"""The label a head gets when it meets several classes' rules: the first here. Task roles
(measured on the behaviour) before attention patterns; among patterns the composed one first
(an induction head builds on a previous-token head, not the reverse). Heads meeting none are
``"other"``."""
LABELS: tuple[str, ...] = (*PRIORITY, "other")
DEFAULT_N = 64
DEFAULT_LENGTH = 32
MIN_LENGTH = 3
"""The shortest ``r``: with T = 2 the induction key i - (T - 1) is the previous token, i - 1."""


@dataclass(frozen=True)
class Thresholds:
    """The class rules' cut-offs, chosen once and not tuned on results (the issue: do not tune
    thresholds until a class appears)."""

    pattern: float = 0.5
    """A pattern class (previous-token, duplicate-token, induction) needs its score >= this: at
    least half the head's attention on the pattern's key, the issue's ground-truth bar."""
    name_mover_attention: float = 0.3
    """A (negative) name mover needs this much attention from the final position to the IO."""
    copy: float = 0.5
    """A name mover needs ``copy_score`` >= this and ``copy_logit`` > 0; a negative name mover
    ``negative_copy_score`` >= this and ``copy_logit`` < 0 (the IO copied in most examples)."""


THRESHOLDS = Thresholds()

HEADS_SCHEMA = pa.schema(
    [pa.field("layer", pa.int32(), nullable=False), pa.field("head", pa.int32(), nullable=False)]
    + [pa.field(name, pa.float64(), nullable=False) for name in PATTERNS]
    + [pa.field(name, pa.float64(), nullable=True) for name in IOI_SCORES]
    + [pa.field("label", pa.string(), nullable=False), pa.field("classes", pa.string(), nullable=False)])
"""heads.parquet: one row per (layer, head). The IOI columns are null when no IOI task was
given (not measured), never NaN; ``classes``: every class whose rule the head meets, in
``PRIORITY`` order, comma-separated (empty when none)."""


# --- repeated random tokens ---------------------------------------------------------------------

def repeated_tokens(vocab_size: int, n: int, length: int, seed: int,
                    exclude: Sequence[int] = ()) -> Int[Tensor, "n two_length"]:
    """``n`` rows ``[r; r]`` of 2 * ``length`` tokens: ``r`` is ``length`` distinct ids drawn
    uniformly from ``range(vocab_size)`` minus ``exclude`` (special tokens), seeded."""
    if n < 1:
        raise UsageError(f"repeated tokens: n must be >= 1 (got {n})")
    if length < MIN_LENGTH:
        raise UsageError(f"repeated tokens: length must be >= {MIN_LENGTH} (got {length}): shorter, the patterns' keys coincide")
    allowed = torch.tensor(sorted(set(range(vocab_size)) - set(exclude)), dtype=torch.long)
    if length > len(allowed):
        raise UsageError(f"repeated tokens: length {length} exceeds the {len(allowed)} usable token ids")
    gen = torch.Generator().manual_seed(seed)
    weights = torch.ones(n, len(allowed))
    r = allowed[torch.multinomial(weights, length, replacement=False, generator=gen)]  # (n, T)
    return torch.cat([r, r], dim=1)


# --- attention-pattern scores -------------------------------------------------------------------

def pattern_keys(length: int) -> dict[str, Tensor]:
    """For each pattern, the key of every second-copy query ``i = T .. 2T-1``: (T,) indices."""
    queries = torch.arange(length, 2 * length)
    return {"previous_token": queries - 1, "duplicate_token": queries - length,
            "induction": queries - (length - 1)}


def _pattern_sums(probs: Float[Tensor, "batch head pos pos"], length: int) -> tuple[Tensor, Tensor]:
    """Numerators (pattern, head) and denominator (head,) of the mul-form scores of one batch."""
    rows = probs[:, :, length:2 * length, :].double()  # (batch, head, T, 2T): second-copy queries
    den = rows.sum(dim=(0, 2, 3))
    nums = []
    for keys in pattern_keys(length).values():
        index = keys.to(rows.device).view(1, 1, length, 1).expand(*rows.shape[:3], 1)
        nums.append(rows.gather(-1, index).sum(dim=(0, 2, 3)))
    return torch.stack(nums), den


def pattern_scores_from_probs(probs: Float[Tensor, "batch head pos pos"], length: int) -> dict[str, np.ndarray]:
    """Mul-form scores (head,) of one layer's attention on ``[r; r]`` with ``len(r) = length``."""
    if probs.shape[-1] != 2 * length or probs.shape[-2] != 2 * length:
        raise ValueError(f"probs of {tuple(probs.shape[-2:])} positions, expected {2 * length} (length {length})")
    nums, den = _pattern_sums(probs, length)
    return {name: (nums[i] / den).cpu().numpy() for i, name in enumerate(PATTERNS)}


@torch.no_grad()
def pattern_scores(adapter: HeadAdapter, tokens: Int[Tensor, "n two_length"], *,
                   batch_size: int = 16) -> dict[str, np.ndarray]:
    """Every head's mul-form pattern scores on ``tokens`` (rows ``[r; r]``, as
    ``repeated_tokens`` makes them): name -> float64 (layers, heads)."""
    width = tokens.shape[1]
    length = width // 2
    if width % 2 or length < MIN_LENGTH or not torch.equal(tokens[:, :length], tokens[:, length:]):
        raise UsageError(f"pattern scores need rows [r; r] with len(r) >= {MIN_LENGTH} (got rows of {width} tokens that are not)")
    nums = torch.zeros(adapter.n_layers, len(PATTERNS), adapter.n_heads, dtype=torch.float64)
    dens = torch.zeros(adapter.n_layers, adapter.n_heads, dtype=torch.float64)

    def keep(layer: int, site: str, probs: Tensor) -> None:
        num, den = _pattern_sums(probs, length)
        nums[layer] += num.cpu()
        dens[layer] += den.cpu()

    device = adapter.model.get_input_embeddings().weight.device
    with adapter.trace(["probs"], keep):
        for chunk in tokens.split(batch_size):
            adapter.model(input_ids=chunk.to(device), use_cache=False)
    return {name: (nums[:, i] / dens).numpy() for i, name in enumerate(PATTERNS)}


# --- IOI role scores ----------------------------------------------------------------------------

def io_weights(task) -> Float[Tensor, "n pos"]:
    """Per example, weight 1/m on each of the m positions of the IO token before the final
    position; a UsageError for an example that is not IOI-shaped (no IO, S not repeated)."""
    n, width = task.clean.shape
    before = torch.arange(width)[None, :] < task.last[:, None]  # (n, pos)
    is_io = (task.clean == task.answer[:, None]) & before & task.mask.bool()
    is_s = (task.clean == task.distractor[:, None]) & before & task.mask.bool()
    for i in range(n):
        if not is_io[i].any():
            raise UsageError(f"IOI example {i + 1}: the indirect object (answer) does not occur before the final position")
        if int(is_s[i].sum()) < 2:
            raise UsageError(f"IOI example {i + 1}: the subject (distractor) does not occur twice: IOI roles need a repeated name")
    return is_io.double() / is_io.sum(dim=1, keepdim=True)


def head_writes(adapter: HeadAdapter, layer: int,
                values: Float[Tensor, "n head d_head"]) -> Float[Tensor, "n head d_model"]:
    """Head h's write into the residual stream for the per-head result ``values[:, h]``: the
    layer's output projection applied to an input that is zero outside head h's slice, minus its
    output on zeros (the bias)."""
    n, heads, d_head = values.shape
    out_proj = getattr(adapter.attentions[layer], adapter.family.out_proj)
    dtype = next(out_proj.parameters()).dtype
    x = values.new_zeros(n, heads, heads, d_head)  # (n, writer head, input slot, d_head)
    index = torch.arange(heads)
    x[:, index, index] = values
    x = x.flatten(-2).to(dtype)  # (n, head, d_model): only the writer's own slice is non-zero
    return (out_proj(x) - out_proj(torch.zeros_like(x[:1, :1]))).float()


def frozen_norm(norm: nn.Module, resid: Float[Tensor, "n d_model"],
                x: Float[Tensor, "n head d_model"]) -> Float[Tensor, "n head d_model"]:
    """The final norm linearised at ``resid``: its scale taken from ``resid`` (example by
    example), applied to ``x`` without its bias. LayerNorm centres ``x``; RMSNorm does not."""
    r = resid.float()
    if isinstance(norm, nn.LayerNorm):
        scale = (r.var(dim=-1, unbiased=False) + norm.eps).sqrt()
        y = x - x.mean(dim=-1, keepdim=True)
    elif type(norm).__name__.endswith("RMSNorm") and hasattr(norm, "variance_epsilon"):
        scale = (r.pow(2).mean(dim=-1) + norm.variance_epsilon).sqrt()
        y = x
    else:
        raise ValueError(f"final norm {type(norm).__name__}: only LayerNorm and RMSNorm can be linearised")
    y = y / scale[:, None, None]
    weight = getattr(norm, "weight", None)
    return y * weight.float() if weight is not None else y


@dataclass
class _IOIParts:
    """What one batch of clean prompts gives the role scores, per layer."""

    attention: list  # per layer: (batch, head) attention from the final position to the IO
    io_values: list  # per layer: (batch, head, d_head) value at the IO position(s)
    resid: Tensor | None = None  # (batch, d_model): the final residual at the final position


def _capture_ioi(adapter: HeadAdapter, ids: Tensor, mask: Tensor, last: Tensor, weights: Tensor) -> _IOIParts:
    parts = _IOIParts([None] * adapter.n_layers, [None] * adapter.n_layers)
    rows = torch.arange(len(ids), device=ids.device)
    w = weights.to(ids.device)

    def keep(layer: int, site: str, t: Tensor) -> None:
        if site == "probs":  # (batch, head, q, k) -> rows of the final positions
            final = t[rows, :, last.to(ids.device)].double()  # (batch, head, k)
            parts.attention[layer] = (final * (w[:, None] > 0)).sum(-1).cpu()  # summed over IO positions
        elif site == "values":  # (batch, pos, head, d_head)
            parts.io_values[layer] = torch.einsum("bp,bphd->bhd", w, t.double()).float()
        elif site == "resid_post" and layer == adapter.n_layers - 1:
            parts.resid = t[rows, last.to(ids.device)].float()

    with adapter.trace(["probs", "values", "resid_post"], keep, attention_mask=mask):
        adapter.model(input_ids=ids, attention_mask=mask, use_cache=False)
    return parts


@torch.no_grad()
def ioi_scores(adapter: HeadAdapter, task, *, top_k: int = TOP_K, batch_size: int = 16) -> dict[str, np.ndarray]:
    """Every head's IOI role scores on the clean prompts of ``task`` (a
    ``spectral.causal.tasks.EncodedTask``): name -> float64 (layers, heads), ``IOI_SCORES``."""
    weights = io_weights(task)
    names = torch.unique(torch.cat([task.answer, task.distractor]))
    model = adapter.model
    device = model.get_input_embeddings().weight.device
    norm = model.get_submodule(adapter.family.final_norm)
    unembed = model.get_output_embeddings()
    per_example = {k: [[] for _ in range(adapter.n_layers)] for k in IOI_SCORES}
    for start in range(0, len(task), batch_size):
        sl = slice(start, start + batch_size)
        parts = _capture_ioi(adapter, task.clean[sl].to(device), task.mask[sl].to(device), task.last[sl], weights[sl])
        answer = task.answer[sl].to(device)
        for layer in range(adapter.n_layers):
            normed = frozen_norm(norm, parts.resid, head_writes(adapter, layer, parts.io_values[layer]))
            w_dtype = unembed.weight.dtype
            logits = (unembed(normed.to(w_dtype)) - unembed(torch.zeros_like(normed[:1, :1]).to(w_dtype))).float()
            io = logits.gather(-1, answer[:, None, None].expand(-1, logits.shape[1], 1))  # (batch, head, 1)
            per_example["name_mover_attention"][layer].append(parts.attention[layer])
            per_example["copy_score"][layer].append(((logits > io).sum(-1) < top_k).cpu())
            per_example["negative_copy_score"][layer].append(((logits < io).sum(-1) < top_k).cpu())
            per_example["copy_logit"][layer].append((io[..., 0] - logits[..., names.to(device)].mean(-1)).cpu())
    return {k: np.stack([torch.cat(chunks).double().mean(0).numpy() for chunks in layers])
            for k, layers in per_example.items()}


# --- classes ------------------------------------------------------------------------------------

def class_masks(scores: Mapping[str, np.ndarray], extra: Mapping[str, np.ndarray] | None = None,
                thresholds: Thresholds = THRESHOLDS) -> dict[str, np.ndarray]:
    """Class name -> boolean (layers, heads): which heads meet each class's rule. Classes whose
    scores are absent (no IOI task given) are all False; ``extra`` supplies ``EXTRA_CLASSES``."""
    shape = np.shape(scores[PATTERNS[0]])
    out = {c: np.zeros(shape, dtype=bool) for c in PRIORITY}
    with np.errstate(invalid="ignore"):  # NaN meets no rule
        for name in PATTERNS:
            out[name] = np.asarray(scores[name]) >= thresholds.pattern
        if all(k in scores for k in IOI_SCORES):
            s = {k: np.asarray(scores[k], dtype=float) for k in IOI_SCORES}
            attends = s["name_mover_attention"] >= thresholds.name_mover_attention
            out["name_mover"] = attends & (s["copy_score"] >= thresholds.copy) & (s["copy_logit"] > 0)
            out["negative_name_mover"] = attends & (s["negative_copy_score"] >= thresholds.copy) & (s["copy_logit"] < 0)
    for name, mask in (extra or {}).items():
        if name not in EXTRA_CLASSES:
            raise ValueError(f"unknown extra class {name!r} (known: {', '.join(EXTRA_CLASSES)})")
        if np.shape(mask) != shape:
            raise ValueError(f"extra class {name!r}: mask of shape {np.shape(mask)}, expected {shape}")
        out[name] = np.asarray(mask, dtype=bool)
    return out


def classify(scores: Mapping[str, np.ndarray], extra: Mapping[str, np.ndarray] | None = None,
             thresholds: Thresholds = THRESHOLDS) -> np.ndarray:
    """One label (``LABELS``) per head, (layers, heads) of str: the first class in ``PRIORITY``
    whose rule the head meets, else ``"other"``."""
    masks = class_masks(scores, extra, thresholds)
    labels = np.full(np.shape(scores[PATTERNS[0]]), "other", dtype=object)
    for name in reversed(PRIORITY):  # the highest priority is written last
        labels[masks[name]] = name
    return labels.astype(str)


# --- the table ----------------------------------------------------------------------------------

def head_score_table(loaded, *, n: int = DEFAULT_N, length: int = DEFAULT_LENGTH, seed: int = 0,
                     ioi_examples=None, extra: Mapping[str, np.ndarray] | None = None,
                     token_pool: Sequence[int] | None = None, batch_size: int = 16) -> pa.Table:
    """One row per (layer, head): ``layer, head``, the ``PATTERNS`` scores on ``n`` repeated
    sequences of ``length`` random tokens (drawn from ``token_pool``, default every non-special
    id of the tokenizer), the ``IOI_SCORES`` on ``ioi_examples`` (null when none are given: not
    measured), ``label`` and ``classes`` (every class met, in ``PRIORITY`` order,
    comma-separated). ``extra``: boolean (layers, heads) masks of ``EXTRA_CLASSES``."""
    adapter = HeadAdapter(loaded.model)
    adapter.require_causal_lm("head scores")
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    if limit is not None and 2 * length > limit:
        raise UsageError(f"repeated tokens: 2 * length = {2 * length} exceeds the model's {limit} positions")
    vocab = min(len(loaded.tokenizer), loaded.model.config.vocab_size)
    exclude = set(loaded.tokenizer.all_special_ids)
    if token_pool is not None:
        exclude |= set(range(vocab)) - set(token_pool)
    tokens = repeated_tokens(vocab, n, length, seed, exclude=sorted(exclude))
    scores = pattern_scores(adapter, tokens, batch_size=batch_size)
    if ioi_examples is not None:
        from spectral.causal.tasks import encode

        scores.update(ioi_scores(adapter, encode(loaded.tokenizer, list(ioi_examples), "ioi"), batch_size=batch_size))
    masks = class_masks(scores, extra)
    labels = classify(scores, extra)
    layers, heads = np.indices(labels.shape)
    columns = {"layer": pa.array(layers.ravel(), pa.int32()), "head": pa.array(heads.ravel(), pa.int32())}
    for name in (*PATTERNS, *IOI_SCORES):
        values = scores[name].ravel().tolist() if name in scores else [None] * labels.size
        columns[name] = pa.array(values, pa.float64())
    columns["label"] = pa.array(labels.ravel().tolist(), pa.string())
    met = [",".join(c for c in PRIORITY if masks[c][idx]) for idx in zip(layers.ravel(), heads.ravel())]
    columns["classes"] = pa.array(met, pa.string())
    return pa.table(columns, schema=HEADS_SCHEMA)
