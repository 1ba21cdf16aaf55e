"""The evaluator: hf backend, suites, cache, prefix-recovery probe, CLI (tiny untrained model)."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from mast.backends import Backend, GenerationRequest, HFBackend, VLLMBackend, encode_prompts, truncate_at_stop
from mast.config import DecodingSpec, ProbeSpec, SuiteSpec
from mast.evaluation import evaluate, load_suite_problems
from mast.files import InputError, read_jsonl
from mast.probe import prefix_recovery, solution_prefix
from mast.prompts import format_prompt

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def backend(tiny_model):
    return HFBackend(tiny_model, batch_size=4, progress=False)


def _prompts(tok, problems):
    return [format_prompt(tok, p["prompt"], "qwen_boxed") for p in problems]


def _texts(backend, prompts, decoding):
    """Per prompt the texts of its samples: one request through the backend's one generate()."""
    [rows] = backend.generate([GenerationRequest(encode_prompts(backend.tokenizer, prompts), decoding)])
    return [[s["text"] for s in row] for row in rows]


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
    batched = _texts(backend, prompts, dec)
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
    a = _texts(backend, prompts, DecodingSpec(max_tokens=6, temperature=1.0, n=3, seed=7))
    b = _texts(backend, prompts, DecodingSpec(max_tokens=6, temperature=1.0, n=3, seed=7))
    c = _texts(backend, prompts, DecodingSpec(max_tokens=6, temperature=1.0, n=3, seed=8))
    assert a == b and a != c
    assert [len(x) for x in a] == [3, 3]
    assert len(set(a[0])) > 1  # untrained model, temperature 1: the three samples differ
    with pytest.raises(ValueError, match="needs sampling"):  # greedy has one answer (vLLM refuses n > 1)
        DecodingSpec(max_tokens=6, n=2)


def test_hf_backend_stop_strings(backend, problems):
    prompts = _prompts(backend.tokenizer, problems[:3])
    free = _texts(backend, prompts, DecodingSpec(max_tokens=10, temperature=1.0, seed=1))
    text = free[0][0]
    assert len(text) >= 3
    stop = text[2]  # a character the model is known to produce at position 2
    stopped = _texts(backend, prompts, DecodingSpec(max_tokens=10, temperature=1.0, seed=1, stop=[stop]))
    for f, s in zip(free, stopped):
        assert stop not in s[0]
        assert s[0] == truncate_at_stop(f[0], [stop])


def test_hf_backend_rejects_missing_model(tmp_path):
    with pytest.raises(InputError):
        HFBackend(tmp_path / "nope")


# --------------------------------------------------------------------------- evaluate + cache


def _suite(tmp_path, problems, **kw) -> SuiteSpec:
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))
    return SuiteSpec(name="t", benchmark="jsonl", path=str(path),
                     decoding=DecodingSpec(max_tokens=kw.pop("max_tokens", 6)), **kw)


class OracleBackend(Backend):
    """A test double of the backend contract around the real hf backend's tokenizer.

    It answers with the reference solution (or its remainder after a probe prefix) for problems
    whose number is even and with "no idea" otherwise, so the correct count is known.
    """

    name = "oracle"

    def __init__(self, real, problems, template="qwen_boxed"):
        self.tokenizer = real.tokenizer
        self.by_prompt = {format_prompt(real.tokenizer, p["prompt"], template): p for p in problems}
        self.calls, self.generate_calls = [], []

    def generate(self, requests):
        self.generate_calls.append([len(r.prompt_ids) for r in requests])
        return [[self._answer(ids, r.decoding.n) for ids in r.prompt_ids] for r in requests]

    def _answer(self, ids, n):
        text = self.tokenizer.decode(ids)
        self.calls.append(text)
        prompt = max((p for p in self.by_prompt if text.startswith(p)), key=len)
        prob, prefix = self.by_prompt[prompt], text[len(prompt):]
        good = int(prob["id"][1:]) % 2 == 0
        assert prob["solution"].startswith(prefix)
        answer = prob["solution"][len(prefix):] if good else "no idea"
        return [{"text": answer, "n_tokens": len(answer.split()), "truncated": None, "finish_reason": None}] * n


def test_evaluate_counts_correct_answers_with_real_grader(backend, problems, tmp_path):
    suite = _suite(tmp_path, problems[:6])
    oracle = OracleBackend(backend, problems[:6])
    res = evaluate(backend.model_dir, suite, backend=oracle, cache_dir=tmp_path / "cache")
    assert [r["id"] for r in res.records] == [p["id"] for p in problems[:6]]
    assert [r["correct"] for r in res.records] == [i % 2 == 0 for i in range(6)]
    assert res.accuracy == pytest.approx(3 / 6) and res.n_correct == 3
    assert res.records[0]["extracted"] == problems[0]["answer"]


def test_evaluate_records_and_cache(tiny_model, problems, tmp_path):
    suite = _suite(tmp_path, problems)
    cache = tmp_path / "cache"
    first = evaluate(tiny_model, suite, problems=problems[:5], cache_dir=cache, batch_size=4, progress=False)
    assert not first.cache_hit
    assert [r["id"] for r in first.records] == [p["id"] for p in problems[:5]]
    for r in first.records:
        assert set(r) >= {"id", "correct", "response", "extracted", "prompt_sha", "prompt_tokens", "response_tokens"}
        assert r["correct"] is False  # untrained model
        assert r["prompt_tokens"] > 0 and r["response_tokens"] == 6  # untrained: never emits eos
    files = list((cache / "eval").glob("*.jsonl"))
    assert len(files) == 1 and files[0].stem == first.key

    again = evaluate(tiny_model, suite, problems=problems[:5], cache_dir=cache, progress=False)
    assert again.cache_hit and again.records == first.records and again.key == first.key
    assert again.seconds < first.seconds / 2
    lazy = HFBackend(tiny_model, progress=False)  # a reused backend: a hit never loads the weights
    assert evaluate(tiny_model, suite, backend=lazy, problems=problems[:5], cache_dir=cache).cache_hit
    assert lazy._model is None

    # anything that changes the answers changes the key: problems, decoding, template, backend
    other = evaluate(tiny_model, suite, problems=problems[:4], cache_dir=cache, progress=False)
    assert not other.cache_hit and other.records == first.records[:4]  # greedy, batch-independent
    longer = suite.model_copy(update={"decoding": DecodingSpec(max_tokens=7)})
    assert not evaluate(tiny_model, longer, problems=problems[:4], cache_dir=cache, progress=False).cache_hit
    plain = suite.model_copy(update={"template": "plain"})
    res_plain = evaluate(tiny_model, plain, problems=problems[:4], cache_dir=cache, progress=False)
    assert not res_plain.cache_hit and res_plain.records[0]["prompt_sha"] != first.records[0]["prompt_sha"]
    # use_cache=False regenerates and writes nothing
    n_files = len(list((cache / "eval").glob("*.jsonl")))
    fresh = evaluate(tiny_model, suite, problems=problems[:5], cache_dir=cache, use_cache=False, progress=False)
    assert not fresh.cache_hit and fresh.records == first.records
    assert len(list((cache / "eval").glob("*.jsonl"))) == n_files


def test_evaluate_suite_file_limit_and_bad_input(tiny_model, problems, tmp_path):
    suite = _suite(tmp_path, problems, limit=3)
    assert [p["id"] for p in load_suite_problems(suite)] == ["p0", "p1", "p2"]
    res = evaluate(tiny_model, suite, cache_dir=tmp_path / "c", progress=False)
    assert [r["id"] for r in res.records] == ["p0", "p1", "p2"]
    with pytest.raises(InputError, match="model folder not found"):
        evaluate(tmp_path / "missing", suite, cache_dir=tmp_path / "c")
    with pytest.raises(InputError, match="duplicate problem id"):
        evaluate(tiny_model, suite, problems=[problems[0], problems[0]], cache_dir=tmp_path / "c")
    with pytest.raises(InputError, match="no 'path'"):
        evaluate(tiny_model, SuiteSpec(name="f", benchmark="jsonl", split_role="forget"), cache_dir=tmp_path / "c")
    with pytest.raises(InputError, match="unknown backend"):
        evaluate(tiny_model, suite, backend="nope", cache_dir=tmp_path / "c")


def test_load_suite_problems_benchmarks(data_dir):
    m = load_suite_problems(SuiteSpec(name="m", benchmark="math500", limit=3), data_dir)
    g = load_suite_problems(SuiteSpec(name="g", benchmark="gsm8k", limit=2), data_dir)
    assert len(m) == 3 and len(g) == 2
    assert m == load_suite_problems(SuiteSpec(name="m", benchmark="math500", limit=3), data_dir)
    for p in m + g:
        assert {"id", "prompt", "solution", "answer"} <= set(p)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm installed")
def test_vllm_backend_without_vllm_is_input_error(tiny_model):
    with pytest.raises(InputError, match=r"pip install -e '\.\[vllm\]'"):
        VLLMBackend(tiny_model)


# --------------------------------------------------------------------------- prefix-recovery probe


def test_probe_feeds_prefixes_and_grades_prefix_plus_continuation(backend, problems, tmp_path):
    probs = problems[:4]
    suite = _suite(tmp_path, probs, probe=ProbeSpec(fractions=[0.0, 0.5, 0.75]))
    oracle = OracleBackend(backend, probs)
    res = evaluate(backend.model_dir, suite, backend=oracle, cache_dir=tmp_path / "cache")
    assert res.probe["fractions"] == [0.0, 0.5, 0.75] and res.probe["n"] == 4
    # even ids solved (prefix + rest = the solution); odd ids answer "no idea", which only the
    # prefix + continuation score can count right (a prefix stating "= 56." feeds the grader's fallback)
    assert res.probe["accuracy_continuation"] == [0.5, 0.5, 0.5]
    assert res.probe["accuracy"][0] == 0.5
    assert all(a >= c for a, c in zip(res.probe["accuracy"], res.probe["accuracy_continuation"]))
    # one generation call: the 4 prompts, then prompt + the whitespace-cut prefix for p > 0
    # (p = 0 reuses the evaluation's responses)
    probe_calls = oracle.calls[4:]
    assert len(oracle.calls) == 4 + 2 * 4 and oracle.generate_calls == [[4 + 2 * 4]]
    for j, frac in enumerate([0.5, 0.75]):
        for i, p in enumerate(probs):
            assert probe_calls[j * 4 + i].endswith(format_prompt(backend.tokenizer, p["prompt"], "qwen_boxed")
                                                   + solution_prefix(p["solution"], frac))
    hit = evaluate(backend.model_dir, suite, backend=oracle, cache_dir=tmp_path / "cache")
    assert hit.cache_hit and hit.probe == res.probe


def test_probe_on_real_model(tiny_model, problems, tmp_path):
    suite = _suite(tmp_path, problems[:3], probe="prefix_recovery")
    res = evaluate(tiny_model, suite, cache_dir=tmp_path / "cache", progress=False)
    assert res.probe["fractions"] == [0.0, 0.25, 0.5, 0.75]
    assert len(res.probe["accuracy"]) == 4 and all(0.0 <= a <= 1.0 for a in res.probe["accuracy"])
    assert res.probe["accuracy"][0] == res.accuracy  # p = 0 is the plain evaluation
    be = HFBackend(tiny_model, progress=False)  # standalone probe, separate generation: same curve
    probs = problems[:3]
    alone = prefix_recovery(be, probs, _prompts(be.tokenizer, probs), suite, ProbeSpec())
    assert alone == res.probe


# --------------------------------------------------------------------------- CLI


def test_cli_eval_writes_results_probe_and_hits_cache(tiny_model, problems, tmp_path, capsys):
    from mast.cli import main

    data = tmp_path / "probs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in problems[:3]))
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: t\nbenchmark: jsonl\npath: probs.jsonl\nprobe: {fractions: [0.0, 0.5]}\n"
                     "decoding: {max_tokens: 5}\n")
    out = tmp_path / "out" / "RESULTS.jsonl"
    argv = ["eval", "--model", str(tiny_model), "--suite", str(suite), "--out", str(out),
            "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "accuracy: 0/3 = 0.0000" in text and "cache: miss" in text
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["p0", "p1", "p2"]
    probe = json.loads((tmp_path / "out" / "RESULTS.probe.json").read_text())
    assert probe["fractions"] == [0.0, 0.5]
    assert main(argv) == 0
    assert "cache: hit" in capsys.readouterr().out
    assert main(["eval", "--model", str(tmp_path / "nope"), "--suite", str(suite), "--out", str(out)]) == 2
    assert main(["eval", "--model", str(tiny_model), "--suite", str(tmp_path / "nope.yaml"), "--out", str(out)]) == 2
    assert "file not found" in capsys.readouterr().err


# --------------------------------------------------------------------------- toy (slow) and vLLM (gpu)


@pytest.mark.slow
def test_cli_eval_reproduces_toy_summary_and_caches(toy_dir, tmp_path, capsys):
    from mast.cli import main

    summary = json.loads((toy_dir / "toy_summary.json").read_text())
    out = tmp_path / "RESULTS.jsonl"
    argv = ["eval", "--model", str(toy_dir / "rlvr"), "--suite", str(toy_dir / "suites" / "forget.yaml"),
            "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    t0 = time.perf_counter()
    assert main(argv) == 0
    t_first = time.perf_counter() - t0
    first = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    n = len(read_jsonl(toy_dir / "data" / "forget_eval.jsonl"))
    assert len(rows) == n
    assert all(set(r) >= {"id", "correct", "response", "extracted", "prompt_sha", "prompt_tokens",
                          "response_tokens"} for r in rows)
    acc = sum(r["correct"] for r in rows) / n
    assert acc == pytest.approx(summary["rlvr"]["forget"])
    assert "cache: miss" in first
    t0 = time.perf_counter()
    assert main(argv) == 0
    t_second = time.perf_counter() - t0
    assert "cache: hit" in capsys.readouterr().out
    assert t_second < t_first / 3
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows


@pytest.mark.gpu
def test_vllm_matches_hf_greedy(toy_dir, tmp_path):
    """vLLM (own process) and the hf backend give the same greedy answers on the toy RLVR model."""
    from mast.config import load_suite

    suite = load_suite(toy_dir / "suites" / "forget.yaml")
    suite.limit = 40
    hf = evaluate(toy_dir / "rlvr", suite, backend="hf", use_cache=False)  # bf16 on cuda
    vl = evaluate(toy_dir / "rlvr", suite, backend="vllm", use_cache=False,
                  backend_options={"gpu_memory_utilization": 0.3, "dtype": "bfloat16", "enforce_eager": True})
    assert [r["id"] for r in vl.records] == [r["id"] for r in hf.records]
    assert [r["extracted"] for r in vl.records] == [r["extracted"] for r in hf.records]
    same = sum(a["response"] == b["response"] for a, b in zip(vl.records, hf.records))
    assert same >= 0.9 * len(hf.records)
    assert vl.accuracy == hf.accuracy

