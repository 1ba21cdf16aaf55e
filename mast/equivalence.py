"""Is a retained skill preserved? Paired intervals, equivalence tests and the evaluator's noise floor.

A non-significant McNemar test is not evidence that nothing was lost. This module gives the
pieces a report needs to say "preserved" only with evidence. Notation (as in :mod:`mast.stats`):
n paired problems, b = right->wrong, c = wrong->right flips, a = both correct, d = both wrong;
the accuracy change is delta = acc_after - acc_before = (c - b) / n.

- **Interval**: Newcombe's hybrid score interval for a difference of paired proportions
  (Newcombe 1998, Stat Med 17:2635, method 10; the form in Fagerland, Lydersen & Laake 2017,
  "Statistical Analysis of Contingency Tables", section 8.5). With Wilson score limits
  (l1, u1) of p1 = acc_after and (l2, u2) of p2 = acc_before, and phi the correlation of the
  two marginals::

      L = delta - sqrt((p1 - l1)^2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)^2)
      U = delta + sqrt((u1 - p1)^2 - 2 phi (u1 - p1)(p2 - l2) + (p2 - l2)^2)

  phi = C / sqrt(r1 r2 s1 s2) over the four margins (0 when one is 0), with Newcombe's
  correction C = A - n/2 if A > n/2, 0 if 0 <= A <= n/2, A if A < 0, A = (cell products
  of the table with rows = after, columns = before). Closed form; unlike the bootstrap it has
  non-zero width when no answer flips (b = c = 0) because the Wilson limits do.
- **Equivalence** (TOST): two one-sided Tango score tests (Tango 1998, Stat Med 17:891, the
  paper that introduced the score interval for paired proportions for equivalence trials).
  For H0: delta = d0 the score statistic is::

      Z(d0) = (c - b - n d0) / sqrt(n (2 q + d0 (1 - d0)))

  with q the restricted ML estimate of P(right->wrong) under delta = d0:
  q = (sqrt(B^2 - 4AC) - B) / (2A), A = 2n, B = -c - b + (2n - c + b) d0, C = -b d0 (1 - d0).
  Z(0) = (c - b)/sqrt(b + c) is McNemar's statistic. TOST against margin m:
  p_lower = 1 - Phi(Z(-m)) (H0: delta <= -m), p_upper = Phi(Z(m)) (H0: delta >= m),
  p = max(p_lower, p_upper). Equivalence at level alpha <=> p < alpha <=> the (1 - 2 alpha)
  Tango interval lies inside (-m, m). Asymptotic (score-based), not exact.
- **Verdict**: "preserved" only when equivalence holds at the margin fixed before the run,
  else "not shown" (with 100-150 problems and a 2-point margin that is the common outcome:
  say so, don't widen the margin after the fact).
- **Noise floor**: two evaluations of the same weights (a `null` trial): per-suite flip rate
  (b + c)/n and McNemar p (:func:`mast.stats.mcnemar_test`).
- **Selection bias** (:func:`simulate_null_designs`): selecting "problems the target solved
  in run A" and testing run B against run A makes wrong->right flips impossible, so pure noise
  looks like forgetting; testing B against an independent run C does not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq
from scipy.stats import norm

from mast.stats import exact_mcnemar_p, mcnemar_counts, mcnemar_test

PRESERVED = "preserved"
NOT_SHOWN = "not shown"


def _check_counts(n: int, b: int, c: int) -> None:
    if any(int(x) != x for x in (n, b, c)) or n <= 0 or b < 0 or c < 0 or b + c > n:
        raise ValueError(f"invalid paired counts n={n}, right_to_wrong={b}, wrong_to_right={c}")


def _check_level(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


# --------------------------------------------------------------------------- intervals


def wilson_interval(x: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion x/n: (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)."""
    if n <= 0 or not 0 <= x <= n:
        raise ValueError(f"invalid binomial counts x={x}, n={n}")
    _check_level(confidence)
    z = float(norm.ppf(0.5 + confidence / 2))
    p = x / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def newcombe_paired_ci(n11: int, n12: int, n21: int, n22: int, confidence: float = 0.95) -> tuple[float, float]:
    """Newcombe's hybrid score interval for p1+ - p+1 of a paired 2x2 table [[n11, n12], [n21, n22]].

    p1+ = (n11 + n12)/N (row margin), p+1 = (n11 + n21)/N (column margin); the estimate is
    (n12 - n21)/N. Formula in the module docstring.
    """
    cells = (n11, n12, n21, n22)
    if any(int(x) != x or x < 0 for x in cells) or sum(cells) == 0:
        raise ValueError(f"invalid 2x2 table {cells}")
    N = sum(cells)
    r1, r2, s1, s2 = n11 + n12, n21 + n22, n11 + n21, n12 + n22
    p1, p2 = r1 / N, s1 / N
    l1, u1 = wilson_interval(r1, N, confidence)
    l2, u2 = wilson_interval(s1, N, confidence)
    phi = 0.0
    if min(r1, r2, s1, s2) > 0:
        A = n11 * n22 - n12 * n21
        C = A - N / 2 if A > N / 2 else (0.0 if A >= 0 else A)
        phi = C / math.sqrt(r1 * r2 * s1 * s2)
    est = p1 - p2
    lo = est - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = est + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, lo), min(1.0, hi)


def paired_delta_ci(n: int, right_to_wrong: int, wrong_to_right: int, both_correct: int,
                    confidence: float = 0.95) -> tuple[float, float]:
    """Newcombe interval of delta = acc_after - acc_before from the paired counts (rows = after)."""
    b, c = int(right_to_wrong), int(wrong_to_right)
    _check_counts(n, b, c)
    a = int(both_correct)
    d = n - a - b - c
    if a < 0 or d < 0:
        raise ValueError(f"invalid paired counts n={n}, both_correct={a}, right_to_wrong={b}, wrong_to_right={c}")
    return newcombe_paired_ci(a, c, b, d, confidence)


# --------------------------------------------------------------------------- Tango score test


def tango_z(n: int, right_to_wrong: int, wrong_to_right: int, d0: float) -> float:
    """Tango's score statistic Z(d0) for H0: acc_after - acc_before = d0 (formula in the module docstring)."""
    b, c = int(right_to_wrong), int(wrong_to_right)
    _check_counts(n, b, c)
    if not -1.0 < d0 < 1.0:
        raise ValueError(f"d0 must be in (-1, 1), got {d0}")
    A = 2.0 * n
    B = -c - b + (2.0 * n - c + b) * d0
    C = -b * d0 * (1.0 - d0)
    q = (math.sqrt(max(0.0, B * B - 4 * A * C)) - B) / (2 * A)
    var = n * (2 * q + d0 * (1 - d0))
    num = c - b - n * d0
    if var <= 0:  # only at d0 = 0 with b = c = 0: no discordant pair, no evidence either way
        return 0.0
    return num / math.sqrt(var)


def tango_ci(n: int, right_to_wrong: int, wrong_to_right: int, confidence: float = 0.95) -> tuple[float, float]:
    """Tango's score interval for delta: {d0 : |Z(d0)| <= z_(1+confidence)/2}, by root finding."""
    _check_level(confidence)
    b, c = int(right_to_wrong), int(wrong_to_right)
    _check_counts(n, b, c)
    z = float(norm.ppf(0.5 + confidence / 2))
    est = (c - b) / n
    eps = 1e-12
    # Z(d0) decreases in d0: the lower limit solves Z = z, the upper Z = -z
    # brackets kept inside (-1, 1): at est = -1 (every answer lost) est - eps rounds to -1.0
    lo = -1.0 if est <= -1 + eps else brentq(lambda d: tango_z(n, b, c, d) - z, -1 + eps, min(est + eps, 1 - eps),
                                               xtol=1e-12)
    hi = 1.0 if est >= 1 - eps else brentq(lambda d: tango_z(n, b, c, d) + z, max(est - eps, -1 + eps), 1 - eps,
                                           xtol=1e-12)
    return float(lo), float(hi)


@dataclass(frozen=True)
class Equivalence:
    """TOST result for delta against ±margin."""

    delta: float
    margin: float
    alpha: float
    p_lower: float  # H0: delta <= -margin
    p_upper: float  # H0: delta >= +margin
    p_value: float  # max of the two
    equivalent: bool
    ci_low: float  # (1 - 2 alpha) Tango interval: inside (-margin, margin) iff equivalent
    ci_high: float

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def tost_paired(n: int, right_to_wrong: int, wrong_to_right: int, margin: float, alpha: float = 0.05) -> Equivalence:
    """Two one-sided Tango score tests of |acc_after - acc_before| < margin (equivalent when both reject at alpha)."""
    b, c = int(right_to_wrong), int(wrong_to_right)
    _check_counts(n, b, c)
    if not 0.0 < margin < 1.0 or not math.isfinite(margin):
        raise ValueError(f"margin must be in (0, 1), got {margin}")
    if not 0.0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
    p_lower = float(norm.sf(tango_z(n, b, c, -margin)))
    p_upper = float(norm.cdf(tango_z(n, b, c, margin)))
    p = max(p_lower, p_upper)
    lo, hi = tango_ci(n, b, c, 1 - 2 * alpha)
    return Equivalence((c - b) / n, float(margin), float(alpha), p_lower, p_upper, p, p < alpha, lo, hi)


def verdict(equivalence: Equivalence) -> str:
    """"preserved" when the TOST shows equivalence at the pre-registered margin, else "not shown"."""
    return PRESERVED if equivalence.equivalent else NOT_SHOWN


def retention_summary(n: int, right_to_wrong: int, wrong_to_right: int, both_correct: int, margin: float,
                      alpha: float = 0.05, confidence: float = 0.95) -> dict:
    """What a report shows per retain/GSM8K delta: Newcombe interval, TOST and the verdict."""
    lo, hi = paired_delta_ci(n, right_to_wrong, wrong_to_right, both_correct, confidence)
    eq = tost_paired(n, right_to_wrong, wrong_to_right, margin, alpha)
    return {"n": int(n), "delta": eq.delta, "ci_low": lo, "ci_high": hi, "ci_method": "newcombe-hybrid-score",
            "confidence": confidence, "margin": eq.margin, "tost_p": eq.p_value, "tost_alpha": alpha,
            "tost_method": "tango-score", "verdict": verdict(eq)}


# --------------------------------------------------------------------------- noise floor


def noise_floor(runs: Mapping[str, tuple[Sequence[dict], Sequence[dict]]]) -> dict:
    """Per suite, two evaluations of the SAME weights: {"n", "flips", "flip_rate", "right_to_wrong",
    "wrong_to_right", "mcnemar_p"}; `runs` maps suite -> (records of run 1, records of run 2).

    The flip rate (b + c)/n is how often an answer changes with no weight change; the McNemar p
    (from :func:`mast.stats.mcnemar_test`) should be far from significant.
    """
    out = {}
    for suite, (first, second) in runs.items():
        m = mcnemar_test(first, second, n_bootstrap=1, names=(f"{suite} run 1", f"{suite} run 2"))
        flips = m["right_to_wrong"] + m["wrong_to_right"]
        out[suite] = {"n": m["n"], "flips": flips, "flip_rate": flips / m["n"],
                      "right_to_wrong": m["right_to_wrong"], "wrong_to_right": m["wrong_to_right"],
                      "mcnemar_p": m["p_value"]}
    return out


# --------------------------------------------------------------------------- selection-bias simulation


def per_run_flip_prob(flip_rate: float) -> float:
    """q such that two runs, each flipping an answer independently with probability q, disagree
    on a problem with probability `flip_rate`: 2 q (1 - q) = flip_rate, q = (1 - sqrt(1 - 2 flip_rate)) / 2."""
    if not 0.0 <= flip_rate <= 0.5:
        raise ValueError(f"flip_rate must be in [0, 0.5], got {flip_rate}")
    return (1.0 - math.sqrt(1.0 - 2.0 * flip_rate)) / 2.0


def independent_runs(latent: np.ndarray, flip_prob: float, n_runs: int, rng: np.random.Generator) -> np.ndarray:
    """`n_runs` evaluations with no weight change: each answer is the problem's latent outcome,
    flipped independently with probability `flip_prob` (sampling-like noise). Shape (n_runs, n)."""
    flips = rng.random((n_runs, latent.size)) < flip_prob
    return latent[None, :] ^ flips


def simulate_null_designs(n_pool: int = 600, n_forget: int = 150, accuracy: float = 0.5, flip_rate: float = 0.03,
                          repetitions: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """McNemar p-values of a null trial (no weight change) under the two forget-set designs.

    Per repetition: latent outcomes ~ Bernoulli(accuracy) over `n_pool` problems; three
    independent runs A, B, C (:func:`independent_runs`) that disagree pairwise on a fraction
    `flip_rate` of problems (:func:`per_run_flip_prob`); the forget set is the first `n_forget`
    problems correct in run A (require_target_correct). `biased`: B against A, the run used to
    select (wrong->right flips impossible). `independent`: B against C.
    """
    flip_prob = per_run_flip_prob(flip_rate)
    rng = np.random.Generator(np.random.PCG64(seed))
    out = {"biased": np.empty(repetitions), "independent": np.empty(repetitions)}
    for i in range(repetitions):
        latent = rng.random(n_pool) < accuracy
        A, B, C = independent_runs(latent, flip_prob, 3, rng)
        chosen = np.flatnonzero(A)[:n_forget]
        for design, before in (("biased", A), ("independent", C)):
            _, b, c, _ = mcnemar_counts(before[chosen], B[chosen])
            out[design][i] = exact_mcnemar_p(b, c)
    return out
