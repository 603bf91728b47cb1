"""TopK SAE training core (spectral.saes): planted-dictionary recovery, held-out statistics
against a plain numpy recomputation from the saved weights, reload identity (ours and SAELens'
``SAE.load_from_disk``), one-line usage errors, and one forward pass feeding every head."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from sae_lens import SAE

from spectral.errors import UsageError
from spectral.kernels.scan import ScanSettings, token_batches
from spectral.models.adapter import HeadAdapter
from spectral.models.loading import load_model
from spectral.saes.activations import head_name, resolve_targets, z_stream
from spectral.saes.train import SaeTrainingConfig, load_saes, train_head_saes, train_saes

N_FEATURES, D, ACTIVE = 32, 16, 2
TWIN = "random:pythia-410m?layers=2&hidden=64&heads=4&vocab=512"
TEXTS = [
    "When Mary and John went to the store, John gave a drink to",
    "The quick brown fox jumps over the lazy dog again and again",
    "Eigenvalue gaps of key kernels, measured for every head.",
]


def planted_stream(seed: int = 0, rows: int = 512):
    """A known dictionary of 32 unit directions in 16 dims (more features than dimensions);
    each row is 2 of them with weights in [0.5, 1.5], plus a constant offset of 3 (the mean the
    normalisation removes)."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(N_FEATURES, D, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    seen: list[torch.Tensor] = []

    def stream():
        while True:
            idx = torch.rand(rows, N_FEATURES, generator=g).argsort(1)[:, :ACTIVE]
            weights = torch.rand(rows, ACTIVE, generator=g) + 0.5
            x = (weights[..., None] * dictionary[idx]).sum(1) + 3.0
            seen.append(x)
            yield {"src": x}

    return dictionary, stream(), seen


PLANTED = SaeTrainingConfig(ks=(ACTIVE,), expansion=4, tokens=100_000, batch_size=128, lr=1e-2, lr_end=1e-3,
                            calibration_tokens=2048, buffer_batches=4, dead_feature_window=20)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    out = tmp_path_factory.mktemp("planted")
    dictionary, stream, seen = planted_stream()
    result = train_saes(stream, {"src": ("src",)}, PLANTED, out)
    held_out = torch.cat(seen)[:PLANTED.calibration_tokens]  # the calibration rows, never trained on
    return dictionary, result, held_out, out


def test_planted_features_recovered(planted):
    dictionary, result, _, _ = planted
    (trained,) = result.saes
    assert (trained.name, trained.d_in, trained.d_sae, trained.k) == ("src_k2", D, 4 * D, ACTIVE)
    decoder = trained.sae.W_dec.detach()
    decoder = decoder / decoder.norm(dim=1, keepdim=True)
    best = (dictionary @ decoder.T).max(dim=1).values  # each planted feature's closest decoder row
    assert best.mean().item() >= 0.9
    assert result.tokens == 782 * PLANTED.batch_size  # whole batches until 100,000 rows are passed


def numpy_stats(path, x: np.ndarray, k: int) -> tuple[float, float]:
    """Explained variance and L0 of a saved TopK SAE, recomputed with numpy from its files."""
    w = load_file(str(path / "sae_weights.safetensors"))
    cfg = json.loads((path / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == k and not cfg["rescale_acts_by_decoder_norm"]
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    acts = np.zeros_like(pre)
    top = np.argpartition(-pre, k - 1, axis=1)[:, :k]
    np.put_along_axis(acts, top, np.maximum(np.take_along_axis(pre, top, axis=1), 0), axis=1)
    recon = acts @ w["W_dec"] + w["b_dec"]
    ev = 1 - ((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    return float(ev), float((acts != 0).sum(1).mean())


def test_statistics_match_numpy_recomputation(planted):
    _, result, held_out, out = planted
    (trained,) = result.saes
    ev, l0 = numpy_stats(out / "saes" / "src_k2", held_out.numpy().astype(np.float64), ACTIVE)
    assert trained.explained_variance == pytest.approx(ev, abs=1e-5)
    assert trained.l0 == pytest.approx(l0, abs=1e-9)
    assert 0.9 < ev <= 1.0 and 1.5 < l0 <= ACTIVE
    summary = json.loads((out / "saes" / "summary.json").read_text())
    assert summary["saes"][0]["explained_variance"] == pytest.approx(ev, abs=1e-5)
    meta = json.loads((out / "saes" / "src_k2" / "cfg.json").read_text())["metadata"]["eigengap"]
    assert meta["sources"] == ["src"] and len(meta["mean"]) == D and len(meta["scale"]) == 1
    np.testing.assert_allclose(meta["mean"], held_out.mean(0).numpy(), atol=1e-5)  # the offset of 3


def test_reload_gives_identical_activations(planted):
    _, result, held_out, out = planted
    (trained,) = result.saes
    with torch.no_grad():
        expected = trained.sae.encode(held_out)
        ours = load_saes(out)["src_k2"]
        theirs = SAE.load_from_disk(out / "saes" / "src_k2")
        for sae in (ours, theirs):
            assert torch.equal(sae.encode(held_out), expected)
            assert torch.equal(sae.decode(expected), trained.sae.decode(expected))


@pytest.mark.parametrize("k", [0, -1, 4 * D + 1])
def test_bad_k_is_one_line_and_writes_nothing(tmp_path, k):
    _, stream, _ = planted_stream()
    bad = SaeTrainingConfig(ks=(k,), expansion=4, tokens=1024, batch_size=128, calibration_tokens=256)
    with pytest.raises(UsageError) as err:
        train_saes(stream, {"src": ("src",)}, bad, tmp_path / "run")
    assert "\n" not in str(err.value) and f"k={k}" in str(err.value)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def twin():
    return load_model(TWIN)


def test_unknown_head_is_one_line_and_writes_nothing(twin, tmp_path):
    cfg = SaeTrainingConfig(ks=(2,), expansion=2, tokens=256, batch_size=64, calibration_tokens=64)
    for heads, message in [([(0, 4)], "head 4 out of range"), ([(2, 0)], "layer 2 out of range")]:
        with pytest.raises(UsageError, match=message) as err:
            train_head_saes(twin, TEXTS, cfg, tmp_path / "run", heads=heads)
        assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="k=64 out of range"):  # per-head d_in 16 x expansion 2 = 32
        train_head_saes(twin, TEXTS, SaeTrainingConfig(ks=(64,), expansion=2), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_stream_rows_are_the_result_site(twin):
    """z_stream's rows equal a plain HeadAdapter.run of the result site, real tokens only."""
    settings = ScanSettings(batch_size=2)
    targets = resolve_targets(HeadAdapter(twin.model))
    blocks = list(z_stream(twin, TEXTS, settings, targets))
    batches = list(token_batches(twin, TEXTS, settings))
    assert len(blocks) == len(batches) == 2
    adapter = HeadAdapter(twin.model)
    for block, (ids, mask) in zip(blocks, batches):
        assert sorted(block) == sorted(head_name(layer, h) for layer in range(2) for h in range(4))
        ref = adapter.run(ids, mask, sites=["result"])
        for layer in range(2):
            z = ref[(layer, "result")][mask.bool()]  # (real tokens, head, d_head)
            for h in range(4):
                torch.testing.assert_close(block[head_name(layer, h)], z[:, h].float(), rtol=0, atol=0)


def test_one_forward_pass_feeds_every_sae(twin, tmp_path):
    """8 per-head SAEs and 2 per-layer SAEs, 2 values of k: 20 SAEs, one forward pass per batch."""
    prompts = TEXTS * 40  # 120 prompts, about 1,500 tokens
    settings = ScanSettings(batch_size=8)
    n_batches = len(list(token_batches(twin, prompts, settings)))
    calls = []
    handle = twin.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        cfg = SaeTrainingConfig(ks=(1, 2), expansion=2, tokens=640, batch_size=64, calibration_tokens=128,
                                buffer_batches=2)
        result = train_head_saes(twin, prompts, cfg, tmp_path / "run", settings=settings)
    finally:
        handle.remove()
    assert 0 < len(calls) <= n_batches == 15
    names = {t.name for t in result.saes}
    assert len(names) == 20 and {"L0H0_k1", "L1H3_k2", "L0_k1", "L1_k2"} <= names
    by_name = {t.name: t for t in result.saes}
    assert (by_name["L1H3_k2"].d_in, by_name["L1H3_k2"].d_sae) == (16, 32)
    assert (by_name["L1_k2"].d_in, by_name["L1_k2"].sources) == (64, ("L1H0", "L1H1", "L1H2", "L1H3"))
    loaded = load_saes(tmp_path / "run")
    assert set(loaded) == names and loaded["L0_k1"].cfg.metadata.hook_name == "layers.0.result"


def test_too_few_tokens_is_one_line_and_writes_nothing(twin, tmp_path):
    cfg = SaeTrainingConfig(ks=(2,), expansion=2, tokens=100_000, batch_size=64, calibration_tokens=32)
    with pytest.raises(UsageError, match="the prompts gave only") as err:
        train_head_saes(twin, TEXTS, cfg, tmp_path / "run", per_layer=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()
