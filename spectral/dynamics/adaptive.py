"""Spectrally adaptive steering during generation (research plan 3.2; issue 17, point 4).

A steering vector ``v`` (ActAdd or CAA of a concept at one layer, as ``eigengap steer`` builds
it) is added, during greedy generation, to the residual stream entering the injection layer
``L`` (``resid_pre``) at the current position only, with a coefficient ``alpha_t`` set afresh at
every step ``t`` from the current spectral state of that layer:

- ``fixed``: ``alpha_t = alpha``;
- ``gap`` (the adaptive rule, ``RULES``): ``alpha_t = alpha x g_t / g_0``, where ``g_t`` is the
  minimum over layer ``L``'s heads of the key-kernel gap of the context before the current
  position, and ``g_0`` its value on the prompt before any injection (every prompt token but the
  last). A head's gap is the scan's: ``spectral.kernels.key.key_kernel_spectra`` (raw keys, ridge
  1e-2 absolute, centred) of streamed statistics that each read position's key updates (rank one,
  ``spectral.dynamics.generation.ContextKeyStats``): equal to recomputing it from all those keys.
  A prompt whose context becomes less separated (smaller gap) is pushed less;
- ``inverse-gap``: ``alpha_t = alpha x g_0 / g_t`` (pushed more where the gap shrinks).

Steps. The prompt's first n - 1 tokens are read without injection (their keys are the prompt's
spectral state, ``g_0``). Step t (0 <= t < T) reads one position, the current one: at step 0 the
prompt's last token, at step t >= 1 the token generated at step t - 1, with ``alpha_t x v`` added
at layer ``L``; the keys of that position then join the statistics (so ``g_{t+1}`` sees the keys
of the steered context), and the step's next-token distribution gives token t (argmax: greedy,
deterministic). Why the state excludes the current position: its own key at layer ``L`` is computed
from the residual the injection changes, so it cannot set the injection's coefficient. Every
prompt generates exactly T tokens (no stop at an end-of-sequence token, as
``spectral.steering.measure.generate``); earlier positions keep the injection of their own step
(through the KV cache).

Measures per step, on the same prefix (the steered continuation): the steered next-token
distribution and the unsteered one (the same tokens read with no injection anywhere: a second
copy of each prompt in the same batch, fed the steered arm's tokens), the concept effect
``set_score(steered) - set_score(unsteered)`` (log P(target set) - log P(opposite set),
``spectral.steering.measure.set_score``) and the side effect ``KL(unsteered || steered)``
(``kl_per_prompt``). ``match_scale`` scales ``alpha`` of an arm so that the mean KL over steps and
prompts equals a budget (``spectral.steering.strategies.match_budget``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from spectral.dynamics.generation import ContextKeyStats, left_padded
from spectral.errors import UsageError
from spectral.kernels.key import key_kernel_spectra
from spectral.kernels.registry import RidgeMode
from spectral.models.adapter import HeadAdapter
from spectral.steering.measure import kl_per_prompt, set_score
from spectral.steering.strategies import match_budget

ARMS = ("fixed", "adaptive")
"""The two arms compared: a fixed coefficient, and the adaptive rule (``AdaptiveSettings.rule``)."""
RULES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "fixed": lambda g, g0: np.ones_like(g),
    "gap": lambda g, g0: g / g0,
    "inverse-gap": lambda g, g0: g0 / g,
}
"""Rule name -> ``alpha_t / alpha`` from the current gap ``g_t`` and the prompt's ``g_0`` (per prompt)."""
RULE_TEXT = {"fixed": "alpha_t = alpha", "gap": "alpha_t = alpha x g_t / g_0",
             "inverse-gap": "alpha_t = alpha x g_0 / g_t"}
MATCH_TOLERANCE = 0.02
"""``match_scale``'s tolerance, relative to the budget: each arm's mean KL is within this x the budget of it."""
MIN_PROMPT_TOKENS = 3
"""A prompt needs two tokens before its last for ``g_0`` (a kernel of one key has no gap)."""


@dataclass(frozen=True)
class AdaptiveSettings:
    """What one steered generation computes (ridge, centring and ridge mode as the scan's defaults)."""

    max_new_tokens: int = 8
    batch_size: int = 16
    """Prompts per forward pass (each runs twice: steered and unsteered)."""
    ridge: float = 1e-2
    center: bool = True
    ridge_mode: RidgeMode = "absolute"

    def check(self) -> None:
        if self.max_new_tokens <= 0:
            raise UsageError(f"max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise UsageError(f"batch size must be at least 1, got {self.batch_size}")


@dataclass(frozen=True)
class SteeredGeneration:
    """Per prompt and step (arrays of shape (prompts, steps)) of one arm at one scale."""

    rule: str
    scale: float
    """``alpha``."""
    tokens: np.ndarray
    """Generated token ids (the steered continuation)."""
    coefficient: np.ndarray
    """``alpha_t``: the coefficient of the step's injection."""
    gap: np.ndarray
    """``g_t``: the injection layer's minimum key-kernel gap over the context before the step's position."""
    effect: np.ndarray
    """Set score steered - unsteered of the step's next-token distribution."""
    kl: np.ndarray
    """KL(unsteered || steered) of the step's next-token distribution (nats)."""
    score_unsteered: np.ndarray
    """The unsteered set score (log P(target) - log P(opposite)) on the same prefix."""

    @property
    def mean_kl(self) -> float:
        return float(self.kl.mean())


class _Keys:
    """Hook callback: the injection layer's raw keys of this forward's positions, one query head per key head."""

    def __init__(self, kv_first: Tensor):
        self.kv_first = kv_first
        self.keys: Tensor | None = None

    def __call__(self, layer: int, site: str, t: Tensor) -> None:  # (batch, pos, head, d_head)
        self.keys = t[:, :, self.kv_first.to(t.device)].to(self.kv_first.device)


def min_gaps(stats: ContextKeyStats, n: int, settings: AdaptiveSettings) -> np.ndarray:
    """(n,) per prompt, the minimum over the layer's key heads of the key-kernel gap (the scan's)."""
    result = key_kernel_spectra(stats.key_stats(torch.arange(n, device=stats.count.device)), ridge=settings.ridge,
                                center=settings.center, ridge_mode=settings.ridge_mode)
    return result.metrics["gap"].reshape(n, -1).min(axis=1)  # (prompt x 1 layer, kv head) -> (prompt,)


@torch.no_grad()
def steered_generation(adapter: HeadAdapter, rows: Sequence[Sequence[int]], vector: Tensor, layer: int,
                       scale: float, rule: str, target: Sequence[int], opposite: Sequence[int],
                       settings: AdaptiveSettings = AdaptiveSettings(), pad: int = 0) -> SteeredGeneration:
    """Greedy generation of ``settings.max_new_tokens`` tokens for each prompt (token-id ``rows``)
    with ``alpha_t x vector`` added at ``layer`` (``rule``: a key of ``RULES``, ``alpha = scale``),
    and the per-step measures of the module docstring."""
    settings.check()
    if rule not in RULES:
        raise UsageError(f"unknown steering rule {rule!r} (known: {', '.join(RULES)})")
    adapter.check_layers([layer])
    if not np.isfinite(scale):
        raise UsageError(f"the steering scale must be finite, got {scale}")
    short = next((i for i, r in enumerate(rows) if len(r) < MIN_PROMPT_TOKENS), None)
    if short is not None:
        raise UsageError(f"prompt {short} has {len(rows[short])} token(s): adaptive steering needs at least "
                         f"{MIN_PROMPT_TOKENS} (the gap of the tokens before the last)")
    parts = [_batch(adapter, rows[i:i + settings.batch_size], vector, layer, scale, rule, target, opposite, settings,
                    pad, i) for i in range(0, len(rows), settings.batch_size)]
    return SteeredGeneration(rule, float(scale), *(np.concatenate([p[k] for p in parts]) for k in range(6)))


def _batch(adapter: HeadAdapter, rows, vector: Tensor, layer: int, scale: float, rule: str, target, opposite,
           settings: AdaptiveSettings, pad: int, first: int) -> tuple[np.ndarray, ...]:
    model = adapter.model
    device = model.get_input_embeddings().weight.device
    dtype = model.get_input_embeddings().weight.dtype
    n, steps = len(rows), settings.max_new_tokens
    ids, mask = left_padded(rows, pad, device)
    ids = torch.cat([ids, ids.new_full((n, steps), pad)], dim=1).repeat(2, 1)  # rows n..2n-1: the unsteered copy
    mask = torch.cat([mask, mask.new_ones(n, steps)], dim=1).repeat(2, 1)
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
    t0 = ids.shape[1] - steps  # the prompts' width; column t0 - 1 + t is step t's position
    group = adapter.n_heads // adapter.n_kv_heads
    capture = _Keys(torch.arange(adapter.n_kv_heads, device=device) * group)
    stats = ContextKeyStats(n, 1, adapter.n_kv_heads, adapter.d_head, device, float(torch.finfo(dtype).eps))
    coefficient = torch.zeros(2 * n, dtype=torch.float64, device=device)
    v = vector.to(device)

    def edit(x: Tensor) -> Tensor:  # the current position is the forward's last (and only) column
        x = x.clone()
        x[:, -1] += (coefficient[:, None] * v[None].double()).to(x.dtype)
        return x

    def add_keys(real: Tensor) -> None:  # the steered copy's keys of this forward's positions
        stats.add(capture.keys[:n, :, None], real[:n])  # (n, new, 1 layer, kv, d)

    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with adapter.trace(["keys_raw"], capture, layers=[layer]):  # the prompts but their last tokens: g_0's context
        out = model(input_ids=ids[:, :t0 - 1], attention_mask=mask[:, :t0 - 1], position_ids=positions[:, :t0 - 1],
                    use_cache=True, logits_to_keep=1)
    cache = out[cache_arg]
    add_keys(mask[:, :t0 - 1].bool())
    ratio = RULES[rule]
    cols = {k: np.zeros((n, steps)) for k in ("coefficient", "gap", "effect", "kl", "score")}
    tokens = np.zeros((n, steps), dtype=np.int64)
    g0 = None
    for t in range(steps):
        c = t0 - 1 + t
        g = min_gaps(stats, n, settings)
        if g0 is None:
            g0 = g
            bad = np.flatnonzero(~(np.isfinite(g0) & (g0 > 0)))
            if bad.size:
                raise UsageError(f"prompt {first + int(bad[0])}: the key-kernel gap of layer {layer} on its tokens "
                                 f"before the last is {g0[bad[0]]:g}: the adaptive rule needs a positive gap")
        alpha = scale * ratio(g, g0)
        if not np.all(np.isfinite(alpha)):
            i = int(np.flatnonzero(~np.isfinite(alpha))[0])
            raise UsageError(f"prompt {first + i}, step {t}: the coefficient is {alpha[i]:g} (gap {g[i]:g} at layer "
                             f"{layer}): the {rule!r} rule is undefined there")
        coefficient[:n] = torch.as_tensor(alpha, dtype=torch.float64, device=device)
        with adapter.trace(["keys_raw"], capture, layers=[layer], edits={(layer, "resid_pre"): edit}):
            out = model(input_ids=ids[:, c:c + 1], attention_mask=mask[:, :c + 1], position_ids=positions[:, c:c + 1],
                        use_cache=True, logits_to_keep=1, **{cache_arg: cache})
        cache = out[cache_arg]
        add_keys(torch.ones(2 * n, 1, dtype=torch.bool, device=device))
        logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        steered, plain = logp[:n], logp[n:]
        token = steered.argmax(dim=-1)
        score_s, score_p = set_score(steered, target, opposite), set_score(plain, target, opposite)
        cols["coefficient"][:, t], cols["gap"][:, t] = alpha, g
        cols["effect"][:, t] = (score_s - score_p).cpu().numpy()
        cols["kl"][:, t] = kl_per_prompt(plain, steered).clamp(min=0).cpu().numpy()
        cols["score"][:, t] = score_p.cpu().numpy()
        tokens[:, t] = token.cpu().numpy()
        if t + 1 < steps:
            ids[:, c + 1] = token.repeat(2)
    return tokens, cols["coefficient"], cols["gap"], cols["effect"], cols["kl"], cols["score"]


def match_scale(run: Callable[[float], SteeredGeneration], budget: float) -> tuple[float, SteeredGeneration]:
    """The scale ``alpha`` at which ``run(alpha)``'s mean KL over steps and prompts equals ``budget``
    within ``MATCH_TOLERANCE`` (2 % relative; ``match_budget``), and that run; a UsageError when the
    budget is out of the arm's reach. Where the mean KL jumps over the budget (a greedy continuation
    flipping at one scale moves the mean by a step), no scale lands within the tolerance: then the
    closest scale the bisection found and its run, and ``missed_match`` says so (the caller reports it)."""
    if not budget > 0:
        raise UsageError(f"--budget must be a positive number, got {budget}")
    runs: dict[float, SteeredGeneration] = {}

    def kl_of(s: float) -> float:
        runs[s] = run(s)
        return runs[s].mean_kl

    try:
        scale, kl = match_budget(kl_of, budget, tol=MATCH_TOLERANCE)
    except ValueError as err:
        raise UsageError(f"--budget: {err}; give a smaller --budget") from None
    return scale, runs[scale]


def missed_match(kl: float, budget: float, scale: float) -> str:
    """'' when the mean KL ``kl`` is within ``MATCH_TOLERANCE`` of ``budget``, else a sentence saying it is not."""
    if abs(kl - budget) <= MATCH_TOLERANCE * budget * (1 + 1e-9):
        return ""
    return (f"the closest mean KL the matcher reached is {kl:.4g} (scale {scale:.6g}), {abs(kl / budget - 1):.1%} "
            f"from the budget {budget:g}, outside its {MATCH_TOLERANCE:.0%} tolerance: the arm's mean KL jumps over "
            "the budget")


def sentiment_prompts(tasks: dict, n: int, seed: int = 0) -> tuple[str, ...]:
    """``n`` distinct sentiment contexts of an organism's language (its tasks.json), positive and
    negative alternating (as ``organism_sentiment``'s evaluation prompts; ``n`` even). Per polarity
    the templates take turns, each giving its distinct fillings in a seeded order until it has no
    more (so the short templates are not repeated); a UsageError when the language has fewer than
    ``n / 2`` distinct contexts of a polarity. Why: the adaptive arm's per-prompt KL is heavy-tailed,
    so a mean-KL budget matched on 16 prompts does not hold on 16 others; more prompts per split
    make the match transfer (``docs/DESIGN.md``, "Spectrally adaptive steering")."""
    import itertools
    import random
    import string

    if n < 4 or n % 2:
        raise UsageError(f"--prompts must be an even number of at least 4, got {n}")
    rng, per = random.Random(f"eigengap-adaptive-steering:{seed}"), {}
    fills = {"object": tasks["objects"], "name": tasks["names"], "place": tasks["places"]}
    for polarity in ("positive", "negative"):
        queues = []
        for template in tasks["sentiment_contexts"][polarity]:
            fields = sorted({f for _, f, _, _ in string.Formatter().parse(template) if f})
            texts = sorted({template.format(**dict(zip(fields, combo)))
                            for combo in itertools.product(*(fills[f] for f in fields))})
            rng.shuffle(texts)
            queues.append(texts)
        chosen: list[str] = []
        for text in itertools.chain.from_iterable(itertools.zip_longest(*queues)):
            if text is not None and text not in chosen:
                chosen.append(text)
        if len(chosen) < n // 2:
            raise UsageError(f"--prompts {n}: this organism's language has only {len(chosen)} distinct {polarity} "
                             f"sentiment contexts (at most {2 * len(chosen)} prompts)")
        per[polarity] = chosen[:n // 2]
    return tuple(p for pair in zip(per["positive"], per["negative"]) for p in pair)


def token_rows(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt's token ids as the steering measures read them (no special tokens, as
    ``spectral.steering.vectors.Batch``)."""
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
