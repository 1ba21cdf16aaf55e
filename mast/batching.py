"""Batches of prompt + solution texts and their completion log-probabilities: one implementation.

Selection (the coupling signal's forget loss), unlearning (every objective and the retain NLL)
and the diagnostics (per-token log-probs) all score texts through the functions here, so the
loss whose gradient ranks the tensors is the very NLL the unlearning loop lowers or raises.

Notation (one batch of N texts, each ``x_i`` = prompt + solution tokens, ``m_it`` = 1 on the
solution tokens; :func:`mast.prompts.problem_pair` builds both):

- per token   ``ℓ_it = log softmax(z_i,t−1)[x_it]``  (the logits at t−1 predict token t)
- per text    ``s_i = Σ_{t≥1} m_it ℓ_it``, ``|y_i| = Σ_{t≥1} m_it``
- NLL         ``−Σ_i s_i / Σ_i |y_i|`` (mean token NLL of the batch, or of a larger set when
  the denominator is that set's token count: accumulating over batches gives the set's NLL)

Scored batches are right-padded (:func:`pad_right`; :func:`pad_left` is for generation): with
causal attention a real token never sees the padding after it, so the pad id does not change
any log-prob (a test checks padded == unpadded).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mast.prompts import problem_pair

Batch = dict[str, torch.Tensor]  # input_ids, attention_mask, completion_mask: (B, T) int64
Encoded = tuple[list[int], list[int]]  # (token ids, completion mask) of one text


# --------------------------------------------------------------------------- collate


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad id, else its eos id, else 0 (the value never reaches a real token's log-prob)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def encode_problems(tokenizer, problems: Sequence[dict], template: str, max_length: int) -> list[Encoded]:
    """(input_ids, completion_mask) per problem, via :func:`mast.prompts.problem_pair`."""
    return [problem_pair(tokenizer, p, template, max_length) for p in problems]


def pad_right(pairs: Sequence[Encoded], pad_id: int) -> Batch:
    """Right-padded batch of (ids, completion mask) pairs: input_ids, attention_mask, completion_mask."""
    T = max(len(x) for x, _ in pairs)
    ids = torch.full((len(pairs), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(pairs), T), dtype=torch.long)
    cm = torch.zeros((len(pairs), T), dtype=torch.long)
    for r, (x, m) in enumerate(pairs):
        ids[r, : len(x)] = torch.tensor(x)
        att[r, : len(x)] = 1
        cm[r, : len(m)] = torch.tensor(m)
    return {"input_ids": ids, "attention_mask": att, "completion_mask": cm}


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (input_ids, attention_mask) of prompts for ``generate`` (new tokens then line up at the right)."""
    T = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), T), dtype=torch.long)
    for r, x in enumerate(seqs):
        ids[r, T - len(x):] = torch.tensor(x, dtype=torch.long)
        att[r, T - len(x):] = 1
    return ids, att


def collate(encoded: Sequence[Encoded], idx: Sequence[int], pad_id: int) -> Batch:
    """The texts `encoded[i]` for i in `idx`, right-padded (:func:`pad_right`)."""
    return pad_right([encoded[i] for i in idx], pad_id)


def in_order(encoded: Sequence[Encoded], batch_size: int, pad_id: int) -> list[Batch]:
    """Consecutive batches of `batch_size` texts in their given order (the last one may be shorter)."""
    return [collate(encoded, range(i, min(i + batch_size, len(encoded))), pad_id)
            for i in range(0, len(encoded), batch_size)]


def to_device(batch: Batch, device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def completion_positions(batch: Batch) -> torch.Tensor:
    """The (B, T−1) boolean mask of predicted solution tokens: ``m_it`` for t ≥ 1."""
    return batch["completion_mask"][:, 1:].bool()


# --------------------------------------------------------------------------- log-probs (pure)


def at_least_f32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> float32 (softmax over a vocabulary needs it); float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(z)[y]`` per row, computed in (at least) float32. logits (..., V), targets (...) -> (...)."""
    return -F.cross_entropy(at_least_f32(logits).reshape(-1, logits.shape[-1]), targets.reshape(-1),
                            reduction="none").view(targets.shape)


def next_token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``log π(ids[t] | ids[<t])`` for t ≥ 1 from full (B, T, V) logits: (B, T−1), float32.

    log_softmax + gather over every position (padding and prompt included; the caller masks):
    the toy build's formula, kept as written so its weights stay bit-identical.
    """
    return torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def sum_by_sequence(tok: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scatter packed per-token values back to (B, T') by the boolean `mask` and sum each row.

    Deterministic on every device (masked assignment, then a row sum; no atomic adds).
    """
    full = torch.zeros(mask.shape, dtype=tok.dtype, device=tok.device)
    full = full.masked_scatter(mask, tok)
    return full.sum(dim=1)


def split_by_sequence(tok: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Packed per-token values (row-major over `mask`) split into one tensor per sequence."""
    return list(torch.split(tok, mask.sum(dim=1).tolist()))


def sequence_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence ``s_i`` and ``|y_i|`` from full (B, T, V) logits; only masked rows reach the log-softmax."""
    m = completion_mask[:, 1:].bool()
    tok = token_logprobs(logits[:, :-1][m], input_ids[:, 1:][m])
    return sum_by_sequence(tok, m), m.sum(dim=1)


def completion_nll(logp: torch.Tensor, lengths: torch.Tensor, n_tokens: int | None = None) -> torch.Tensor:
    """Mean token NLL ``−Σ_i s_i / Σ_i |y_i|``; with `n_tokens`, ``−Σ_i s_i / n_tokens`` instead.

    The second form is this batch's share of the NLL of a set of `n_tokens` completion tokens:
    the shares of its batches add up to the set's mean token NLL (and so do their gradients).
    """
    if n_tokens is None:
        return -logp.sum() / lengths.sum().clamp_min(1).to(logp.dtype)
    return -logp.sum() / n_tokens


# --------------------------------------------------------------------------- log-probs of a model


def completion_logits(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits only where a completion token is predicted: (rows (n, V), targets (n,), mask (B, T−1)).

    Runs the decoder once and the LM head on the masked positions only (the full (B, T, V)
    logits of a 150k vocabulary are never built).
    """
    decoder = getattr(model, model.base_model_prefix)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    hidden = hidden.last_hidden_state
    m = completion_positions(batch)
    rows = model.get_output_embeddings()(hidden[:, :-1][m])
    return rows, batch["input_ids"][:, 1:][m], m


def completion_logprobs(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s, lengths, rows): per-text summed completion log-probs (≥ float32), ``|y_i|``, the logit rows."""
    rows, targets, m = completion_logits(model, batch)
    return sum_by_sequence(token_logprobs(rows, targets), m), m.sum(dim=1), rows


def per_token_logprobs(model, batch: Batch) -> list[torch.Tensor]:
    """``ℓ_it`` of each text's completion tokens, one 1-D tensor per text (≥ float32)."""
    rows, targets, m = completion_logits(model, batch)
    return split_by_sequence(token_logprobs(rows, targets), m)
