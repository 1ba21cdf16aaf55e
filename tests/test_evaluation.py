"""The evaluator: hf backend, suites, cache, prefix-recovery probe, CLI (tiny untrained model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mast.config import DecodingSpec, ProbeSpec, SuiteSpec
from mast.evaluation import (
    HFBackend,
    encode_prompts,
    solution_prefix,
    truncate_at_stop,
)
from mast.files import InputError
from mast.prompts import format_prompt

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def backend(tiny_model):
    return HFBackend(tiny_model, batch_size=4, progress=False)


def _prompts(tok, problems):
    return [format_prompt(tok, p["prompt"], "qwen_boxed") for p in problems]


# --------------------------------------------------------------------------- pure helpers


def test_truncate_at_stop_takes_earliest_and_excludes_it():
    assert truncate_at_stop("abc STOP def END", ["END", "STOP"]) == "abc "
    assert truncate_at_stop("abc", ["x"]) == "abc"
    assert truncate_at_stop("abc", []) == "abc"


def test_solution_prefix_cuts_on_whitespace():
    sol = "alpha beta gamma delta"  # 22 chars
    assert solution_prefix(sol, 0.0) == ""
    # 0.5 * 22 = 11 -> index 11 is 'g' of gamma after a space: boundary already
    assert solution_prefix(sol, 0.5) == "alpha beta "
    # 0.3 * 22 = 6 -> inside "beta"? index 6 is 'b', index 5 is ' ': boundary
    assert solution_prefix(sol, 0.3) == "alpha "
    # 0.4 * 22 = 8 -> inside "beta": moved back to the start of "beta"
    assert solution_prefix(sol, 0.4) == "alpha "
    assert sol.startswith(solution_prefix(sol, 0.75))
    with pytest.raises(ValueError):
        solution_prefix(sol, 1.0)


# --------------------------------------------------------------------------- hf backend


def test_hf_backend_batched_matches_one_at_a_time(backend, problems):
    """Sorting + left padding + batching must not change greedy outputs or their order."""
    import torch

    dec = DecodingSpec(max_tokens=8)
    prompts = _prompts(backend.tokenizer, problems[:6])
    prompts[1] = prompts[1].replace("What is", "Please tell me quickly what is")  # unequal lengths
    batched = backend.generate(prompts, dec)
    assert len(batched) == len(prompts) and all(len(c) == 1 for c in batched)
    tok = backend.tokenizer
    for p, got in zip(prompts, batched):
        ids = torch.tensor([encode_prompts(tok, [p])[0]])
        seq = backend.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                     do_sample=False, eos_token_id=backend.eos_ids, pad_token_id=tok.pad_token_id)
        new = seq[0, ids.shape[1]:].tolist()
        new = new[: next((j for j, t in enumerate(new) if t in backend.eos_ids), len(new))]
        assert got[0] == tok.decode(new, skip_special_tokens=True)


def test_hf_backend_sampling_is_seeded_and_n(backend, problems):
    prompts = _prompts(backend.tokenizer, problems[:2])
    a = backend.generate(prompts, DecodingSpec(max_tokens=6, temperature=1.0, n=3, seed=7))
    b = backend.generate(prompts, DecodingSpec(max_tokens=6, temperature=1.0, n=3, seed=7))
    c = backend.generate(prompts, DecodingSpec(max_tokens=6, temperature=1.0, n=3, seed=8))
    assert a == b and a != c
    assert [len(x) for x in a] == [3, 3]
    assert len(set(a[0])) > 1  # untrained model, temperature 1: the three samples differ
    greedy = backend.generate(prompts, DecodingSpec(max_tokens=6, n=2))
    assert all(x[0] == x[1] for x in greedy)


def test_hf_backend_stop_strings(backend, problems):
    prompts = _prompts(backend.tokenizer, problems[:3])
    free = backend.generate(prompts, DecodingSpec(max_tokens=10, temperature=1.0, seed=1))
    text = free[0][0]
    assert len(text) >= 3
    stop = text[2]  # a character the model is known to produce at position 2
    stopped = backend.generate(prompts, DecodingSpec(max_tokens=10, temperature=1.0, seed=1, stop=[stop]))
    for f, s in zip(free, stopped):
        assert stop not in s[0]
        assert s[0] == truncate_at_stop(f[0], [stop])


def test_hf_backend_rejects_missing_model(tmp_path):
    with pytest.raises(InputError):
        HFBackend(tmp_path / "nope")
