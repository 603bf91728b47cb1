"""What one training checkpoint shows (issue 17, training dynamics): its in-context learning, its
heads' attention patterns, its task accuracies and every head's key-kernel spectrum, each measured
on inputs fixed once for the whole run (``Probes``: the same tokens and prompts at every checkpoint).

In-context-learning (ICL) score (Olsson et al. 2022: the loss at the 500th token minus the loss at
the 50th token of 512-token contexts): the mean loss of a late token minus that of an early token
of sequences in which the late token repeats earlier text. The loss at the k-th token (1-based) is
``-log p(x_k | x_1 .. x_{k-1})``, averaged over the sequences. Two forms (``ICLSequences``):

- ``olsson`` (models without tasks, e.g. Pythia): ``[r; r]`` of ``length = 2T`` tokens, ``T =
  min(context, 2 x pool) // 2``, ``r`` = T distinct tokens drawn uniformly from the vocabulary minus
  the special tokens; early = ``round(50 x length / 512)``, late = ``round(500 x length / 512)``
  (Olsson's 50th and 500th at length 512; at 2048: the 200th and 2000th). The early token lies in
  the first copy, the late one in the second.
- ``organism`` (an organism, from its tasks.json): the organisms learn induction only in their
  training format, so the sequences are that format at its longest: ``"Repeat: r | r | r."`` with
  ``r`` = ``SPAN`` (10) distinct ``induction_tokens`` (one token each), 37 tokens with the
  organisms' tokenizer; early = the ``POSITION``-th (5th) token of r in its first copy (predictable
  only as "one of the 48 syllables"), late = the same token in the third copy. (On long ``[r; r]``
  of induction tokens the organisms do not copy at all: top-1 accuracy on the repeat 0.000 at every
  checkpoint of organism-xs, while their in-format induction accuracy goes from 0.00 to 1.00.)

``icl_score = loss(late) - loss(early)`` (nats): near 0 before the model copies from its context,
strongly negative after.

Attention patterns on repeated random tokens: ``[r; r]`` rows as in the ``olsson`` form but from the
model's ICL pool (an organism's induction tokens, else the vocabulary minus special tokens): per
head the mul-form ``induction``, ``previous_token`` and ``duplicate_token`` scores
(``spectral.circuits.scores.pattern_scores``), their maxima over heads, and ``repeat_accuracy``
(top-1 accuracy on tokens T+2 .. 2T, the repeat after its first token), reported whatever they
are: an organism need not grow a textbook induction head. With an organism's tasks.json:
``induction_accuracy`` (its in-format task, ``spectral.organisms.evaluate.induction_quality``: tokens
2..k of the repeat, chance about 1/48) and ``ioi_accuracy`` (the mean of the ABBA and BABA accuracies
of ``ioi_quality``: chance 0.5); NaN for a model without tasks (not measured; the job says so).

Spectra: the key scan (``spectral.kernels.scan``, key kernel, raw keys) of the fixed prompt set,
one row per head with every metric of ``spectral.kernels.metrics.METRICS`` (the scan's own table).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from jaxtyping import Int
from torch import Tensor

from spectral.circuits.scores import pattern_scores
from spectral.errors import UsageError
from spectral.kernels.scan import ScanSettings, ScanUnit, finalize, result_table, scan_unit
from spectral.models.adapter import HeadAdapter
from spectral.models.loading import LoadedModel

OLSSON_CONTEXT, OLSSON_EARLY, OLSSON_LATE = 512, 50, 500
"""Olsson et al.'s ICL score: loss at the 500th minus the 50th token of 512-token contexts."""
MIN_LENGTH = 32
"""Shortest ``olsson`` sequence: its early token is then at least the 3rd."""
SPAN, COPIES, POSITION = 10, 3, 5
"""``organism`` form: span tokens (the organisms' longest), copies of the span (their most), and
the span token whose loss is read (1-based, in the first and the last copy)."""
PROBE_SEED = 60_000
"""Seed of the ICL sequences, the scan prompts and the task samples (the organisms trained on
seeds 0-4; other tools use 10,000-50,000)."""


def icl_positions(length: int) -> tuple[int, int]:
    """(early, late) of the ``olsson`` form: the 1-based tokens whose losses the ICL score
    subtracts, for sequences of ``length`` tokens."""
    return round(OLSSON_EARLY * length / OLSSON_CONTEXT), round(OLSSON_LATE * length / OLSSON_CONTEXT)


def repeated_pool_tokens(pool: Sequence[int], n: int, context: int, seed: int) -> Int[Tensor, "n length"]:
    """``n`` sequences ``[r; r]``, ``r`` = ``T = min(context, 2 len(pool)) // 2`` distinct ids of
    ``pool``, seeded."""
    pool = sorted(set(int(t) for t in pool))
    length = 2 * (min(context, 2 * len(pool)) // 2)
    if n < 1:
        raise UsageError(f"ICL sequences: n must be >= 1 (got {n})")
    if length < MIN_LENGTH:
        raise UsageError(f"ICL sequences: {length} tokens ([r; r] from a context of {context} and a pool of "
                         f"{len(pool)} tokens); need at least {MIN_LENGTH}")
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.tensor(pool, dtype=torch.long)
    r = allowed[torch.multinomial(torch.ones(n, len(pool)), length // 2, replacement=False, generator=gen)]  # (n, T)
    return torch.cat([r, r], dim=1)


@dataclass(frozen=True)
class ICLSequences:
    """The sequences of the ICL score and the two tokens it reads."""

    form: str
    """``olsson`` or ``organism`` (module docstring)."""
    tokens: Tensor
    """(n, length) token ids."""
    early: int
    """1-based token of the early loss."""
    late: int
    """1-based token of the late loss (the same token id as ``early`` in the ``organism`` form)."""


def olsson_sequences(pool: Sequence[int], n: int, context: int, seed: int) -> ICLSequences:
    tokens = repeated_pool_tokens(pool, n, context, seed)
    return ICLSequences("olsson", tokens, *icl_positions(tokens.shape[1]))


def organism_sequences(tokenizer, tasks: dict, n: int, seed: int) -> ICLSequences:
    """``"Repeat: r | r | r."`` with r = ``SPAN`` distinct induction tokens, seeded; the pieces
    are tokenized apart and checked once against the tokenizer on the whole text."""
    pool = induction_pool(tokenizer, tasks)
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prefix, sep, end = ids("Repeat:"), ids(" |"), ids(".")
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        r = [pool[j] for j in torch.randperm(len(pool), generator=gen)[:SPAN].tolist()]
        row = prefix + r + [t for _ in range(COPIES - 1) for t in sep + r] + end
        if i == 0:
            words = [tokenizer.convert_ids_to_tokens(t).replace("\u2581", " ").replace("Ġ", " ") for t in r]
            text = "Repeat:" + " |".join(["".join(words)] * COPIES) + "."
            if ids(text) != row:
                raise UsageError("organism ICL sequences: the tokenizer does not split 'Repeat: r | r | r.' into "
                                 "its pieces (prefix, one token per induction syllable, ' |', '.')")
        rows.append(row)
    early = len(prefix) + POSITION
    late = early + (COPIES - 1) * (len(sep) + SPAN)
    return ICLSequences("organism", torch.tensor(rows, dtype=torch.long), early, late)


def induction_pool(tokenizer, tasks: dict) -> list[int]:
    """An organism's induction syllables as token ids (each with its leading space, one token)."""
    pool = []
    for word in tasks["induction_tokens"]:
        got = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if len(got) != 1:
            raise UsageError(f"tasks.json induction token {word!r} is {len(got)} tokens, not one")
        pool.append(got[0])
    return pool


@dataclass(frozen=True)
class Probes:
    """The inputs every checkpoint of a run is measured on."""

    icl: ICLSequences
    """The ICL score's sequences."""
    repeated: Tensor
    """(n, 2T) ``[r; r]`` rows for the attention patterns and ``repeat_accuracy``."""
    prompts: tuple[str, ...]
    """The key scan's prompts."""
    tasks: dict | None
    """An organism's tasks.json (induction and IOI accuracy), or None."""
    n_induction: int = 100
    """Induction-task samples (organisms)."""
    n_ioi_per_template: int = 20
    """IOI examples per template (organisms)."""
    seed: int = PROBE_SEED


def make_probes(loaded: LoadedModel, tasks: dict | None, prompts: Sequence[str], *, n_sequences: int = 128,
                n_induction: int = 100, n_ioi_per_template: int = 20, seed: int = PROBE_SEED) -> Probes:
    """The probes of a run, from its first checkpoint (only the tokenizer and the config are read)."""
    tok = loaded.tokenizer
    context = int(getattr(loaded.model.config, "max_position_embeddings", 0) or 0)
    if tasks is not None:
        pool = induction_pool(tok, tasks)
        icl = organism_sequences(tok, tasks, n_sequences, seed)
    else:
        special = set(tok.all_special_ids)
        pool = [t for t in range(min(len(tok), loaded.model.config.vocab_size)) if t not in special]
        icl = olsson_sequences(pool, n_sequences, context, seed)
    if icl.tokens.shape[1] > context:
        raise UsageError(f"ICL sequences of {icl.tokens.shape[1]} tokens exceed the model's context of {context}")
    return Probes(icl, repeated_pool_tokens(pool, n_sequences, context, seed + 3), tuple(prompts), tasks,
                  n_induction, n_ioi_per_template, seed)


@dataclass(frozen=True)
class ICLScore:
    """The ICL score of one checkpoint and its parts."""

    score: float
    """``loss_late - loss_early`` (nats)."""
    loss_early: float
    loss_late: float
    early: int
    """1-based token of ``loss_early``."""
    late: int


@torch.no_grad()
def token_losses(loaded: LoadedModel, tokens: Int[Tensor, "n length"], *, batch_size: int = 32
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per sequence and token k = 2 .. length: the loss ``-log p(x_k | x_<k)`` and whether the
    top-1 prediction was x_k; (n, length - 1) each (column j is token j + 2)."""
    device = loaded.model.get_input_embeddings().weight.device
    losses, hits = [], []
    for chunk in tokens.split(batch_size):
        chunk = chunk.to(device)
        logits = loaded.model(input_ids=chunk, use_cache=False).logits[:, :-1].float()  # (b, length-1, vocab)
        target = chunk[:, 1:]
        logp = torch.log_softmax(logits, dim=-1).gather(-1, target[..., None])[..., 0]
        losses.append((-logp).double().cpu())
        hits.append((logits.argmax(-1) == target).cpu())
    return torch.cat(losses).numpy(), torch.cat(hits).numpy()


def icl_score(loaded: LoadedModel, sequences: ICLSequences, *, batch_size: int = 32) -> ICLScore:
    """The ICL score of ``sequences`` under ``loaded`` (module docstring)."""
    losses, _ = token_losses(loaded, sequences.tokens, batch_size=batch_size)  # (n, length - 1): token k at k - 2
    loss_early = float(losses[:, sequences.early - 2].mean())
    loss_late = float(losses[:, sequences.late - 2].mean())
    return ICLScore(loss_late - loss_early, loss_early, loss_late, sequences.early, sequences.late)


def repeat_accuracy(loaded: LoadedModel, tokens: Int[Tensor, "n two_length"], *, batch_size: int = 32) -> float:
    """Top-1 accuracy on tokens T+2 .. 2T of ``[r; r]`` rows."""
    _, hits = token_losses(loaded, tokens, batch_size=batch_size)
    return float(hits[:, tokens.shape[1] // 2:].mean())


def key_scan(loaded: LoadedModel, prompts: Sequence[str], settings: ScanSettings, model: str) -> pa.Table:
    """The scan table (``spectral.tables.SCAN``) of ``loaded`` on ``prompts``: one work unit."""
    adapter = HeadAdapter(loaded.model)
    n_kv = getattr(loaded.model.config, "num_key_value_heads", None)
    stats = scan_unit(loaded, ScanUnit(0, tuple(prompts), settings))
    return result_table(finalize(stats, settings), settings, model, adapter.n_layers, adapter.n_heads, n_kv)


@dataclass(frozen=True)
class CheckpointMeasures:
    """Everything measured on one checkpoint."""

    icl: ICLScore
    repeat_accuracy: float
    """Top-1 accuracy on the repeat of the ``[r; r]`` rows."""
    patterns: dict[str, np.ndarray]
    """Pattern name -> (layers, heads) scores on the ``[r; r]`` rows."""
    induction_accuracy: float
    """In-format induction accuracy (organisms; NaN without tasks)."""
    ioi_accuracy: float
    """Mean of the ABBA and BABA IOI accuracies (organisms; NaN without tasks)."""
    scan: pa.Table
    """The key scan of the prompts (``spectral.tables.SCAN``)."""


def measure(loaded: LoadedModel, probes: Probes, settings: ScanSettings, model: str, *,
            batch_size: int = 32) -> CheckpointMeasures:
    """Every measure of the module on one loaded checkpoint."""
    from spectral.organisms.evaluate import induction_quality, ioi_quality

    icl = icl_score(loaded, probes.icl, batch_size=batch_size)
    repeat = repeat_accuracy(loaded, probes.repeated, batch_size=batch_size)
    patterns = pattern_scores(HeadAdapter(loaded.model), probes.repeated, batch_size=batch_size)
    induction = ioi = float("nan")
    if probes.tasks is not None:
        induction, _ = induction_quality(loaded, probes.tasks, probes.n_induction, probes.seed + 1)
        by_order, _ = ioi_quality(loaded, probes.tasks, probes.n_ioi_per_template, probes.seed + 2)
        ioi = float(np.mean([acc for acc, _ in by_order.values()]))
    return CheckpointMeasures(icl, repeat, patterns, float(induction), ioi,
                              key_scan(loaded, probes.prompts, settings, model))


def organism_probe_prompts(n: int, seed: int = PROBE_SEED, episodes_per_prompt: int = 4) -> tuple[str, ...]:
    """``n`` prompts of the organism language, ``episodes_per_prompt`` episodes each, from ``seed``."""
    from spectral.organisms.language import corpus

    episodes = corpus(seed, n * episodes_per_prompt)
    return tuple(" ".join(episodes[i:i + episodes_per_prompt]) for i in range(0, len(episodes), episodes_per_prompt))
