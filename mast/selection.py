"""Which tensors to unlearn: the three MAST signals, the selection rules, and `mast select`.

For a candidate tensor with reference weight W (m x n, the SFT model) and increment
D = W_target - W (what RLVR changed):

- update magnitude        ||D||_F / ||W||_F
- off-principal energy    1 - ||U_r^T D V_r||_F^2 / ||D||_F^2, U_r, V_r the top-r singular
                          vectors of W, r = ceil(rho * min(m, n)); 0 when D = 0
- forget coupling         |<G, D>_F| with G = dL_forget/dW at the target model, L_forget the
                          mean token NLL of the forget solutions (prompt tokens masked);
                          `coupling_cosine` = <G, D>_F / (||G||_F ||D||_F), signed (negative:
                          the increment lowered the forget loss)
- MAST score              sum_s w_s * pct_s / sum_s w_s, pct_s the rank percentile of signal s
                          among the candidates (average rank for ties, divided by N)

The pure functions (tensors in, numbers out) come first; then the two trial-independent,
disk-cached stages (`spectral_stats`: magnitudes, energies and spectra from the two
checkpoints streamed one tensor at a time; `coupling_stats`: one batched backward pass of
the target on the forget texts); then the rules, `select` and the CLI.

Selection policy (documented choices):
- Signal rules (`mast`, `off_principal`, `magnitude`, `coupling`) never select a tensor
  with D = 0: it scores lowest (score 0) and is ineligible. When k exceeds the number of
  tensors that moved, only the moved ones are selected and the selection says so in
  `warnings` (padding with unmoved tensors would be arbitrary).
- `random` draws a priority per candidate from numpy's Generator(seed) in inventory order
  and takes the k highest, among all candidates (it is the signal-blind control).
- `attention` selects every candidate, `full` every parameter (`all_parameters: true`);
  both ignore k.
- Ties are broken by score (descending), then name (ascending).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mast.config import SelectionSpec, load_yaml, validate
from mast.files import (
    InputError,
    cache_root,
    fingerprint_model,
    read_json,
    read_jsonl,
    stable_hash,
    write_json,
)
from mast.models import DEFAULT_PATTERNS, check_model_dir, matched_inventory

SIGNALS = ("update_magnitude", "off_principal_energy", "coupling")
SPECTRAL_VERSION = 1
COUPLING_VERSION = 1
CURVE_POINTS = 101  # energy curve sampled at rho = 0, 0.01, ..., 1


def _torch():
    import torch

    return torch


def default_device() -> str:
    return "cuda" if _torch().cuda.is_available() else "cpu"


# =========================================================================== pure math


def rank_for(rho: float, shape: Sequence[int]) -> int:
    """r = ceil(rho * min(m, n)), at least 1 (a 1e-9 slack keeps 0.1 * 30 at 3, not 4)."""
    k = min(int(shape[-2]), int(shape[-1]))
    return max(1, min(k, math.ceil(rho * k - 1e-9)))


def frobenius(x) -> float:
    """||x||_F as a float, accurate to double precision at single-precision speed (row norms, then f64)."""
    torch = _torch()
    if x.dim() < 2 or x.dtype == torch.float64:
        return float(torch.linalg.vector_norm(x.double()))
    return float(torch.linalg.vector_norm(torch.linalg.vector_norm(x, dim=-1).double()))


def update_magnitude(W, D) -> float:
    """||D||_F / ||W||_F (0 when D = 0; inf when W = 0 and D != 0)."""
    torch = _torch()
    nd = float(torch.linalg.vector_norm(D.double()))
    if nd == 0.0:
        return 0.0
    nw = float(torch.linalg.vector_norm(W.double()))
    return nd / nw if nw > 0 else math.inf


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
    torch = _torch()
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return Subspace(U[:, :R], S[:R], Vh[:R].T, S * S, method)


def _ritz(Q, W, R: int, WtQ=None):
    """Rayleigh-Ritz on span(Q): B = Q^T W, B B^T = Z diag(l) Z^T; U = Q Z, S = sqrt(l), V = B^T Z / S.

    `WtQ` = W^T Q (= B^T) when the caller already has it.
    """
    torch = _torch()
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
    torch = _torch()
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
    torch = _torch()
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
    torch = _torch()
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


# =========================================================================== spectral statistics (cached)


def _spectral_key(ref_fp: str, tgt_fp: str, rho: float, patterns: Sequence[str], method: str, curves: bool) -> str:
    return stable_hash({"v": SPECTRAL_VERSION, "reference": ref_fp, "target": tgt_fp, "rho": float(rho),
                        "patterns": list(patterns), "method": method, "curves": bool(curves)})


def spectral_stats_multi(
    reference: str | os.PathLike, target: str | os.PathLike, rhos: Iterable[float],
    cache_dir: str | os.PathLike | None = None, patterns: Sequence[str] = DEFAULT_PATTERNS,
    method: str = "fast", device: str | None = None, progress: bool = True, curves: bool = False,
) -> dict[float, dict]:
    """Spectral statistics for several rho at once (one subspace per tensor, at the largest r).

    Each rho gets its own cache file `cache_root(cache_dir)/spectral/<hash>.json`, keyed by
    the fingerprints of both checkpoints, rho, the candidate patterns and the method, so a
    sweep's prepare step can fill the cache for every rho of its grid in one pass.
    `curves=True` adds each tensor's energy curve (the full spectrum of W: a diagnostic that
    costs the fast path about as much again; `select` does not need it).
    """
    torch = _torch()
    rhos = sorted({float(r) for r in rhos})
    for rho in rhos:
        if not 0.0 < rho <= 1.0:
            raise InputError(f"rho: must be in (0, 1], got {rho}")
    if method not in ("fast", "exact"):
        raise InputError(f"method: unknown {method!r} (fast|exact)")
    check_model_dir(reference, "reference")
    check_model_dir(target, "target")
    patterns = list(patterns)
    ref_fp, tgt_fp = fingerprint_model(reference), fingerprint_model(target)
    folder = cache_root(cache_dir) / "spectral"
    paths = {rho: folder / f"{_spectral_key(ref_fp, tgt_fp, rho, patterns, method, curves)}.json" for rho in rhos}
    out: dict[float, dict] = {}
    for rho, path in paths.items():
        if path.is_file():
            try:
                out[rho] = {**read_json(path), "cache_hit": True}
            except InputError:  # a corrupt cache entry is recomputed
                pass
    todo = [rho for rho in rhos if rho not in out]
    if not todo:
        return out

    from tqdm import tqdm

    dev = device or default_device()
    cands, ref_store, tgt_store = matched_inventory(reference, target, patterns)
    t0 = time.perf_counter()
    rows: dict[float, list[dict]] = {rho: [] for rho in todo}
    for c in tqdm(cands, desc="spectral stats", unit="tensor", disable=not progress, file=sys.stderr):
        rkey, tkey = c.key_in(ref_store), c.key_in(tgt_store)
        # the fast path works in float32: bf16/fp16 weights and their difference are exact in it
        half = {ref_store.dtype(rkey), tgt_store.dtype(tkey)} <= {"BF16", "F16"}
        dtype = torch.float32 if method == "fast" and half else torch.float64
        W = ref_store.get(rkey, dtype=dtype, device=dev)
        D = tgt_store.get(tkey, dtype=dtype, device=dev)
        D.sub_(W)
        if W.dim() != 2:
            raise InputError(f"{reference}: candidate {c.name} is not a matrix (shape {list(W.shape)})")
        ranks = [rank_for(rho, W.shape) for rho in todo]
        norm_w, norm_d = frobenius(W), frobenius(D)
        magnitude = 0.0 if norm_d == 0 else (norm_d / norm_w if norm_w > 0 else math.inf)
        if norm_d == 0 and not curves:  # nothing moved: energy 0 by definition, no subspace needed
            sub, energies = Subspace(None, None, None, None, "skipped (D = 0)"), [0.0] * len(ranks)
        else:
            sub = principal_subspace(W, ranks, method, D=D if norm_d > 0 else None, spectrum=curves)
            if sub.energies is not None:
                energies = [sub.energies[r] for r in ranks]
            else:
                energies = energy_at_ranks(sub, D, ranks, norm_d**2)
        curve = energy_curve(sub.sq, total=norm_w**2) if curves else None
        for rho, r, e in zip(todo, ranks, energies, strict=True):
            rows[rho].append({
                "name": c.name, "shape": list(c.shape), "norm_w": norm_w, "norm_d": norm_d,
                "update_magnitude": magnitude, "off_principal_energy": e, "r": r,
                "method": sub.method, "iterations": sub.iterations, "energy_curve": curve,
            })
        del W, D, sub
    seconds = time.perf_counter() - t0
    for rho in todo:
        entry = {
            "version": SPECTRAL_VERSION, "reference": str(reference), "target": str(target),
            "fingerprints": {"reference": ref_fp, "target": tgt_fp}, "rho": rho, "patterns": patterns,
            "method": method, "seconds": round(seconds, 3),
            "curve_rho": [i / (CURVE_POINTS - 1) for i in range(CURVE_POINTS)], "candidates": rows[rho],
        }
        write_json(paths[rho], entry)
        out[rho] = {**entry, "cache_hit": False}
    return out


def spectral_stats(
    reference: str | os.PathLike, target: str | os.PathLike, rho: float = 0.05,
    cache_dir: str | os.PathLike | None = None, patterns: Sequence[str] = DEFAULT_PATTERNS,
    method: str = "fast", device: str | None = None, progress: bool = True, curves: bool = False,
) -> dict:
    """Per candidate: update magnitude, off-principal energy at rho (and energy curve); cached on disk.

    Trial-independent (a function of the two checkpoints, rho and the patterns only), so a
    sweep computes it once. Returns {"candidates": [{"name", "shape", "norm_w", "norm_d",
    "update_magnitude", "off_principal_energy", "r", "energy_curve" (None unless `curves`), ...}],
    "cache_hit", ...}.
    """
    return spectral_stats_multi(reference, target, [rho], cache_dir, patterns, method, device, progress,
                                curves)[float(rho)]


# =========================================================================== forget-gradient coupling (cached)


def _check_forget(forget: Sequence[dict], source: str = "forget") -> None:
    if not forget:
        raise InputError(f"{source}: no problems (the coupling signal needs forget texts)")
    for i, row in enumerate(forget):
        if not isinstance(row, dict):
            raise InputError(f"{source}[{i}]: expected a problem object")
        for key in ("prompt", "solution"):
            if not isinstance(row.get(key), str):
                raise InputError(f"{source}[{i}]: missing field {key!r}")


def forget_batches(tokenizer, forget: Sequence[dict], template: str, max_length: int, batch_size: int):
    """Right-padded batches (input_ids, attention_mask, completion_mask) of prompt + solution texts."""
    torch = _torch()
    from mast.prompts import problem_pair

    pairs = [problem_pair(tokenizer, p, template, max_length) for p in forget]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batches = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        L = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), L), pad, dtype=torch.long)
        att = torch.zeros((len(chunk), L), dtype=torch.long)
        msk = torch.zeros((len(chunk), L), dtype=torch.long)
        for j, (x, m) in enumerate(chunk):
            ids[j, : len(x)] = torch.tensor(x)
            att[j, : len(x)] = 1
            msk[j, : len(m)] = torch.tensor(m)
        batches.append((ids, att, msk))
    return batches


def token_nll_sum(model, ids, att, msk):
    """Sum of -log p(token) over completion tokens (logits at t predict token t+1), and their count."""
    torch = _torch()
    logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits[:, :-1]
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    target = ids[:, 1:]
    weight = (msk[:, 1:] * att[:, 1:]).to(logits.dtype)
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="none")
    return (nll * weight.reshape(-1)).sum(), weight.sum()


def coupling_stats(
    reference: str | os.PathLike, target: str | os.PathLike, forget: Sequence[dict],
    cache_dir: str | os.PathLike | None = None, patterns: Sequence[str] = DEFAULT_PATTERNS,
    template: str = "qwen_boxed", max_length: int = 1024, batch_size: int = 8,
    device: str | None = None, progress: bool = True,
) -> dict:
    """Per candidate: |<G, D>_F| and the cosine, G the gradient of the forget loss at the target.

    L_forget = (sum of completion-token NLL over all forget texts) / (number of those tokens),
    accumulated over batches of `batch_size` (one backward pass per batch; the result does not
    depend on the batch size). Only candidate tensors require grad. Cached under
    `cache_root/coupling/` by both fingerprints, the forget texts, template, max_length, patterns.
    """
    torch = _torch()
    from mast.prompts import TEMPLATES

    _check_forget(forget)
    if template not in TEMPLATES:
        raise InputError(f"template: unknown {template!r}; known: {sorted(TEMPLATES)}")
    check_model_dir(reference, "reference")
    check_model_dir(target, "target")
    patterns = list(patterns)
    ref_fp, tgt_fp = fingerprint_model(reference), fingerprint_model(target)
    texts = [[p["prompt"], p["solution"]] for p in forget]
    key = stable_hash({"v": COUPLING_VERSION, "reference": ref_fp, "target": tgt_fp, "texts": texts,
                       "template": template, "max_length": max_length, "patterns": patterns})
    path = cache_root(cache_dir) / "coupling" / f"{key}.json"
    if path.is_file():
        try:
            return {**read_json(path), "cache_hit": True}
        except InputError:
            pass

    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = device or default_device()
    cands, ref_store, tgt_store = matched_inventory(reference, target, patterns)
    tok = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).to(dev)
    model.eval()
    model.requires_grad_(False)
    params = dict(model.named_parameters())
    missing = [c.name for c in cands if c.name not in params]
    if missing:
        raise InputError(f"{target}: candidate(s) {missing[:3]} are not parameters of the loaded model")
    for c in cands:
        params[c.name].requires_grad_(True)
    batches = forget_batches(tok, forget, template, max_length, batch_size)
    n_tokens = int(sum(int((m[:, 1:] * a[:, 1:]).sum()) for _, a, m in batches))
    if n_tokens == 0:
        raise InputError(f"forget: no solution tokens within max_length={max_length}")
    total = 0.0
    t0 = time.perf_counter()
    for ids, att, msk in tqdm(batches, desc="forget gradient", unit="batch", disable=not progress, file=sys.stderr):
        s, _ = token_nll_sum(model, ids.to(dev), att.to(dev), msk.to(dev))
        (s / n_tokens).backward()
        total += float(s.detach())
    rows = {}
    for c in cands:
        G = params[c.name].grad
        G = torch.zeros_like(params[c.name]) if G is None else G
        D = tgt_store.get(c.key_in(tgt_store), dtype=torch.float64, device=dev)
        D.sub_(ref_store.get(c.key_in(ref_store), dtype=torch.float64, device=dev))
        value, cosine = coupling(G, D)
        rows[c.name] = {"coupling": value, "coupling_cosine": cosine,
                        "grad_norm": float(torch.linalg.vector_norm(G.double()))}
    entry = {
        "version": COUPLING_VERSION, "reference": str(reference), "target": str(target),
        "fingerprints": {"reference": ref_fp, "target": tgt_fp}, "template": template, "max_length": max_length,
        "patterns": patterns, "forget_loss": total / n_tokens, "forget_tokens": n_tokens, "n_forget": len(forget),
        "seconds": round(time.perf_counter() - t0, 3), "candidates": rows,
    }
    del model, params
    write_json(path, entry)
    return {**entry, "cache_hit": False}


# =========================================================================== rules


def _moved(rows: Sequence[dict]) -> list[bool]:
    return [r["norm_d"] > 0 for r in rows]


def _top_k(rows: Sequence[dict], scores: Sequence[float], k: int, eligible: Sequence[bool]) -> list[bool]:
    """The k eligible rows with the highest score; ties by name."""
    order = sorted((i for i in range(len(rows)) if eligible[i]), key=lambda i: (-scores[i], rows[i]["name"]))
    chosen = set(order[:k])
    return [i in chosen for i in range(len(rows))]


def _signal_rule(signal: str):
    def rule(rows: Sequence[dict], spec: SelectionSpec) -> tuple[list[float], list[bool]]:
        moved = _moved(rows)
        scores = [float(r[signal]) if m else 0.0 for r, m in zip(rows, moved, strict=True)]
        return scores, _top_k(rows, scores, spec.k, moved)

    rule.__doc__ = f"Top-k moved tensors by {signal} (raw value is the score)."
    return rule


def rule_mast(rows: Sequence[dict], spec: SelectionSpec) -> tuple[list[float], list[bool]]:
    """Top-k moved tensors by sum_s w_s pct_s / sum_s w_s (rank percentiles over all candidates)."""
    moved = _moved(rows)
    weights = {s: float(spec.weights.get(s, 0.0)) for s in SIGNALS}
    total = sum(weights.values())
    score = np.zeros(len(rows))
    for s, w in weights.items():
        if w > 0:
            score += w * rank_percentiles([r[s] for r in rows])
    scores = [float(x / total) if m else 0.0 for x, m in zip(score, moved, strict=True)]
    return scores, _top_k(rows, scores, spec.k, moved)


def rule_random(rows: Sequence[dict], spec: SelectionSpec) -> tuple[list[float], list[bool]]:
    """k candidates by a uniform priority drawn from numpy.random.default_rng(seed), inventory order."""
    scores = np.random.default_rng(spec.seed).random(len(rows)).tolist()
    return scores, _top_k(rows, scores, spec.k, [True] * len(rows))


def rule_attention(rows: Sequence[dict], spec: SelectionSpec) -> tuple[list[float], list[bool]]:
    """Every candidate tensor (ignores k)."""
    return [1.0] * len(rows), [True] * len(rows)


def rule_full(rows: Sequence[dict], spec: SelectionSpec) -> tuple[list[float], list[bool]]:
    """Every parameter of the model (the full-parameter baseline; ignores k)."""
    return [1.0] * len(rows), [True] * len(rows)


RULES = {
    "mast": rule_mast,
    "off_principal": _signal_rule("off_principal_energy"),
    "magnitude": _signal_rule("update_magnitude"),
    "coupling": _signal_rule("coupling"),
    "random": rule_random,
    "attention": rule_attention,
    "full": rule_full,
}
SIGNAL_RULES = ("mast", "off_principal", "magnitude", "coupling")
ALL_RULES = ("attention", "full")


def apply_rule(rows: Sequence[dict], spec: SelectionSpec) -> tuple[list[float], list[bool], list[str]]:
    """(scores, selected, warnings) of `spec.rule` on candidate rows carrying the three signals."""
    if spec.rule not in RULES:
        raise InputError(f"rule: unknown {spec.rule!r}; known: {sorted(RULES)}")
    scores, selected = RULES[spec.rule](rows, spec)
    warnings = []
    n_sel = sum(selected)
    if spec.rule not in ALL_RULES and n_sel < spec.k:
        if spec.rule in SIGNAL_RULES:
            n_moved = sum(_moved(rows))
            warnings.append(f"k={spec.k} exceeds the {n_moved} tensor(s) that moved (D != 0) among "
                            f"{len(rows)} candidates; selected {n_sel}")
        else:
            warnings.append(f"k={spec.k} exceeds the {len(rows)} candidates; selected {n_sel}")
    return scores, selected, warnings


# =========================================================================== select


def _as_spec(spec) -> SelectionSpec:
    if spec is None:
        return SelectionSpec()
    if isinstance(spec, SelectionSpec):
        return validate(SelectionSpec, spec.model_dump(), "selection spec")
    if isinstance(spec, dict):
        return validate(SelectionSpec, spec, "selection spec")
    raise InputError(f"selection spec: expected a SelectionSpec or a mapping, got {type(spec).__name__}")


def select(
    reference: str | os.PathLike, target: str | os.PathLike, forget: Sequence[dict], spec: SelectionSpec | None = None,
    cache_dir: str | os.PathLike | None = None, template: str = "qwen_boxed", method: str = "fast",
    device: str | None = None, progress: bool = True,
) -> dict:
    """Rank the candidate tensors of (reference, target) and pick the tensors to unlearn.

    Returns the selection JSON of ARCHITECTURE.md: {"rule", "k", "rho", "candidates": [{"name",
    "shape", "update_magnitude", "off_principal_energy", "coupling", "coupling_cosine", "score",
    "selected", "moved"}], "all_parameters", ...} plus provenance (fingerprints, cache hits, warnings).
    """
    spec = _as_spec(spec)
    check_model_dir(reference, "reference")
    check_model_dir(target, "target")
    _check_forget(forget)
    spectral = spectral_stats(reference, target, spec.rho, cache_dir, spec.candidates, method, device, progress)
    coup = coupling_stats(reference, target, forget, cache_dir, spec.candidates, template, spec.max_length,
                          spec.coupling_batch_size, device, progress)
    rows = []
    for c in spectral["candidates"]:
        cc = coup["candidates"].get(c["name"])
        if cc is None:
            raise InputError(f"{target}: candidate {c['name']} missing from the coupling statistics")
        rows.append({**c, **cc})
    scores, selected, warnings = apply_rule(rows, spec)
    for w in warnings:
        print(f"mast select: warning: {w}", file=sys.stderr)
    candidates = [
        {"name": r["name"], "shape": r["shape"], "update_magnitude": r["update_magnitude"],
         "off_principal_energy": r["off_principal_energy"], "coupling": r["coupling"],
         "coupling_cosine": r["coupling_cosine"], "score": s, "selected": bool(sel), "moved": r["norm_d"] > 0}
        for r, s, sel in zip(rows, scores, selected, strict=True)
    ]
    return {
        "rule": spec.rule, "k": spec.k, "rho": spec.rho, "seed": spec.seed, "weights": spec.weights,
        "patterns": list(spec.candidates), "candidates": candidates, "all_parameters": spec.rule == "full",
        "selected": [c["name"] for c in candidates if c["selected"]],
        "n_moved": sum(c["moved"] for c in candidates), "warnings": warnings,
        "reference": str(reference), "target": str(target), "template": template,
        "fingerprints": spectral["fingerprints"], "spectral_method": method,
        "forget_loss": coup["forget_loss"], "forget_tokens": coup["forget_tokens"],
        "cache_hit": {"spectral": spectral["cache_hit"], "coupling": coup["cache_hit"]},
    }


# =========================================================================== CLI


def format_table(selection: dict) -> str:
    """A fixed-width table: name, shape, the three signals, score, selected."""
    rows = selection["candidates"]
    w = max([len("tensor")] + [len(r["name"]) for r in rows])
    head = (f"{'tensor':<{w}}  {'shape':>11}  {'|D|/|W|':>9}  {'off-prin':>8}  {'coupling':>9}  "
            f"{'cos':>6}  {'score':>6}  sel")
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = "x".join(str(s) for s in r["shape"])
        lines.append(
            f"{r['name']:<{w}}  {shape:>11}  {r['update_magnitude']:9.3e}  {r['off_principal_energy']:8.4f}  "
            f"{r['coupling']:9.3e}  {r['coupling_cosine']:6.3f}  {r['score']:6.3f}  {'*' if r['selected'] else ''}"
        )
    n_sel = sum(r["selected"] for r in rows)
    tail = "all parameters train" if selection["all_parameters"] else f"{n_sel} of {len(rows)} candidate(s) selected"
    lines.append(f"rule={selection['rule']} k={selection['k']} rho={selection['rho']}: {tail}")
    return "\n".join(lines)


def spec_from_args(args) -> SelectionSpec:
    """The --spec file (or defaults) with the flags the user passed on top."""
    spec = load_yaml(args.spec, SelectionSpec) if getattr(args, "spec", None) else SelectionSpec()
    overrides = {f: getattr(args, f) for f in ("rule", "k", "rho", "seed") if getattr(args, f, None) is not None}
    return validate(SelectionSpec, {**spec.model_dump(), **overrides}, "command line") if overrides else spec


def cli_select(args) -> int:
    from mast.hub import resolve_model

    spec = spec_from_args(args)
    args.reference = resolve_model(args.reference, "--reference")  # a folder or a Hub id
    args.target = resolve_model(args.target, "--target")
    check_model_dir(args.reference, "--reference")
    check_model_dir(args.target, "--target")
    forget = read_jsonl(args.forget, required=("prompt", "solution"))
    if not forget:
        raise InputError(f"{args.forget}: no problems")
    result = select(args.reference, args.target, forget, spec, cache_dir=getattr(args, "cache_dir", None),
                    template=getattr(args, "template", None) or "qwen_boxed",
                    method=getattr(args, "method", None) or "fast")
    write_json(Path(args.out), result)
    print(format_table(result))
    print(f"wrote {args.out}")
    return 0
