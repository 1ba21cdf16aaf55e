"""Paired tests for n > 1 samples per problem, checked against scipy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest, permutation_test, wilcoxon

from mast.files import InputError
from mast.stats import (
    combine_pvalues_dependent,
    mcnemar_per_sample,
    paired_sample_tests,
    sign_flip_test,
)


def _scipy_sign_flip(d, n_resamples=np.inf):
    """scipy's paired permutation test of mean(after - before): permuting within pairs = flipping signs."""
    d = np.asarray(d, dtype=float)
    res = permutation_test((d, np.zeros_like(d)), lambda x, y, axis: np.mean(x - y, axis=axis),
                           permutation_type="samples", n_resamples=n_resamples, alternative="two-sided",
                           vectorized=True, random_state=0)
    return res.pvalue


@pytest.mark.parametrize("d", [
    [0.25, 0.5, -0.25, 0.75, 0.0, 0.5, 0.25, 0.0],
    [-0.5, -0.25, -1.0, -0.75, -0.25, 0.25, -0.5, 0.0, 0.0, -0.25],
    [0.25, -0.25],
])
def test_exact_sign_flip_matches_scipy(d):
    ours = sign_flip_test(d)
    assert ours["exact"] and ours["statistic"] == pytest.approx(np.mean(d))
    assert ours["p_value"] == pytest.approx(min(1.0, _scipy_sign_flip(d)), abs=1e-12)


def test_monte_carlo_sign_flip_is_close_to_exact():
    rng = np.random.default_rng(0)
    d = rng.choice([-0.5, -0.25, 0.0, 0.25, 0.5, 0.75], size=18, p=[0.1, 0.15, 0.2, 0.25, 0.2, 0.1])
    nz = int(np.sum(d != 0))
    assert nz > 16  # the Monte Carlo branch
    ours = sign_flip_test(d, n_permutations=20000, seed=1)
    assert not ours["exact"] and ours["n_permutations"] == 20000
    assert ours["p_value"] == pytest.approx(_scipy_sign_flip(d), abs=0.01)
    assert sign_flip_test(d, n_permutations=20000, seed=1) == ours  # seeded
    assert sign_flip_test([0.0, 0.0])["p_value"] == 1.0


def test_mcnemar_per_sample_index_and_dependent_combination():
    rng = np.random.default_rng(3)
    before = rng.random((40, 4)) < 0.7
    after = before & (rng.random((40, 4)) < 0.6)  # unlearning loses ~40% of the solved samples
    res = mcnemar_per_sample(before, after)
    for j, row in enumerate(res["per_index"]):
        b = int(np.sum(before[:, j] & ~after[:, j]))
        c = int(np.sum(~before[:, j] & after[:, j]))
        assert (row["right_to_wrong"], row["wrong_to_right"]) == (b, c)
        assert row["p_value"] == pytest.approx(binomtest(b, b + c, 0.5).pvalue if b + c else 1.0)
    ps = [r["p_value"] for r in res["per_index"]]
    assert res["p_value"] == pytest.approx(min(1.0, 2 * np.mean(ps)))
    assert combine_pvalues_dependent([0.9, 0.8]) == 1.0 and combine_pvalues_dependent([0.01, 0.03]) == 0.04
    with pytest.raises(ValueError):
        combine_pvalues_dependent([])


def _records(matrix, prefix="p"):
    return [{"id": f"{prefix}{i}", "correct": bool(row[0]), "samples": [{"correct": bool(x)} for x in row]}
            for i, row in enumerate(matrix)]


def test_paired_sample_tests_on_records():
    rng = np.random.default_rng(5)
    before = rng.random((30, 4)) < 0.8
    after = before & (rng.random((30, 4)) < 0.5)
    res = paired_sample_tests(_records(before), list(reversed(_records(after))))  # matched by id, not order
    acc_b, acc_a = before.mean(axis=1), after.mean(axis=1)
    assert res["n"] == 30 and res["n_samples"] == 4
    assert res["acc_before"] == pytest.approx(acc_b.mean()) and res["delta"] == pytest.approx((acc_a - acc_b).mean())
    assert res["p_value"] == res["permutation"]["p_value"] < 0.001  # a strong, real effect
    # ids sorted as strings by paired_table: compare Wilcoxon on the same order
    order = sorted(range(30), key=lambda i: f"p{i}")
    w = wilcoxon(acc_a[order], acc_b[order], zero_method="wilcox")
    assert res["wilcoxon"]["p_value"] == pytest.approx(w.pvalue)
    same = paired_sample_tests(_records(before), _records(before))
    assert same["p_value"] == 1.0 and same["delta"] == 0 and same["wilcoxon"]["p_value"] == 1.0
    assert same["mcnemar_per_sample"]["p_value"] == 1.0


def test_paired_sample_tests_n1_records_and_mismatched_n():
    before = [{"id": i, "correct": i < 8} for i in range(10)]
    after = [{"id": i, "correct": False} for i in range(10)]
    res = paired_sample_tests(before, after)
    assert res["n_samples"] == 1 and res["delta"] == pytest.approx(-0.8)
    assert res["p_value"] == pytest.approx(2 * 0.5 ** 8)  # = exact McNemar with 8 right->wrong, 0 back
    with pytest.raises(InputError, match="different numbers of samples"):
        paired_sample_tests(_records([[1, 0]]), _records([[1, 0, 1]]))
