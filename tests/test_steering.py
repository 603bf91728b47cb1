"""Steering: vectors against the model's own hidden states, injection correctness, the
strategies' rules, the matched budget, concept files, the held-out scan, the comparison's
statistics and verdicts (issue 12), the steer job (local, Ray, bad input)."""

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from jobs.cli import main
from spectral.models.adapter import HeadAdapter
from spectral.errors import UsageError
from spectral.steering.concepts import concept_from_dict, read_concept
from spectral.steering.injection import Injection
from spectral.steering.measure import next_token_logprobs
from spectral.steering.vectors import Batch, steering_vectors
from spectral.steering.strategies import (MIN_RANDOM_DRAWS, STRATEGIES, arms, layer_gaps, match_budget, oracle_arms,
                                 oracle_profile, spectral_profile)

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
    with pytest.raises(UsageError, match="--layer: layer 6 out of range"):
        arms(6, baseline_layer=6, gaps=gaps, families=STRATEGIES)
    assert layer_gaps([{"layer": 0, "gap": 0.5}, {"layer": 0, "gap": 0.3}, {"layer": 1, "gap": float("nan")},
                       {"layer": 1, "gap": 0.9}]) == {0: (0.3, 0.4), 1: (0.9, 0.9)}


GAPS6 = {0: (0.9, 0.95), 1: (0.2, 0.6), 2: (0.5, 0.7), 3: (0.2, 0.5), 4: (0.8, 0.9), 5: (0.4, 0.8)}


def test_strategies_are_compared_at_equal_numbers_of_layers():
    """Issue 12, defect 4 (b, c): the spectral rule's k = ceil(L/3) layers are compared with a
    random control at the same k (>= 20 seeded draws, the spectral weights in random order)
    and an oracle at k; the 1-layer spectral choice is its own row, beside the 1-layer baseline."""
    rows = {a.name: a for a in arms(6, baseline_layer=2, gaps=GAPS6, families=STRATEGIES, seed=0)}
    assert set(rows) == {"baseline", "spectral-1", "random-1", "spectral", "random", "all"}
    assert rows["baseline"].k == rows["spectral-1"].k == rows["random-1"].k == 1
    assert rows["spectral-1"].profiles == ({3: 1.0},)  # the single weakest layer (tie at 0.2 broken by mean gap)
    assert rows["spectral"].k == rows["random"].k == 2 and rows["all"].k == 6
    for name, k in (("random", 2), ("random-1", 1)):
        draws = rows[name].profiles
        assert len(draws) == MIN_RANDOM_DRAWS
        assert all(len(p) == k for p in draws)
        assert all(sorted(p.values()) == sorted(rows["spectral" if k == 2 else "spectral-1"].profiles[0].values())
                   for p in draws)
        assert len({tuple(sorted(p)) for p in draws}) > 1  # not one draw repeated
    again = {a.name: a for a in arms(6, baseline_layer=2, gaps=GAPS6, families=STRATEGIES, seed=0)}
    assert again["random"].profiles == rows["random"].profiles  # seeded
    assert arms(6, baseline_layer=2, gaps=GAPS6, families=STRATEGIES, seed=1)[2].profiles != rows["random-1"].profiles
    with pytest.raises(UsageError, match="--random-draws: at least 20 draws"):
        arms(6, baseline_layer=2, gaps=GAPS6, families=STRATEGIES, draws=1)
    # k = 1 (2 or 3 layers): no duplicate 1-layer rows
    two = arms(2, baseline_layer=1, gaps={0: (0.5, 0.6), 1: (0.4, 0.7)}, families=STRATEGIES)
    assert [(a.name, a.k) for a in two] == [("baseline", 1), ("spectral", 1), ("random", 1), ("all", 2)]


def test_oracle_chooses_on_selection_effects_at_each_k():
    effects = {0: 1.0, 1: 3.0, 2: 2.0, 3: 0.0, 4: 2.0, 5: -1.0}
    assert oracle_profile(effects, [1.0]) == {1: 1.0}
    assert oracle_profile(effects, [0.3, 0.7]) == {1: 0.7, 2: 0.3}  # ties: the lower layer; best layer, largest weight
    o = {a.name: a for a in oracle_arms(6, GAPS6, effects)}
    assert o["oracle-1"].profiles == ({1: 1.0},) and o["oracle"].profiles == ({1: 0.5, 2: 0.5},)


def test_match_budget_finds_the_scale():
    calls = []

    def kl(s):
        calls.append(s)
        return 0.01 * s ** 2

    scale, value = match_budget(kl, 0.5)
    assert value == pytest.approx(0.5, rel=0.02) and scale == pytest.approx(math.sqrt(50), rel=0.01)
    with pytest.raises(ValueError, match="stays below the budget"):
        match_budget(lambda s: 0.0, 0.1)


# --- the comparison's statistics and verdicts, on per-prompt effects made up here -------------------
def _run(profile, effects):
    return {"profile": profile, "scale": 1.0, "effect": list(map(float, effects)), "kl": [0.25] * 4, "loss_increase": []}


def _verdicts(spectral, baseline, *, spectral_layer=0, baseline_layer=1, n=32):
    """Verdict rows of a 1-layer spectral choice against the baseline; effects on every prompt."""
    from analysis.steering import selection_split, strategy_rows

    split = selection_split(n, 0.5, 0)
    arms_ = [{"name": "baseline", "family": "baseline", "k": 1, "runs": [_run({baseline_layer: 1.0}, baseline)]},
             {"name": "spectral", "family": "spectral", "k": 1, "runs": [_run({spectral_layer: 1.0}, spectral)]}]
    tables = strategy_rows(arms_, {}, [], {0: (0.3, 0.5), 1: (0.6, 0.7)}, split)
    return {r["key"]: r for r in tables["verdicts"].to_pylist()}, tables


def test_ratio_is_undefined_when_the_baseline_does_not_steer_and_the_verdict_rests_on_the_difference():
    """Issue 12, defect 2: 'the spectral rule beats the baseline by +5.40 [4.36, 6.44] yet reads
    improvement -8.9 [-78.9, 80.8]'. A baseline whose effect interval reaches 0 makes the ratio
    undefined (NaN, said so), never a number; the difference carries the verdict."""
    rng = np.random.default_rng(0)
    prompt = rng.normal(0, 1.0, 32)
    baseline = prompt - prompt.mean() - 0.6 + rng.normal(0, 0.5, 32)  # mean -0.6, interval reaching 0
    spectral = baseline + 5.4 + rng.normal(0, 1.0, 32)
    v, _ = _verdicts(spectral, baseline)
    imp, diff = v["steering_improvement"], v["steering_difference"]
    assert math.isnan(imp["value"]) and math.isnan(imp["low"]) and math.isnan(imp["high"])
    assert imp["verdict"] == "INCONCLUSIVE" and "undefined" in imp["note"]
    assert diff["verdict"] == "PASS" and 4 < diff["low"] < diff["value"] < diff["high"] < 7
    assert imp["name"].startswith("improvement of spectral over baseline")  # the prefix earlier readers match


def test_same_layer_is_no_forced_fail_when_the_baseline_does_not_steer():
    """Issue 12, defect 4 (a): the baseline-above-zero guard comes before the same-layer check:
    a spectral choice equal to the baseline's layer with a baseline that does not steer is
    INCONCLUSIVE (it was a forced FAIL); with a baseline that steers it FAILs by construction."""
    rng = np.random.default_rng(1)
    flat = rng.normal(0, 1, 32)
    v, _ = _verdicts(flat, flat, spectral_layer=1, baseline_layer=1)
    assert v["steering_improvement"]["verdict"] == "INCONCLUSIVE"
    assert v["steering_difference"]["verdict"] == "INCONCLUSIVE"
    assert v["steering_improvement"]["by_construction"]
    steers = 3 + rng.normal(0, 1, 32)
    v, _ = _verdicts(steers, steers, spectral_layer=1, baseline_layer=1)
    assert v["steering_improvement"]["verdict"] == "FAIL" and v["steering_difference"]["verdict"] == "FAIL"
    assert "by construction" in v["steering_improvement"]["note"]


@pytest.mark.parametrize("factor, noise, expected", [(2.0, 0.3, "PASS"), (1.0, 0.3, "FAIL"), (0.5, 0.3, "FAIL"),
                                                     (1.1, 0.3, "FAIL"), (1.25, 1.0, "INCONCLUSIVE")])
def test_improvement_rule(factor, noise, expected):
    """PASS needs a defined ratio whose interval lies above 0.25 and a positive difference; FAIL
    when an improvement of 25 % is excluded (also a real but smaller one); near the target
    with noisy prompts the data cannot decide."""
    rng = np.random.default_rng(2)
    prompt = rng.normal(0, 1, 32)
    baseline = 4 + prompt + rng.normal(0, noise, 32)
    extra = rng.normal(0, noise, 32)
    extra[_heldout()] -= extra[_heldout()].mean()  # the held-out ratio is exactly the factor
    spectral = factor * baseline + extra
    v, _ = _verdicts(spectral, baseline)
    imp = v["steering_improvement"]
    assert imp["verdict"] == expected, imp
    assert imp["value"] == pytest.approx(np.mean(spectral[_heldout()]) / np.mean(baseline[_heldout()]) - 1)
    assert imp["low"] < imp["value"] < imp["high"]


def _heldout(n=32):
    from analysis.steering import selection_split

    return list(selection_split(n, 0.5, 0).heldout)


def test_fieller_interval_agrees_with_the_margin_contrast():
    """The improvement's interval lies above 0.25 exactly when spectral - 1.25 x baseline lies above 0."""
    from analysis.steering import Comparison

    rng = np.random.default_rng(3)
    for _ in range(50):
        prompt = rng.normal(0, 1, 16)
        b = 3 + prompt + rng.normal(0, 1, 16)
        s = rng.uniform(2.5, 6) + prompt + rng.normal(0, 1, 16)
        cmp = Comparison.of({"s": s[None], "b": b[None]}, n_resamples=500)
        ratio, margin = cmp.ratio("s", "b"), cmp.contrast({"s": 1.0, "b": -1.25})
        if np.isfinite(ratio.low):
            assert (ratio.low > 1.25) == (margin.low > 0) and (ratio.high < 1.25) == (margin.high < 0)
            assert ratio.low <= ratio.value <= ratio.high


def test_every_effect_is_on_the_held_out_split_and_the_oracle_chooses_on_the_selection_split():
    """Issue 12, defect 4 (d): the oracle's layer is chosen on the selection prompts and scored
    on the held-out ones; every reported effect is the held-out mean."""
    from analysis.steering import selection_split, strategy_rows

    split = selection_split(32, 0.5, 0)
    sel, held = list(split.selection), list(split.heldout)
    assert sorted(sel + held) == list(range(32)) and not set(sel) & set(held)
    lucky, steady = np.full(32, 1.0), np.full(32, 2.0)
    lucky[sel] = 5.0  # best on the selection prompts only
    steady += np.random.default_rng(4).normal(0, 0.1, 32)
    lucky += np.random.default_rng(5).normal(0, 0.1, 32)
    layer_runs = {0: _run({0: 1.0}, lucky), 1: _run({1: 1.0}, steady)}
    chosen = oracle_arms(2, {0: (0.5, 0.6), 1: (0.4, 0.7)}, {l: float(np.mean(np.asarray(r["effect"])[sel]))
                                                            for l, r in layer_runs.items()})
    assert chosen[0].profiles == ({0: 1.0},)
    arms_ = [{"name": "spectral", "family": "spectral", "k": 1, "runs": [layer_runs[1]]},
             {"name": "oracle", "family": "oracle", "k": 1, "runs": [layer_runs[0]]}]
    tables = strategy_rows(arms_, layer_runs, [], {0: (0.5, 0.6), 1: (0.4, 0.7)}, split)
    rows = {r["strategy"]: r for r in tables["strategies"].to_pylist()}
    assert rows["oracle"]["effect"] == pytest.approx(lucky[held].mean())  # about 1, not the selection's 5
    assert rows["spectral"]["effect"] == pytest.approx(steady[held].mean())
    layers = {r["layer"]: r for r in tables["layers"].to_pylist()}
    assert layers[0]["effect_selection"] == pytest.approx(lucky[sel].mean())
    lost = {r["key"]: r for r in tables["verdicts"].to_pylist()}["layer_choice"]
    assert lost["value"] < 0  # on held-out prompts the spectral layer beats the oracle's lucky pick
    pp = tables["per_prompt"].to_pylist()
    assert {r["split"] for r in pp if r["prompt"] in held} == {"heldout"}
    with pytest.raises(ValueError, match="each part needs at least 2"):
        selection_split(3, 0.5, 0)


def test_split_is_stratified_and_seeded():
    from analysis.steering import selection_split

    strata = np.arange(32) % 2  # positive and negative contexts alternate
    split = selection_split(32, 0.5, 7, strata)
    assert sum(strata[list(split.heldout)]) == 8 and len(split.heldout) == 16
    assert selection_split(32, 0.5, 7, strata) == split and selection_split(32, 0.5, 8, strata) != split


def test_random_control_interval_resamples_draws_and_prompts():
    """Issue 12, defect 4 (b): the random row is the mean over draws x prompts, and its interval
    widens with the spread between draws (one seeded draw ignored it)."""
    from analysis.steering import Comparison

    rng = np.random.default_rng(6)
    prompt = rng.normal(0, 1, 16)
    tight = 2 + prompt[None] + rng.normal(0, 0.1, (20, 16))
    spread = tight + rng.normal(0, 4.0, (20, 1))
    a, b = Comparison.of({"r": tight}).effect("r"), Comparison.of({"r": spread}).effect("r")
    assert a.value == pytest.approx(tight.mean()) and b.value == pytest.approx(spread.mean())
    assert (b.high - b.low) > 2 * (a.high - a.low)


def test_in_sample_scan_is_labelled_in_the_report():
    from analysis.render.markdown import steering_report as report

    _, tables = _verdicts(np.ones(32), np.ones(32) * 2)

    class Config:
        concept, vector, coefficient = "c", "actadd", None

    text = report(tables, {}, 0.25, 1, Config(), "m", None, {"scan_set": "in-sample", "n_texts": 3, "sources": ["prompts"]})
    assert "IN-SAMPLE" in text
    text = report(tables, {}, 0.25, 1, Config(), "m", None, {"scan_set": "held-out", "n_texts": 3, "sources": ["pairs"],
                                                             "scan_seed": 4})
    assert "IN-SAMPLE" not in text and "scan seed 4" in text


def test_held_out_scan_texts_are_disjoint_from_the_evaluation_prompts():
    """Issue 12, defect 9 (steering): the scan the spectral rule reads held out from the
    evaluation prompts by default (the organisms' concept draws a disjoint sample of the same
    distribution, seeded); in-sample stays available."""
    from spectral.steering.concepts import organism_sentiment, scan_texts
    from spectral.organisms.language import TASKS

    concept = organism_sentiment(TASKS)
    texts, info = scan_texts(concept)
    assert not set(texts) & set(concept.prompts) and info["n_evaluation_prompts_in_scan"] == 0
    assert set(concept.scan) <= set(texts) and len(concept.scan) == len(concept.prompts)
    assert organism_sentiment(TASKS, scan_seed=0).scan == concept.scan != organism_sentiment(TASKS, scan_seed=1).scan
    texts, info = scan_texts(concept, "in-sample")
    assert set(concept.prompts) <= set(texts) and info["scan_set"] == "in-sample"
    file_concept = concept_from_dict({**GOOD_CONCEPT, "prompts": ["x", "a"]})  # no scan field: pairs and neutral
    assert scan_texts(file_concept)[0] == ["b", "q"]
    with pytest.raises(UsageError, match="--scan-set: expected one of"):
        scan_texts(concept, "everything")


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
    assert set(strategies) == {"baseline", "oracle", "random", "spectral", "all"}  # 2 layers: k = 1
    params = json.loads((steer_local / "params.json").read_text())
    for name, r in strategies.items():  # matched budget: every strategy spends the same KL
        assert r["kl"] == pytest.approx(params["budget_kl"], rel=0.03), name
        assert 0 <= r["greedy_fraction"] <= 1
    assert {r["strategy"]: r["k"] for r in strategies.values()} == {"baseline": 1, "oracle": 1, "random": 1,
                                                                     "spectral": 1, "all": 2}
    grid = pq.read_table(steer_local / "grid.parquet")
    assert grid.num_rows == 2 * 3
    verdicts = {r["key"]: r for r in pq.read_table(steer_local / "verdicts.parquet").to_pylist()}
    assert {"steering_improvement", "steering_difference", "spectral_vs_random", "layer_choice"} <= set(verdicts)
    v = verdicts["steering_improvement"]
    assert v["name"] == "improvement of spectral over baseline (mean effect, 1 layer each, held-out prompts)"
    assert v["target"] == 0.25 and v["verdict"] in ("PASS", "FAIL", "INCONCLUSIVE")
    assert all(r["scan_set"] == "held-out" for r in verdicts.values())
    for name in ("report.md", "effect_by_layer.png", "effect_vs_side_effect.png"):
        assert (steer_local / name).stat().st_size > 0


def test_steer_holds_out_the_scan_and_scores_every_effect_on_held_out_prompts(steer_local):
    """Issue 12, defects 4 (b, d) and 9 on the organism: the scan read no evaluation prompt (its
    seed recorded); the oracle chose on the selection split; every effect is the held-out
    mean; the random row is the mean over >= 20 draws, each matched to the budget."""
    params = json.loads((steer_local / "params.json").read_text())
    assert params["scan"]["scan_set"] == "held-out" and params["scan"]["n_evaluation_prompts_in_scan"] == 0
    assert params["scan"]["scan_seed"] == 0 and params["config"]["scan_set"] == "held-out"
    assert set(pq.read_table(steer_local / "scan.parquet")["scan_set"].to_pylist()) == {"held-out"}
    split = params["split"]
    assert len(split["selection"]) == len(split["heldout"]) == 16 and not set(split["selection"]) & set(split["heldout"])
    per_prompt = pq.read_table(steer_local / "per_prompt.parquet").to_pylist()
    strategies = {r["strategy"]: r for r in pq.read_table(steer_local / "strategies.parquet").to_pylist()}
    for name in ("baseline", "spectral", "oracle", "all"):
        held = [r["effect"] for r in per_prompt if r["strategy"] == name and r["split"] == "heldout"]
        assert len(held) == 16 and strategies[name]["effect"] == pytest.approx(np.mean(held))
    random_rows = [r for r in per_prompt if r["strategy"] == "random" and r["split"] == "heldout"]
    assert len({r["draw"] for r in random_rows}) == strategies["random"]["n_draws"] == 20
    assert strategies["random"]["effect"] == pytest.approx(np.mean([r["effect"] for r in random_rows]))
    layers = {r["layer"]: r for r in pq.read_table(steer_local / "layers.parquet").to_pylist()}
    best = max(layers, key=lambda l: (layers[l]["effect_selection"], -l))
    assert params["oracle"]["oracle"] == [best] == json.loads(strategies["oracle"]["layers"])
    report = (steer_local / "report.md").read_text()
    assert "held-out prompts" in report and "Verdict rules" in report and "Scan: held-out" in report


def test_steer_on_ray_equals_local(organism_cache, steer_local, tmp_path, ray_cluster):
    out = tmp_path / "ray"
    assert main(steer_args(organism_cache, out, "--executor", "ray", "--workers", "2")) == 0
    for name in ("strategies.parquet", "grid.parquet", "layers.parquet", "per_prompt.parquet", "verdicts.parquet"):
        local, remote = pq.read_table(steer_local / name), pq.read_table(out / name)
        assert local.column_names == remote.column_names
        for col in local.column_names:
            a, b = local[col].to_pylist(), remote[col].to_pylist()
            if isinstance(a[0], float):
                np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-9, err_msg=f"{name}:{col}")
            else:
                assert a == b, f"{name}:{col}"


def test_in_sample_scan_stays_available_and_is_labelled(organism_cache, steer_local, tmp_path):
    out = tmp_path / "in-sample"
    assert main(steer_args(organism_cache, out, "--scan-set", "in-sample", "--strategies", "baseline", "spectral",
                           "--grid=1")) == 0
    params = json.loads((out / "params.json").read_text())
    assert params["scan"]["scan_set"] == "in-sample" and params["scan"]["n_evaluation_prompts_in_scan"] > 0
    assert set(pq.read_table(out / "scan.parquet")["scan_set"].to_pylist()) == {"in-sample"}
    assert {r["scan_set"] for r in pq.read_table(out / "verdicts.parquet").to_pylist()} == {"in-sample"}
    assert {r["scan_set"] for r in pq.read_table(out / "strategies.parquet").to_pylist()} == {"in-sample"}
    assert "IN-SAMPLE" in (out / "report.md").read_text()
    held = pq.read_table(steer_local / "scan.parquet")["gap"].to_pylist()
    assert pq.read_table(out / "scan.parquet")["gap"].to_pylist() != held  # another set of texts, another spectrum


@pytest.mark.parametrize("concept, extra, message", [
    ({**GOOD_CONCEPT, "target": [" good", " xyzzy"]}, [], "target word ' xyzzy' is not in the vocabulary"),
    ({**GOOD_CONCEPT, "target": [" good bad"]}, [], "target word ' good bad' is 2 tokens, not one"),
    ({**GOOD_CONCEPT, "target": [" good"], "opposite": [" bad"], "prompts": ["I hate the qqq"]}, [],
     "has words that are not in the vocabulary"),
    (None, ["--layer", "9"], "--layer: layer 9 out of range (the model has layers 0..1)"),
    (None, ["--coefficient", "inf"], "--coefficient: Value error, coefficient inf is not finite"),
    (None, ["--positions", "middle"], "--positions: expected all or last or a token index >= 0, got 'middle'"),
    (None, ["--random-draws", "5"], "--random-draws: Input should be greater than or equal to 20"),
    (None, ["--selection-fraction", "1"], "--selection-fraction: Input should be less than 1"),
    ({**GOOD_CONCEPT, "target": [" good"], "opposite": [" bad"], "pairs": [["I love", "I hate"]], "neutral": ["A ball is"],
      "prompts": ["I love the", "I hate the", "The"]}, [],
     "--selection-fraction: 3 evaluation prompts split at 0.5 leave 1 for selection and 2 held out"),
    ({k: v for k, v in GOOD_CONCEPT.items() if k != "neutral"}, [], "missing field 'neutral'"),
    (None, ["--concept", "names"], "the steering vector is zero at layer(s) 0"),
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
    from spectral.steering.concepts import english_love_hate

    concept = english_love_hate(organism.tokenizer)  # a word-level vocabulary with some of the words
    assert concept.target == (" good", " great", " happy", " wonderful", " love", " nice")
    assert concept.opposite == (" bad", " terrible", " sad", " awful", " hate", " ugly")
    with pytest.raises(UsageError, match="fewer than 3 single-token sentiment words"):
        english_love_hate(neox.tokenizer)  # byte-level: no word is one token
