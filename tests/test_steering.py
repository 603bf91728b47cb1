"""Steering: vectors against the model's own hidden states, injection correctness, the
strategies' rules, the matched budget, concept files, the steer job (local, Ray, bad input)."""

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from jobs.cli import main
from spectral.adapter import HeadAdapter
from spectral.errors import UsageError
from spectral.steering import Batch, Injection, concept_from_dict, next_token_logprobs, read_concept, steering_vectors
from spectral.strategies import layer_gaps, match_budget, profiles, spectral_profile

PAIRS = [("I like it a lot", "I do not like it"), ("good day", "bad day")]


def test_vectors_are_differences_of_the_models_hidden_states(tiny):
    adapter = HeadAdapter(tiny.model)
    vectors = steering_vectors(adapter, tiny.tokenizer, PAIRS, range(adapter.n_layers))
    for layer in range(adapter.n_layers):
        diffs = []
        for pos, neg in PAIRS:
            states = []
            for text in (pos, neg):
                ids = torch.tensor([tiny.tokenizer(text, add_special_tokens=False)["input_ids"]])
                with torch.no_grad():
                    hs = tiny.model(input_ids=ids, output_hidden_states=True).hidden_states
                states.append(hs[layer][0, -1])  # the input of block `layer` at the last token
            diffs.append(states[0] - states[1])
        torch.testing.assert_close(vectors[layer], torch.stack(diffs).mean(0), rtol=1e-5, atol=1e-5)


def residuals(adapter, batch, injection=None):
    out = {}
    edits = injection.edits(batch.last) if injection is not None else {}
    with torch.no_grad(), adapter.trace(["resid_post"], lambda l, s, t: out.__setitem__(l, t.clone()), edits=edits):
        adapter.model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False)
    return out


def test_injection_zero_changes_nothing_and_earlier_layers_stay_untouched(tiny):
    adapter = HeadAdapter(tiny.model)
    batch = Batch.of(tiny.tokenizer, ["When Mary and John went", "The quick brown fox jumps"])
    vectors = {l: torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(l)) for l in range(adapter.n_layers)}
    base = residuals(adapter, batch)
    zero = Injection({1: torch.zeros(adapter.d_model)}, {1: 5.0})
    torch.testing.assert_close(next_token_logprobs(adapter, batch, zero), next_token_logprobs(adapter, batch), rtol=0, atol=0)
    for layer in range(adapter.n_layers):
        steered = residuals(adapter, batch, Injection(vectors, {layer: 3.0}))
        for l in range(adapter.n_layers):
            if l < layer:
                assert torch.equal(steered[l], base[l]), (layer, l)
            else:
                assert not torch.allclose(steered[l], base[l]), (layer, l)
    # positions="last": every earlier position of every layer is untouched (causal model)
    steered = residuals(adapter, batch, Injection(vectors, {0: 3.0}, positions="last"))
    for l in range(adapter.n_layers):
        for row in range(2):
            last = int(batch.last[row])
            torch.testing.assert_close(steered[l][row, :last], base[l][row, :last], rtol=0, atol=0)
            assert not torch.allclose(steered[l][row, last], base[l][row, last])


def test_vectors_read_at_a_token_index_or_the_mean_and_injected_at_one_position(neox):
    adapter = HeadAdapter(neox.model)
    pairs = [("abcdef", "abxdef")]  # differ from position 2 on
    at1 = steering_vectors(adapter, neox.tokenizer, pairs, [1], at=1)
    assert torch.count_nonzero(at1[1]) == 0  # before the difference the two runs agree (causal)
    at2 = steering_vectors(adapter, neox.tokenizer, pairs, [1], at=2)
    mean = steering_vectors(adapter, neox.tokenizer, pairs, [1], at="mean")
    assert torch.count_nonzero(at2[1]) > 0 and torch.count_nonzero(mean[1]) > 0
    with pytest.raises(UsageError, match="position 9 is past the end"):
        steering_vectors(adapter, neox.tokenizer, pairs, [1], at=9)
    batch = Batch.of(neox.tokenizer, ["hello world", "abcdefgh"])
    base = residuals(adapter, batch)
    steered = residuals(adapter, batch, Injection({0: at2[1]}, {0: 3.0}, positions=3))
    for l in range(adapter.n_layers):  # positions before 3 untouched, position 3 moved
        torch.testing.assert_close(steered[l][:, :3], base[l][:, :3], rtol=0, atol=0)
        assert not torch.allclose(steered[l][:, 3], base[l][:, 3])


def test_negative_coefficients_steer_the_other_way(neox):
    adapter = HeadAdapter(neox.model)
    batch = Batch.of(neox.tokenizer, ["abc", "hello"])
    v = {1: torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(0))}  # not constant: LayerNorm removes that
    base = next_token_logprobs(adapter, batch)
    up, down = (next_token_logprobs(adapter, batch, Injection(v, {1: c})) for c in (2.0, -2.0))
    assert not torch.allclose(up, base) and not torch.allclose(down, base) and not torch.allclose(up, down)
    with pytest.raises(UsageError, match="coefficient of layer 1 is not finite"):
        Injection(v, {1: math.inf})


def test_spectral_rule():
    gaps = {0: (0.9, 0.95), 1: (0.2, 0.6), 2: (0.5, 0.7), 3: (0.2, 0.5), 4: (0.8, 0.9), 5: (0.4, 0.8)}
    # k = ceil(6 / 3) = 2 weakest layers by min gap; tie at 0.2 broken by mean gap (layer 3 first)
    assert spectral_profile(gaps) == {1: 0.5, 3: 0.5}
    prof = spectral_profile(gaps, k=3)
    assert list(prof) == [1, 3, 5]
    inv = {1: 5.0, 3: 5.0, 5: 2.5}
    assert prof == pytest.approx({l: inv[l] / 12.5 for l in inv})
    p = profiles(6, baseline_layer=2, gaps=gaps, seed=0)
    assert p["baseline"] == {2: 1.0} and p["all"] == {l: 1 / 6 for l in range(6)} and len(p["random"]) == 1
    assert p["random"] == profiles(6, baseline_layer=2, gaps=gaps, seed=0)["random"]
    with pytest.raises(UsageError, match="--layer: layer 6 out of range"):
        profiles(6, baseline_layer=6, gaps=gaps)
    assert layer_gaps([{"layer": 0, "gap": 0.5}, {"layer": 0, "gap": 0.3}, {"layer": 1, "gap": float("nan")},
                       {"layer": 1, "gap": 0.9}]) == {0: (0.3, 0.4), 1: (0.9, 0.9)}


def test_match_budget_finds_the_scale():
    calls = []

    def kl(s):
        calls.append(s)
        return 0.01 * s ** 2

    scale, value = match_budget(kl, 0.5)
    assert value == pytest.approx(0.5, rel=0.02) and scale == pytest.approx(math.sqrt(50), rel=0.01)
    with pytest.raises(ValueError, match="stays below the budget"):
        match_budget(lambda s: 0.0, 0.1)


GOOD_CONCEPT = {"name": "c", "pairs": [["a", "b"]], "prompts": ["x"], "target": ["y"], "opposite": ["z"], "neutral": ["q"]}


@pytest.mark.parametrize("change, message", [
    ({"pairs": None}, "missing field 'pairs'"),
    ({"pairs": [["a"]]}, "field 'pairs' must be a non-empty list of [positive, negative] string pairs"),
    ({"target": []}, "field 'target' is empty"),
    ({"extra": 1}, "unknown field 'extra'"),
])
def test_concept_validation(change, message):
    data = {**GOOD_CONCEPT, **change}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        concept_from_dict(data, "f.yaml")


def test_concept_file_round_trip(tmp_path):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(GOOD_CONCEPT))
    assert read_concept(path).pairs == (("a", "b"),)
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(UsageError, match="bad.json: not valid JSON"):
        read_concept(bad)


def steer_args(model, out, *extra):
    return ["steer", "--model", str(model), "--out", str(out), "--grid=-2,2,6", "--generate-tokens", "3", *extra]


@pytest.fixture(scope="module")
def steer_local(organism_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("steer") / "local"
    assert main(steer_args(organism_cache, out)) == 0
    return out


def test_sentiment_vector_moves_the_organism(steer_local):
    """Ground truth: the organism's sentiment vector moves log P(positive) - log P(negative)
    with an interval excluding 0 at some layer, at the baseline's side-effect budget."""
    layers = pq.read_table(steer_local / "layers.parquet").to_pylist()
    assert len(layers) == 2
    assert any(r["effect_low"] > 0 for r in layers), layers
    strategies = {r["strategy"]: r for r in pq.read_table(steer_local / "strategies.parquet").to_pylist()}
    assert set(strategies) == {"baseline", "oracle", "random", "spectral", "all"}
    params = json.loads((steer_local / "params.json").read_text())
    for name, r in strategies.items():  # matched budget: every strategy spends the same KL
        assert r["kl"] == pytest.approx(params["budget_kl"], rel=0.03), name
        assert 0 <= r["greedy_fraction"] <= 1
    grid = pq.read_table(steer_local / "grid.parquet")
    assert grid.num_rows == 2 * 3
    verdicts = {r["name"]: r for r in pq.read_table(steer_local / "verdicts.parquet").to_pylist()}
    v = verdicts["improvement of spectral over baseline (mean effect)"]
    assert v["target"] == 0.25 and v["verdict"] in ("PASS", "FAIL", "INCONCLUSIVE")
    for name in ("report.md", "effect_by_layer.png", "effect_vs_side_effect.png"):
        assert (steer_local / name).stat().st_size > 0


def test_steer_on_ray_equals_local(organism_cache, steer_local, tmp_path, ray_cluster):
    out = tmp_path / "ray"
    assert main(steer_args(organism_cache, out, "--executor", "ray", "--workers", "2")) == 0
    for name in ("strategies.parquet", "grid.parquet", "layers.parquet", "per_prompt.parquet"):
        local, remote = pq.read_table(steer_local / name), pq.read_table(out / name)
        assert local.column_names == remote.column_names
        for col in local.column_names:
            a, b = local[col].to_pylist(), remote[col].to_pylist()
            if isinstance(a[0], float):
                np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-9, err_msg=f"{name}:{col}")
            else:
                assert a == b, f"{name}:{col}"


@pytest.mark.parametrize("concept, extra, message", [
    ({**GOOD_CONCEPT, "target": [" good", " xyzzy"]}, [], "target word ' xyzzy' is not in the vocabulary"),
    ({**GOOD_CONCEPT, "target": [" good bad"]}, [], "target word ' good bad' is 2 tokens, not one"),
    ({**GOOD_CONCEPT, "target": [" good"], "opposite": [" bad"], "prompts": ["I hate the qqq"]}, [],
     "has words that are not in the vocabulary"),
    (None, ["--layer", "9"], "--layer: layer 9 out of range (the model has layers 0..1)"),
    (None, ["--coefficient", "inf"], "--coefficient: Value error, coefficient inf is not finite"),
    (None, ["--positions", "middle"], "--positions: expected all or last or a token index >= 0, got 'middle'"),
    ({k: v for k, v in GOOD_CONCEPT.items() if k != "neutral"}, [], "missing field 'neutral'"),
])
def test_steer_bad_input(organism_cache, tmp_path, capsys, concept, extra, message):
    args = steer_args(organism_cache, tmp_path / "out", *extra)
    if concept is not None:
        path = tmp_path / "concept.json"
        path.write_text(json.dumps(concept))
        args += ["--concept", str(path)]
    assert main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not progress bars
    assert len(errors) == 1 and errors[0].startswith("eigengap steer: error: "), errors
    assert message.removeprefix("--coefficient: Value error, ") in errors[0]
    assert not (tmp_path / "out").exists()


def test_english_love_hate_keeps_single_known_tokens(organism, neox):
    from spectral.concepts import english_love_hate

    concept = english_love_hate(organism.tokenizer)  # a word-level vocabulary with some of the words
    assert concept.target == (" good", " great", " happy", " wonderful", " love", " nice")
    assert concept.opposite == (" bad", " terrible", " sad", " awful", " hate", " ugly")
    with pytest.raises(UsageError, match="fewer than 3 single-token sentiment words"):
        english_love_hate(neox.tokenizer)  # byte-level: no word is one token
