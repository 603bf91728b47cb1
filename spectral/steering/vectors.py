"""Activation steering: ActAdd and CAA vectors from the residual stream, injection at any set
of layers with per-layer coefficients, and the measures of effect and side effect.

A steering vector for layer ``l`` lives in the residual stream entering block ``l``
(``resid_pre``). ActAdd takes one contrast pair, CAA the mean difference over many; both read
each prompt at its last real token. Injection adds ``coefficient[l] * vector[l]`` to the
residual entering block ``l`` at the chosen positions, through scoped hooks of the adapter
(the same code for GPT-NeoX, Llama and GPT-2).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from spectral.models.adapter import HeadAdapter
from spectral.tokens import right_padded, single_token
from spectral.errors import UsageError

Positions = Literal["all", "last"] | int
"""Where a vector is added: every position, each prompt's last real token only, or one token
index (0-based; sequences shorter than that are left alone)."""


# ---------------------------------------------------------------------------- concepts
@dataclass(frozen=True)
class Concept:
    """A steering concept as data.

    ``pairs`` are (positive, negative) contrast prompts: ActAdd uses the first, CAA all of them.
    The effect is measured on ``prompts`` as the change of ``log P(target) - log P(opposite)``
    for the next token, where a set's probability is the sum over its words (single tokens).
    The side effect is measured on ``neutral`` prompts (KL of the next-token distribution) and
    on ``heldout`` text (loss increase). ``scan`` (optional) are prompts from the distribution of
    ``prompts`` but disjoint from them: the held-out scan the spectral strategy reads
    (``spectral.steering.concepts.scan_texts``).
    """

    name: str
    pairs: tuple[tuple[str, str], ...]
    prompts: tuple[str, ...]
    target: tuple[str, ...]
    opposite: tuple[str, ...]
    neutral: tuple[str, ...]
    heldout: tuple[str, ...] = ()
    scan: tuple[str, ...] = ()

    FIELDS = ("name", "pairs", "prompts", "target", "opposite", "neutral")
    OPTIONAL = ("heldout", "scan")


def concept_from_dict(data: Mapping, source: str = "concept") -> Concept:
    """A Concept from a parsed YAML/JSON mapping; UsageError names the first bad field."""
    if not isinstance(data, Mapping):
        raise UsageError(f"{source}: expected a mapping with fields {', '.join(Concept.FIELDS)}")
    missing = [k for k in Concept.FIELDS if k not in data]
    if missing:
        raise UsageError(f"{source}: missing field {missing[0]!r}")
    unknown = sorted(set(data) - set(Concept.FIELDS) - set(Concept.OPTIONAL))
    if unknown:
        raise UsageError(f"{source}: unknown field {unknown[0]!r} (known: {', '.join(Concept.FIELDS + Concept.OPTIONAL)})")
    if not isinstance(data["name"], str) or not data["name"]:
        raise UsageError(f"{source}: field 'name' must be a non-empty string")

    def strings(key: str, required: bool = True) -> tuple[str, ...]:
        value = data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UsageError(f"{source}: field {key!r} must be a list of strings")
        if required and not value:
            raise UsageError(f"{source}: field {key!r} is empty")
        return tuple(value)

    pairs = data["pairs"]
    if (not isinstance(pairs, list) or not pairs
            or not all(isinstance(p, list | tuple) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in pairs)):
        raise UsageError(f"{source}: field 'pairs' must be a non-empty list of [positive, negative] string pairs")
    return Concept(data["name"], tuple((p[0], p[1]) for p in pairs), strings("prompts"), strings("target"),
                   strings("opposite"), strings("neutral"), strings("heldout", required=False),
                   strings("scan", required=False))


def read_concept(path: str | Path) -> Concept:
    """A concept file: YAML (``.yaml``/``.yml``) or JSON."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"concept file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise UsageError(f"{path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'} "
                         f"({str(err).splitlines()[0]})") from None
    return concept_from_dict(data, str(path))


def single_token_ids(tokenizer, words: Sequence[str], what: str, source: str) -> list[int]:
    """Token ids of words that must each be exactly one known token."""
    return [single_token(tokenizer, word, source, f"{what} word") for word in words]


# ---------------------------------------------------------------------------- batches
@dataclass
class Batch:
    """Right-padded token ids of prompts, with each prompt's last real position."""

    ids: Tensor
    mask: Tensor
    last: Tensor

    @classmethod
    def of(cls, tokenizer, texts: Sequence[str], device=None, source: str = "prompts") -> Batch:
        rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        unk = getattr(tokenizer, "unk_token_id", None)
        for text, row in zip(texts, rows):
            if not row:
                raise UsageError(f"{source}: the prompt {text!r} is empty")
            if unk is not None and unk in row:
                raise UsageError(f"{source}: the prompt {text!r} has words that are not in the vocabulary")
        ids, mask = right_padded(tokenizer, rows)
        batch = cls(ids, mask, mask.sum(1) - 1)
        return batch.to(device) if device is not None else batch

    def to(self, device) -> Batch:
        return Batch(self.ids.to(device), self.mask.to(device), self.last.to(device))


# ---------------------------------------------------------------------------- vectors
ReadAt = Literal["last", "mean"] | int
"""Where a vector is read in each contrast prompt: its last real token, the mean over its real
tokens, or a token index (0-based; every prompt must be that long)."""


@torch.no_grad()
def read_residuals(adapter: HeadAdapter, batch: Batch, layers: Sequence[int], at: ReadAt = "last") -> dict[int, Tensor]:
    """Residual stream entering each of ``layers``, one (n, d_model) row per prompt, at ``at``."""
    out: dict[int, Tensor] = {}
    rows = torch.arange(batch.ids.shape[0], device=batch.ids.device)
    if isinstance(at, int) and not 0 <= at <= int(batch.last.min()):
        raise UsageError(f"position {at} is past the end of the shortest contrast prompt "
                         f"({int(batch.last.min()) + 1} tokens)")

    def keep(layer, site, t):
        if at == "last":
            value = t[rows, batch.last]
        elif at == "mean":
            m = batch.mask.to(t.device, t.dtype)[..., None]
            value = (t * m).sum(1) / m.sum(1)
        else:
            value = t[:, at]
        out[layer] = value.detach().float().clone()

    with adapter.trace(["resid_pre"], keep, layers=layers):
        adapter.model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False)
    return out


def steering_vectors(adapter: HeadAdapter, tokenizer, pairs: Sequence[tuple[str, str]], layers: Sequence[int],
                     device=None, at: ReadAt = "last") -> dict[int, Tensor]:
    """Mean over ``pairs`` of resid_pre(positive) - resid_pre(negative) read ``at`` the last
    token (default), the token mean or a token index, per layer. One pair is ActAdd; many
    pairs is CAA (contrastive activation addition)."""
    layers = adapter.check_layers(layers)
    pos = read_residuals(adapter, Batch.of(tokenizer, [p for p, _ in pairs], device, "pairs"), layers, at)
    neg = read_residuals(adapter, Batch.of(tokenizer, [n for _, n in pairs], device, "pairs"), layers, at)
    return {l: (pos[l] - neg[l]).mean(0) for l in layers}


def actadd(adapter, tokenizer, concept: Concept, layers, device=None, at: ReadAt = "last") -> dict[int, Tensor]:
    """ActAdd: the first contrast pair only."""
    return steering_vectors(adapter, tokenizer, concept.pairs[:1], layers, device, at)


def caa(adapter, tokenizer, concept: Concept, layers, device=None, at: ReadAt = "last") -> dict[int, Tensor]:
    """CAA: the mean difference over every contrast pair."""
    return steering_vectors(adapter, tokenizer, concept.pairs, layers, device, at)


@dataclass(frozen=True)
class Injection:
    """``coefficients[l] * vectors[l]`` added to the residual entering block ``l``."""

    vectors: Mapping[int, Tensor]
    coefficients: Mapping[int, float]
    positions: Positions = "all"

    def __post_init__(self):
        for layer, c in self.coefficients.items():
            if not np.isfinite(c):
                raise UsageError(f"coefficient of layer {layer} is not finite ({c})")
            if layer not in self.vectors:
                raise UsageError(f"no steering vector for layer {layer}")

    def edits(self, last: Tensor | None = None) -> dict[tuple[int, str], object]:
        """Adapter edits (scoped to one ``trace``). ``last``: each row's last real position,
        needed for ``positions='last'`` on full prompts."""
        def make(layer: int, coefficient: float):
            def edit(x: Tensor) -> Tensor:
                delta = (coefficient * self.vectors[layer]).to(x.device, x.dtype)
                if isinstance(self.positions, int):
                    if self.positions >= x.shape[1]:
                        return x
                    x = x.clone()
                    x[:, self.positions] += delta
                    return x
                if self.positions == "all" or last is None or x.shape[1] == 1:
                    return x + delta
                x = x.clone()
                rows = torch.arange(x.shape[0], device=x.device)
                x[rows, last.to(x.device)] += delta
                return x
            return edit
        return {(l, "resid_pre"): make(l, c) for l, c in self.coefficients.items() if c != 0}


# ---------------------------------------------------------------------------- measures
@torch.no_grad()
def next_token_logprobs(adapter: HeadAdapter, batch: Batch, injection: Injection | None = None) -> Tensor:
    """log-softmax of the next-token logits at each prompt's last real token: (n, vocab)."""
    edits = injection.edits(batch.last) if injection is not None else {}
    with adapter.trace([], edits=edits):
        logits = adapter.model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False).logits
    rows = torch.arange(batch.ids.shape[0], device=logits.device)
    return torch.log_softmax(logits[rows, batch.last.to(logits.device)].float(), dim=-1)


def set_score(logprobs: Tensor, target: Sequence[int], opposite: Sequence[int]) -> Tensor:
    """Per prompt: log P(target set) - log P(opposite set) (each set's probabilities summed)."""
    t = torch.logsumexp(logprobs[:, list(target)], dim=-1)
    o = torch.logsumexp(logprobs[:, list(opposite)], dim=-1)
    return t - o


def kl_per_prompt(base: Tensor, steered: Tensor) -> Tensor:
    """KL(base || steered) of next-token distributions, per prompt (nats)."""
    return (base.exp() * (base - steered)).sum(-1)


@torch.no_grad()
def heldout_loss(adapter: HeadAdapter, batch: Batch, injection: Injection | None = None) -> Tensor:
    """Mean next-token cross-entropy per text (nats), with the injection at every position
    (whatever the injection's ``positions``: held-out text has no designated last token)."""
    edits = Injection(injection.vectors, injection.coefficients, "all").edits() if injection is not None else {}
    with adapter.trace([], edits=edits):
        logits = adapter.model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1)
    targets = batch.ids[:, 1:].to(logp.device)
    nll = -logp.gather(-1, targets[..., None]).squeeze(-1)
    valid = batch.mask[:, 1:].to(nll.device).float()
    return (nll * valid).sum(1) / valid.sum(1).clamp(min=1)


@torch.no_grad()
def generate(adapter: HeadAdapter, tokenizer, prompts: Sequence[str], injection: Injection | None, *,
             max_new_tokens: int = 8, sample: bool = False, seed: int = 0, temperature: float = 1.0) -> list[list[int]]:
    """Continuations (token ids) of each prompt, one at a time (no padding), greedy or sampled
    (seeded). The injection acts as on prompts: at every position, or (``positions='last'``)
    at the newest token of each step."""
    model = adapter.model
    device = model.get_input_embeddings().weight.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for text in prompts:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], device=device)
        new: list[int] = []
        for _ in range(max_new_tokens):
            edits = injection.edits(torch.tensor([ids.shape[1] - 1])) if injection is not None else {}
            with adapter.trace([], edits=edits):
                logits = model(input_ids=ids, use_cache=False).logits[0, -1].float()
            if sample:
                probs = torch.softmax(logits / temperature, -1).cpu()
                token = int(torch.multinomial(probs, 1, generator=gen))
            else:
                token = int(logits.argmax())
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
        out.append(new)
    return out


@dataclass
class Measurement:
    """Per-prompt values of one injection (for bootstrap intervals)."""

    effect: np.ndarray
    """Per evaluation prompt: change of log P(target) - log P(opposite) vs no injection."""
    kl: np.ndarray
    """Per neutral prompt: KL(unsteered || steered) of the next-token distribution."""
    loss_increase: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """Per held-out text: mean cross-entropy increase (nats/token)."""


class Evaluator:
    """Measures injections on one concept; the unsteered baselines are computed once."""

    def __init__(self, adapter: HeadAdapter, tokenizer, concept: Concept, source: str = "concept"):
        self.adapter, self.tokenizer, self.concept = adapter, tokenizer, concept
        device = adapter.model.get_input_embeddings().weight.device
        self.target = single_token_ids(tokenizer, concept.target, "target", source)
        self.opposite = single_token_ids(tokenizer, concept.opposite, "opposite", source)
        self.prompts = Batch.of(tokenizer, concept.prompts, device, f"{source}: prompts")
        self.neutral = Batch.of(tokenizer, concept.neutral, device, f"{source}: neutral")
        self.heldout = Batch.of(tokenizer, concept.heldout, device, f"{source}: heldout") if concept.heldout else None
        self.base_score = set_score(next_token_logprobs(adapter, self.prompts), self.target, self.opposite)
        self.base_neutral = next_token_logprobs(adapter, self.neutral)
        self.base_loss = heldout_loss(adapter, self.heldout) if self.heldout is not None else None

    def kl(self, injection: Injection) -> float:
        """Mean KL on the neutral prompts (what the side-effect budget is matched on)."""
        return float(kl_per_prompt(self.base_neutral, next_token_logprobs(self.adapter, self.neutral, injection)).mean())

    def measure(self, injection: Injection, with_loss: bool = True) -> Measurement:
        score = set_score(next_token_logprobs(self.adapter, self.prompts, injection), self.target, self.opposite)
        kl = kl_per_prompt(self.base_neutral, next_token_logprobs(self.adapter, self.neutral, injection))
        loss = np.zeros(0)
        if with_loss and self.heldout is not None:
            loss = (heldout_loss(self.adapter, self.heldout, injection) - self.base_loss).cpu().numpy()
        return Measurement((score - self.base_score).cpu().numpy(), kl.cpu().numpy(), loss)

    def target_fraction(self, injection: Injection | None, *, sample: bool, seed: int = 0, max_new_tokens: int = 8) -> np.ndarray:
        """Per evaluation prompt: fraction of generated tokens that are target-set words."""
        target = set(self.target)
        gens = generate(self.adapter, self.tokenizer, self.concept.prompts, injection,
                        max_new_tokens=max_new_tokens, sample=sample, seed=seed)
        return np.array([sum(t in target for t in g) / len(g) for g in gens])
