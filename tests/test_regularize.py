"""The differentiable gap of issue 20: equal to the scan's gap on the same keys, its gradient equal
to finite differences, and the penalty's hinge."""

import numpy as np
import pytest
import torch

from spectral.errors import UsageError
from spectral.kernels.key import KeyStats, key_kernel_spectra
from spectral.regularize.penalties import gap_penalty, key_gap


def test_key_gap_is_the_scans_gap():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(3, 11, 16, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, 16, dtype=torch.float64)
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[1, 7:] = False
    stats = KeyStats.zeros(1, 1, 16)
    stats.update(0, keys[:, :, None, :], mask)  # (batch, pos, head, d_head)
    expected = key_kernel_spectra(stats).metrics["gap"][0, 0]
    assert float(key_gap(keys, mask)) == pytest.approx(expected, rel=1e-10)


def test_the_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(1)
    keys = (torch.randn(20, 8, generator=g, dtype=torch.float64) * torch.linspace(0.3, 3.0, 8, dtype=torch.float64))
    keys.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda k: key_gap(k), (keys,), eps=1e-6, atol=1e-7, rtol=1e-5)
    # a gradient step on the penalty moves the gap the requested way
    for direction, sign in (("up", 1), ("down", -1)):
        k = keys.detach().clone().requires_grad_(True)
        before = float(key_gap(k))
        target = before + 0.2 * sign
        loss = gap_penalty(key_gap(k), target, direction)
        loss.backward()
        with torch.no_grad():
            after = float(key_gap(k - 0.05 * k.grad))
        assert (after - before) * sign > 0, (direction, before, after)


def test_the_penalty_is_a_one_sided_squared_hinge():
    gap = torch.tensor([0.2, 0.5, 0.9])
    assert gap_penalty(gap, 0.5, "up").tolist() == pytest.approx([0.09, 0.0, 0.0])
    assert gap_penalty(gap, 0.5, "down").tolist() == pytest.approx([0.0, 0.0, 0.16])
    for target in (0.0, 1.0, 1.5):
        with pytest.raises(UsageError, match="target gap must lie in"):
            gap_penalty(gap, target, "up")
    with pytest.raises(UsageError, match="'up' or 'down'"):
        gap_penalty(gap, 0.5, "sideways")
    with pytest.raises(UsageError, match="at least 2 keys"):
        key_gap(torch.randn(1, 4))
    assert np.isfinite(float(key_gap(torch.randn(5, 4))))
