"""Streamed key-kernel statistics against the brute-force N x N definition."""

import numpy as np
import pytest
import torch

from spectral.kernels.attention import PromptSpectra
from spectral.kernels.key import KeyStats, key_kernel_spectra
from spectral.kernels.result import STATUS_FEW_TOKENS, STATUS_NONFINITE, STATUS_OK, STATUS_RANK
from spectral.kernels.weights import weight_kernel_result, weight_spectra
from spectral.kernels.metrics import SpectrumMetrics, spectrum_metrics
from tests.reference import brute_key_kernel_metrics, brute_metrics

METRICS = SpectrumMetrics.names()


def _random_batch(gen, batch, pos, heads, d, lengths):
    keys = torch.randn(batch, pos, heads, d, generator=gen, dtype=torch.float64) * 2 + 0.5
    mask = torch.zeros(batch, pos, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    return keys, mask


@pytest.mark.parametrize("lengths, d", [([9, 4, 7], 8), ([30, 25, 12], 8), ([3, 2], 8), ([9, 4, 7], 20)])
@pytest.mark.parametrize("center", [True, False])
def test_streamed_metrics_equal_brute_force(lengths, d, center):
    gen = torch.Generator().manual_seed(sum(lengths) + d)
    keys, mask = _random_batch(gen, len(lengths), max(lengths) + 3, 3, d, lengths)  # padding present
    stats = KeyStats.zeros(1, 3, d)
    stats.update(0, keys[:1], mask[:1])  # two batches: streaming must add up
    stats.update(0, keys[1:], mask[1:])
    result = key_kernel_spectra(stats, ridge=1e-2, center=center)
    n = sum(lengths)
    assert result.n_tokens[0].tolist() == [n] * 3
    for h in range(3):
        pooled = keys[:, :, h][mask].numpy()  # (N, d): real tokens only
        ref = brute_key_kernel_metrics(pooled, 1e-2, center)
        for name in METRICS:
            got = getattr(result.metrics, name)[0, h]
            np.testing.assert_allclose(got, ref[name], rtol=1e-6, err_msg=f"{name} N={n} d={d}")
        assert result.status[0, h] == STATUS_OK


def test_shards_add_exactly():
    gen = torch.Generator().manual_seed(0)
    keys, mask = _random_batch(gen, 4, 12, 2, 6, [12, 5, 9, 3])
    whole = KeyStats.zeros(1, 2, 6)
    whole.update(0, keys, mask)
    a, b = KeyStats.zeros(1, 2, 6), KeyStats.zeros(1, 2, 6)
    a.update(0, keys[:2], mask[:2])
    b.update(0, keys[2:], mask[2:])
    merged = a + b
    np.testing.assert_allclose(merged.ktk, whole.ktk, rtol=1e-14)
    assert merged.count.tolist() == whole.count.tolist() == [[29, 29]]
    assert merged.n_prompts.tolist() == [[4, 4]]


def test_degenerate_heads_are_flagged_not_faked():
    stats = KeyStats.zeros(1, 3, 4)
    keys = torch.zeros(1, 3, 3, 4, dtype=torch.float64)
    keys[0, :, 1] = torch.tensor([[1.0, 0, 0, 0], [2.0, 0, 0, 0], [3.0, 0, 0, 0]])  # rank 1 after centring
    keys[0, :, 2] = torch.randn(3, 4, dtype=torch.float64)
    keys[0, 1, 2, 0] = float("nan")
    mask = torch.tensor([[True, True, True]])
    stats.update(0, keys, mask)
    one_token = KeyStats.zeros(1, 3, 4)
    one_token.update(0, keys[:, :1], mask[:, :1])
    res = key_kernel_spectra(stats)
    assert res.status[0].tolist() == [STATUS_RANK, STATUS_RANK, STATUS_NONFINITE]
    assert np.isnan(res.metrics.gap[0, 2])
    # rank 1 head: lambda2 is the ridge alone, and the row says so
    np.testing.assert_allclose(res.metrics.lambda2[0, 1], 1e-2, rtol=1e-9)
    few = key_kernel_spectra(one_token)
    assert few.status[0].tolist() == [STATUS_FEW_TOKENS] * 3
    assert np.isnan(few.metrics.gap).all()


def test_spectrum_metrics_values():
    m = spectrum_metrics(np.array([4.0, 1.0]), fill_value=1.0, fill_count=2)
    assert m.gap == pytest.approx(0.75) and m.instability == pytest.approx(0.25)
    p = np.array([4, 1, 1, 1]) / 7
    assert m.entropy == pytest.approx(-(p * np.log(p)).sum())
    assert m.condition_number == pytest.approx(4.0)


def test_prompt_spectra_match_per_prompt_svd():
    gen = torch.Generator().manual_seed(1)
    mats = torch.randn(2, 2, 5, 5, generator=gen).tril()
    mats = mats.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    acc = PromptSpectra(1, 2)
    acc.update(0, mats, mask)
    res = acc.result()
    for h in range(2):
        gaps = []
        for b, n in enumerate([5, 3]):
            m = torch.nan_to_num(mats[b, h, :n, :n], neginf=0.0).double().numpy()
            gaps.append(brute_metrics(np.linalg.svd(m, compute_uv=False))["gap"])
        assert res.metrics.gap[0, h] == pytest.approx(np.mean(gaps), rel=1e-9)
    assert res.n_tokens[0].tolist() == [8, 8] and res.n_prompts[0].tolist() == [2, 2]


def test_prompt_spectra_batch_equal_lengths_and_average_each_metric_where_defined():
    """Prompts of equal length share one batched SVD; lambda3_ratio needs T >= 3, so the T = 2
    prompt enters every metric's mean but that one (per-metric counts, plain loop reference)."""
    gen = torch.Generator().manual_seed(2)
    mats = torch.randn(4, 3, 5, 5, generator=gen).tril()
    mats = mats.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    lengths = [5, 3, 5, 2]
    mask = torch.tensor([[i < n for i in range(5)] for n in lengths])
    acc = PromptSpectra(1, 3)
    acc.update(0, mats, mask)
    res = acc.result()
    for h in range(3):
        per_prompt = [brute_metrics(np.linalg.svd(torch.nan_to_num(mats[b, h, :n, :n], neginf=0.0).double().numpy(),
                                                  compute_uv=False)) for b, n in enumerate(lengths)]
        for name in METRICS:
            values = [m[name] for m in per_prompt if not np.isnan(m[name])]
            assert res.metrics[name][0, h] == pytest.approx(np.mean(values), rel=1e-9), name
    assert res.n_prompts[0].tolist() == [4, 4, 4] and res.n_tokens[0].tolist() == [15, 15, 15]


def test_prompt_spectra_of_left_padded_prompts_use_their_real_tokens():
    gen = torch.Generator().manual_seed(3)
    mats = torch.randn(2, 2, 5, 5, generator=gen)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    acc = PromptSpectra(1, 2)
    acc.update(0, mats, mask)
    for h in range(2):
        want = np.mean([brute_metrics(np.linalg.svd(mats[0, h, 2:, 2:].double().numpy(), compute_uv=False))["gap"],
                        brute_metrics(np.linalg.svd(mats[1, h].double().numpy(), compute_uv=False))["gap"]])
        assert acc.result().metrics.gap[0, h] == pytest.approx(want, rel=1e-9)


def test_weight_spectra_equal_full_product_svd():
    gen = torch.Generator().manual_seed(2)
    wq, wk = torch.randn(3, 24, 4, generator=gen), torch.randn(3, 24, 4, generator=gen)
    sv = weight_spectra(wq, wk)
    for h in range(3):
        full = np.linalg.svd((wq[h].double() @ wk[h].double().T).numpy(), compute_uv=False)[:4]
        np.testing.assert_allclose(sv[h], full, rtol=1e-9)
    res = weight_kernel_result(sv[None])
    assert (res.status == STATUS_OK).all()


def _stats_of(keys: torch.Tensor) -> KeyStats:
    """KeyStats of one layer from (batch, pos, heads, d) keys, every position real."""
    stats = KeyStats.zeros(1, keys.shape[2], keys.shape[3])
    stats.update(0, keys, torch.ones(keys.shape[:2], dtype=torch.bool))
    return stats


def test_relative_ridge_makes_metrics_scale_invariant_and_matches_brute_force():
    gen = torch.Generator().manual_seed(3)
    keys = torch.randn(3, 20, 2, 8, generator=gen, dtype=torch.float64)
    small, large = _stats_of(keys), _stats_of(10 * keys)
    # the defect: an absolute ridge makes entropy depend on the keys' scale
    a, b = key_kernel_spectra(small, ridge=1e-2), key_kernel_spectra(large, ridge=1e-2)
    assert np.all(np.abs(a.metrics.entropy - b.metrics.entropy) > 0.05)
    ra, rb = (key_kernel_spectra(s, ridge=1e-2, ridge_mode="relative") for s in (small, large))
    for name in ("gap", "instability", "entropy", "effective_rank", "condition_number"):  # the scale-free metrics
        np.testing.assert_allclose(getattr(ra.metrics, name), getattr(rb.metrics, name), rtol=1e-9, err_msg=name)
    np.testing.assert_allclose(rb.metrics.lambda1, 100 * ra.metrics.lambda1, rtol=1e-9)
    np.testing.assert_allclose(rb.ridge, 100 * ra.ridge, rtol=1e-9)
    for h in range(2):  # the relative ridge is exactly the definitions' kernel with lambda = ridge x mean eigenvalue
        pooled = keys[:, :, h].reshape(-1, 8).numpy()
        ref = brute_key_kernel_metrics(pooled, float(ra.ridge[0, h]), True)
        for name in METRICS:
            np.testing.assert_allclose(getattr(ra.metrics, name)[0, h], ref[name], rtol=1e-6, err_msg=name)


def test_dhead_entropy_depends_on_neither_n_nor_scale():
    gen = torch.Generator().manual_seed(4)
    keys = 0.05 * torch.randn(2, 30, 2, 8, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 3, 8, dtype=torch.float64)
    once, twice = _stats_of(keys), _stats_of(torch.cat([keys, keys]))  # same keys twice: N doubles
    a, b = key_kernel_spectra(once), key_kernel_spectra(twice)
    assert np.all(np.abs(a.metrics.entropy - b.metrics.entropy) > 0.01)  # the N-value entropy moves with N
    np.testing.assert_allclose(a.entropy_dhead, b.entropy_dhead, rtol=1e-9)
    np.testing.assert_allclose(a.entropy_dhead, key_kernel_spectra(_stats_of(5 * keys)).entropy_dhead, rtol=1e-9)
    cov = np.cov(keys[:, :, 0].reshape(-1, 8).numpy().T, bias=True)
    p = np.linalg.eigvalsh(cov)[::-1] / np.trace(cov)
    assert a.entropy_dhead[0, 0] == pytest.approx(-(p * np.log(p)).sum(), rel=1e-9)
