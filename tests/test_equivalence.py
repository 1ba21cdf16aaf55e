"""Paired intervals, equivalence (TOST), the "preserved" verdict, the noise floor and the selection-bias simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from mast import equivalence as eq
from mast.stats import bootstrap_delta_ci, mcnemar_test


def _records(outcomes, prefix="q"):
    return [{"id": f"{prefix}{i}", "correct": bool(v)} for i, v in enumerate(outcomes)]


# --------------------------------------------------------------------------- Newcombe interval


def test_newcombe_matches_the_published_worked_example():
    # Cavo et al. 2012 (complete response before/after consolidation therapy), the worked
    # example of Fagerland, Lydersen & Laake (2017), section 8.5: estimate -0.0621,
    # Newcombe square-and-add 95% CI -0.1186 to -0.0046
    lo, hi = eq.newcombe_paired_ci(59, 6, 16, 80)
    assert (round(lo, 4), round(hi, 4)) == (-0.1186, -0.0046)


def test_newcombe_without_correlation_is_the_independent_square_and_add():
    # margins with a zero make phi = 0: the limits combine the two Wilson intervals in quadrature
    lo, hi = eq.newcombe_paired_ci(0, 5, 0, 15)  # p1 = 5/20, p2 = 0
    l1, u1 = eq.wilson_interval(5, 20)
    l2, u2 = eq.wilson_interval(0, 20)
    assert lo == pytest.approx(0.25 - math.hypot(0.25 - l1, u2 - 0.0))
    assert hi == pytest.approx(0.25 + math.hypot(u1 - 0.25, 0.0 - l2))


def test_wilson_interval_known_value():
    # Wilson (1927) / Newcombe (1998a) example: 81/263 -> 0.2553 to 0.3662
    lo, hi = eq.wilson_interval(81, 263)
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)


def test_zero_discordant_pairs_give_an_interval_of_nonzero_width_unlike_the_bootstrap():
    lo, hi = eq.paired_delta_ci(150, 0, 0, both_correct=100)
    assert lo < 0 < hi and hi - lo > 0.02
    assert bootstrap_delta_ci(150, 0, 0) == (0.0, 0.0)  # what the report used before


def test_paired_delta_ci_is_oriented_after_minus_before_and_covers_the_estimate():
    lo, hi = eq.paired_delta_ci(100, right_to_wrong=12, wrong_to_right=2, both_correct=50)
    assert lo < -0.10 < hi < 0  # delta = (2 - 12)/100 = -0.10: a significant drop
    lo2, hi2 = eq.paired_delta_ci(100, right_to_wrong=2, wrong_to_right=12, both_correct=50)
    assert 0 < lo2 < 0.10 < hi2


def test_paired_delta_ci_rejects_impossible_counts():
    with pytest.raises(ValueError):
        eq.paired_delta_ci(10, 6, 6, 0)
    with pytest.raises(ValueError):
        eq.paired_delta_ci(10, 2, 2, both_correct=8)


# --------------------------------------------------------------------------- Tango score test and TOST


@pytest.mark.parametrize("b,c", [(5, 9), (12, 0), (1, 1)])
def test_tango_statistic_at_zero_is_mcnemars(b, c):
    assert eq.tango_z(100, b, c, 0.0) == pytest.approx((c - b) / math.sqrt(b + c))


@pytest.mark.parametrize("n,b,c", [(161, 16, 6), (150, 0, 0), (120, 3, 1), (40, 0, 9)])
def test_tango_interval_limits_are_where_the_score_test_is_just_significant(n, b, c):
    lo, hi = eq.tango_ci(n, b, c, 0.95)
    z = norm.ppf(0.975)
    assert lo < (c - b) / n < hi
    assert eq.tango_z(n, b, c, lo) == pytest.approx(z, abs=1e-6)
    assert eq.tango_z(n, b, c, hi) == pytest.approx(-z, abs=1e-6)


def test_tost_equivalence_iff_the_90_percent_tango_interval_is_inside_the_margin():
    for n, b, c in [(150, 0, 0), (150, 2, 1), (150, 6, 1), (100, 1, 0), (400, 5, 3), (60, 0, 0)]:
        for margin in (0.02, 0.05, 0.10):
            r = eq.tost_paired(n, b, c, margin, alpha=0.05)
            inside = -margin < r.ci_low and r.ci_high < margin
            assert r.equivalent == inside, (n, b, c, margin, r)
            assert r.p_value == max(r.p_lower, r.p_upper)


def test_tost_has_the_right_direction():
    # a big drop is not equivalent; no flips on many problems is
    assert not eq.tost_paired(150, 20, 0, 0.05).equivalent
    assert eq.tost_paired(1000, 0, 0, 0.02).equivalent
    # more problems with the same flip rate: more evidence
    assert eq.tost_paired(600, 8, 4, 0.03).p_value < eq.tost_paired(150, 2, 1, 0.03).p_value


def test_verdict_is_preserved_only_with_equivalence_and_says_not_shown_otherwise():
    assert eq.verdict(eq.tost_paired(1000, 2, 2, 0.02)) == "preserved"
    # 100 problems, no flip at all, a 2-point margin: not enough evidence (the common case)
    assert eq.verdict(eq.tost_paired(100, 0, 0, 0.02)) == "not shown"
    assert eq.verdict(eq.tost_paired(150, 10, 0, 0.02)) == "not shown"


def test_retention_summary_has_what_the_report_shows():
    s = eq.retention_summary(150, 1, 0, 90, margin=0.05)
    assert s["verdict"] == "preserved" and s["ci_low"] < s["delta"] < s["ci_high"]
    assert s["ci_method"] == "newcombe-hybrid-score" and s["tost_method"] == "tango-score"


@pytest.mark.parametrize("margin", [0.0, 1.0, float("nan"), -0.1])
def test_tost_rejects_bad_margins(margin):
    with pytest.raises(ValueError):
        eq.tost_paired(100, 1, 1, margin)


# --------------------------------------------------------------------------- noise floor


def test_noise_floor_reports_flip_rate_and_the_stats_mcnemar_p():
    rng = np.random.default_rng(0)
    a = rng.random(200) < 0.5
    b = a.copy()
    b[[3, 10, 11, 50, 120, 121, 122]] ^= True
    forget = (_records(a), _records(b))
    retain = (_records(a[:40], "r"), _records(a[:40], "r"))
    out = eq.noise_floor({"forget": forget, "retain": retain})
    assert out["forget"]["flips"] == 7 and out["forget"]["flip_rate"] == pytest.approx(7 / 200)
    assert out["forget"]["mcnemar_p"] == mcnemar_test(*forget)["p_value"]
    assert out["retain"] == {"n": 40, "flips": 0, "flip_rate": 0.0, "right_to_wrong": 0, "wrong_to_right": 0,
                             "mcnemar_p": 1.0}


# --------------------------------------------------------------------------- the biased design


def test_per_run_flip_probability_gives_the_pairwise_flip_rate():
    q = eq.per_run_flip_prob(0.03)
    assert 2 * q * (1 - q) == pytest.approx(0.03)
    rng = np.random.default_rng(1)
    runs = eq.independent_runs(rng.random(200_000) < 0.5, q, 2, rng)
    assert np.mean(runs[0] != runs[1]) == pytest.approx(0.03, abs=0.002)


def test_selecting_on_one_run_and_testing_against_another_is_not_biased_but_testing_against_the_same_is():
    # no effect, 3% of answers differ between any two runs; forget set = 150 problems correct in run A
    p = eq.simulate_null_designs(n_pool=600, n_forget=150, flip_rate=0.03, repetitions=1000, seed=0)
    independent = np.mean(p["independent"] < 0.05)
    biased = np.mean(p["biased"] < 0.05)
    assert independent <= 0.10  # non-significant in >= 90% of repetitions
    assert biased >= 0.20 and biased >= 5 * independent


@pytest.mark.parametrize("b, c", [(100, 0), (0, 100), (60, 0)])
def test_extreme_tables_every_answer_lost_or_gained(b, c):
    """A retain suite that loses (or gains) every answer still gets an interval and a verdict."""
    from mast.equivalence import retention_summary, tango_ci

    n = 100
    lo, hi = tango_ci(n, b, c)
    assert -1.0 <= lo <= (c - b) / n <= hi <= 1.0
    s = retention_summary(n, b, c, n - b - c if b + c < n else 0, margin=0.02)
    assert s["verdict"] == "not shown" and s["ci_low"] <= s["delta"] <= s["ci_high"]
