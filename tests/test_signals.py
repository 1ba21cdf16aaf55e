"""The signals as pure functions: planted matrices with known answers, against independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mast.signals import (
    SIGNALS,
    coupling,
    energy_at_ranks,
    energy_curve,
    magnitude_of_norms,
    mast_score,
    off_principal_energy,
    principal_subspace,
    rank_for,
    rank_percentiles,
    tensor_signals,
    update_magnitude,
)

# exact: float64 SVD; fast: float32 iteration stopped at an estimated error of 5e-4 (contract: 1e-3)
TOL = {"exact": 1e-9, "fast": 1e-4}


def planted(m: int, n: int, decay: float = 0.9, seed: int = 0):
    """W = U diag(s) V^T with s_i = (i + 3)^-decay, and the full orthonormal bases U (m x m), V (n x n)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    k = min(m, n)
    s = (torch.arange(k, dtype=torch.float64) + 3) ** -decay
    return (U[:, :k] * s) @ V[:, :k].T, U, V


# --------------------------------------------------------------------------- signals on planted matrices


def test_rank_for_is_ceil_of_rho_times_min_side():
    assert rank_for(0.05, (1536, 1536)) == 77
    assert rank_for(0.05, (256, 1536)) == 13
    assert rank_for(0.1, (30, 30)) == 3  # 0.1 * 30 = 3.0000000000000004 in floating point
    assert rank_for(1e-6, (64, 64)) == 1
    assert rank_for(1.0, (32, 64)) == 32


@pytest.mark.parametrize("method", ["exact", "fast"])
@pytest.mark.parametrize("shape", [(120, 80), (80, 120)])
def test_increment_in_principal_subspace_has_zero_energy(method, shape):
    m, n = shape
    W, U, V = planted(m, n)
    r = rank_for(0.1, W.shape)
    X = torch.randn(r, r, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    D = U[:, :r] @ X @ V[:, :r].T
    assert off_principal_energy(W, D, 0.1, method) == pytest.approx(0.0, abs=TOL[method])


@pytest.mark.parametrize("method", ["exact", "fast"])
@pytest.mark.parametrize("shape", [(120, 80), (80, 120)])
def test_increment_in_orthogonal_complement_has_unit_energy(method, shape):
    m, n = shape
    W, U, V = planted(m, n)
    r = rank_for(0.1, W.shape)
    g = torch.Generator().manual_seed(2)
    D = U[:, r:] @ torch.randn(m - r, n - r, generator=g, dtype=torch.float64) @ V[:, r:].T
    assert off_principal_energy(W, D, 0.1, method) == pytest.approx(1.0, abs=TOL[method])
    # one-sided: left factor inside the subspace, right factor outside -> U_r^T D V_r = 0 too
    D1 = U[:, :r] @ torch.randn(r, n - r, generator=g, dtype=torch.float64) @ V[:, r:].T
    assert off_principal_energy(W, D1, 0.1, method) == pytest.approx(1.0, abs=TOL[method])


def test_mixed_increment_energy_is_the_off_subspace_share():
    W, U, V = planted(60, 50)
    r = rank_for(0.1, W.shape)  # 5
    inside = U[:, :r] @ V[:, :r].T  # ||.||^2 = r
    outside = U[:, r : 2 * r] @ V[:, r : 2 * r].T  # ||.||^2 = r, orthogonal to `inside`
    D = inside + 3.0 * outside
    assert off_principal_energy(W, D, 0.1, "exact") == pytest.approx(9.0 / 10.0, abs=1e-12)
    assert off_principal_energy(W, D, 0.1, "fast") == pytest.approx(9.0 / 10.0, abs=TOL["fast"])


def test_update_magnitude_is_exact():
    W, _, _ = planted(40, 30)
    assert update_magnitude(W, -0.25 * W) == pytest.approx(0.25, rel=1e-14)
    D = torch.randn(40, 30, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = np.linalg.norm(D.numpy()) / np.linalg.norm(W.numpy())
    assert update_magnitude(W, D) == pytest.approx(expected, rel=1e-14)
    assert update_magnitude(W, torch.zeros_like(W)) == 0.0
    assert off_principal_energy(W, torch.zeros_like(W), 0.05) == 0.0


@pytest.mark.parametrize("shape", [(240, 160), (160, 240), (48, 320)])
def test_fast_path_matches_exact_svd(shape):
    """Gram subspace iteration + Rayleigh-Ritz converges (no fallback) and agrees with the full SVD."""
    W, _, _ = planted(*shape, decay=0.8, seed=4)
    g = torch.Generator().manual_seed(5)
    ranks = [rank_for(rho, shape) for rho in (0.02, 0.05, 0.1)]
    exact = principal_subspace(W, ranks, "exact")
    fast = principal_subspace(W, ranks, "fast", spectrum=True)
    assert fast.method == "fast"
    assert torch.allclose(fast.S.double(), exact.S, rtol=1e-3)
    # the spectrum (for the energy curve) agrees too
    assert np.allclose(energy_curve(fast.sq), energy_curve(exact.sq), atol=1e-5)
    U, _, Vh = torch.linalg.svd(W)
    increments = [
        # low-rank increments plus noise, like an RLVR update on top of bf16 rounding
        1e-2 * torch.randn(shape[0], 4, generator=g, dtype=torch.float64) @ torch.randn(
            4, shape[1], generator=g, dtype=torch.float64) + 1e-4 * torch.randn(*shape, generator=g, dtype=torch.float64)
        for _ in range(3)
    ] + [
        # the worst case for a subspace error: D concentrated on the singular pair just inside / outside r
        U[:, r - 1 : r + 1] @ torch.tensor([[1.0, 0.3], [0.2, 1.0]], dtype=torch.float64) @ Vh[r - 1 : r + 1]
        for r in ranks
    ]
    for D in increments:
        sub = principal_subspace(W, ranks, "fast", D=D)
        assert sub.method == "fast"
        e_fast, e_exact = energy_at_ranks(sub, D, ranks), energy_at_ranks(exact, D, ranks)
        assert np.max(np.abs(np.subtract(e_fast, e_exact))) <= 1e-3


def test_fast_path_falls_back_when_the_subspace_is_not_determined():
    """Equal singular values: no gap, the energies do not settle, so the exact SVD answers."""
    g = torch.Generator().manual_seed(6)
    Q = torch.linalg.qr(torch.randn(50, 50, generator=g, dtype=torch.float64)).Q
    D = torch.randn(50, 50, generator=g, dtype=torch.float64)
    # the energies of D keep changing from check to check (the top-3 subspace is arbitrary)
    assert principal_subspace(Q, [3], "fast", D=D).method == "fast->exact"


def test_energy_curve_is_monotone_and_reaches_one():
    W, _, _ = planted(50, 40)
    curve = energy_curve(principal_subspace(W, [2], "exact").sq)
    assert len(curve) == 101 and curve[0] == 0.0
    assert curve[-1] == pytest.approx(1.0, abs=1e-6)
    assert all(b >= a for a, b in zip(curve, curve[1:], strict=False))


def test_coupling_inner_product_and_cosine():
    G = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    D = torch.tensor([[0.5, -1.0], [3.0, 2.0]])
    inner = 1 * 0.5 + 2 * -1.0 + 0 * 3 + -1 * 2  # -3.5
    value, cos = coupling(G, D)
    assert value == pytest.approx(3.5)
    assert cos == pytest.approx(inner / (math.sqrt(6) * math.sqrt(14.25)))
    assert coupling(G, torch.zeros_like(D)) == (0.0, 0.0)


def test_rank_percentiles_average_ties():
    assert rank_percentiles([3.0, 1.0, 2.0, 2.0]).tolist() == [1.0, 0.25, 0.625, 0.625]


def test_mast_score_is_the_weighted_mean_of_rank_percentiles():
    """Three candidates, each signal a permutation of 1..3: percentiles are rank / 3."""
    sig = {"update_magnitude": [1.0, 2.0, 3.0], "off_principal_energy": [3.0, 1.0, 2.0], "coupling": [2.0, 3.0, 1.0]}
    assert mast_score(sig, dict.fromkeys(SIGNALS, 1.0)).tolist() == pytest.approx([6 / 9, 6 / 9, 6 / 9])
    # weights 2:1:0 -> (2 pct_mag + pct_off) / 3
    w = {"update_magnitude": 2.0, "off_principal_energy": 1.0, "coupling": 0.0}
    assert mast_score(sig, w).tolist() == pytest.approx([(2 / 3 + 1) / 3, (4 / 3 + 1 / 3) / 3, (2 + 2 / 3) / 3])
    # a signal left out of the weights counts 0
    assert mast_score(sig, {"coupling": 1.0}).tolist() == pytest.approx([2 / 3, 1.0, 1 / 3])


def test_magnitude_of_norms_edge_cases():
    assert magnitude_of_norms(2.0, 0.5) == 0.25
    assert magnitude_of_norms(0.0, 0.0) == 0.0  # nothing moved
    assert magnitude_of_norms(0.0, 1.0) == math.inf  # a zero weight that moved


@pytest.mark.parametrize("method", ["exact", "fast"])
def test_tensor_signals_agree_with_the_single_signal_functions(method):
    """The per-tensor record of the spectral statistics is the tested signals, at every rank."""
    W, U, V = planted(90, 70, seed=8)
    g = torch.Generator().manual_seed(9)
    D = 1e-2 * torch.randn(90, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 70, generator=g,
                                                                                    dtype=torch.float64)
    rhos = (0.05, 0.2)
    ranks = [rank_for(rho, W.shape) for rho in rhos]
    sig = tensor_signals(W, D, ranks, method)
    assert sig["update_magnitude"] == update_magnitude(W, D)
    assert sig["norm_w"] == pytest.approx(float(torch.linalg.norm(W)), rel=1e-12)
    assert sig["norm_d"] == pytest.approx(float(torch.linalg.norm(D)), rel=1e-12)
    for rho, e in zip(rhos, sig["energies"], strict=True):
        assert e == pytest.approx(off_principal_energy(W, D, rho, "exact"), abs=TOL[method])
    assert sig["energy_curve"] is None


def test_tensor_signals_of_an_unmoved_tensor():
    W, _, _ = planted(40, 30)
    sig = tensor_signals(W, torch.zeros_like(W), [2, 5])
    assert sig["update_magnitude"] == 0.0 and sig["energies"] == [0.0, 0.0] and sig["method"] == "skipped (D = 0)"
    # the energy curve needs the spectrum of W even when D = 0
    curved = tensor_signals(W, torch.zeros_like(W), [2], "exact", curves=True)
    assert curved["energies"] == [0.0] and curved["energy_curve"][-1] == pytest.approx(1.0, abs=1e-6)
