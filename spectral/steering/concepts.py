"""Steering concepts as data (``Concept``, YAML/JSON concept files) and the built-in ones: the
organisms' sentiment (from ``tasks.json``) and a Love/Hate sentiment concept for English
tokenizers (GPT-2, Pythia, Llama); and the texts the steering scan reads (``scan_texts``): held
out from the evaluation prompts by default."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from spectral.errors import UsageError
from spectral.tokens import is_single_token, single_token

@dataclass(frozen=True)
class Concept:
    """A steering concept as data.

    ``pairs`` are (positive, negative) contrast prompts: ActAdd uses the first, CAA all of them.
    The effect is measured on ``prompts`` as the change of ``log P(target) - log P(opposite)``
    for the next token, where a set's probability is the sum over its words (single tokens).
    The side effect is measured on ``neutral`` prompts (KL of the next-token distribution) and
    on ``heldout`` text (loss increase). ``scan`` (optional) are prompts from the distribution of
    ``prompts`` but disjoint from them: the held-out scan the spectral strategy reads
    (``spectral.steering.concepts.scan_texts``).
    """

    name: str
    pairs: tuple[tuple[str, str], ...]
    prompts: tuple[str, ...]
    target: tuple[str, ...]
    opposite: tuple[str, ...]
    neutral: tuple[str, ...]
    heldout: tuple[str, ...] = ()
    scan: tuple[str, ...] = ()

    FIELDS = ("name", "pairs", "prompts", "target", "opposite", "neutral")
    OPTIONAL = ("heldout", "scan")


def concept_from_dict(data: Mapping, source: str = "concept") -> Concept:
    """A Concept from a parsed YAML/JSON mapping; UsageError names the first bad field."""
    if not isinstance(data, Mapping):
        raise UsageError(f"{source}: expected a mapping with fields {', '.join(Concept.FIELDS)}")
    missing = [k for k in Concept.FIELDS if k not in data]
    if missing:
        raise UsageError(f"{source}: missing field {missing[0]!r}")
    unknown = sorted(set(data) - set(Concept.FIELDS) - set(Concept.OPTIONAL))
    if unknown:
        raise UsageError(f"{source}: unknown field {unknown[0]!r} (known: {', '.join(Concept.FIELDS + Concept.OPTIONAL)})")
    if not isinstance(data["name"], str) or not data["name"]:
        raise UsageError(f"{source}: field 'name' must be a non-empty string")

    def strings(key: str, required: bool = True) -> tuple[str, ...]:
        value = data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UsageError(f"{source}: field {key!r} must be a list of strings")
        if required and not value:
            raise UsageError(f"{source}: field {key!r} is empty")
        return tuple(value)

    pairs = data["pairs"]
    if (not isinstance(pairs, list) or not pairs
            or not all(isinstance(p, list | tuple) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in pairs)):
        raise UsageError(f"{source}: field 'pairs' must be a non-empty list of [positive, negative] string pairs")
    return Concept(data["name"], tuple((p[0], p[1]) for p in pairs), strings("prompts"), strings("target"),
                   strings("opposite"), strings("neutral"), strings("heldout", required=False),
                   strings("scan", required=False))


def read_concept(path: str | Path) -> Concept:
    """A concept file: YAML (``.yaml``/``.yml``) or JSON."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"concept file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise UsageError(f"{path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'} "
                         f"({str(err).splitlines()[0]})") from None
    return concept_from_dict(data, str(path))


def single_token_ids(tokenizer, words: Sequence[str], what: str, source: str) -> list[int]:
    """Token ids of words that must each be exactly one known token."""
    return [single_token(tokenizer, word, source, f"{what} word") for word in words]


SCAN_SETS = ("held-out", "in-sample")
"""Which texts the steering scan reads (``scan_texts``)."""

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
    "scan": ["I think that the play was", "The music at the wedding was", "My new phone is a", "The coffee here is",
             "Frankly, this film is", "The new manager seems", "Our holiday by the sea was", "The game last week was",
             "My first week at school was", "The garden behind the house is", "Her latest book is",
             "The staff in this hotel are"],
}
"""``scan``: prompts like ``prompts`` but disjoint from them, for the held-out steering scan."""


def _draws(draw, n: int, exclude: set[str] = frozenset(), distinct: bool = True) -> list[str]:
    """Up to ``n`` texts ``draw(k)`` (``k``: how many are kept so far), skipping those in ``exclude``
    (and with ``distinct`` repeats), in at most 100 n tries."""
    out: list[str] = []
    for _ in range(100 * n):
        if len(out) == n:
            break
        text = draw(len(out))
        if text not in exclude and not (distinct and text in out):
            out.append(text)
    return out


def organism_sentiment(tasks: dict, n: int = 32, seed: int = 0, scan_seed: int = 0) -> Concept:
    """The organisms' sentiment concept: contrast pairs from the language's sentiment contexts
    ("I love the apple. It is" / "I hate the apple. It is"); evaluation prompts that are
    positive and negative contexts in equal numbers (so that a perturbation that merely
    flattens the prediction moves the mean score by about nothing, and only a push toward
    positive words moves it up); neutral prompts from IOI and filler; held-out text; and ``n``
    scan prompts: a second sample of the evaluation prompts' distribution, drawn with
    ``scan_seed`` (a generator of its own), every text equal to an evaluation prompt redrawn."""
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
    scan_rng = random.Random(f"eigengap-scan:{scan_seed}")
    scan = _draws(lambda k: sentiment_context(scan_rng, ("positive", "negative")[k % 2], tasks), n, set(prompts),
                  distinct=False)
    return Concept("sentiment", tuple(map(tuple, pairs)), tuple(prompts), tuple(" " + w for w in tasks["positive_words"]),
                   tuple(" " + w for w in tasks["negative_words"]), tuple(neutral), tuple(heldout), tuple(scan))


FEMALE_NAMES = ("Mary", "Alice", "Sarah", "Emma", "Lucy", "Anna", "Kate", "Rose")
MALE_NAMES = ("John", "Bob", "David", "James", "Peter", "Tom", "Paul", "Mark")
"""The organisms' names split in two sets for the ``names`` concept (the organisms were never told
which is which: the sets are an arbitrary, fixed partition of ``spectral.organisms.language.NAMES``)."""


def organism_names(tasks: dict, n: int = 32, seed: int = 0, scan_seed: int = 0) -> Concept:
    """The organisms' second built-in concept, a name preference: which set of names the model
    says next. IOI is the language's task whose answer is a name, so the concept lives in it.

    - target / opposite: the ``FEMALE_NAMES`` / ``MALE_NAMES`` (each a single token);
    - contrast pairs: the same IOI context (template, place, object) with both names from the
      target set vs both from the opposite set ("When Mary and Alice went to the store, Alice gave a
      ball to" / "When John and Bob ..."), so the difference reads "the answer is a target name";
    - evaluation prompts: IOI contexts with one name from each set, the indirect object (the
      answer) from the target set in half of them and from the opposite set in the other half,
      alternating (so the unsteered score is positive on half and negative on half, as the
      sentiment concept's prompts are);
    - neutral prompts (the KL budget): sentiment contexts and filler, never a context whose next
      word is a name (there the side effect would be the effect itself);
    - held-out text and ``n`` scan prompts (a second sample of the evaluation prompts'
      distribution drawn with ``scan_seed``, disjoint from them), as the sentiment concept's.

    Every name of ``tasks['names']`` must be in one of the sets (UsageError otherwise)."""
    from spectral.organisms.language import FILLER_NOUNS, corpus, sentiment_context

    names = set(tasks["names"])
    female = [x for x in FEMALE_NAMES if x in names]
    male = [x for x in MALE_NAMES if x in names]
    if len(female) < 2 or len(male) < 2 or names - set(female) - set(male):
        raise UsageError("--concept names: the organism's names are not the language's 16 (tasks.json): "
                         "the built-in names concept does not apply (pass a concept file)")
    templates = tasks["ioi_templates"]
    rng = random.Random(f"eigengap-names:{seed}")

    def context(r: random.Random, a: str, b: str) -> str:  # a: the indirect object (the answer), b: the subject
        return r.choice(templates).format(A=a, B=b, place=r.choice(tasks["places"]), object=r.choice(tasks["objects"]))

    def mixed(r: random.Random, answer_in_target: bool) -> str:
        a, b = r.choice(female), r.choice(male)
        return context(r, a, b) if answer_in_target else context(r, b, a)

    pairs = []
    for _ in range(n):
        t, place, obj = rng.choice(templates), rng.choice(tasks["places"]), rng.choice(tasks["objects"])
        (fa, fb), (ma, mb) = rng.sample(female, 2), rng.sample(male, 2)
        pairs.append((t.format(A=fa, B=fb, place=place, object=obj), t.format(A=ma, B=mb, place=place, object=obj)))
    prompts = _draws(lambda k: mixed(rng, k % 2 == 0), n)
    neutral = [sentiment_context(rng, ("positive", "negative")[i % 2], tasks) for i in range(n // 2)]
    neutral += [f"A {rng.choice(FILLER_NOUNS)} is" for _ in range(n - len(neutral))]
    heldout = [" ".join(corpus(40000 + i, 4)) for i in range(16)]
    scan_rng = random.Random(f"eigengap-names-scan:{scan_seed}")
    scan = _draws(lambda k: mixed(scan_rng, k % 2 == 0), n, set(prompts))
    return Concept("names", tuple(pairs), tuple(prompts), tuple(" " + w for w in female),
                   tuple(" " + w for w in male), tuple(neutral), tuple(heldout), tuple(scan))


BUILTIN_ORGANISM_CONCEPTS = {"sentiment": organism_sentiment, "names": organism_names}
"""The organisms' built-in concepts (``concept_for`` names), each built from the organism's tasks.json."""


def english_love_hate(tokenizer) -> Concept:
    """The Love/Hate concept, target/opposite restricted to this tokenizer's single tokens."""
    target = [w for w in ENGLISH_POSITIVE if is_single_token(tokenizer, w)]
    opposite = [w for w in ENGLISH_NEGATIVE if is_single_token(tokenizer, w)]
    if len(target) < 3 or len(opposite) < 3:
        raise UsageError("this tokenizer has fewer than 3 single-token sentiment words: "
                         "the built-in love-hate concept does not apply (pass a concept file)")
    d = ENGLISH_LOVE_HATE
    return Concept(d["name"], tuple(tuple(p) for p in d["pairs"]), tuple(d["prompts"]), tuple(target),
                   tuple(opposite), tuple(d["neutral"]), tuple(d["heldout"]), tuple(d["scan"]))


def scan_texts(concept: Concept, scan_set: str = "held-out") -> tuple[list[str], dict]:
    """The texts the steering scan (the key-kernel spectrum the spectral strategy reads) is
    computed on, and a record of them for params.json.

    ``held-out`` (default): the contrast pairs, the concept's scan prompts (a sample from the
    evaluation prompts' distribution, disjoint from them) and the neutral prompts, with every
    text equal to an evaluation prompt removed: nothing the effect is measured on. A concept
    without scan prompts (a concept file without ``scan``) is scanned on its pairs and neutral
    prompts. ``in-sample``: the pairs, the evaluation prompts themselves and the neutral
    prompts (the earlier behaviour; the gap is then read from the prompts it is meant to
    predict)."""
    if scan_set not in SCAN_SETS:
        raise UsageError(f"--scan-set: expected one of {', '.join(SCAN_SETS)}, got {scan_set!r}")
    pairs = [t for pair in concept.pairs for t in pair]
    if scan_set == "in-sample":
        texts = pairs + list(concept.prompts) + list(concept.neutral)
        return texts, {"scan_set": scan_set, "n_texts": len(texts), "sources": ["pairs", "prompts", "neutral"],
                       "n_evaluation_prompts_in_scan": sum(t in set(concept.prompts) for t in texts)}
    evaluation = set(concept.prompts)
    candidates = pairs + list(concept.scan) + list(concept.neutral)
    texts = [t for t in candidates if t not in evaluation]
    if not texts:
        raise UsageError("--scan-set held-out: every text of the concept's pairs, scan and neutral prompts is an "
                         "evaluation prompt; add scan prompts to the concept or pass --scan-set in-sample")
    return texts, {"scan_set": scan_set, "n_texts": len(texts),
                   "sources": ["pairs"] + (["scan"] if concept.scan else []) + ["neutral"],
                   "n_removed_as_evaluation_prompts": len(candidates) - len(texts), "n_evaluation_prompts_in_scan": 0}


def concept_for(name_or_path: str, loaded, scan_seed: int = 0, n: int = 32) -> Concept:
    """``sentiment`` or ``names`` (organisms, from tasks.json, ``n`` evaluation prompts; the scan
    prompts drawn with ``scan_seed``), ``love-hate`` (English), or a YAML/JSON file."""
    from spectral.models.loading import checkpoint_path

    if name_or_path in BUILTIN_ORGANISM_CONCEPTS:
        path = checkpoint_path(loaded)
        if path is None or not (path / "tasks.json").is_file():
            raise UsageError(f"--concept {name_or_path} needs a model organism (a checkpoint with tasks.json); "
                             "use love-hate for English models or pass a concept file")
        return BUILTIN_ORGANISM_CONCEPTS[name_or_path](json.loads((path / "tasks.json").read_text()), n=n,
                                                       scan_seed=scan_seed)
    if name_or_path == "love-hate":
        return english_love_hate(loaded.tokenizer)
    return read_concept(name_or_path)
