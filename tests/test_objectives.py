"""Objectives: values and gradients against hand computations on tiny batches."""

from __future__ import annotations

import math

import pytest
import torch

from mast.objectives import (
    OBJECTIVES,
    forget_loss,
    ga,
    kl,
    nll,
    npo,
    simnpo,
)

LOGP = [-3.0, -5.0, -1.5]
REF = [-2.0, -5.5, -1.5]
LENGTHS = [3, 5, 2]


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _leaf(values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g.tolist()


def test_ga_value_and_gradient():
    x = _leaf(LOGP)
    loss = ga(x, torch.tensor(LENGTHS))
    assert loss.item() == pytest.approx(sum(LOGP) / sum(LENGTHS))  # -9.5 / 10
    assert loss.item() == pytest.approx(-0.95)
    assert _grad(loss, x) == pytest.approx([1 / 10] * 3)


def test_nll_is_minus_ga():
    x = _leaf(LOGP)
    loss = nll(x, torch.tensor(LENGTHS))
    assert loss.item() == pytest.approx(0.95)
    assert _grad(loss, x) == pytest.approx([-1 / 10] * 3)


def test_nll_sequence_scale():
    x = _leaf(LOGP)
    loss = nll(x, torch.tensor(LENGTHS), "sequence")
    assert loss.item() == pytest.approx(9.5 / 3)  # mean over texts of the summed NLL
    assert _grad(loss, x) == pytest.approx([-1 / 3] * 3)


def test_retain_scale_match():
    from mast.objectives import retain_scale_for

    assert retain_scale_for("npo", "match") == "sequence"
    assert retain_scale_for("ga", "match") == retain_scale_for("simnpo", "match") == "token"
    assert retain_scale_for("npo", "token") == "token" and retain_scale_for("ga", "sequence") == "sequence"


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_npo_value_and_gradient(beta):
    x = _leaf(LOGP)
    loss = npo(x, torch.tensor(REF, dtype=torch.float64), beta)
    n = len(LOGP)
    r = [a - b for a, b in zip(LOGP, REF)]  # [-1.0, 0.5, 0.0]
    expected = -(2 / beta) * sum(math.log(_sig(-beta * ri)) for ri in r) / n
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # dL/ds_i = (2/N) sigma(beta r_i)
    assert _grad(loss, x) == pytest.approx([2 / n * _sig(beta * ri) for ri in r], rel=1e-12)


def test_npo_at_reference_is_scaled_log2():
    x = _leaf(LOGP)
    loss = npo(x, x.detach().clone(), 0.1)
    assert loss.item() == pytest.approx(2 / 0.1 * math.log(2))
    assert _grad(loss, x) == pytest.approx([1 / 3] * 3)  # (2/N) * sigma(0)


@pytest.mark.parametrize("beta,gamma", [(2.5, 0.0), (1.0, 0.3)])
def test_simnpo_value_and_gradient(beta, gamma):
    x = _leaf(LOGP)
    loss = simnpo(x, torch.tensor(LENGTHS), beta, gamma)
    n = len(LOGP)
    z = [beta * s / ln + gamma for s, ln in zip(LOGP, LENGTHS)]
    expected = -(2 / beta) * sum(math.log(_sig(-zi)) for zi in z) / n
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert _grad(loss, x) == pytest.approx([2 / n * _sig(zi) / ln for zi, ln in zip(z, LENGTHS)], rel=1e-12)


def test_forget_loss_dispatch_and_registry():
    assert set(OBJECTIVES) == {"ga", "npo", "simnpo"}
    x = torch.tensor(LOGP)
    ln = torch.tensor(LENGTHS)
    ref = torch.tensor(REF)
    assert forget_loss("ga", x, ln).item() == pytest.approx(ga(x, ln).item())
    assert forget_loss("npo", x, ln, ref).item() == pytest.approx(npo(x, ref, 0.1).item())
    assert forget_loss("simnpo", x, ln).item() == pytest.approx(simnpo(x, ln, 2.5, 0.0).item())
    with pytest.raises(ValueError):
        forget_loss("npo", x, ln)
    with pytest.raises(ValueError):
        forget_loss("dpo", x, ln)


def _log_softmax(row):
    mx = max(row)
    lse = mx + math.log(sum(math.exp(v - mx) for v in row))
    return [v - lse for v in row]


def test_kl_value_and_gradient():
    zq = torch.tensor([[0.2, -1.0, 0.5], [1.0, 1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    zp = torch.tensor([[0.0, 0.3, -0.4], [2.0, -1.0, 0.0]], dtype=torch.float64)
    loss = kl(zq, zp)
    want = 0.0
    for i in range(2):
        lq, lp = _log_softmax(zq[i].tolist()), _log_softmax(zp[i].tolist())
        want += sum(math.exp(a) * (a - b) for a, b in zip(lp, lq))
    assert loss.item() == pytest.approx(want / 2, rel=1e-9)
    (g,) = torch.autograd.grad(loss, zq)
    expected = (torch.softmax(zq.detach(), -1) - torch.softmax(zp, -1)) / 2
    assert torch.allclose(g, expected, atol=1e-12)
    assert kl(zp, zp).item() == pytest.approx(0.0, abs=1e-12)
    # summed per text, mean over texts: the two rows as one text -> sum of the token KLs
    assert kl(zq, zp, n_sequences=1).item() == pytest.approx(want, rel=1e-9)
