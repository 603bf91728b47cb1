"""The shared tokenising helpers: right padding and the single-token check."""

import pytest
import torch

from spectral.errors import UsageError
from spectral.models.tokenizer import byte_tokenizer
from spectral.tokens import is_single_token, pad_id, right_padded, single_token
from spectral.organisms.vocab import word_tokenizer
from tests.conftest import PROMPTS


def test_right_padded_puts_tokens_first_and_masks_the_padding():
    tok = byte_tokenizer()
    ids, mask = right_padded(tok, [[5, 6, 7], [8], []])
    pad = tok.pad_token_id
    assert ids.tolist() == [[5, 6, 7], [8, pad, pad], [pad, pad, pad]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long


@pytest.mark.parametrize("make", [byte_tokenizer, word_tokenizer])
def test_right_padded_equals_the_tokenizers_own_right_padding(make):
    tok = make()
    texts = PROMPTS if make is byte_tokenizer else ["When Mary and John went to the store", "I love the"]
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    ids, mask = right_padded(tok, rows, device="cpu")
    ref = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    assert tok.padding_side == "right"
    assert torch.equal(ids, ref.input_ids) and torch.equal(mask, ref.attention_mask)


def test_pad_id_is_zero_only_without_a_pad_token():
    tok = byte_tokenizer()
    assert pad_id(tok) == tok.pad_token_id != 0
    tok.pad_token = None
    assert pad_id(tok) == 0 and right_padded(tok, [[3], [3, 4]]).input_ids.tolist() == [[3, 0], [3, 4]]
    with pytest.raises(ValueError, match="no rows to pad"):
        right_padded(tok, [])


def test_single_token_names_the_source_the_word_and_its_token_count():
    tok = word_tokenizer()
    assert single_token(tok, " Mary", "task.jsonl:3", "answer") == tok(" Mary")["input_ids"][0]
    assert is_single_token(tok, " Mary") and not is_single_token(tok, " Mary John")
    with pytest.raises(UsageError, match=r"^task.jsonl:3: answer ' Mary John' is 2 tokens, not one$"):
        single_token(tok, " Mary John", "task.jsonl:3", "answer")
    assert not is_single_token(tok, " xyzzy")  # the unknown token is no word
    with pytest.raises(UsageError, match=r"^concept.yaml: target word ' xyzzy' is not in the vocabulary$"):
        single_token(tok, " xyzzy", "concept.yaml", "target word")
    with pytest.raises(UsageError, match="is 0 tokens, not one"):
        single_token(byte_tokenizer(), "", "src")
