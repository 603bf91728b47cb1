"""Head scores: repeated tokens, attention-pattern scores (against a plain reference on HF's own
eager attention), IOI role scores (against a plain per-example, per-head reference), classes."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from spectral.causal.tasks import Example, builtin_ioi, encode
from spectral.circuits.scores import (
    HEADS_SCHEMA, IOI_SCORES, LABELS, PATTERNS, THRESHOLDS, TOP_K, classify, head_score_table, ioi_scores,
    pattern_scores, pattern_scores_from_probs, repeated_tokens,
)
from spectral.errors import UsageError
from spectral.models.adapter import HeadAdapter


# --- repeated tokens ----------------------------------------------------------------------------

def test_repeated_tokens_are_seeded_distinct_repeats_without_excluded_ids():
    tokens = repeated_tokens(50, n=4, length=10, seed=3, exclude=(0, 1, 7))
    assert tokens.shape == (4, 20) and tokens.dtype == torch.long
    assert torch.equal(tokens[:, :10], tokens[:, 10:])
    for row in tokens[:, :10]:
        assert len(set(row.tolist())) == 10
    assert not set(tokens.flatten().tolist()) & {0, 1, 7}
    assert int(tokens.max()) < 50
    assert torch.equal(tokens, repeated_tokens(50, n=4, length=10, seed=3, exclude=(0, 1, 7)))
    assert not torch.equal(tokens, repeated_tokens(50, n=4, length=10, seed=4, exclude=(0, 1, 7)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=0, length=5), "n must be >= 1"),
    (dict(n=2, length=1), "length must be >= 3"),
    (dict(n=2, length=2), "length must be >= 3"),
    (dict(n=2, length=9), "exceeds the 8 usable"),
])
def test_repeated_tokens_bad_input_is_one_line(kwargs, message):
    with pytest.raises(UsageError, match=message) as err:
        repeated_tokens(10, seed=0, exclude=(0, 1), **kwargs)
    assert "\n" not in str(err.value)


# --- attention-pattern scores -------------------------------------------------------------------

def _pattern(length: int, key_of) -> torch.Tensor:
    """(2T, 2T) attention putting all of query i's weight on key_of(i) (on key 0 where that is < 0)."""
    a = torch.zeros(2 * length, 2 * length)
    for i in range(2 * length):
        a[i, max(key_of(i), 0)] = 1.0
    return a


def test_hand_made_patterns_score_one_on_their_own_pattern_and_zero_elsewhere():
    t = 6
    probs = torch.stack([_pattern(t, lambda i: i - 1), _pattern(t, lambda i: i - t),
                         _pattern(t, lambda i: i - t + 1), _pattern(t, lambda i: i)])[None]  # (1, head, q, k)
    scores = pattern_scores_from_probs(probs, t)
    expected = {"previous_token": [1, 0, 0, 0], "duplicate_token": [0, 1, 0, 0], "induction": [0, 0, 1, 0]}
    for name in PATTERNS:
        np.testing.assert_array_equal(scores[name], expected[name])
    half = 0.5 * probs[:, 0] + 0.5 * probs[:, 2]  # half previous-token, half induction
    mixed = pattern_scores_from_probs(half[:, None], t)
    assert mixed["previous_token"][0] == pytest.approx(0.5) and mixed["induction"][0] == pytest.approx(0.5)


def reference_pattern_scores(model, tokens: torch.Tensor) -> dict[str, np.ndarray]:
    """Plainly: HF's own eager attention, one sequence at a time, loops over layers, heads and
    second-copy query positions i = T..2T-1, keys i-1, i-T and i-(T-1)."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    t = tokens.shape[1] // 2
    num = {name: np.zeros((layers, heads)) for name in PATTERNS}
    den = np.zeros((layers, heads))
    for row in tokens:
        with torch.no_grad():
            attentions = eager(input_ids=row[None], output_attentions=True).attentions
        for layer in range(layers):
            a = attentions[layer][0].tolist()  # [head][q][k]
            for head in range(heads):
                for i in range(t, 2 * t):
                    den[layer, head] += sum(a[head][i])
                    num["previous_token"][layer, head] += a[head][i][i - 1]
                    num["duplicate_token"][layer, head] += a[head][i][i - t]
                    num["induction"][layer, head] += a[head][i][i - (t - 1)]
    return {name: num[name] / den for name in PATTERNS}


def test_pattern_scores_match_the_plain_reference(tiny):
    tokens = repeated_tokens(len(tiny.tokenizer), n=3, length=7, seed=1, exclude=tiny.tokenizer.all_special_ids)
    got = pattern_scores(HeadAdapter(tiny.model), tokens, batch_size=2)  # batches of 2 and 1
    want = reference_pattern_scores(tiny.model, tokens)
    for name in PATTERNS:
        assert got[name].dtype == np.float64 and got[name].shape == (3, 4)
        np.testing.assert_allclose(got[name], want[name], atol=1e-6, rtol=0)


def test_pattern_scores_refuse_rows_that_are_not_repeats(neox):
    tokens = repeated_tokens(200, n=2, length=5, seed=0)
    tokens[1, 7] += 1
    with pytest.raises(UsageError, match="not"):
        pattern_scores(HeadAdapter(neox.model), tokens)


# --- IOI role scores ----------------------------------------------------------------------------

TEMPLATES = ("When {A} and {B} went to the store, {B} gave a drink to",
             "Then {B} and {A} met at the old park. {B} threw the ball to")
NAMES = "JKLMPQRSTXYZ"


def letter_ioi(n: int) -> list[Example]:
    """IOI with one-letter names, single tokens in the tiny models' byte tokenizer; the two
    templates differ in length (padding)."""
    out = []
    for i in range(n):
        a, b, c = NAMES[i % 12], NAMES[(i + 5) % 12], NAMES[(i + 9) % 12]
        t = TEMPLATES[i % 2]
        head, _, tail = t.rpartition("{B}")
        out.append(Example(t.format(A=a, B=b), (head + c + tail).format(A=a, B=b), a, b))
    return out


def reference_ioi_scores(loaded, task) -> dict[str, np.ndarray]:
    """Plainly, one example at a time: HF's eager attention from the final position to the IO;
    the value at the IO through the head's columns of W_O (the family's layout written out),
    the final norm's formula with the final residual's scale, W_U; top-k by torch.topk."""
    model, family = loaded.model, HeadAdapter(loaded.model).family.name
    adapter = HeadAdapter(model)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    layers, heads, d_head = adapter.n_layers, adapter.n_heads, adapter.d_head
    norm = model.get_submodule(adapter.family.final_norm)
    w_u = model.get_output_embeddings().weight.float()  # (vocab, d_model)
    names = sorted(set(task.answer.tolist()) | set(task.distractor.tolist()))
    sums = {k: np.zeros((layers, heads)) for k in IOI_SCORES}
    for e in range(len(task)):
        last = int(task.last[e])
        ids = task.clean[e:e + 1, :last + 1]
        io_pos = [p for p in range(last) if int(ids[0, p]) == int(task.answer[e])]
        with torch.no_grad():
            attentions = eager(input_ids=ids, output_attentions=True).attentions
        run = adapter.run(ids, sites=["values", "resid_post"])
        resid = run[(layers - 1, "resid_post")][0, last].float()
        for layer in range(layers):
            w_o = getattr(adapter.attentions[layer], adapter.family.out_proj).weight.float()
            for head in range(heads):
                sums["name_mover_attention"][layer, head] += sum(float(attentions[layer][0, head, last, p]) for p in io_pos)
                v = sum(run[(layer, "values")][0, p, head].float() for p in io_pos) / len(io_pos)
                cols = slice(head * d_head, (head + 1) * d_head)
                write = v @ w_o[cols, :] if family == "gpt2" else w_o[:, cols] @ v  # Conv1D vs Linear
                if family == "llama":
                    y = write / torch.sqrt(resid.pow(2).mean() + norm.variance_epsilon)
                else:
                    y = (write - write.mean()) / torch.sqrt(resid.var(unbiased=False) + norm.eps)
                logits = w_u @ (y * norm.weight.float())
                io = int(task.answer[e])
                sums["copy_score"][layer, head] += io in torch.topk(logits, TOP_K).indices.tolist()
                sums["negative_copy_score"][layer, head] += io in torch.topk(-logits, TOP_K).indices.tolist()
                sums["copy_logit"][layer, head] += float(logits[io] - logits[names].mean())
    return {k: v / len(task) for k, v in sums.items()}


def test_ioi_scores_match_the_plain_reference(tiny):
    task = encode(tiny.tokenizer, letter_ioi(6))
    assert len(set(task.last.tolist())) == 2  # padded batch
    got = ioi_scores(HeadAdapter(tiny.model), task, batch_size=4)  # batches of 4 and 2
    want = reference_ioi_scores(tiny, task)
    for name in IOI_SCORES:
        assert got[name].dtype == np.float64 and got[name].shape == (3, 4)
        np.testing.assert_allclose(got[name], want[name], atol=1e-6, rtol=0, err_msg=name)
    assert np.abs(got["copy_logit"]).max() > 1e-3  # not trivially zero


def test_ioi_scores_match_the_plain_reference_on_the_organism(organism):
    """The trained organism copies names: the top-k fractions are neither all 0 nor all 1 here."""
    task = encode(organism.tokenizer, builtin_ioi(organism, 8, 1))
    got = ioi_scores(HeadAdapter(organism.model), task, batch_size=3)
    want = reference_ioi_scores(organism, task)
    for name in IOI_SCORES:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=0, err_msg=name)
    assert 0 < got["copy_score"].max() and got["copy_score"].min() < 1
    assert 0 < got["negative_copy_score"].max() and got["copy_logit"].min() < 0 < got["copy_logit"].max()


@pytest.mark.parametrize("clean, answer, distractor, message", [
    ("When J and K went to the store, L gave a drink to", "J", "K", "does not occur twice"),
    ("When J and K went to the store, K gave a drink to", "M", "K", "does not occur before"),
])
def test_ioi_scores_refuse_examples_without_ioi_roles(neox, clean, answer, distractor, message):
    task = encode(neox.tokenizer, [letter_ioi(1)[0], Example(clean, clean, answer, distractor)])
    with pytest.raises(UsageError, match=f"example 2: .*{message}") as err:
        ioi_scores(HeadAdapter(neox.model), task)
    assert "\n" not in str(err.value)


# --- classes ------------------------------------------------------------------------------------

def test_classify_applies_the_thresholds_and_the_priority():
    z = np.zeros((1, 7))
    scores = {"previous_token": np.array([[0.6, 0.6, 0.0, 0.0, 0.0, np.nan, 0.49]]),
              "duplicate_token": z.copy(), "induction": np.array([[0.0, 0.7, 0.0, 0.0, 0.0, 0.0, 0.0]]),
              "name_mover_attention": np.array([[0.0, 0.0, 0.5, 0.5, 0.1, 0.0, 0.0]]),
              "copy_score": np.array([[0.0, 0.0, 0.9, 0.0, 0.9, 0.0, 0.0]]),
              "negative_copy_score": np.array([[0.0, 0.0, 0.0, 0.8, 0.0, 0.0, 0.0]]),
              "copy_logit": np.array([[0.0, 0.0, 2.0, -3.0, 2.0, 0.0, 0.0]])}
    labels = classify(scores)
    assert labels.tolist() == [["previous_token", "induction", "name_mover", "negative_name_mover",
                                "other", "other", "other"]]
    s_inhibition = np.array([[True, True, False, False, False, False, False]])
    labels = classify(scores, {"s_inhibition": s_inhibition})
    assert labels[0, :2].tolist() == ["s_inhibition", "s_inhibition"]
    pattern_only = {k: scores[k] for k in PATTERNS}
    assert classify(pattern_only)[0, 2] == "other"  # no IOI scores: no IOI class
    assert THRESHOLDS.pattern == 0.5 and set(labels.ravel()) <= set(LABELS)
    with pytest.raises(ValueError, match="unknown extra class"):
        classify(scores, {"mover": s_inhibition})


# --- the table, on the trained organism ---------------------------------------------------------

def test_head_table_on_the_organism(organism):
    table = head_score_table(organism, n=32, length=16, seed=0, ioi_examples=builtin_ioi(organism, 32, 0))
    assert table.schema == HEADS_SCHEMA
    layers, heads = organism.model.config.num_hidden_layers, organism.model.config.num_attention_heads
    assert table.num_rows == layers * heads
    cols = table.to_pydict()
    assert cols["layer"] == [l for l in range(layers) for _ in range(heads)]
    for name in (*PATTERNS, "name_mover_attention", "copy_score", "negative_copy_score"):
        values = np.array(cols[name])
        assert np.all(np.isfinite(values)) and values.min() >= 0 and values.max() <= 1 + 1e-9, name
    assert np.all(np.isfinite(cols["copy_logit"]))
    assert set(cols["label"]) <= set(LABELS)
    print()
    for layer in range(layers):
        rows = [i for i, l in enumerate(cols["layer"]) if l == layer]
        best = {name: max(cols[name][i] for i in rows) for name in (*PATTERNS, "name_mover_attention", "copy_score")}
        print(f"organism-xs layer {layer}: max " + ", ".join(f"{k} {v:.3f}" for k, v in best.items())
              + f"; labels {[cols['label'][i] for i in rows]}")


def test_head_table_without_ioi_has_null_ioi_columns(neox):
    table = head_score_table(neox, n=2, length=5, seed=0)
    assert table.schema == HEADS_SCHEMA and table.num_rows == 12
    assert all(table.column(name).null_count == 12 for name in IOI_SCORES)
    assert all(not math.isnan(x) for x in table.column("induction").to_pylist())


def test_head_table_refuses_sequences_longer_than_the_model_or_the_pool(organism):
    limit = organism.model.config.max_position_embeddings
    with pytest.raises(UsageError, match="exceeds the model's"):
        head_score_table(organism, n=1, length=limit // 2 + 1)
    with pytest.raises(UsageError, match="exceeds the 4 usable"):
        head_score_table(organism, n=1, length=5, token_pool=[10, 11, 12, 13])
    assert head_score_table(organism, n=2, length=4, token_pool=[10, 11, 12, 13]).num_rows == 16
