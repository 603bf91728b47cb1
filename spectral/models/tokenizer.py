"""The offline byte-level tokenizer of random-weight twins.

Every UTF-8 byte is one token (ids 0-255 in GPT-2's byte-to-unicode order), then
``<|endoftext|>`` and ``<|pad|>``. No merges: any text round-trips exactly and nothing has to
be downloaded. Real checkpoints bring their own tokenizer. The helpers every job tokenises
with (right padding, the single-token check) are in ``spectral.tokens``.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """The byte-level tokenizer (258 ids); padding on the right."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=_byte_value)
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    vocab[EOS] = len(vocab)
    vocab[PAD] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=EOS, pad_token=PAD, padding_side="right"
    )


def _byte_value(ch: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode for one character."""
    code = ord(ch)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]
