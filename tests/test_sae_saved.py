"""The SAEs ``spectral.saes.train`` saves, read back for the metrics (``spectral.saes.saved``):
the unfolded plain-tensor SAE encodes raw inputs exactly as SAELens' own reload does, and the
metrics' L0 and explained variance on the held-out calibration rows equal the ones training
recorded."""

import json

import pytest
import torch

from spectral.errors import UsageError
from spectral.saes.metrics import evaluate
from spectral.saes.saved import load_topk
from spectral.saes.train import load_saes, train_saes
from tests.test_sae_train import PLANTED, planted_stream


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("saved")
    _, stream, seen = planted_stream(seed=3)
    result = train_saes(stream, {"src": ("src",)}, PLANTED, out)
    return out, result, torch.cat(seen)[:PLANTED.calibration_tokens]


def test_unfolded_sae_matches_saelens_reload(saved):
    out, result, held_out = saved
    name = result.saes[0].name
    ours = load_topk(out / "saes" / name)
    theirs = load_saes(out)[name]
    with torch.no_grad():
        want = theirs.encode(held_out)
        got = ours.encode(ours.normalise(held_out))
        assert torch.allclose(got, want, atol=1e-5)
        assert torch.allclose(ours.reconstruct(held_out), theirs.decode(want), atol=1e-4)


def test_metrics_equal_the_recorded_held_out_statistics(saved):
    out, result, held_out = saved
    trained = result.saes[0]
    sae = load_topk(out / "saes" / trained.name)
    m = evaluate(sae, [sae.normalise(held_out)])
    assert m.l0 == pytest.approx(trained.l0, rel=1e-6)
    # the same SAE in normalised space: explained variance is invariant to the one scale per head
    assert m.explained_variance == pytest.approx(trained.explained_variance, abs=1e-4)


def test_a_directory_without_our_statistics_is_one_line(saved, tmp_path):
    out, result, _ = saved
    src = out / "saes" / result.saes[0].name
    (tmp_path / "s").mkdir()
    cfg = json.loads((src / "cfg.json").read_text())
    cfg["metadata"].pop("eigengap")
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    (tmp_path / "s" / "sae_weights.safetensors").write_bytes((src / "sae_weights.safetensors").read_bytes())
    with pytest.raises(UsageError, match="metadata.eigengap"):
        load_topk(tmp_path / "s")
    with pytest.raises(UsageError, match="not a saved SAE"):
        load_topk(tmp_path)


def test_a_layer_sae_of_two_heads_with_different_scales(tmp_path):
    """Two sources (heads) concatenated, the second 5x larger: the saved per-head scales are
    expanded over each head's dimensions and the unfolded SAE still encodes as SAELens does."""
    _, stream, seen = planted_stream(seed=5)
    halves = [[], []]

    def two_heads():
        for block in stream:
            a, b = block["src"][:, :8], 5.0 * block["src"][:, 8:]
            halves[0].append(a)
            halves[1].append(b)
            yield {"a": a, "b": b}

    result = train_saes(two_heads(), {"L0": ("a", "b")}, PLANTED, tmp_path)
    held_out = torch.cat([torch.cat(halves[0]), torch.cat(halves[1])], dim=1)[:PLANTED.calibration_tokens]
    name = result.saes[0].name
    ours, theirs = load_topk(tmp_path / "saes" / name), load_saes(tmp_path)[name]
    assert ours.scale[:8].unique().numel() == 1 and ours.scale[8:].unique().numel() == 1
    assert ours.scale[8] / ours.scale[0] == pytest.approx(5.0, rel=0.05)
    with torch.no_grad():
        assert torch.allclose(ours.encode(ours.normalise(held_out)), theirs.encode(held_out), atol=1e-4)
