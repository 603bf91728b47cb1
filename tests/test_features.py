"""Every feature of ``spectral.features.extract`` equals a brute-force computation: each prompt run
alone (no padding, no streaming), the explicit N x N Gram, T x T score and probability matrices
and d_model x d_model weight products formed in numpy and decomposed with ``numpy.linalg``, for
random GPT-NeoX, Llama and GPT-2 models (BERT in tests/test_bert.py), with and without the
first token; batched, padded, sharded extraction must agree within 1e-6."""

from operator import attrgetter

import numpy as np
import pytest
import torch
from scipy.special import softmax, xlogy

from cluster.executors import LocalExecutor
from spectral.features.extract import FeatureSettings, features_table
from spectral.features.names import FEATURE_KERNELS, FEATURE_METRICS, baseline_features, spectral_features
from spectral.models.adapter import HeadAdapter
from spectral.tables import FEATURES, conform
from tests.conftest import PROMPTS
from tests.reference import brute_metrics

TEXTS = PROMPTS + ["A fourth, much longer prompt that pads the others of its batch with many more tokens than they have."]


def _per_prompt(loaded, text):
    adapter = HeadAdapter(loaded.model)
    ids = loaded.tokenizer(text, add_special_tokens=adapter.family.special_tokens, return_tensors="pt")["input_ids"]
    return adapter, adapter.run(ids, sites=("queries", "keys_raw", "keys_rotated", "queries_rotated", "result"))


def _gram_metrics(vectors: np.ndarray) -> dict:
    k = vectors - vectors.mean(axis=0)
    gram = k @ k.T / k.shape[1] + 1e-2 * np.eye(k.shape[0])
    return brute_metrics(np.sort(np.linalg.eigvalsh(gram))[::-1])


def _resolved(sv: np.ndarray, size: int) -> np.ndarray:
    """numpy's matrix_rank convention at the model's float32 precision: values below
    sv[0] x size x eps are not resolved by float32 scores and count as zero."""
    return np.where(sv > sv[0] * size * np.finfo(np.float32).eps, sv, 0.0)


def _prompt_matrix_metrics(mats: list[np.ndarray]) -> dict:
    per = [brute_metrics(_resolved(np.linalg.svd(m, compute_uv=False), len(m))) for m in mats]
    return {k: np.nanmean([p[k] for p in per]) for k in FEATURE_METRICS}


def brute_features(loaded, texts) -> dict[tuple[int, int], dict[str, float]]:
    """Every feature of every head, the slow way."""
    runs = [_per_prompt(loaded, t) for t in texts]
    adapter = runs[0][0]
    out = {}
    for layer in range(adapter.n_layers):
        wq, wk = (w.double() for w in adapter.qk_weights(layer))
        wv, wo = (w.double() for w in adapter.ov_weights(layer))
        scaling = attrgetter(adapter.family.scaling)(adapter.attentions[layer])
        for head in range(adapter.n_heads):
            f: dict[str, float] = {}
            grams = {"key_raw": "keys_raw", "key_rotated": "keys_rotated", "query": "queries"}
            prompt_scores, prompt_probs, entropies, firsts, norms = [], [], [], [], []
            for kernel, site in grams.items():
                per = [run[(layer, site)][0, :, head].double().numpy() for _, run in runs]
                for suffix, start in (("", 0), ("_nobos", 1)):
                    m = _gram_metrics(np.concatenate([p[start:] for p in per]))
                    f.update({f"{kernel}{suffix}.{k}": m[k] for k in FEATURE_METRICS})
            for _, run in runs:
                q = run[(layer, "queries_rotated")][0, :, head].double().numpy()
                k = run[(layer, "keys_rotated")][0, :, head].double().numpy()
                t = q.shape[0]
                s = q @ k.T * scaling
                causal = np.triu(np.ones((t, t), bool), 1) & adapter.family.causal  # BERT: no mask
                p = softmax(np.where(causal, -np.inf, s), axis=-1)
                prompt_scores.append(np.where(causal, 0.0, s))
                prompt_probs.append(p)
                entropies.append(-xlogy(p, p).sum(-1))
                firsts.append(p[:, 0])
                z = run[(layer, "result")][0, :, head].double()
                norms.append(torch.linalg.vector_norm(z @ wo[head], dim=-1).numpy())
            for kernel, mats in (("scores", prompt_scores), ("probs", prompt_probs)):
                for suffix, start in (("", 0), ("_nobos", 1)):
                    m = _prompt_matrix_metrics([x[start:, start:] for x in mats])
                    f.update({f"{kernel}{suffix}.{k}": m[k] for k in FEATURE_METRICS})
            for kernel, product in (("qk", wq[head] @ wk[head].T), ("ov", wv[head] @ wo[head])):
                sv = _resolved(np.linalg.svd(product.numpy(), compute_uv=False)[:adapter.d_head], adapter.d_head)
                m = brute_metrics(sv)
                f.update({f"{kernel}.{k}": m[k] for k in FEATURE_METRICS})
            f["baseline.output_norm"] = float(np.concatenate(norms).mean())
            f["baseline.attention_entropy"] = float(np.concatenate(entropies).mean())
            f["baseline.first_token_attention"] = float(np.concatenate(firsts).mean())
            for name, w in (("wq", wq), ("wk", wk), ("wv", wv), ("wo", wo)):
                f[f"baseline.{name}_norm"] = float(np.linalg.norm(w[head].numpy()))
            out[(layer, head)] = f
    return out


@pytest.fixture(scope="module")
def tiny_bert():
    from spectral.models.loading import load_model

    return load_model("random:minilm-l6?layers=2&hidden=64&heads=4&vocab=512")


def test_every_feature_equals_brute_force_on_bert(tiny_bert):
    """The bidirectional encoder: no causal mask in the scores and probabilities."""
    test_every_feature_equals_brute_force(tiny_bert)


def test_every_feature_equals_brute_force(tiny):
    """Batches of 2 right-padded prompts, shards of 3 prompts: the streamed, batched features of
    every head equal the per-prompt explicit computation within 1e-6 (relative)."""
    adapter = HeadAdapter(tiny.model)
    table = features_table(LocalExecutor(tiny, progress=False), tiny.spec.text, TEXTS, FeatureSettings(batch_size=2),
                           adapter.n_layers, adapter.n_heads, adapter.n_kv_heads, shard_size=3)
    table = conform(table, FEATURES, "features")
    assert table.num_rows == adapter.n_layers * adapter.n_heads
    brute = brute_features(tiny, TEXTS)
    for row in table.to_pylist():
        want = brute[(row["layer"], row["head"])]
        for name in spectral_features() + baseline_features():
            got, ref = row[name], want[name]
            if np.isnan(ref):
                assert np.isnan(got), name
            else:
                assert got == pytest.approx(ref, rel=1e-6, abs=1e-9), (row["layer"], row["head"], name)
        assert all(row[f"{k}.status"] in ("ok", "rank_deficient") for k in FEATURE_KERNELS)
    rows = table.to_pylist()
    assert rows[0]["n_prompts"] == len(TEXTS)


def test_key_raw_features_equal_the_scan(neox):
    """The features' key_raw kernel is the scan's key kernel (same ridge, centring, keys)."""
    from spectral.kernels.scan import ScanSettings, scan_table

    ex = LocalExecutor(neox, progress=False)
    scan = scan_table(ex, neox.spec.text, TEXTS, ScanSettings(kernel="key", keys="raw"), 3, 4).to_pylist()
    feats = features_table(ex, neox.spec.text, TEXTS, FeatureSettings(), 3, 4).to_pylist()
    for s, f in zip(scan, feats):
        for metric in FEATURE_METRICS:
            assert f[f"key_raw.{metric}"] == pytest.approx(s[metric], rel=1e-12), metric


def test_layer_and_head_selection(neox):
    ex = LocalExecutor(neox, progress=False)
    table = features_table(ex, neox.spec.text, TEXTS, FeatureSettings(layers=(1,), heads=(0, 2)), 3, 4)
    assert [(r["layer"], r["head"]) for r in table.to_pylist()] == [(1, 0), (1, 2)]
    full = {(r["layer"], r["head"]): r for r in features_table(ex, neox.spec.text, TEXTS, FeatureSettings(), 3, 4)
            .to_pylist()}
    for r in table.to_pylist():
        assert r["scores.gap"] == pytest.approx(full[(1, r["head"])]["scores.gap"], rel=1e-12)
