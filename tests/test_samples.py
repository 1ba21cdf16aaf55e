"""n samples per problem, truncation and token counts: the same in both backends.

vLLM cannot run here; its output conversion is a pure function, tested on plain objects with the
fields vLLM 0.33's ``RequestOutput`` / ``CompletionOutput`` have (index, text, token_ids,
finish_reason, stop_reason): a data shape, not a mock of vLLM.
"""

from __future__ import annotations

import json
import os
import sys
import time
from types import SimpleNamespace as NS

import pytest

from mast.backends import Backend, HFBackend, hf_sample, run_with_timeout, vllm_sampling_kwargs
from mast.config import DecodingSpec, SuiteSpec
from mast.evaluation import accuracy, evaluate, evaluate_many, sample_matrix, truncated_rate
from mast.prompts import format_prompt
from mast.vllm_worker import completion_sample, convert_request_outputs

EOS = 151645


def _comp(index, token_ids, finish_reason, stop_reason=None, text="t"):
    return NS(index=index, text=text, token_ids=token_ids, cumulative_logprob=None, logprobs=None,
              finish_reason=finish_reason, stop_reason=stop_reason)


def _req(outputs):
    return NS(request_id="0", prompt=None, prompt_token_ids=[1, 2], outputs=outputs, finished=True)


# --------------------------------------------------------------------------- vLLM conversion (pure)


def test_vllm_sample_counts_without_the_ending_token_and_flags_length():
    # ended on the model's EOS: vLLM keeps it in token_ids (check_stop appends, then stops)
    assert completion_sample(_comp(0, [7, 8, 9, EOS], "stop")) == \
        {"text": "t", "n_tokens": 3, "truncated": False, "finish_reason": "stop"}
    # ended on one of stop_token_ids: stop_reason is that id, and it is in token_ids too
    assert completion_sample(_comp(0, [7, EOS], "stop", stop_reason=EOS))["n_tokens"] == 1
    # ended on a stop STRING: its tokens are generated text in both backends
    assert completion_sample(_comp(0, [7, 8, 9], "stop", stop_reason="\n\n"))["n_tokens"] == 3
    # cut at max_tokens: every token counts and the answer is truncated
    cut = completion_sample(_comp(0, [7, 8, 9, 10], "length"))
    assert cut["n_tokens"] == 4 and cut["truncated"] and cut["finish_reason"] == "length"
    assert completion_sample(_comp(0, [], "abort"))["n_tokens"] == 0


def test_convert_request_outputs_orders_samples_by_index_and_checks_n():
    outs = [_req([_comp(1, [5, EOS], "stop", text="b"), _comp(0, [4, 4, 4], "length", text="a")]),
            _req([_comp(0, [EOS], "stop", text=""), _comp(1, [3], "length", text="c")])]
    rows = convert_request_outputs(outs, 2)
    assert [[s["text"] for s in r] for r in rows] == [["a", "b"], ["", "c"]]
    assert [[s["n_tokens"] for s in r] for r in rows] == [[3, 1], [0, 1]]
    assert [[s["truncated"] for s in r] for r in rows] == [[True, False], [False, True]]
    assert convert_request_outputs(outs, [2, 2]) == rows
    with pytest.raises(RuntimeError, match="2 completions for prompt 0, expected 3"):
        convert_request_outputs(outs, 3)
    with pytest.raises(RuntimeError, match="2 outputs for 3 prompts"):
        convert_request_outputs(outs, [2, 2, 2])


def test_vllm_sampling_kwargs_greedy_and_sampled():
    """The parent computes the worker's SamplingParams kwargs; greedy ignores top_p (DecodingSpec.greedy)."""
    greedy = DecodingSpec(temperature=0.0, top_p=0.5, max_tokens=9, seed=3)
    assert greedy.greedy
    assert vllm_sampling_kwargs(greedy, [EOS]) == {"n": 1, "temperature": 0.0, "top_p": 1.0, "max_tokens": 9,
                                                   "seed": 3, "stop": None, "stop_token_ids": [EOS],
                                                   "skip_special_tokens": True}
    spec = DecodingSpec(temperature=0.6, top_p=0.95, n=4, max_tokens=9, seed=3, stop=["</s>"])
    sampled = vllm_sampling_kwargs(spec, [])
    assert not spec.greedy
    assert (sampled["temperature"], sampled["top_p"], sampled["n"], sampled["stop"], sampled["stop_token_ids"]) == \
        (0.6, 0.95, 4, ["</s>"], None)
    assert json.loads(json.dumps(sampled)) == sampled  # crosses the process boundary as JSON


def test_both_backends_count_the_same_tokens():
    """The same generation seen by each backend: hf ids (eos, then padding) and vLLM's token_ids."""
    pad = 151643
    cases = [  # (hf row after the prompt, vLLM token_ids, finish_reason, stop_reason)
        ([5, 6, EOS, pad, pad], [5, 6, EOS], "stop", None),
        ([5, 6, 7, 8], [5, 6, 7, 8], "length", None),
    ]
    for hf_row, v_ids, reason, stop_reason in cases:
        h = hf_sample(hf_row, "text", {EOS}, pad, 4, [])
        v = completion_sample(_comp(0, v_ids, reason, stop_reason, text="text"))
        assert (h["n_tokens"], h["truncated"], h["finish_reason"]) == \
            (v["n_tokens"], v["truncated"], v["finish_reason"])


def test_hf_sample_stop_string_is_not_truncation():
    s = hf_sample([5, 6, 7, 0, 0], "ab STOP cd", {EOS}, 0, 5, ["STOP"])
    assert s == {"text": "ab ", "n_tokens": 3, "truncated": False, "finish_reason": "stop"}
    assert hf_sample([5, 6, 7, 8, 9], "abcde", {EOS}, 0, 5, ["STOP"])["truncated"]


# --------------------------------------------------------------------------- records with n samples


class AlternatingBackend(Backend):
    """A test double of the backend contract: sample j of every problem is the right answer iff j is even;
    it cannot tell truncation (``truncated`` None)."""

    name = "alternating"

    def __init__(self, real, problems, template="qwen_boxed"):
        self.tokenizer = real.tokenizer
        self.by_prompt = {format_prompt(real.tokenizer, p["prompt"], template): p for p in problems}
        self.calls = 0

    def generate(self, requests):
        self.calls += 1
        return [[self._samples(self.by_prompt[self.tokenizer.decode(ids)], r.decoding.n) for ids in r.prompt_ids]
                for r in requests]

    @staticmethod
    def _samples(prob, n):
        texts = [f"\\boxed{{{prob['answer']}}}" if j % 2 == 0 else "\\boxed{-1}" for j in range(n)]
        return [{"text": t, "n_tokens": 3, "truncated": None, "finish_reason": None} for t in texts]


def _suite(tmp_path, problems, name="t", **decoding):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))
    return SuiteSpec(name=name, benchmark="jsonl", path=str(path), decoding=DecodingSpec(**decoding))


def test_every_sample_is_scored_and_kept(tiny_model, problems, tmp_path):
    real = HFBackend(tiny_model, progress=False)
    suite = _suite(tmp_path, problems[:4], temperature=0.6, top_p=0.95, n=3, max_tokens=8)
    res = evaluate(tiny_model, suite, backend=AlternatingBackend(real, problems[:4]), cache_dir=tmp_path / "c")
    for r in res.records:
        assert [s["correct"] for s in r["samples"]] == [True, False, True]
        assert r["accuracy"] == pytest.approx(2 / 3) and r["correct"] is True  # correct = first sample
        assert [s["extracted"] for s in r["samples"]][1] == "-1"
        assert all(s["truncated"] is None for s in r["samples"])  # that backend cannot tell
    assert res.accuracy == pytest.approx(2 / 3) and res.n_correct == 4 and res.n_samples == 3
    assert sample_matrix(res.records) == [[True, False, True]] * 4
    assert res.metrics()["accuracy_first_sample"] == 1.0 and res.metrics()["truncated_rate"] is None
    again = evaluate(tiny_model, suite, backend=AlternatingBackend(real, problems[:4]), cache_dir=tmp_path / "c")
    assert again.cache_hit and again.records == res.records and again.accuracy == res.accuracy


def test_truncation_on_the_hf_backend_with_a_tiny_max_tokens(tiny_model, problems, tmp_path):
    """An untrained model never emits eos: at max_tokens 3 every answer is cut, at n = 2 too."""
    short = evaluate(tiny_model, _suite(tmp_path, problems[:3], max_tokens=3), cache_dir=tmp_path / "c",
                     progress=False)
    assert [r["truncated"] for r in short.records] == [True] * 3
    assert [r["response_tokens"] for r in short.records] == [3] * 3
    assert short.truncated_rate == 1.0 and short.metrics()["mean_response_tokens"] == 3
    sampled = evaluate(tiny_model, _suite(tmp_path, problems[:3], name="s", max_tokens=3, temperature=1.0, n=2),
                       cache_dir=tmp_path / "c", progress=False)
    assert all(len(r["samples"]) == 2 and all(s["truncated"] and s["n_tokens"] == 3 for s in r["samples"])
               for r in sampled.records)
    assert truncated_rate(sampled.records) == 1.0
    mixed = [{"id": "a", "correct": True, "truncated": False}, {"id": "b", "correct": False, "truncated": True},
             {"id": "c", "correct": False, "truncated": True, "accuracy": 0.5,
              "samples": [{"truncated": True}, {"truncated": False}]}]
    assert truncated_rate(mixed) == pytest.approx(2 / 4) and accuracy(mixed) == pytest.approx(1.5 / 3)


def test_evaluate_many_is_one_generation_call_and_matches_evaluate(tiny_model, problems, tmp_path):
    real = HFBackend(tiny_model, progress=False)
    calls = []

    class Counting(HFBackend):
        def generate(self, requests):
            calls.append([len(r.prompt_ids) for r in requests])
            return super().generate(requests)

    a = _suite(tmp_path, problems[:3], name="a", max_tokens=4)
    b = _suite(tmp_path, problems[3:7], name="b", max_tokens=5)
    together = evaluate_many(tiny_model, [a, b], backend=Counting(tiny_model, progress=False), use_cache=False)
    assert calls == [[3, 4]] and list(together) == ["a", "b"]
    for s in (a, b):
        alone = evaluate(tiny_model, s, backend=real, use_cache=False)
        assert together[s.name].records == alone.records
    # cache hits are not generated again; only the missing suite is
    evaluate(tiny_model, a, backend=real, cache_dir=tmp_path / "c")
    calls.clear()
    res = evaluate_many(tiny_model, [a, b], backend=Counting(tiny_model, progress=False), cache_dir=tmp_path / "c")
    assert calls == [[4]] and res["a"].cache_hit and not res["b"].cache_hit


# --------------------------------------------------------------------------- the worker's timeout


def test_run_with_timeout_kills_the_whole_process_group(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    cmd = [sys.executable, "-c",
           "import subprocess, sys, time; p = subprocess.Popen(['sleep', '60']); "
           f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(60)"]
    t0 = time.time()
    assert run_with_timeout(cmd, 2.0) is None
    assert time.time() - t0 < 30
    pid = int(pidfile.read_text())
    deadline = time.time() + 10
    while time.time() < deadline and _alive(pid):
        time.sleep(0.2)
    assert not _alive(pid)  # vLLM's engine-core / TP processes die with the worker
    assert run_with_timeout([sys.executable, "-c", "raise SystemExit(3)"], 30) == 3


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (reaped by init later) counts as dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
