"""Off-principal energy relative to its direction-free baseline, and the signed forget coupling (pure math).

For a reference weight W (m x n) with top-r singular vectors U_r, V_r (r = ceil(rho min(m, n)))
and an increment D, the principal fraction is

    f = ||U_r^T D V_r||_F^2 / ||D||_F^2,        raw off-principal energy = 1 - f.

For a direction-free increment (D / ||D|| uniform on the sphere, e.g. i.i.d. Gaussian D) the
r x r block holds r^2 of the m n coordinates, so E[f] = r^2 / (m n) exactly, and f ~
Beta(r^2/2, (mn - r^2)/2), Var f = e (1 - e) / (mn/2 + 1) with e = r^2/(mn). The raw energy
therefore ranks by shape: at rho 0.05, 1 - e = 0.99749 for a 1536x1536 q/o projection (r 77)
and 0.99957 for a 256x1536 k/v projection (r 13), so a k_proj increment three times MORE
concentrated in the principal subspace than chance (1 - 3e = 0.99871) still outranks a
direction-free q_proj (0.99749). Normalizing by the baseline removes the shape:

    concentration c = f / e            (1: direction-free; > 1: concentrated; < 1: avoids it)
    normalized off-principal = 1 - c   (0: direction-free; higher = more off-principal than chance)

`standardized_concentration` gives (f - e) / sd(f) under the direction-free null: c alone
still lets small shapes (few r^2 coordinates, a noisier f) reach the extremes more often.

Signed coupling: -<G, D>_F with G = dL_forget/dW at the target; positive when the increment
lowered the forget loss to first order (made the forget texts more likely), the tensors
whose update unlearning should undo.
"""

from __future__ import annotations

import math

import numpy as np

from mast.signals import rank_for  # noqa: F401  (r = ceil(rho min(m, n)), one definition)


def direction_free_fraction(shape, r: int) -> float:
    """E[f] for a direction-free increment: r^2 / (m n)."""
    m, n = int(shape[-2]), int(shape[-1])
    if not 1 <= r <= min(m, n):
        raise ValueError(f"rank {r} out of range for shape {(m, n)}")
    return r * r / (m * n)


def direction_free_sd(shape, r: int) -> float:
    """sd of f for a direction-free increment: sqrt(e (1 - e) / (mn/2 + 1)) (f ~ Beta(r^2/2, (mn - r^2)/2))."""
    e = direction_free_fraction(shape, r)
    mn = int(shape[-2]) * int(shape[-1])
    return math.sqrt(e * (1 - e) / (mn / 2 + 1))


def principal_fraction(U_r: np.ndarray, V_r: np.ndarray, D: np.ndarray) -> float:
    """f = ||U_r^T D V_r||_F^2 / ||D||_F^2 (0 when D = 0); U_r (m x r), V_r (n x r) orthonormal columns."""
    D = np.asarray(D, dtype=np.float64)
    d2 = float(np.sum(D * D))
    if d2 == 0.0:
        return 0.0
    M = np.asarray(U_r, dtype=np.float64).T @ D @ np.asarray(V_r, dtype=np.float64)
    return min(1.0, float(np.sum(M * M)) / d2)


def top_subspace(W: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """(U_r, V_r): the top-r left and right singular vectors of W (exact SVD)."""
    U, _, Vh = np.linalg.svd(np.asarray(W, dtype=np.float64), full_matrices=False)
    return U[:, :r], Vh[:r].T


def concentration(f: float, shape, r: int) -> float:
    """c = f / (r^2 / (m n)): the principal fraction in units of its direction-free expectation."""
    return f / direction_free_fraction(shape, r)


def normalized_off_principal(f: float, shape, r: int) -> float:
    """1 - c: 0 for a direction-free increment, > 0 when it avoids the principal subspace more than chance."""
    return 1.0 - concentration(f, shape, r)


def standardized_concentration(f: float, shape, r: int) -> float:
    """(f - e) / sd(f) under the direction-free null: concentration in standard deviations."""
    return (f - direction_free_fraction(shape, r)) / direction_free_sd(shape, r)


def energy_signals(W: np.ndarray, D: np.ndarray, rho: float) -> dict:
    """All energy variants of one tensor: raw off-principal energy, f, e, c, 1 - c, z, r."""
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    r = rank_for(rho, W.shape)
    U, V = top_subspace(W, r)
    f = principal_fraction(U, V, D)
    return {"rank": r, "principal_fraction": f, "expected_fraction": direction_free_fraction(W.shape, r),
            "off_principal_raw": 1.0 - f if np.any(D) else 0.0, "concentration": concentration(f, W.shape, r),
            "off_principal_normalized": normalized_off_principal(f, W.shape, r),
            "concentration_z": standardized_concentration(f, W.shape, r)}


def normalized_from_raw(raw_energy: float, shape, r: int) -> float:
    """1 - c from a raw off-principal energy E = 1 - f (what the spectral statistics store); 0 when D = 0."""
    if raw_energy == 0.0:  # D = 0: did not move (the rules never select it)
        return 0.0
    return normalized_off_principal(1.0 - raw_energy, shape, r)


def signed_coupling(G: np.ndarray, D: np.ndarray) -> float:
    """-<G, D>_F: > 0 when the increment D lowered the forget loss to first order (L(W + D) ≈ L(W) + <G, D>)."""
    G = np.asarray(G, dtype=np.float64)
    D = np.asarray(D, dtype=np.float64)
    if G.shape != D.shape:
        raise ValueError(f"gradient {G.shape} and increment {D.shape} differ in shape")
    return -float(np.sum(G * D))
