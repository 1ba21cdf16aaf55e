"""Off-principal energy normalized by its direction-free baseline; signed coupling (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from mast import energy as en


def _orthonormal(rng, m, r):
    q, _ = np.linalg.qr(rng.standard_normal((m, r)))
    return q


def _with_fraction(rng, U, V, f):
    """An increment whose principal fraction is exactly f: sqrt(f) in-subspace + sqrt(1-f) outside, unit norm."""
    inside = U @ rng.standard_normal((U.shape[1], V.shape[1])) @ V.T
    noise = rng.standard_normal((U.shape[0], V.shape[0]))
    outside = noise - U @ (U.T @ noise @ V) @ V.T
    return np.sqrt(f) * inside / np.linalg.norm(inside) + np.sqrt(1 - f) * outside / np.linalg.norm(outside)


def test_issue_numbers_for_the_direction_free_energy_at_rho_005():
    rq = en.rank_for(0.05, (1536, 1536))
    rk = en.rank_for(0.05, (256, 1536))
    assert (rq, rk) == (77, 13)
    assert round(1 - en.direction_free_fraction((1536, 1536), rq), 5) == 0.99749
    assert round(1 - en.direction_free_fraction((256, 1536), rk), 5) == 0.99957


def test_increment_inside_the_principal_subspace_has_concentration_mn_over_r2():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((64, 48))
    r = en.rank_for(0.1, W.shape)
    U, V = en.top_subspace(W, r)
    D = U @ rng.standard_normal((r, r)) @ V.T
    s = en.energy_signals(W, D, 0.1)
    assert s["principal_fraction"] == pytest.approx(1.0)
    assert s["concentration"] == pytest.approx(64 * 48 / r**2)
    assert s["off_principal_raw"] == pytest.approx(0.0, abs=1e-12)


def test_direction_free_increments_have_mean_fraction_r2_over_mn_and_the_beta_sd():
    rng = np.random.default_rng(1)
    shape, rho = (96, 40), 0.1
    W = rng.standard_normal(shape)
    r = en.rank_for(rho, shape)
    U, V = en.top_subspace(W, r)
    fs = np.array([en.principal_fraction(U, V, rng.standard_normal(shape)) for _ in range(4000)])
    e = en.direction_free_fraction(shape, r)
    sd = en.direction_free_sd(shape, r)
    assert fs.mean() == pytest.approx(e, abs=4 * sd / np.sqrt(fs.size))
    assert fs.std() == pytest.approx(sd, rel=0.05)
    cs = np.array([en.concentration(f, shape, r) for f in fs])
    assert cs.mean() == pytest.approx(1.0, abs=0.02)


def test_concentrated_k_proj_no_longer_outranks_a_direction_free_q_proj_once_normalized():
    rng = np.random.default_rng(2)
    rho = 0.05
    q_shape, k_shape = (1536, 1536), (256, 1536)
    rq, rk = en.rank_for(rho, q_shape), en.rank_for(rho, k_shape)
    Uq, Vq = _orthonormal(rng, 1536, rq), _orthonormal(rng, 1536, rq)
    Uk, Vk = _orthonormal(rng, 256, rk), _orthonormal(rng, 1536, rk)
    Dq = rng.standard_normal(q_shape)  # direction-free
    Dk = _with_fraction(rng, Uk, Vk, 3 * en.direction_free_fraction(k_shape, rk))  # 3x more concentrated
    fq, fk = en.principal_fraction(Uq, Vq, Dq), en.principal_fraction(Uk, Vk, Dk)
    assert en.concentration(fk, k_shape, rk) == pytest.approx(3.0)
    assert en.concentration(fq, q_shape, rq) == pytest.approx(1.0, abs=0.1)
    # raw energy: the concentrated k_proj still ranks above the direction-free q_proj (by shape)
    assert 1 - fk > 1 - fq
    # normalized: the q_proj ranks above
    assert en.normalized_off_principal(fq, q_shape, rq) > en.normalized_off_principal(fk, k_shape, rk)
    assert en.standardized_concentration(fk, k_shape, rk) > en.standardized_concentration(fq, q_shape, rq)


def test_zero_increment_has_zero_fraction():
    W = np.eye(8)
    s = en.energy_signals(W, np.zeros((8, 8)), 0.25)
    assert s["principal_fraction"] == 0.0 and s["off_principal_raw"] == 0.0


def test_signed_coupling_is_positive_when_the_increment_lowered_the_loss_to_first_order():
    rng = np.random.default_rng(3)
    T, W = rng.standard_normal((6, 5)), rng.standard_normal((6, 5))

    def loss(X):
        return 0.5 * np.sum((X - T) ** 2)

    G = W - T  # dL/dW
    toward, away = 0.01 * (T - W), 0.01 * (W - T)
    assert en.signed_coupling(G, toward) > 0 > en.signed_coupling(G, away)
    D = 1e-4 * rng.standard_normal((6, 5))
    assert loss(W + D) - loss(W) == pytest.approx(-en.signed_coupling(G, D), rel=1e-3)
    with pytest.raises(ValueError):
        en.signed_coupling(G, D[:3])
