"""A 2-layer GPT-2 with a known induction circuit, its weights set by hand.

The textbook composition (Elhage et al., "A Mathematical Framework for Transformer Circuits"),
written into the weights rather than trained (training a small rotary model found a positional
shortcut instead, see issue 14):

- layer 0, head ``PREVIOUS_TOKEN_HEAD``: the query reads the position p, the key reads the
  position p - 1, so position p attends to p - 1; the value reads the token there and the
  output writes it into a "previous token" subspace of the residual stream;
- layer 1, head ``INDUCTION_HEAD``: the query reads the current token t, the key reads the
  "previous token" subspace (K-composition), so the head attends to the positions that follow
  an earlier t; the value reads the token there and the output writes it into an "answer"
  subspace, which is all the unembedding reads.

Every other head and both MLPs are zero. The residual stream (``D_MODEL`` dims) is split in
two halves; a feature with coordinate c is written +a at c and -a at c + D_MODEL / 2, so every
residual vector has mean exactly 0 and GPT-2's layer norms reduce to x * sqrt(D / |x|^2). The
norm |x|^2 is the same at every position (one unit pair per feature present), and each norm's
weight undoes it, so every feature reaches the attention weights with amplitude ~1.

Prompts start with the BOS token, so that position 0's previous-token write (its own token)
is the BOS and never a content token. ``induction_task`` builds the patching examples.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from spectral.causal.tasks import Example
from spectral.errors import UsageError
from spectral.tokens import is_single_token

VERSION = 1
"""Bumped whenever the construction changes; ``build_induction_model`` refuses (never
overwrites) a directory holding another version."""
MARKER = "groundtruth.json"

BOS, PAD, UNK = "<|endoftext|>", "<|pad|>", "<unk>"
SPECIALS = (BOS, PAD, UNK)
TOKENS: tuple[str, ...] = tuple(f"t{i}" for i in range(32))
"""The content tokens (ids 3 .. 34, after the specials)."""
VOCAB = len(SPECIALS) + len(TOKENS)
MAX_POSITIONS = 64
N_HEADS, D_HEAD = 4, 96
D_MODEL = N_HEADS * D_HEAD
HALF = D_MODEL // 2

PREVIOUS_TOKEN_HEAD = (0, 1)
"""(layer, head) of the previous-token head (not head 0, so a swapped index shows in tests)."""
INDUCTION_HEAD = (1, 2)
"""(layer, head) of the induction head."""

_PREV, _IND = (f"a{layer}.h{head}" for layer, head in (PREVIOUS_TOKEN_HEAD, INDUCTION_HEAD))
CIRCUIT_EDGES: tuple[tuple[str, str, str], ...] = (("input", _PREV, "v"), (_PREV, _IND, "k"), (_IND, "logits", "logits"))
"""The edges (sender, receiver, input; named as ``spectral.circuits.edges.Edge``) that carry
the logit difference of ``induction_task``: each alone, ablated, removes ~90-100% of it."""

SHARPNESS = 10.0
"""Pre-softmax score gap between a matching key and the others, for both heads: > 0.99
attention on any prompt that fits the 64 positions. The softmax is then saturated at the
clean point, so plain EAP (one gradient there) all but misses the K-composition edge
(measured -0.03 against an exact -9.1) while EAP-IG finds it: a known weakness of EAP, and
part of what this model tests."""
LOGIT_SCALE = 10.0
"""The answer token's logit when the induction head attends fully to it."""

# residual coordinates (the + half; each has its partner at + HALF)
_TOKEN, _POSITION = 0, VOCAB
_PREVIOUS = _POSITION + MAX_POSITIONS
_ANSWER = _PREVIOUS + VOCAB
assert _ANSWER + VOCAB <= HALF

# |x|^2 entering each norm: one unit pair (2) per feature present
_NORM_SQ = {"ln_1.0": 4.0, "ln_1.1": 6.0, "ln_f": 8.0}


def construction() -> dict:
    """What the weights depend on (written to the checkpoint's marker file)."""
    return {"version": VERSION, "d_model": D_MODEL, "heads": N_HEADS, "vocab": VOCAB,
            "max_positions": MAX_POSITIONS, "previous_token_head": list(PREVIOUS_TOKEN_HEAD),
            "induction_head": list(INDUCTION_HEAD), "sharpness": SHARPNESS, "logit_scale": LOGIT_SCALE}


def induction_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the specials and ``TOKENS``, split on whitespace."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + TOKENS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=BOS, pad_token=PAD,
                                   unk_token=UNK, padding_side="right")


def _config() -> GPT2Config:
    return GPT2Config(
        vocab_size=VOCAB, n_embd=D_MODEL, n_layer=2, n_head=N_HEADS, n_positions=MAX_POSITIONS,
        n_inner=4 * D_HEAD, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )


def _pair(w: torch.Tensor, row, coord: int, value: float) -> None:
    """Write feature ``coord`` with amplitude ``value`` into row(s) ``row`` of a (.., D_MODEL) matrix."""
    w[row, coord] = value
    w[row, coord + HALF] = -value


def induction_weights() -> dict[str, torch.Tensor]:
    """The full state dict of the hand-set model (every parameter; zeros where not stated)."""
    model = GPT2LMHeadModel(_config())
    sd = {name: torch.zeros_like(t) for name, t in model.state_dict().items()}
    for t in range(VOCAB):
        _pair(sd["transformer.wte.weight"], t, _TOKEN + t, 1.0)
        sd["lm_head.weight"][t, _ANSWER + t] = LOGIT_SCALE
    for p in range(MAX_POSITIONS):
        _pair(sd["transformer.wpe.weight"], p, _POSITION + p, 1.0)
    for layer in (0, 1):
        sd[f"transformer.h.{layer}.ln_1.weight"].fill_(math.sqrt(_NORM_SQ[f"ln_1.{layer}"] / D_MODEL))
        sd[f"transformer.h.{layer}.ln_2.weight"].fill_(1.0)  # the MLPs are zero: any value
    sd["transformer.ln_f.weight"].fill_(math.sqrt(_NORM_SQ["ln_f"] / D_MODEL))
    # both heads: score = s * s * scaling with scaling = 1 / sqrt(D_HEAD)
    s = math.sqrt(SHARPNESS * math.sqrt(D_HEAD))
    _head(sd, PREVIOUS_TOKEN_HEAD, s,
          query=[(_POSITION + p, p) for p in range(MAX_POSITIONS)],
          key=[(_POSITION + p, p + 1) for p in range(MAX_POSITIONS)],
          value=[(_TOKEN + t, t) for t in range(VOCAB)],
          out=[(t, _PREVIOUS + t) for t in range(VOCAB)])
    _head(sd, INDUCTION_HEAD, s,
          query=[(_TOKEN + t, t) for t in range(VOCAB)],
          key=[(_PREVIOUS + t, t) for t in range(VOCAB)],
          value=[(_TOKEN + t, t) for t in range(VOCAB)],
          out=[(t, _ANSWER + t) for t in range(VOCAB)])
    return sd


def _head(sd, where, scale, *, query, key, value, out) -> None:
    """Set one head's maps: (residual coord, head dim) pairs for q/k/v, (head dim, residual
    feature) pairs for the output. GPT-2's Conv1D computes x @ W, W: (in, out)."""
    layer, head = where
    qkv = sd[f"transformer.h.{layer}.attn.c_attn.weight"]  # (D_MODEL, 3 * D_MODEL)
    for block, pairs, value_scale in ((0, query, scale), (1, key, scale), (2, value, 1.0)):
        base = block * D_MODEL + head * D_HEAD
        for coord, dim in pairs:
            qkv[coord, base + dim] = value_scale
    proj = sd[f"transformer.h.{layer}.attn.c_proj.weight"]  # (D_MODEL in = head dims, D_MODEL out)
    for dim, coord in out:
        _pair(proj, head * D_HEAD + dim, coord, 1.0)


def build_induction_model(path: str | Path) -> Path:
    """Write the hand-set checkpoint (safetensors, config.json, tokenizer) to ``path`` and
    return it; a ``path`` that already holds this construction is returned untouched. A
    non-empty ``path`` holding anything else is refused (UsageError), never overwritten."""
    path = Path(path)
    if _is_built(path):
        return path
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"{path} exists and does not hold the ground-truth induction model (version {VERSION}); "
                         "choose another directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _config().save_pretrained(tmp)
    save_file(induction_weights(), tmp / "model.safetensors", metadata={"format": "pt"})
    induction_tokenizer().save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps(construction(), indent=2) + "\n")
    if path.is_dir():
        path.rmdir()  # empty (checked above)
    try:
        tmp.rename(path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
        if not _is_built(path):
            raise
    return path


def _is_built(path: Path) -> bool:
    try:
        return json.loads((path / MARKER).read_text()) == construction()
    except (OSError, json.JSONDecodeError):
        return False


def induction_task(tokenizer, n: int, length: int, seed: int = 0) -> list[Example]:
    """``n`` patching examples for the induction circuit (format of ``spectral.causal.tasks``).

    Clean: ``BOS r r[:k+1]`` for ``length`` distinct random tokens ``r`` and a random
    ``k < length - 1``; the answer is ``r[k+1]``. Corrupt: the same prompt with the first
    copy's ``r[k]`` resampled to a token ``x`` not in ``r``, so no earlier position follows the
    final token and induction has nothing to copy; the distractor is ``x``. Only what the
    previous-token head reads differs (the value the induction head would copy, ``r[k+1]``, is
    still there), so the circuit the logit difference needs is exactly: embedding -> the
    previous-token head's value, that head -> the induction head's key, the induction head ->
    the logits; and patching that key path alone carries the whole effect in both directions
    (clean into corrupt and corrupt into clean). Resampling the whole first copy would also
    change the copied value, so that patching the key path alone from clean into corrupt
    would raise the corrupt token, not the answer."""
    if n < 1:
        raise UsageError(f"induction task: n must be at least 1 (got {n})")
    if not 2 <= length <= len(TOKENS) - 1:
        raise UsageError(f"induction task: length must be in 2..{len(TOKENS) - 1} (got {length})")
    bad = [tok for tok in TOKENS + (BOS,) if not is_single_token(tokenizer, tok)]
    if bad:
        raise UsageError(f"induction task: {bad[0]!r} is not a single token here (the task needs the "
                         "ground-truth induction model's tokenizer)")
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        tokens = rng.sample(TOKENS, length + 1)
        r, x = tokens[:length], tokens[length]
        k = rng.randrange(length - 1)
        first = [*r[:k], x, *r[k + 1:]]
        examples.append(Example(
            clean=" ".join([BOS, *r, *r[:k + 1]]), corrupt=" ".join([BOS, *first, *r[:k + 1]]),
            answer=" " + r[k + 1], distractor=" " + x))
    return examples
