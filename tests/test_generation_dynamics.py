"""Generation dynamics (spectral.dynamics.generation): per-step key-kernel spectra from rank-one
updates equal the N x N Gram of all the context's keys, the step attention equals the softmax of
the adapter's own score row, the tokens equal Hugging Face ``generate``'s, and bad input is one line."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.special import softmax

from spectral.dynamics import generation
from spectral.dynamics.generation import GenerationSettings, generate_trajectories, left_padded
from spectral.errors import UsageError
from spectral.kernels.metrics import METRICS
from spectral.models.adapter import HeadAdapter
from spectral.models.loading import load_model
from spectral.tables import STEP_ATTENTION_METRICS, TRAJECTORIES
from tests.conftest import TINY
from tests.reference import brute_key_kernel_metrics

# three lengths (byte tokenizer: 23, 4 and 12 tokens), so the batch is left-padded
GEN_PROMPTS = ["When Mary and John went", "The ", "Eigenvalue g"]
STEPS = 4


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny64(request):
    """Each family's tiny twin in float64: the cached and the rerun paths then agree to ~1e-13."""
    return load_model(TINY[request.param], dtype=torch.float64)


def hf_tokens(loaded, gen, steps: int, eos=None) -> list[list[int]]:
    """Hugging Face ``generate(do_sample=False)`` on the same left-padded batch, cut after EOS."""
    ids, mask = left_padded(gen.prompt_tokens, gen.pad_token, torch.device("cpu"))
    out = loaded.model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=steps,
                                pad_token_id=gen.pad_token, **({} if eos is None else {"eos_token_id": eos}))
    rows = out[:, ids.shape[1]:].tolist()
    stop = loaded.model.generation_config.eos_token_id if eos is None else eos
    return [row[:row.index(stop) + 1] if stop in row else row for row in rows]


def reference_rows(loaded, gen, prompt: int, keys: str = "raw") -> dict[tuple[int, int, int], dict[str, float]]:
    """Per (step, layer, head): the plain N x N key kernel of the context's keys and the step
    query's probabilities (softmax of the adapter's score row, in float64: its ``probs`` site is
    float32), from one unpadded forward pass over the prompt and its tokens."""
    adapter = HeadAdapter(loaded.model)
    prompt_ids, new = gen.prompt_tokens[prompt], gen.tokens[prompt]
    ids = torch.tensor([prompt_ids + new[:-1]])
    site = f"keys_{keys}"
    out = adapter.run(ids, torch.ones_like(ids), sites=(site, "scores"))
    ref = {}
    for step in range(len(new)):
        n = len(prompt_ids) + step
        for layer in range(adapter.n_layers):
            for head in range(adapter.n_heads):
                row = brute_key_kernel_metrics(out[(layer, site)][0, :n, head].numpy())
                scores = out[(layer, "scores")][0, head, n - 1, :n].numpy()
                p = np.sort(softmax(scores))[::-1]
                entropy = float(-(p * np.log(p)).sum())
                row |= {"attn_entropy": entropy, "attn_effective_keys": np.exp(entropy), "attn_top1": p[0],
                        "attn_gap": (p[0] - p[1]) / p[0] if n > 1 else np.nan,
                        "attn_score_norm": float(np.linalg.norm(scores))}
                ref[(step, layer, head)] = row
    return ref


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv_cache", "rerun"])
def test_rank_one_spectra_equal_full_recomputation_at_every_step(tiny64, use_cache):
    settings = GenerationSettings(max_new_tokens=STEPS, use_cache=use_cache, batch_size=3)
    gen = generate_trajectories(tiny64, GEN_PROMPTS, settings)
    assert [len(p) for p in gen.prompt_tokens] == [23, 4, 12]
    assert gen.tokens == hf_tokens(tiny64, gen, STEPS)
    rows = gen.trajectories.to_pylist()
    adapter = HeadAdapter(tiny64.model)
    assert len(rows) == len(GEN_PROMPTS) * STEPS * adapter.n_layers * adapter.n_heads
    for prompt in range(len(GEN_PROMPTS)):
        ref = reference_rows(tiny64, gen, prompt)
        mine = [r for r in rows if r["prompt"] == prompt]
        assert [r["token"] for r in mine if r["layer"] == 0 and r["head"] == 0] == gen.tokens[prompt]
        for r in mine:
            expected = ref[(r["step"], r["layer"], r["head"])]
            assert r["n_keys"] == len(gen.prompt_tokens[prompt]) + r["step"]
            assert r["status"] == "ok" and r["keys"] == "raw" and r["ridge"] == 1e-2
            for name in (*METRICS, *STEP_ATTENTION_METRICS):
                np.testing.assert_allclose(r[name], expected[name], rtol=1e-6, atol=1e-12, err_msg=name)


def test_worker_threads_and_the_loop_give_the_same_table(neox, monkeypatch):
    monkeypatch.setattr(generation, "SPECTRA_CHUNK", 3)  # chunks of 3 steps: 5 steps end in a part-chunk
    settings = GenerationSettings(max_new_tokens=5, batch_size=2, spectra_threads=0)
    in_loop = generate_trajectories(neox, GEN_PROMPTS, settings)
    assert in_loop.trajectories.num_rows == 3 * 5 * 3 * 4
    for threads in (1, 3):
        threaded = generate_trajectories(neox, GEN_PROMPTS, replace(settings, spectra_threads=threads))
        assert threaded.trajectories.equals(in_loop.trajectories) and threaded.tokens == in_loop.tokens


def test_rotated_keys_and_a_head_subset(tiny64):
    settings = GenerationSettings(max_new_tokens=2, keys="rotated", layers=(1,), heads=(0, 3))
    gen = generate_trajectories(tiny64, GEN_PROMPTS[:2], settings)
    rows = gen.trajectories.to_pylist()
    assert {(r["layer"], r["head"]) for r in rows} == {(1, 0), (1, 3)} and len(rows) == 2 * 2 * 2
    kv = HeadAdapter(tiny64.model).n_kv_heads
    assert {r["head"]: r["kv_head"] for r in rows} == ({0: 0, 3: 1} if kv == 2 else {0: 0, 3: 3})
    for prompt in range(2):
        ref = reference_rows(tiny64, gen, prompt, keys="rotated")
        for r in (r for r in rows if r["prompt"] == prompt):
            assert r["keys"] == "rotated"
            np.testing.assert_allclose(r["gap"], ref[(r["step"], r["layer"], r["head"])]["gap"], rtol=1e-6)


def test_tokens_equal_hf_generate_in_float32(tiny):
    gen = generate_trajectories(tiny, GEN_PROMPTS, GenerationSettings(max_new_tokens=4))
    assert gen.tokens == hf_tokens(tiny, gen, 4)
    assert gen.trajectories.schema.equals(TRAJECTORIES)


def test_a_prompt_stops_at_its_eos_token():
    neox = load_model(TINY["gpt_neox"])  # its own copy: the end-of-sequence token is changed below
    first = generate_trajectories(neox, GEN_PROMPTS, GenerationSettings(max_new_tokens=4, stop_at_eos=False))
    eos = first.tokens[1][1]  # prompt 1's second token becomes the end-of-sequence token
    neox.model.generation_config.eos_token_id = eos
    gen = generate_trajectories(neox, GEN_PROMPTS, GenerationSettings(max_new_tokens=4))
    expected = hf_tokens(neox, gen, 4, eos=eos)
    assert gen.tokens[1] == first.tokens[1][:2] and gen.tokens == expected
    steps = {r["step"] for r in gen.trajectories.to_pylist() if r["prompt"] == 1}
    assert steps == {0, 1}


def test_sampling_is_seeded(neox):
    def draw(seed):
        return generate_trajectories(neox, GEN_PROMPTS[:2], GenerationSettings(max_new_tokens=3, sample=True,
                                                                                seed=seed)).tokens
    assert draw(0) == draw(0)
    assert draw(0) != draw(1)


@pytest.mark.parametrize("settings, message", [
    (GenerationSettings(max_new_tokens=0), "max-new-tokens must be at least 1, got 0"),
    (GenerationSettings(max_new_tokens=-3), "max-new-tokens must be at least 1, got -3"),
    (GenerationSettings(keys="both"), "keys must be one of raw, rotated, got 'both'"),
    (GenerationSettings(spectra_threads=-1), "spectra threads must be >= 0, got -1"),
    (GenerationSettings(max_new_tokens=2048), "prompt 0 has 23 tokens: with 2048 new tokens the context exceeds "
                                              "the model's 2048 positions"),
])
def test_bad_settings_are_one_line(neox, settings, message):
    with pytest.raises(UsageError) as err:
        generate_trajectories(neox, GEN_PROMPTS, settings)
    assert str(err.value) == message


def test_an_encoder_cannot_generate():
    bert = load_model("random:minilm-l6?layers=2&hidden=64&heads=4&vocab=512")
    with pytest.raises(UsageError) as err:
        generate_trajectories(bert, GEN_PROMPTS, GenerationSettings(max_new_tokens=2))
    assert "\n" not in str(err.value) and "bidirectional encoder" in str(err.value)
