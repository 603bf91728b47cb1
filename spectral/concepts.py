"""Built-in steering concepts: the organisms' sentiment (from ``tasks.json``) and a Love/Hate
sentiment concept for English tokenizers (GPT-2, Pythia, Llama)."""

from __future__ import annotations

import json
import random

from spectral.errors import UsageError
from spectral.steering import Concept, read_concept

ENGLISH_POSITIVE = [" good", " great", " happy", " wonderful", " love", " beautiful", " nice", " excellent"]
ENGLISH_NEGATIVE = [" bad", " terrible", " sad", " awful", " hate", " ugly", " horrible", " poor"]
"""Target and opposite words of the English Love/Hate concept (each kept only where it is a
single token of the model's tokenizer; at least 3 of each must remain)."""

ENGLISH_LOVE_HATE = {
    "name": "love-hate",
    "pairs": [[" Love", " Hate"], ["I love this", "I hate this"], ["I love you", "I hate you"],
              ["We love it", "We hate it"], ["They loved the show", "They hated the show"],
              ["She loves her job", "She hates her job"], ["What a lovely day", "What a horrible day"],
              ["This is wonderful", "This is terrible"]],
    "prompts": ["I think that the movie was", "The weather today is", "My neighbour is a", "The food at the party was",
                "Honestly, this book is", "The new teacher seems", "Our trip to the city was", "The concert last night was",
                "My first day at work was", "The view from the hill is", "His latest song is", "The service in this shop is"],
    "neutral": ["The capital of France is", "Water boils at a temperature of", "The train leaves the station at",
                "In 1969, the first person to walk on the moon was", "The recipe calls for two cups of",
                "A triangle has three", "The meeting is scheduled for", "The river flows into the"],
    "heldout": ["The committee met on Tuesday to review the budget for the coming year.",
                "Photosynthesis converts light energy into chemical energy stored in glucose.",
                "The museum opens at nine and closes at five on weekdays.",
                "He parked the car, locked the door and walked to the station."],
}


def organism_sentiment(tasks: dict, n: int = 32, seed: int = 0) -> Concept:
    """The organisms' sentiment concept: contrast pairs from the language's sentiment contexts
    ("I love the apple. It is" / "I hate the apple. It is"); evaluation prompts that are
    positive and negative contexts in equal numbers (so that a perturbation that merely
    flattens the prediction moves the mean score by about nothing, and only a push toward
    positive words moves it up); neutral prompts from IOI and filler; held-out text."""
    from spectral.organisms.language import FILLER_NOUNS, corpus, sentiment_context

    rng = random.Random(seed)
    contexts = tasks["sentiment_contexts"]
    pairs = [["I love", "I hate"]]
    for _ in range(n - 1):
        i = rng.randrange(len(contexts["positive"]))
        fill = {"object": rng.choice(tasks["objects"]), "name": rng.choice(tasks["names"]),
                "place": rng.choice(tasks["places"])}
        pairs.append([contexts["positive"][i].format(**fill), contexts["negative"][i].format(**fill)])
    prompts = [sentiment_context(rng, polarity, tasks) for _ in range(n // 2) for polarity in ("positive", "negative")]
    neutral = [f"When {a} and {b} went to the {p}, {b} gave a {o} to" for a, b, p, o in
               ((rng.choice(tasks["names"]), rng.choice(tasks["names"]), rng.choice(tasks["places"]),
                 rng.choice(tasks["objects"])) for _ in range(n // 2))]
    neutral += [f"A {rng.choice(FILLER_NOUNS)} is" for _ in range(n - len(neutral))]
    heldout = [" ".join(corpus(30000 + i, 4)) for i in range(16)]
    return Concept("sentiment", tuple(map(tuple, pairs)), tuple(prompts), tuple(" " + w for w in tasks["positive_words"]),
                   tuple(" " + w for w in tasks["negative_words"]), tuple(neutral), tuple(heldout))


def english_love_hate(tokenizer) -> Concept:
    """The Love/Hate concept, target/opposite restricted to this tokenizer's single tokens."""
    unk = getattr(tokenizer, "unk_token_id", None)

    def single(word: str) -> bool:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        return len(ids) == 1 and (unk is None or ids[0] != unk)

    target = [w for w in ENGLISH_POSITIVE if single(w)]
    opposite = [w for w in ENGLISH_NEGATIVE if single(w)]
    if len(target) < 3 or len(opposite) < 3:
        raise UsageError("this tokenizer has fewer than 3 single-token sentiment words: "
                         "the built-in love-hate concept does not apply (pass a concept file)")
    d = ENGLISH_LOVE_HATE
    return Concept(d["name"], tuple(tuple(p) for p in d["pairs"]), tuple(d["prompts"]), tuple(target),
                   tuple(opposite), tuple(d["neutral"]), tuple(d["heldout"]))


def concept_for(name_or_path: str, loaded) -> Concept:
    """``sentiment`` (organisms, from tasks.json), ``love-hate`` (English), or a YAML/JSON file."""
    from spectral.loading import checkpoint_path

    if name_or_path == "sentiment":
        path = checkpoint_path(loaded)
        if path is None or not (path / "tasks.json").is_file():
            raise UsageError("--concept sentiment needs a model organism (a checkpoint with tasks.json); "
                             "use love-hate for English models or pass a concept file")
        return organism_sentiment(json.loads((path / "tasks.json").read_text()))
    if name_or_path == "love-hate":
        return english_love_hate(loaded.tokenizer)
    return read_concept(name_or_path)
