"""The three MAST signals and the score, as pure functions of tensors (no files, no models).

For a candidate tensor with reference weight W (m x n, the SFT model) and increment
D = W_target - W (what RLVR changed):

- update magnitude        ||D||_F / ||W||_F
- off-principal energy    1 - ||U_r^T D V_r||_F^2 / ||D||_F^2, U_r, V_r the top-r singular
                          vectors of W, r = ceil(rho * min(m, n)); 0 when D = 0
- forget coupling         |<G, D>_F| with G = dL_forget/dW at the target model (L_forget the
                          mean token NLL of :mod:`mast.batching`); the cosine
                          <G, D>_F / (||G||_F ||D||_F) is signed (negative: the increment
                          lowered the forget loss)
- MAST score              sum_s w_s * pct_s / sum_s w_s, pct_s the rank percentile of signal s
                          among the candidates (average rank for ties, divided by N)

Shape bias of the raw energy, and the default. A direction-free increment already scores
1 − r²/(mn): 0.99749 for a 1536x1536 q/o and 0.99957 for a 256x1536 k/v projection at rho
0.05, so a k_proj three times MORE concentrated in the principal subspace than chance
(0.99871) still outranks a direction-free q_proj; RLVR increments are close to
direction-free, so the raw value mostly picks k/v by shape. The `mast` score and the
`off_principal` rule therefore rank 1 − f/(r²/(mn)) (f the principal fraction;
:mod:`mast.energy`), 0 for a direction-free increment; `off_principal_raw` keeps the raw
value as an ablation, and `coupling_signed` ranks by −<G, D>_F (did the increment make
the forget texts more likely?). selection.json records every column.

:mod:`mast.selection` streams the checkpoints, caches and applies the rules; everything it
computes per tensor comes from here (:func:`tensor_signals`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

SIGNALS = ("update_magnitude", "off_principal_energy", "coupling")
CURVE_POINTS = 101  # energy curve sampled at rho = 0, 0.01, ..., 1


def rank_for(rho: float, shape: Sequence[int]) -> int:
    """r = ceil(rho * min(m, n)), at least 1 (a 1e-9 slack keeps 0.1 * 30 at 3, not 4)."""
    k = min(int(shape[-2]), int(shape[-1]))
    return max(1, min(k, math.ceil(rho * k - 1e-9)))


def frobenius(x) -> float:
    """||x||_F as a float, accurate to double precision at single-precision speed (row norms, then f64)."""
    if x.dim() < 2 or x.dtype == torch.float64:
        return float(torch.linalg.vector_norm(x.double()))
    return float(torch.linalg.vector_norm(torch.linalg.vector_norm(x, dim=-1).double()))


def magnitude_of_norms(norm_w: float, norm_d: float) -> float:
    """||D||_F / ||W||_F from the two norms (0 when D = 0; inf when W = 0 and D != 0)."""
    if norm_d == 0.0:
        return 0.0
    return norm_d / norm_w if norm_w > 0 else math.inf


def update_magnitude(W, D) -> float:
    """||D||_F / ||W||_F (0 when D = 0; inf when W = 0 and D != 0)."""
    return magnitude_of_norms(frobenius(W), frobenius(D))


@dataclass
class Subspace:
    """Top singular triplets of W: U (m x R), S (R), V (n x R); `sq` all squared singular values
    (descending) when the spectrum was asked for, else None."""

    U: object
    S: object
    V: object
    sq: object
    method: str  # "exact", "fast", or "fast->exact" (the fast path did not converge and fell back)
    iterations: int = 0
    energies: dict | None = None  # {r: off-principal energy of D} when the fast path was given D

    def transposed(self) -> Subspace:
        return Subspace(self.V, self.S, self.U, self.sq, self.method, self.iterations, self.energies)


def _exact_subspace(W, R: int, method: str = "exact") -> Subspace:
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return Subspace(U[:, :R], S[:R], Vh[:R].T, S * S, method)


def _ritz(Q, W, R: int, WtQ=None):
    """Rayleigh-Ritz on span(Q): B = Q^T W, B B^T = Z diag(l) Z^T; U = Q Z, S = sqrt(l), V = B^T Z / S.

    `WtQ` = W^T Q (= B^T) when the caller already has it.
    """
    Bt = W.T @ Q if WtQ is None else WtQ
    lam, Z = torch.linalg.eigh(Bt.T @ Bt)
    lam, Z = lam.flip(0).clamp_min(0), Z.flip(1)
    s = lam[:R].sqrt()
    V = (Bt @ Z[:, :R]) / torch.where(s > 0, s, torch.ones_like(s))
    return Q @ Z[:, :R], s, V, lam


def principal_subspace(
    W, ranks: int | Sequence[int], method: str = "fast", D=None, spectrum: bool = False,
    oversample: int | None = None, tol: float = 5e-4, min_iter: int = 2, max_iter: int = 30, seed: int = 0,
) -> Subspace:
    """Top-R singular subspace of W (R = max(ranks)).

    exact: float64 full SVD. fast (float32; on the smaller side m <= n, W^T otherwise): shifted
    subspace iteration for the top eigenvectors of the Gram matrix A = W W^T, applied as
    Q <- orth(W (W^T Q) - mu Q) (A is never formed), from a seeded Gaussian sketch
    Q = orth(W O) of b = R + p columns, p = max(R, 16). Rayleigh-Ritz against W after each step
    (the b x b eigenproblem of B B^T, B = Q^T W, reusing W^T Q for the next step) gives U, S,
    V and the Ritz values l_1 >= ... >= l_b of A. The shift mu = l_b / 2 (Chebyshev degree 1
    on [0, l_b], from the previous Ritz values, the sketch's for the first step) contracts the
    error per step by gamma = max(l_b - mu, mu) / (l_r - mu) instead of l_b / l_r.
    Stopping rule, checked after every step from `min_iter`: the change c_k of the
    off-principal energies of D since the previous step (with D; without D, of the logarithms
    of the top-R Ritz values) times g / (1 - g) is <= tol (default 5e-4, half the 1e-3 accuracy goal): the
    a-posteriori error of a geometric sequence with ratio g. At the first comparison g is the
    linear rate 1.25 gamma (1.25: the Ritz l_b underestimates s_{b+1}^2 early on); from the
    second on, the observed ratio c_k / c_{k-1}, but at least gamma^2 (energies of increments
    not concentrated on the boundary directions converge quadratically in the subspace angle,
    like Ritz values; concentrated ones show the slower, linear ratio, which is then observed).
    No convergence by `max_iter` steps, or no gap between l_r and l_b: the exact SVD answers
    (method "fast->exact"). `spectrum=True` also returns all
    squared singular values (eigvalsh of A: a diagnostic that costs more than the rest).
    """
    ranks = [ranks] if isinstance(ranks, int) else list(ranks)
    m, n = W.shape
    if m > n:
        Dt = None if D is None else D.T
        sub = principal_subspace(W.T, ranks, method, Dt, spectrum, oversample, tol, min_iter, max_iter, seed)
        return sub.transposed()
    k = m
    ranks = sorted({max(1, min(k, int(r))) for r in ranks})
    R = ranks[-1]
    if method not in ("fast", "exact"):
        raise ValueError(f"unknown method {method!r} (fast|exact)")
    b = min(k, R + (oversample if oversample is not None else max(R, 16)))
    if method == "exact" or b >= k:
        return _exact_subspace(W, R)
    W32 = W.float()
    D32, d2 = (None, 0.0) if D is None else (D.float(), frobenius(D) ** 2)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    Q = torch.linalg.qr(W32 @ torch.randn(n, b, generator=gen).to(device=W32.device)).Q
    WtQ = W32.T @ Q
    # the sketch's own Ritz values (a b x b eigenproblem) give the first shift
    prev, prev_change, mu = None, None, float(torch.linalg.eigvalsh(WtQ.T @ WtQ)[0].clamp_min(0)) / 2
    for it in range(1, max_iter + 1):
        Y = W32 @ WtQ
        if mu:
            Y.sub_(Q, alpha=mu)
        Q = torch.linalg.qr(Y).Q
        WtQ = W32.T @ Q
        if it < min_iter - 1:
            continue
        U, s, V, lam = _ritz(Q, W32, R, WtQ)
        if D32 is not None:
            cur = torch.tensor(energy_at_ranks(Subspace(U, s, V, None, "fast"), D32, ranks, d2))
        else:
            cur = lam[:R].clamp_min(1e-30 * float(lam[0]) + 1e-300).log()  # relative changes of the Ritz values
        if prev is not None:
            lb = float(lam[b - 1])
            gamma = max(max(lb - mu, mu) / (float(lam[r - 1]) - mu) if float(lam[r - 1]) > lb else 1.0 for r in ranks)
            change = float((cur - prev).abs().max())
            if prev_change is None:  # two values: the linear rate, inflated for the Ritz estimate of l_b
                g = min(1.0, 1.25 * gamma)
            else:  # three or more: the observed rate, at least the quadratic-regime rate gamma^2
                g = max(change / prev_change if prev_change > 0 else 0.0, gamma * gamma)
            est = change * g / (1 - g) if g < 1 else math.inf  # no gap between r and b, or not converging
            if est <= tol:
                sq = torch.linalg.eigvalsh(W32 @ W32.T).flip(0).clamp_min(0).double() if spectrum else None
                energies = dict(zip(ranks, cur.tolist(), strict=True)) if D32 is not None else None
                return Subspace(U, s, V, sq, "fast", it, energies)
            prev_change = change
        prev, mu = cur, float(lam[b - 1]) / 2
    return _exact_subspace(W, R, "fast->exact")


def energy_at_ranks(sub: Subspace, D, ranks: Sequence[int], d2: float | None = None) -> list[float]:
    """Off-principal energy 1 - ||U_r^T D V_r||^2 / ||D||^2 for each r (0 when D = 0); d2 = ||D||^2 if known."""
    if d2 is None:
        d2 = frobenius(D) ** 2
    if d2 == 0.0:
        return [0.0 for _ in ranks]
    M = (sub.U.T @ D.to(sub.U.dtype) @ sub.V).double()
    C = M.square().cumsum(0).cumsum(1)
    return [min(1.0, max(0.0, 1.0 - float(C[r - 1, r - 1]) / d2)) for r in ranks]


def off_principal_energy(W, D, rho: float, method: str = "fast") -> float:
    """1 - ||U_r^T D V_r||_F^2 / ||D||_F^2 with U_r, V_r the top-r singular vectors of W, r = ceil(rho min(m,n))."""
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    r = rank_for(rho, W.shape)
    return energy_at_ranks(principal_subspace(W, [r], method, D=D), D, [r])[0]


def energy_curve(sq, total: float | None = None, points: int = CURVE_POINTS) -> list[float]:
    """Fraction of ||W||_F^2 in the top ceil(rho k) singular values, at rho = 0, 1/(points-1), ..., 1."""
    sq = torch.as_tensor(sq, dtype=torch.float64).flatten().cpu()
    k = sq.numel()
    total = float(sq.sum()) if total is None else float(total)
    if total <= 0:
        return [0.0] * points
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), sq.cumsum(0)])
    out = []
    for i in range(points):
        rho = i / (points - 1)
        r = 0 if i == 0 else rank_for(rho, (k, k))
        out.append(round(min(1.0, float(cum[r]) / total), 6))
    return out


def coupling(G, D) -> tuple[float, float]:
    """(|<G, D>_F|, <G, D>_F / (||G||_F ||D||_F)); the cosine is 0 when G or D is 0."""
    G, D = G.double(), D.double()
    inner = float((G * D).sum())
    den = float(torch.linalg.vector_norm(G)) * float(torch.linalg.vector_norm(D))
    return abs(inner), (inner / den if den > 0 else 0.0)


def rank_percentiles(values: Sequence[float]) -> np.ndarray:
    """Rank of each value among all (1 = smallest, ties averaged) divided by N: in (0, 1]."""
    from scipy.stats import rankdata

    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return v
    return rankdata(v, method="average") / v.size


def mast_score(signals: Mapping[str, Sequence[float]], weights: Mapping[str, float]) -> np.ndarray:
    """sum_s w_s pct_s / sum_s w_s over the signals with w_s > 0; pct_s = :func:`rank_percentiles`.

    `signals` maps each signal name to its values over the candidates (one per candidate).
    """
    w = {s: float(weights.get(s, 0.0)) for s in SIGNALS}
    n = len(next(iter(signals.values()))) if signals else 0
    score = np.zeros(n)
    for s, ws in w.items():
        if ws > 0:
            score += ws * rank_percentiles(signals[s])
    return score / sum(w.values())


def tensor_signals(W, D, ranks: Sequence[int], method: str = "fast", curves: bool = False) -> dict:
    """Everything the spectral statistics record for one tensor (D = W_target - W already formed).

    Returns {"norm_w", "norm_d", "update_magnitude", "energies" (off-principal energy at each
    rank of `ranks`), "method", "iterations", "energy_curve" (None unless `curves`)}. One
    subspace at the largest rank serves every rank; D = 0 needs none (energy 0 by definition)
    unless the curve (the full spectrum of W) is asked for.
    """
    ranks = list(ranks)
    norm_w, norm_d = frobenius(W), frobenius(D)
    if norm_d == 0 and not curves:
        sub, energies = Subspace(None, None, None, None, "skipped (D = 0)"), [0.0] * len(ranks)
    else:
        sub = principal_subspace(W, ranks, method, D=D if norm_d > 0 else None, spectrum=curves)
        if sub.energies is not None:
            energies = [sub.energies[r] for r in ranks]
        else:
            energies = energy_at_ranks(sub, D, ranks, norm_d**2)
    return {
        "norm_w": norm_w, "norm_d": norm_d, "update_magnitude": magnitude_of_norms(norm_w, norm_d),
        "energies": energies, "method": sub.method, "iterations": sub.iterations,
        "energy_curve": energy_curve(sub.sq, total=norm_w**2) if curves else None,
    }
