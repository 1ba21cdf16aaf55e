"""Batches and completion log-probs: padding never changes a log-prob, the NLL of known distributions."""

from __future__ import annotations

import math

import pytest
import torch

from mast.batching import (
    collate,
    completion_logits,
    completion_logprobs,
    completion_nll,
    encode_problems,
    in_order,
    next_token_logprobs,
    pad_id_of,
    pad_left,
    pad_right,
    per_token_logprobs,
    sequence_logprobs,
    split_by_sequence,
    token_logprobs,
)


def _log_softmax(row):
    mx = max(row)
    lse = mx + math.log(sum(math.exp(v - mx) for v in row))
    return [v - lse for v in row]


def test_pad_right_layout():
    b = pad_right([([5, 6, 7], [0, 1, 1]), ([8], [1])], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["completion_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in b.values())
    # collate picks texts by index, in the order given
    enc = [([1, 2], [0, 1]), ([3, 4, 5], [0, 0, 1])]
    assert collate(enc, [1, 0], 9)["input_ids"].tolist() == [[3, 4, 5], [1, 2, 9]]
    assert [x["input_ids"].shape[0] for x in in_order(enc * 3, 4, 0)] == [4, 2]


def test_pad_left_layout_for_generation():
    ids, att = pad_left([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and att.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_nll_of_a_uniform_distribution_is_log_v():
    """Uniform logits over V tokens: every completion token has log-prob -log V, so the NLL is log V."""
    V = 11
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 0, 0]])
    s, lengths = sequence_logprobs(torch.zeros(2, 4, V), ids, mask)
    assert lengths.tolist() == [3, 1]
    assert s.tolist() == pytest.approx([-3 * math.log(V), -math.log(V)], rel=1e-6)
    assert completion_nll(s, lengths).item() == pytest.approx(math.log(V), rel=1e-6)


def test_completion_nll_shares_add_up_to_the_set_nll():
    s = torch.tensor([-3.0, -5.0, -1.5, -4.0])
    lengths = torch.tensor([3, 5, 2, 4])
    whole = completion_nll(s, lengths)
    assert whole.item() == pytest.approx(13.5 / 14)
    shares = completion_nll(s[:2], lengths[:2], 14) + completion_nll(s[2:], lengths[2:], 14)
    assert shares.item() == pytest.approx(whole.item(), rel=1e-7)


def test_split_by_sequence_inverts_the_packing():
    mask = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])
    parts = split_by_sequence(torch.arange(5.0), mask)
    assert [p.tolist() for p in parts] == [[0.0, 1.0], [], [2.0, 3.0, 4.0]]


def test_sequence_logprobs_masks_prompt_and_padding():
    gen = torch.Generator().manual_seed(0)
    B, T, V = 2, 5, 7
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 1, 2, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])  # seq 1: right padding
    s, lengths = sequence_logprobs(logits, ids, mask)
    assert lengths.tolist() == [3, 2]
    for i in range(B):
        want = sum(
            _log_softmax(logits[i, t - 1].tolist())[ids[i, t].item()] for t in range(1, T) if mask[i, t]
        )
        assert s[i].item() == pytest.approx(want, rel=1e-6)
    # gradient only reaches logits that predict completion tokens
    lg = logits.clone().requires_grad_(True)
    s, _ = sequence_logprobs(lg, ids, mask)
    (g,) = torch.autograd.grad(s.sum(), lg)
    touched = (g.abs().sum(-1) > 0).int().tolist()
    assert touched == [[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]]
    # d s / d z_{t-1} = onehot(y_t) - softmax(z_{t-1})
    p = torch.softmax(logits[0, 1], -1)
    want = -p
    want[ids[0, 2]] += 1
    assert torch.allclose(g[0, 1].to(want.dtype), want, atol=1e-6)


def test_token_logprobs_is_float32_for_bf16_logits():
    z = torch.randn(4, 9).to(torch.bfloat16)
    out = token_logprobs(z, torch.tensor([0, 1, 2, 3]))
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.log_softmax(z.float(), -1)[torch.arange(4), torch.tensor([0, 1, 2, 3])])


def test_next_token_logprobs_is_the_shifted_token_logprobs_at_every_position():
    # the toy's full-logits formula (log_softmax + gather) and the loop's masked one agree, shifted by one
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 7, 11, generator=g)
    ids = torch.randint(0, 11, (3, 7), generator=g)
    out = next_token_logprobs(z, ids)
    assert out.shape == (3, 6) and out.dtype == torch.float32
    assert torch.allclose(out, token_logprobs(z[:, :-1], ids[:, 1:]), atol=1e-6)
    assert out[1, 2] == torch.log_softmax(z[1, 2], -1)[ids[1, 3]]


@pytest.fixture(scope="module")
def scored(tiny_model, problems):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64).eval()
    return model, tok, encode_problems(tok, problems, "qwen_boxed", 256)


def test_padding_does_not_change_any_log_prob(scored):
    """Each text alone (no padding) and in a right-padded batch, with two pad ids: the same log-probs."""
    model, tok, enc = scored
    assert len({len(x) for x, _ in enc}) > 1  # the batch really pads
    with torch.no_grad():
        alone = [completion_logprobs(model, collate(enc, [i], 0)) for i in range(len(enc))]
        for pad in (pad_id_of(tok), 3):
            s, lengths, _ = completion_logprobs(model, collate(enc, range(len(enc)), pad))
            assert lengths.tolist() == [int(a[1]) for a in alone]
            assert torch.allclose(s, torch.cat([a[0] for a in alone]), rtol=1e-10, atol=1e-10)
        tokens = per_token_logprobs(model, collate(enc, range(len(enc)), pad_id_of(tok)))
    assert [t.numel() for t in tokens] == lengths.tolist()
    assert torch.allclose(torch.stack([t.sum() for t in tokens]), s, rtol=1e-12)


def test_completion_logits_are_the_full_logits_at_the_completion_positions(scored):
    """The LM head on the masked hidden states only = the model's full logits at those positions."""
    model, tok, enc = scored
    batch = collate(enc, range(4), pad_id_of(tok))
    with torch.no_grad():
        rows, targets, m = completion_logits(model, batch)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        s, lengths = sequence_logprobs(full, batch["input_ids"], batch["completion_mask"])
        s2, lengths2, _ = completion_logprobs(model, batch)
    assert torch.allclose(rows, full[:, :-1][m], atol=1e-10)
    assert torch.equal(targets, batch["input_ids"][:, 1:][m])
    assert torch.allclose(s, s2, rtol=1e-10) and torch.equal(lengths, lengths2)
    # the completion mask predicts exactly the solution tokens (the prompt is never scored)
    sol = tok.decode(batch["input_ids"][0, 1:][m[0]])
    assert sol.endswith("<|im_end|>") and "What is" not in sol
