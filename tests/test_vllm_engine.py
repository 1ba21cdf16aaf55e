"""The vLLM path for real: ``mast.vllm_worker`` on vLLM's CPU build (``make test-vllm``, docs/vllm.md).

Engine tests (marker ``vllm``) run the toy RLVR model through :func:`mast.evaluation.evaluate_many`
with ``backend="vllm"``: one worker process, one engine start, every suite of :func:`_suites` in
one ``generate()``. The module makes that call twice (reproducibility needs two engine starts)
and compares with the hf backend. Runs in different sampling streams (:mod:`mast.sampling_seeds`)
share no sample of a problem; the same stream reproduces. Skipped where vLLM is not importable (the project's .venv).

The finish-reason handling (abort / error cannot be provoked on a healthy engine) and the CPU
engine options are pure, tested on plain objects with vLLM 0.32's ``CompletionOutput`` fields.
"""

from __future__ import annotations

import importlib.util
import itertools
import time
from types import SimpleNamespace as NS

import pytest
from pydantic import ValidationError

from mast.backends import GenerationRequest, HFBackend, vllm_sampling_kwargs
from mast.config import DecodingSpec, RepetitionSpec, SuiteSpec, load_suite
from mast.evaluation import build_records, evaluate, evaluate_many
from mast.files import InputError
from mast.vllm_worker import (
    CPU_MIN_BATCHED_TOKENS,
    completion_sample,
    convert_request_outputs,
    cpu_engine_kwargs,
    group_params,
)

no_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (make test-vllm)")

GREEDY, SHORT, SAMPLED, SAME_SEED, RESEEDED, REPEAT = "greedy", "short", "sampled", "same_seed", "reseeded", "repeat"
SHORT_TOKENS, N = 4, 4
# one decoding in four streams (target, its second run, two null trials) and the target's again: hot and
# short, so two independent samples are never equal by chance (the toy's temperature-1 answers often are)
STREAMS = {"hot_target": None, "hot_second": "target/2", "hot_trial_a": "trial/null-s0",
           "hot_trial_b": "trial/null-s1"}
HOT_AGAIN, HOT_PROBLEMS = "hot_again", 100


def _suites(toy_dir) -> list[SuiteSpec]:
    """The toy's forget suite (200 problems, greedy, max_tokens 64) and variants of its decoding."""
    base = load_suite(toy_dir / "suites" / "forget.yaml")

    def variant(name, **kw):
        return base.model_copy(update={"name": name, "decoding": base.decoding.model_copy(update=kw)})

    return [variant(GREEDY), variant(SHORT, max_tokens=SHORT_TOKENS),
            variant(SAMPLED, temperature=1.0, n=N, seed=5), variant(SAME_SEED, temperature=1.0, n=N, seed=5),
            variant(RESEEDED, temperature=1.0, n=N, seed=6),
            # a token repeated twice in a row ends the answer: some toy answers have one, most not
            variant(REPEAT, repetition_detection=RepetitionSpec(max_pattern_size=1, min_count=2)),
            *[variant(name, temperature=2.0, n=N, max_tokens=12, seed=0, stream=stream).model_copy(
                update={"limit": HOT_PROBLEMS}) for name, stream in [*STREAMS.items(), (HOT_AGAIN, None)]]]


def _vllm_run(toy_dir) -> tuple[dict, float]:
    t0 = time.perf_counter()
    res = evaluate_many(toy_dir / "rlvr", _suites(toy_dir), backend="vllm", use_cache=False, progress=False)
    return res, time.perf_counter() - t0


@pytest.fixture(scope="module")
def first(toy_dir):
    """(results by suite name, seconds) of the first engine run."""
    return _vllm_run(toy_dir)


def _texts(res) -> list[list[str]]:
    return [[s["response"] for s in r["samples"]] for r in res.records]


# --------------------------------------------------------------------------- the real engine


@pytest.mark.vllm
@no_vllm
def test_greedy_vllm_matches_hf_on_the_toy_forget_suite(toy_dir, first):
    """>= 98% of texts equal; token counts and `truncated` equal on every problem."""
    hf = evaluate(toy_dir / "rlvr", _suites(toy_dir)[0], backend="hf", use_cache=False, progress=False)
    vl = first[0][GREEDY]
    assert [r["id"] for r in vl.records] == [r["id"] for r in hf.records] and len(hf.records) == 200
    same = sum(a["response"] == b["response"] for a, b in zip(vl.records, hf.records))
    assert same >= 0.98 * len(hf.records), f"{same}/{len(hf.records)} texts equal"
    assert [r["response_tokens"] for r in vl.records] == [r["response_tokens"] for r in hf.records]
    assert [r["truncated"] for r in vl.records] == [r["truncated"] for r in hf.records]
    assert not any(r["truncated"] for r in vl.records)  # the toy answers well inside 64 tokens
    assert abs(vl.accuracy - hf.accuracy) <= 0.02


@pytest.mark.vllm
@no_vllm
def test_tiny_max_tokens_truncates(first):
    """Every answer cut at 4 tokens: finish_reason "length" -> truncated, all 4 tokens counted."""
    recs = first[0][SHORT].records
    assert all(r["truncated"] is True and r["response_tokens"] == SHORT_TOKENS for r in recs)
    assert all("finish_reason" not in r for r in recs)  # "length" is an ordinary ending
    assert first[0][SHORT].truncated_rate == 1.0 and first[0][GREEDY].truncated_rate == 0.0


@pytest.mark.vllm
@no_vllm
def test_repetition_detection_ends_answers_as_truncated(first):
    """A repeated token ends the answer early: finish_reason "repetition", truncated, recorded per record."""
    recs = first[0][REPEAT].records
    greedy = {r["id"]: r for r in first[0][GREEDY].records}
    hit = [r for r in recs if r.get("finish_reason") == "repetition"]
    assert 0 < len(hit) < len(recs)
    assert all(r["truncated"] is True for r in hit)
    assert all(r["truncated"] is False and "finish_reason" not in r for r in recs if r not in hit)
    # cut short of the greedy answer (same model, same prompt, greedy): a prefix of it
    assert all(r["response_tokens"] < greedy[r["id"]]["response_tokens"] for r in hit)
    assert all(greedy[r["id"]]["response"].startswith(r["response"]) for r in hit)


@pytest.mark.vllm
@no_vllm
def test_seeded_sampling_n4_is_reproducible(toy_dir, first):
    """n = 4 seeded samples: the same in a second engine and within one; another seed differs."""
    res = first[0][SAMPLED]
    assert all(len(r["samples"]) == N and not any(s["truncated"] for s in r["samples"]) for r in res.records)
    texts = _texts(res)
    assert sum(len(set(t)) > 1 for t in texts) > len(texts) // 2  # real sampling, not 4 greedy copies
    assert _texts(first[0][SAME_SEED]) == texts
    assert _texts(first[0][RESEEDED]) != texts
    again, _ = _vllm_run(toy_dir)
    assert _texts(again[SAMPLED]) == texts
    assert [r["samples"] for r in again[SAMPLED].records] == [r["samples"] for r in res.records]
    assert all(_texts(again[name]) == _texts(first[0][name]) for name in STREAMS)


@pytest.mark.vllm
@no_vllm
def test_runs_in_other_streams_share_no_sample(first):
    """vLLM seeds sample j with seed + j; under the old seed offsets (+1 for the second run, +100 + k for
    a trial of seed k) sample j + 1 of one run was sample j of the other in 600 of 600 cases (toy, 200
    problems, n = 4). Per-prompt seeds per stream: two streams' samples of a problem (any j, k) are equal
    only by chance (the toy is confident even at temperature 2: measured 3-12 of the 1,600 pairs; a shared
    seed makes >= 300 equal), and the target's stream gives the same samples under another suite name."""
    runs = {name: _texts(first[0][name]) for name in [*STREAMS, HOT_AGAIN]}
    assert all(len(r) == HOT_PROBLEMS for r in runs.values())
    assert runs[HOT_AGAIN] == runs["hot_target"]
    for a, b in itertools.combinations(STREAMS, 2):
        shared = sum(x == y for ra, rb in zip(runs[a], runs[b]) for x in ra for y in rb)
        assert shared <= HOT_PROBLEMS * N * N // 20, f"{a} and {b} share {shared} of {HOT_PROBLEMS * N * N} samples"


# --------------------------------------------------------------------------- finish reasons (pure)


def _comp(index, token_ids, finish_reason, stop_reason=None, text="t"):
    return NS(index=index, text=text, token_ids=token_ids, cumulative_logprob=None, logprobs=None,
              finish_reason=finish_reason, stop_reason=stop_reason)


@pytest.mark.parametrize("reason", ["abort", "error"])
def test_aborted_or_failed_request_fails_the_worker(reason):
    ok = NS(outputs=[_comp(0, [5, 6], "stop"), _comp(1, [5], "length")])
    bad = NS(outputs=[_comp(0, [5, 6], "stop"), _comp(1, [], reason)])
    assert len(convert_request_outputs([ok], 2)[0]) == 2
    with pytest.raises(RuntimeError, match=f"prompt 1's sample\\(s\\) with finish_reason '{reason}' \\(1 of 2\\)"):
        convert_request_outputs([ok, bad], 2)


def test_repetition_is_a_truncated_sample_and_its_reason_reaches_the_records():
    # vLLM's check_stop: FINISHED_REPETITION with stop_reason "repetition_detected"; every token counts
    rep = completion_sample(_comp(0, [7, 7, 7], "repetition", stop_reason="repetition_detected"))
    assert rep == {"text": "t", "n_tokens": 3, "truncated": True, "finish_reason": "repetition"}
    plain = completion_sample(_comp(0, [7, 8, 2], "stop"))
    probs = [{"id": "a", "answer": "1"}]
    graded = [{"correct": False, "response": "t", "extracted": None}] * 2
    one = build_records(probs, ["q"], [[1]], [[rep]], graded, 1)[0]
    assert one["truncated"] is True and one["finish_reason"] == "repetition"
    two = build_records(probs, ["q"], [[1]], [[plain, rep]], graded, 2)[0]
    assert "finish_reason" not in two and [s.get("finish_reason") for s in two["samples"]] == [None, "repetition"]


def test_repetition_detection_reaches_sampling_params_only_when_set():
    plain = DecodingSpec(max_tokens=9)
    assert "repetition_detection" not in vllm_sampling_kwargs(plain, [2])
    rep = plain.model_copy(update={"repetition_detection": RepetitionSpec(max_pattern_size=8, min_count=3)})
    assert vllm_sampling_kwargs(rep, [2])["repetition_detection"] == \
        {"max_pattern_size": 8, "min_pattern_size": 0, "min_count": 3}


def test_a_sampled_group_gets_one_seed_per_prompt():
    """One SamplingParams per prompt with its own seed (vLLM then seeds sample j with seed + j); a
    group without per-prompt seeds (greedy) shares one, as before."""
    kw = {"n": 4, "temperature": 1.0, "seed": 5}
    shared = group_params(dict, kw, None, 3)
    assert shared == [kw] * 3 and shared[0] is shared[2]
    assert [p["seed"] for p in group_params(dict, kw, [512, 256, 7680], 3)] == [512, 256, 7680]
    assert kw["seed"] == 5
    with pytest.raises(RuntimeError, match="2 seeds for 3 prompts"):
        group_params(dict, kw, [1, 2], 3)


def test_cpu_engine_has_no_partial_prefill_and_computes_in_float32():
    groups = [{"sampling": {"max_tokens": 64}, "prompt_token_ids": [[1] * 30, [1] * 50]}]
    kw = cpu_engine_kwargs({"dtype": "auto", "seed": 0}, groups, model_max_len=256)
    assert kw == {"enable_chunked_prefill": False, "max_num_batched_tokens": CPU_MIN_BATCHED_TOKENS,
                  "dtype": "float32", "seed": 0}
    # the budget holds the longest sequence the engine may see: without chunked prefill vLLM refuses less
    assert cpu_engine_kwargs({}, groups, model_max_len=40960)["max_num_batched_tokens"] == 40960
    assert cpu_engine_kwargs({"max_model_len": 20000}, groups, 40960)["max_num_batched_tokens"] == 20000
    # the caller's own settings win
    own = cpu_engine_kwargs({"dtype": "bfloat16", "enable_chunked_prefill": True}, groups, 256)
    assert own["dtype"] == "bfloat16" and own["enable_chunked_prefill"] is True


def test_repetition_detection_leaves_existing_keys_alone_and_the_hf_backend_refuses_it(tiny_model):
    """Unset, the decoding dumps as before the field existed (eval cache keys, spec hashes unchanged)."""
    plain = DecodingSpec(max_tokens=8)
    assert "repetition_detection" not in plain.model_dump() and "repetition_detection" not in plain.model_dump(
        mode="json")
    rep = DecodingSpec.model_validate({"max_tokens": 8, "repetition_detection": {"max_pattern_size": 4,
                                                                                  "min_count": 3}})
    assert rep.model_dump()["repetition_detection"] == {"max_pattern_size": 4, "min_pattern_size": 0, "min_count": 3}
    assert DecodingSpec.model_validate(rep.model_dump()) == rep
    for bad in ({"max_pattern_size": 2, "min_count": 1}, {"max_pattern_size": 2, "min_pattern_size": 3,
                                                          "min_count": 2}):
        with pytest.raises(ValidationError):
            DecodingSpec.model_validate({"repetition_detection": bad})
    with pytest.raises(InputError, match="repetition_detection: only the vllm backend"):
        HFBackend(tiny_model, progress=False).generate([GenerationRequest([[1, 2]], rep)])
