"""The measures of a steering injection: the effect (the concept's target-set score at the next
token), the side effect (KL on neutral prompts, held-out loss), generations and the target-word
fraction, gathered by ``Evaluator``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from spectral.models.adapter import HeadAdapter
from spectral.steering.concepts import Concept, single_token_ids
from spectral.steering.injection import Injection
from spectral.steering.vectors import Batch

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
    (whatever the injection's ``positions``: held-out text has no designated last token). The
    injection is an ``Injection``, a ``baselines.HeadInjection`` or an ``autosteer.RowScaled`` (any
    object with ``with_positions`` and ``edits(last)``)."""
    edits = injection.with_positions("all").edits(batch.last) if injection is not None else {}
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
        adapter.require_causal_lm("steering")
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
