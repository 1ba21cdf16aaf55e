"""Paired significance tests: per trial (exact McNemar + bootstrap CI) and across seeds (paired tests, Holm).

Per trial, per suite, a trial's per-problem results are paired with the target's cached results on
the same problem ids (`paired_table`). With b = right->wrong and c = wrong->right flips:

- exact McNemar: two-sided binomial test of b successes in b + c trials at p = 1/2
  (p = min(1, 2 * P[Bin(b + c, 1/2) <= min(b, c)])); no discordant pair -> p = 1.
  The paper's 8 right->wrong, 0 back: p = 2 * 0.5**8 = 0.0078125.
- delta = acc_after - acc_before = (c - b) / n, with a paired percentile-bootstrap interval:
  resampling the n problems with replacement is resampling their (before, after) cells, so each
  replicate's (b*, c*) is Multinomial(n; b/n, c/n, 1 - (b + c)/n) and delta* = (c* - b*) / n.
  The interval is therefore a function of the recorded (n, b, c, n_bootstrap, confidence, seed) alone.

Across seeds: Student-t intervals (:func:`t_interval`), the paired t / exact Wilcoxon / exact sign
tests of matched per-seed deltas (:func:`paired_tests`) and Holm (:func:`holm_reject`); the
seed-level table that applies them to conditions is :mod:`mast.seeds`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

import numpy as np

from mast.files import InputError
from mast.results import MCNEMAR_KEYS  # noqa: F401 (MCNEMAR_KEYS: the dict's fields)

MCNEMAR_TEST = "exact McNemar (two-sided binomial on discordant pairs, p=1/2)"
CI_METHOD = "paired percentile bootstrap over problems (multinomial on the 2x2 cells)"

_MAX_NAMED = 5


# --------------------------------------------------------------------------- pure math: one trial


def mcnemar_counts(before: Sequence[bool], after: Sequence[bool]) -> tuple[int, int, int, int]:
    """2x2 paired table of two aligned boolean vectors: (both_correct, right_to_wrong, wrong_to_right, both_wrong)."""
    b = np.asarray(before, dtype=bool)
    a = np.asarray(after, dtype=bool)
    if b.shape != a.shape or b.ndim != 1:
        raise ValueError(f"before/after must be aligned 1-d vectors, got {b.shape} and {a.shape}")
    return (int(np.sum(b & a)), int(np.sum(b & ~a)), int(np.sum(~b & a)), int(np.sum(~b & ~a)))


def exact_mcnemar_p(right_to_wrong: int, wrong_to_right: int) -> float:
    """Two-sided exact McNemar p: binomtest(b, b + c, 1/2); 1.0 without discordant pairs."""
    from scipy.stats import binomtest

    b, c = int(right_to_wrong), int(wrong_to_right)
    if b < 0 or c < 0:
        raise ValueError("counts must be >= 0")
    if b + c == 0:
        return 1.0
    return float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)


def bootstrap_delta_ci(n: int, right_to_wrong: int, wrong_to_right: int, n_bootstrap: int = 2000,
                       confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of delta* = (c* - b*)/n over `n_bootstrap` paired resamples of the n problems.

    Resampling problems with replacement draws (b*, c*, rest*) ~ Multinomial(n; b/n, c/n, rest/n).
    """
    n, b, c = int(n), int(right_to_wrong), int(wrong_to_right)
    if n <= 0 or b < 0 or c < 0 or b + c > n:
        raise ValueError(f"invalid counts n={n}, right_to_wrong={b}, wrong_to_right={c}")
    if n_bootstrap <= 0:
        raise ValueError("n_bootstrap must be > 0")
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must be in (0, 1)")
    rng = np.random.Generator(np.random.PCG64(seed))
    draws = rng.multinomial(n, [b / n, c / n, (n - b - c) / n], size=int(n_bootstrap))
    deltas = (draws[:, 1] - draws[:, 0]) / n
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(deltas, [tail, 1.0 - tail])
    return float(lo), float(hi)


def mcnemar_from_counts(both_correct: int, right_to_wrong: int, wrong_to_right: int, both_wrong: int,
                        n_bootstrap: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:
    """The McNemar dict of docs/architecture.md from the 2x2 counts, plus the inputs that reproduce it."""
    counts = (both_correct, right_to_wrong, wrong_to_right, both_wrong)
    if any(int(x) != x or x < 0 for x in counts):
        raise ValueError(f"counts must be non-negative integers, got {counts}")
    n = int(sum(counts))
    if n == 0:
        raise ValueError("no problems")
    acc_before = (both_correct + right_to_wrong) / n
    acc_after = (both_correct + wrong_to_right) / n
    lo, hi = bootstrap_delta_ci(n, right_to_wrong, wrong_to_right, n_bootstrap, confidence, seed)
    return {
        "n": n, "both_correct": int(both_correct), "right_to_wrong": int(right_to_wrong),
        "wrong_to_right": int(wrong_to_right), "both_wrong": int(both_wrong),
        "acc_before": acc_before, "acc_after": acc_after, "delta": (wrong_to_right - right_to_wrong) / n,
        "ci_low": lo, "ci_high": hi, "p_value": exact_mcnemar_p(right_to_wrong, wrong_to_right),
        "test": MCNEMAR_TEST, "ci_method": CI_METHOD,
        "n_bootstrap": int(n_bootstrap), "confidence": float(confidence), "seed": int(seed),
    }


# --------------------------------------------------------------------------- pure math: across seeds


def holm(pvalues: Sequence[float], alpha: float = 0.05) -> list[float]:
    """Holm step-down adjusted p-values (original order): p_(i) -> max_{j<=i} min(1, (m - j + 1) p_(j))."""
    return holm_reject(pvalues, alpha)[0]


def holm_reject(pvalues: Sequence[float], alpha: float = 0.05) -> tuple[list[float], list[bool]]:
    """(adjusted p, reject at alpha) by statsmodels' multipletests(method="holm") (its default is Holm-Sidak)."""
    p = [float(x) for x in pvalues]
    if not p:
        return [], []
    if any(not 0.0 <= x <= 1.0 for x in p):
        raise ValueError(f"p-values must be in [0, 1], got {p}")
    from statsmodels.stats.multitest import multipletests

    reject, adjusted, _, _ = multipletests(p, alpha=alpha, method="holm")
    return [float(x) for x in adjusted], [bool(x) for x in reject]


def t_interval(values: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean, sample sd and Student-t interval mean -/+ t_{n-1} sd / sqrt(n) (None for n < 2)."""
    from scipy.stats import t as student_t

    x = np.asarray(values, dtype=float)
    n = int(x.size)
    if n == 0:
        raise ValueError("no values")
    mean = float(x.mean())
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "ci_low": None, "ci_high": None}
    sd = float(x.std(ddof=1))
    half = float(student_t.ppf(0.5 + confidence / 2.0, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci_low": mean - half, "ci_high": mean + half}


def exact_test_floor(n: int) -> float:
    """Smallest two-sided p an exact sign / signed-rank test can give with n non-zero pairs: min(1, 2/2^n)."""
    return 1.0 if n <= 0 else min(1.0, 2.0 / 2.0**n)


def paired_tests(x: Sequence[float], y: Sequence[float], confidence: float = 0.95, decimals: int = 12) -> dict:
    """Paired t-test, exact Wilcoxon signed-rank and exact sign test of d = x - y (two-sided).

    d is rounded to `decimals` so that deltas that are equal fractions k/n give exact zeros and ties.
    Zero differences are dropped by Wilcoxon (zero_method="wilcox") and the sign test.
    The t-test is undefined (p None) for n < 2 or sd(d) = 0 with mean(d) != 0; sd = mean = 0 gives p = 1.
    """
    from scipy import stats as st

    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xa.shape != ya.shape or xa.ndim != 1:
        raise ValueError("x and y must be aligned 1-d vectors")
    d = np.round(xa - ya, decimals)
    n = int(d.size)
    nonzero = d[d != 0]
    out: dict = {"n": n, "differences": [float(v) for v in d], "mean_difference": float(d.mean()) if n else None,
                 "n_nonzero": int(nonzero.size), "exact_p_floor": exact_test_floor(int(nonzero.size))}
    # paired t-test
    tt: dict = {"test": "paired t-test (scipy.stats.ttest_rel)", "statistic": None, "df": n - 1, "p_value": None,
                "ci_low": None, "ci_high": None, "note": None}
    if n < 2:
        tt["note"] = "fewer than 2 matched seeds"
    elif float(d.std(ddof=1)) == 0.0:
        if float(d.mean()) == 0.0:
            tt.update(p_value=1.0, statistic=0.0, ci_low=0.0, ci_high=0.0, note="all differences are 0")
        else:
            tt["note"] = "zero variance of the paired differences: t-test undefined"
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            r = st.ttest_rel(xa, ya)
            ci = r.confidence_interval(confidence)
        tt.update(statistic=float(r.statistic), p_value=float(r.pvalue), ci_low=float(ci.low), ci_high=float(ci.high))
    out["ttest"] = tt
    # exact Wilcoxon signed-rank
    wx: dict = {"test": "exact Wilcoxon signed-rank (scipy.stats.wilcoxon, method='exact', zero_method='wilcox')",
                "statistic": None, "p_value": None, "note": None}
    if nonzero.size == 0:
        wx.update(p_value=1.0, note="all differences are 0" if n else "no matched seeds")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            r = st.wilcoxon(nonzero, method="exact", zero_method="wilcox")
        wx.update(statistic=float(r.statistic), p_value=float(r.pvalue))
        if len(np.unique(np.abs(nonzero))) < nonzero.size:
            wx["note"] = "tied |differences|"
    out["wilcoxon"] = wx
    # exact sign test
    pos = int(np.sum(nonzero > 0))
    sg: dict = {"test": "exact sign test (scipy.stats.binomtest on positive differences)",
                "n_positive": pos, "n_negative": int(nonzero.size) - pos, "p_value": 1.0}
    if nonzero.size:
        sg["p_value"] = float(st.binomtest(pos, int(nonzero.size), 0.5).pvalue)
    out["sign"] = sg
    return out


# --------------------------------------------------------------------------- records -> tables (I/O shapes)


def _correct(row: dict, side: str) -> bool:
    v = row.get("correct")
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    raise InputError(f"{side}: record {row.get('id')!r}: 'correct' must be true/false, got {v!r}")


def _name_some(ids: Iterable) -> str:
    ids = sorted(ids, key=str)
    shown = ", ".join(str(i) for i in ids[:_MAX_NAMED])
    return shown + (f" ... (+{len(ids) - _MAX_NAMED} more)" if len(ids) > _MAX_NAMED else "")


def _index(rows: Sequence[dict], side: str) -> dict:
    out: dict = {}
    dups = set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "id" not in row:
            raise InputError(f"{side}: record {i} has no 'id'")
        if row["id"] in out:
            dups.add(row["id"])
        out[row["id"]] = _correct(row, side)
    if dups:
        raise InputError(f"{side}: duplicate id(s) {_name_some(dups)}")
    return out


def paired_table(before: Sequence[dict], after: Sequence[dict], names: tuple[str, str] = ("before", "after")
                 ) -> tuple[list, np.ndarray, np.ndarray]:
    """Match per-problem result records by "id": (ids sorted, before correct[], after correct[]).

    Raises InputError naming (some of) the missing ids and the side that lacks them, or duplicates.
    """
    b, a = _index(before, names[0]), _index(after, names[1])
    if not b and not a:
        raise InputError(f"{names[0]}/{names[1]}: no records")
    only_b, only_a = set(b) - set(a), set(a) - set(b)
    if only_b or only_a:
        parts = []
        if only_b:
            parts.append(f"{names[1]} is missing {len(only_b)} id(s) present in {names[0]}: {_name_some(only_b)}")
        if only_a:
            parts.append(f"{names[0]} is missing {len(only_a)} id(s) present in {names[1]}: {_name_some(only_a)}")
        raise InputError("; ".join(parts))
    ids = sorted(b, key=str)
    return ids, np.array([b[i] for i in ids], dtype=bool), np.array([a[i] for i in ids], dtype=bool)


def mcnemar_test(before: Sequence[dict], after: Sequence[dict], n_bootstrap: int = 2000,
                 confidence: float = 0.95, seed: int = 0, names: tuple[str, str] = ("before", "after")) -> dict:
    """Exact McNemar + paired bootstrap CI of the accuracy delta for two per-problem result lists."""
    if n_bootstrap <= 0:
        raise InputError(f"n_bootstrap must be > 0, got {n_bootstrap}")
    if not 0.0 < confidence < 1.0:
        raise InputError(f"confidence must be in (0, 1), got {confidence}")
    _, b, a = paired_table(before, after, names)
    return mcnemar_from_counts(*mcnemar_counts(b, a), n_bootstrap=n_bootstrap, confidence=confidence, seed=seed)


# --------------------------------------------------------------------------- n > 1 samples per problem
#
# With n samples per problem (R1-style decoding: temperature 0.6, top-p 0.95) a problem's score is its
# accuracy a_i = (#correct samples) / n, and the suite's accuracy is avg@n = mean_i a_i.
# PRIMARY: a paired sign-flip permutation test on d_i = a_i(after) - a_i(before), statistic
# mean_i d_i = the avg@n delta itself. Under H0 (unlearning does not change a problem's solve rate,
# before/after exchangeable within a problem) each d_i is symmetric about 0, so flipping signs gives
# the exact null distribution: enumerated for <= 16 non-zero d_i, else `n_permutations` seeded random
# flips with p = (1 + #{|T*| >= |T|}) / (1 + B). It uses every sample and tests the reported effect.
# Recorded beside it: Wilcoxon signed-rank on the d_i (many ties: a_i lives on a 1/n grid) and
# McNemar per sample index j (sample j before vs sample j after; exact, but each uses 1/n of the
# data) with the p-values combined by twice their mean, min(1, 2 * mean_j p_j) (Rüschendorf 1982,
# Vovk & Wang 2020), valid under ANY dependence between the indices (they share the problems,
# so Fisher's or Stouffer's independence-based combinations would be anti-conservative).

PERMUTATION_TEST = "paired sign-flip permutation test on per-problem accuracy (mean over samples)"
COMBINE_METHOD = "twice the mean p over sample indices (valid under arbitrary dependence)"
_EXACT_FLIPS = 16


def combine_pvalues_dependent(pvalues: Sequence[float]) -> float:
    """min(1, 2 * mean(p)): a p-value valid under arbitrary dependence of the inputs (Vovk & Wang 2020)."""
    p = np.asarray(pvalues, dtype=float)
    if p.size == 0 or np.any((p < 0) | (p > 1)):
        raise ValueError(f"p-values must be a non-empty list in [0, 1], got {list(pvalues)}")
    return float(min(1.0, 2.0 * p.mean()))


def mcnemar_per_sample(before: np.ndarray, after: np.ndarray) -> dict:
    """Exact McNemar for each sample index j of two (problems x samples) boolean matrices, and the combined p."""
    b, a = np.asarray(before, dtype=bool), np.asarray(after, dtype=bool)
    if b.shape != a.shape or b.ndim != 2 or b.shape[1] == 0:
        raise ValueError(f"before/after must be aligned (problems x samples) matrices, got {b.shape} and {a.shape}")
    rows = []
    for j in range(b.shape[1]):
        _, r2w, w2r, _ = mcnemar_counts(b[:, j], a[:, j])
        rows.append({"index": j, "right_to_wrong": r2w, "wrong_to_right": w2r, "p_value": exact_mcnemar_p(r2w, w2r)})
    ps = [r["p_value"] for r in rows]
    return {"per_index": rows, "p_value": combine_pvalues_dependent(ps), "combine": COMBINE_METHOD}


def sign_flip_test(diffs: Sequence[float], n_permutations: int = 10000, seed: int = 0) -> dict:
    """Two-sided paired sign-flip permutation test of mean(diffs) = 0.

    T = mean(d); null: every d_i's sign flipped with probability 1/2. Exact (all 2^m flips of the m
    non-zero d_i) when m <= 16, else `n_permutations` seeded draws with p = (1 + #{|T*| >= |T|}) / (1 + B).
    Zeros never change T's distribution except through the divisor, so they are kept in the mean.
    """
    d = np.asarray(diffs, dtype=float)
    if d.ndim != 1 or d.size == 0:
        raise ValueError("diffs must be a non-empty 1-d vector")
    t_obs = abs(d.mean())
    nz = d[d != 0]
    m = nz.size
    tol = 1e-12 * max(1.0, float(np.abs(d).max()))
    if m == 0:
        return {"statistic": 0.0, "p_value": 1.0, "exact": True, "n_permutations": 1}
    if m <= _EXACT_FLIPS:
        signs = 1 - 2 * ((np.arange(2 ** m)[:, None] >> np.arange(m)) & 1)
        t = np.abs((signs * nz).sum(axis=1)) / d.size
        return {"statistic": float(d.mean()), "p_value": float(np.mean(t >= t_obs - tol)), "exact": True,
                "n_permutations": int(2 ** m)}
    rng = np.random.Generator(np.random.PCG64(seed))
    hits = 0
    for start in range(0, n_permutations, 2000):  # chunks: bounded memory for long suites
        k = min(2000, n_permutations - start)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(k, m))
        hits += int(np.sum(np.abs(signs @ nz) / d.size >= t_obs - tol))
    return {"statistic": float(d.mean()), "p_value": (1 + hits) / (1 + n_permutations), "exact": False,
            "n_permutations": int(n_permutations), "seed": int(seed)}


def _sample_correct(row: dict, side: str) -> list[bool]:
    """A record's per-sample correctness: its `samples` (n > 1) or its own `correct` (n = 1)."""
    if "samples" in row:
        return [_correct(s, side) for s in row["samples"]]
    return [_correct(row, side)]


def paired_sample_tests(before: Sequence[dict], after: Sequence[dict], n_permutations: int = 10000,
                        seed: int = 0, names: tuple[str, str] = ("before", "after")) -> dict:
    """Paired tests of two per-problem result lists with n samples each (see the block comment above).

    Returns ``{"n", "n_samples", "acc_before", "acc_after", "delta", "p_value" (primary: the
    permutation test), "test", "permutation", "wilcoxon": {statistic, p_value}, "mcnemar_per_sample"}``.
    With n = 1 the permutation test is an exact McNemar-like sign test on the flips.
    """
    ids, _, _ = paired_table(before, after, names)
    bi = {r["id"]: _sample_correct(r, names[0]) for r in before}
    ai = {r["id"]: _sample_correct(r, names[1]) for r in after}
    ns = {len(bi[i]) for i in ids} | {len(ai[i]) for i in ids}
    if len(ns) != 1:
        raise InputError(f"{names[0]}/{names[1]}: records have different numbers of samples {sorted(ns)}")
    b = np.array([bi[i] for i in ids], dtype=bool)
    a = np.array([ai[i] for i in ids], dtype=bool)
    acc_b, acc_a = b.mean(axis=1), a.mean(axis=1)
    d = acc_a - acc_b
    perm = sign_flip_test(d, n_permutations, seed)
    nz = d[d != 0]
    if nz.size:
        from scipy.stats import wilcoxon

        w = wilcoxon(acc_a, acc_b, zero_method="wilcox")
        wil = {"statistic": float(w.statistic), "p_value": float(w.pvalue)}
    else:
        wil = {"statistic": 0.0, "p_value": 1.0}
    return {
        "n": len(ids), "n_samples": int(b.shape[1]),
        "acc_before": float(acc_b.mean()), "acc_after": float(acc_a.mean()), "delta": float(d.mean()),
        "p_value": perm["p_value"], "test": PERMUTATION_TEST, "permutation": perm,
        "wilcoxon": wil, "mcnemar_per_sample": mcnemar_per_sample(b, a),
    }
