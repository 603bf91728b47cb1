"""SAE metrics (issue 16, point 2): each against a plain recomputation or a known answer."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from spectral.errors import UsageError
from spectral.models.loading import load_model
from spectral.saes.metrics import (
    LOG_DENSITY_EDGES, TopKSAE, attribution_entropy, evaluate, ev_l0_area, feature_dimensionality,
    head_attribution,
)
from spectral.saes.splice import ce_score, splice_score

TWIN = "random:pythia-410m?layers=2&hidden=64&heads=4&vocab=512"  # d_head 16, 4 heads
PROMPTS = [
    "When Mary and John went to the store, John gave a drink to",
    "The quick brown fox",
    "Eigenvalue gaps of key kernels, measured for every head.",
]


def identity_sae(d: int, **norm) -> TopKSAE:
    """decode(encode(x)) = x exactly: features [relu(x), relu(-x)], k = d keeps |x_j| for every j."""
    eye = torch.eye(d)
    return TopKSAE(torch.cat([eye, -eye], 1), torch.zeros(2 * d), torch.cat([eye, -eye], 0), torch.zeros(d), d, **norm)


def random_sae(d_in=6, d_sae=20, k=3, seed=0) -> TopKSAE:
    g = torch.Generator().manual_seed(seed)
    return TopKSAE(torch.randn(d_in, d_sae, generator=g), 0.1 * torch.randn(d_sae, generator=g),
                   0.5 * torch.randn(d_sae, d_in, generator=g), 0.1 * torch.randn(d_in, generator=g), k)


@pytest.fixture(scope="module")
def twin():
    return load_model(TWIN)


# ---------------------------------------------------------------------------- encode / decode
def test_identity_sae_reconstructs_exactly_with_normalisation():
    x = torch.randn(50, 16, dtype=torch.float64)
    assert torch.equal(identity_sae(16).to(dtype=torch.float64).reconstruct(x), x)
    sae = identity_sae(16, mean=torch.full((16,), 3.0), scale=torch.linspace(0.5, 2.0, 16))
    torch.testing.assert_close(sae.reconstruct(x.float()), x.float(), atol=1e-6, rtol=1e-6)


def test_encode_keeps_top_k_then_relu():
    sae = TopKSAE(torch.eye(4), torch.zeros(4), torch.eye(4), torch.zeros(4), 3)
    f = sae.encode(torch.tensor([[2.0, -1.0, 0.5, -3.0]]))
    # the top 3 of the pre-activations are 2, 0.5, -1; ReLU zeroes the -1
    assert f.tolist() == [[2.0, 0.0, 0.5, 0.0]]


def test_encode_decode_match_sae_lens():
    import sae_lens  # a pinned dependency: the comparison always runs
    ours = random_sae(d_in=6, d_sae=20, k=4)
    lens = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=6, d_sae=20, k=4))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(lens, name).copy_(getattr(ours, name))
        x = torch.randn(30, 6)
        torch.testing.assert_close(ours.encode(x), lens.encode(x))
        torch.testing.assert_close(ours.decode(ours.encode(x)), lens(x))


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_from_folded_undoes_sae_lens_fold(apply_b_dec_to_input):
    """SAELens folds ``(x - mean) / scale`` into the weights; ``from_folded`` gives back the
    normalised-space SAE, with the same raw-unit reconstructions."""
    import sae_lens  # a pinned dependency: the comparison always runs
    ours = replace(random_sae(d_in=6, d_sae=20, k=4).to(dtype=torch.float64), apply_b_dec_to_input=apply_b_dec_to_input)
    mean, scale = torch.linspace(-2.0, 3.0, 6, dtype=torch.float64), torch.linspace(0.5, 4.0, 6, dtype=torch.float64)
    lens = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=6, d_sae=20, k=4, dtype="float64",
                                                   apply_b_dec_to_input=apply_b_dec_to_input))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(lens, name).copy_(getattr(ours, name))
        lens.fold_activation_whitening(mean=mean, whitening_matrix=torch.diag(1 / scale),
                                       unwhitening_matrix=torch.diag(scale))
        back = TopKSAE.from_folded(lens.W_enc, lens.b_enc, lens.W_dec, lens.b_dec, 4, mean, scale,
                                   apply_b_dec_to_input)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            torch.testing.assert_close(getattr(back, name), getattr(ours, name))
        x = torch.randn(30, 6, dtype=torch.float64) * scale + mean
        torch.testing.assert_close(back.reconstruct(x), lens(x))


# ---------------------------------------------------------------------------- streamed metrics
def test_streamed_metrics_equal_plain_recomputation():
    sae = random_sae(d_in=6, d_sae=20, k=3)
    x = torch.randn(500, 6) * torch.linspace(0.5, 3.0, 6) + 4.0
    m = evaluate(sae, x.split(64))
    f = sae.encode(x).numpy().astype(float)
    rec = f @ sae.W_dec.numpy() + sae.b_dec.numpy()
    xs = x.numpy().astype(float)
    density = (f != 0).mean(0)
    assert m.tokens == 500
    assert m.l0 == pytest.approx((f != 0).sum(1).mean(), abs=1e-12)
    assert m.fvu == pytest.approx(((xs - rec) ** 2).sum() / ((xs - xs.mean(0)) ** 2).sum(), rel=1e-6)
    np.testing.assert_allclose(m.density, density)
    assert m.dead == int((density == 0).sum()) and m.dense == int((density > 0.1).sum())
    live = density[density > 0]
    assert m.histogram.counts.tolist() == np.histogram(np.log10(live), LOG_DENSITY_EDGES)[0].tolist()
    assert m.histogram.dead == m.dead


def test_ev_curve_equals_explicit_restricted_reconstructions():
    """The curve from streamed pair sums equals reconstructing from each prefix of features."""
    sae = random_sae(d_in=5, d_sae=12, k=3, seed=1)
    x = torch.randn(300, 5, dtype=torch.float64)
    m = evaluate(sae.to(dtype=torch.float64), x.split(70))
    f = sae.to(dtype=torch.float64).encode(x).numpy()
    W, b, xs = sae.W_dec.double().numpy(), sae.b_dec.double().numpy(), x.numpy()
    total = ((xs - xs.mean(0)) ** 2).sum()
    score = (f ** 2).sum(0) * (W ** 2).sum(1)
    live = [i for i in sorted(range(12), key=lambda i: -score[i]) if (f[:, i] != 0).any()]
    expected = [1 - ((xs - (f[:, live[:n]] @ W[live[:n]] + b)) ** 2).sum() / total for n in range(len(live) + 1)]
    np.testing.assert_allclose(m.ev_curve, expected, atol=1e-10)
    assert m.ev_curve[-1] == pytest.approx(1 - m.fvu, abs=1e-10)


def test_superposition_index_of_three_directions_in_a_plane():
    """Data along three directions 120 degrees apart in 2-D, one per token; an SAE with those
    three features (k = 1) reconstructs exactly. Each feature explains 1/3 of the variance, so
    90 % needs 3 features; the covariance is isotropic, so 90 % needs 2 components: index 1.5."""
    angles = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3], dtype=torch.float64)
    U = torch.stack([angles.cos(), angles.sin()], 1)  # (3 features, 2)
    a = torch.linspace(1.0, 2.0, 40, dtype=torch.float64)
    x = (a[:, None, None] * U[None]).reshape(-1, 2)  # every direction with the same amplitudes
    sae = TopKSAE(U.T, torch.zeros(3), U, torch.zeros(2), 1).to(dtype=torch.float64)
    m = evaluate(sae, [x])
    assert m.fvu == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(m.ev_curve, [0.0, 1 / 3, 2 / 3, 1.0], atol=1e-12)
    assert (m.features_90, m.components_90, m.superposition_index, m.superposition_status) == (3, 2, 1.5, "ok")


def test_superposition_index_nan_when_sae_below_target_or_not_tracked():
    sae = random_sae()
    x = torch.randn(200, 6)
    below = evaluate(sae, [x])
    assert below.ev_curve[-1] < 0.9
    assert math.isnan(below.superposition_index) and below.superposition_status == "below_target"
    untracked = evaluate(sae, [x], pairs=False)
    assert untracked.ev_curve is None and untracked.superposition_status == "not_tracked"
    assert untracked.fvu == below.fvu


# ---------------------------------------------------------------------------- decoder geometry
def test_feature_dimensionality_equals_double_loop():
    W = torch.randn(9, 4, dtype=torch.float64)
    W[3] = 0.0
    expected = []
    for i in range(9):
        norm = W[i].norm()
        if norm == 0:
            expected.append(np.nan)
            continue
        expected.append(float(norm ** 2 / sum(float((W[i] / norm) @ W[j]) ** 2 for j in range(9))))
    np.testing.assert_allclose(feature_dimensionality(W, chunk=4), expected)
    # orthogonal features own a dimension each; two equal features share one
    np.testing.assert_allclose(feature_dimensionality(torch.eye(3)), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(feature_dimensionality(torch.tensor([[1.0, 0.0], [1.0, 0.0]])), [0.5, 0.5])


def test_head_attribution_and_entropy_on_a_hand_built_decoder():
    W = torch.tensor([[3.0, 4.0, 0.0, 0.0],   # head 0 only
                      [1.0, 0.0, 0.0, 1.0],   # both heads equally
                      [0.0, 3.0, 4.0, 0.0],   # norms 3 and 4
                      [0.0, 0.0, 0.0, 0.0]])  # zero row
    a = head_attribution(W, n_heads=2)
    np.testing.assert_allclose(a[:3], [[1.0, 0.0], [0.5, 0.5], [3 / 7, 4 / 7]])
    assert np.isnan(a[3]).all()
    h = attribution_entropy(a)
    np.testing.assert_allclose(h[:3], [0.0, math.log(2), -(3 / 7) * math.log(3 / 7) - (4 / 7) * math.log(4 / 7)])
    assert np.isnan(h[3])


def test_ev_l0_area_is_the_mean_ev_over_log2_l0():
    # log2 L0 = 3, 2, 4 -> sorted EV 0.5, 0.7, 0.9: trapezoid 0.6 + 0.8 over a range of 2
    assert ev_l0_area([8, 4, 16], [0.7, 0.5, 0.9]) == pytest.approx(0.7)


# ---------------------------------------------------------------------------- CE splice
@pytest.mark.parametrize("layer,head", [(0, 1), (1, None)])
def test_identity_splice_scores_one_and_zero_sae_scores_zero(twin, layer, head):
    d = 16 if head is not None else 64
    ident = splice_score(twin, PROMPTS, identity_sae(d), layer, head, batch_size=2)
    assert ident.status == "ok" and ident.tokens > 0
    assert abs(ident.ce_spliced - ident.ce_clean) < 1e-6
    assert ident.ce_zero - ident.ce_clean > 1e-4  # zero ablation changes the loss
    assert ident.score == pytest.approx(1.0, abs=1e-6)
    normalised = identity_sae(d, mean=torch.full((d,), 0.3), scale=torch.linspace(0.5, 2.0, d))
    assert splice_score(twin, PROMPTS, normalised, layer, head).score == pytest.approx(1.0, abs=1e-3)
    zero = TopKSAE(torch.randn(d, 8), torch.zeros(8), torch.zeros(8, d), torch.zeros(d), 2)
    ablated = splice_score(twin, PROMPTS, zero, layer, head)
    assert ablated.ce_clean == pytest.approx(ident.ce_clean, abs=1e-9)
    assert ablated.score == pytest.approx(0.0, abs=1e-9)


def test_ce_score_guard():
    assert ce_score(2.0, 3.0, 2.5) == (0.5, "ok")
    score, status = ce_score(2.0, 2.0 + 1e-7, 2.0)
    assert math.isnan(score) and status == "no_ablation_effect"
    score, status = ce_score(2.0, float("inf"), 2.0)
    assert math.isnan(score) and status == "non_finite"


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("change,message", [
    ({"k": 0}, "k must be an integer in 1..d_sae=8"),
    ({"k": 9}, "k must be an integer in 1..d_sae=8"),
    ({"W_dec": torch.zeros(8, 3)}, "W_dec has shape (8, 3); expected (8, 4)"),
    ({"b_enc": torch.zeros(7)}, "b_enc has shape (7,); expected (8,)"),
    ({"scale": torch.zeros(4)}, "scale must be finite and positive"),
])
def test_bad_sae_is_a_one_line_usage_error(change, message):
    parts = {"W_enc": torch.zeros(4, 8), "b_enc": torch.zeros(8), "W_dec": torch.zeros(8, 4),
             "b_dec": torch.zeros(4), "k": 2} | change
    with pytest.raises(UsageError, match=r"^SAE: ") as err:
        TopKSAE(**parts)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_wrong_input_width_and_wrong_site_are_usage_errors(twin):
    sae = identity_sae(16)
    with pytest.raises(UsageError, match="d_in=16"):
        sae.encode(torch.zeros(3, 5))
    with pytest.raises(UsageError, match="layer 0's heads' results has 64 dimensions"):
        splice_score(twin, PROMPTS, sae, 0, None)
    with pytest.raises(UsageError):
        splice_score(twin, PROMPTS, sae, 5, 0)
    with pytest.raises(UsageError, match="two or more different L0"):
        ev_l0_area([4, 4], [0.5, 0.6])
