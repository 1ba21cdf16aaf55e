"""The evaluator: suites, cached per-problem results, avg@n accuracy, the `mast eval` CLI.

:func:`evaluate` (one suite) and :func:`evaluate_many` (several suites, one generation call)
format each problem with :func:`mast.prompts.format_prompt`, generate ``n`` samples with a
backend of :mod:`mast.backends` (hf or vLLM, through its one ``generate(requests)``), grade
every sample with :func:`mast.grading.grade_responses` and cache the per-problem records
(:func:`build_records`) under ``cache_root()/eval/<key>.jsonl``, key = hash(model fingerprint,
problems + formatted prompts, grader, decoding, backend, template). Accuracy = mean over
problems of the mean correctness over their samples (avg@n; n = 1: #correct / N). A suite with
``probe`` also gets the prefix-recovery curve of :mod:`mast.probe`, generated in the same call.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import mast.prompts as prompts_module
from mast.backends import BACKENDS, Backend, GenerationRequest, encode_prompts, make_backend
from mast.config import ProbeSpec, SuiteSpec, load_suite
from mast.data import load_benchmark
from mast.files import (
    InputError,
    cache_root,
    check_output_path,
    fingerprint_model,
    read_json,
    read_jsonl,
    stable_hash,
    write_json,
    write_jsonl,
)
from mast.grading import grade_responses
from mast.hub import resolve_model
from mast.probe import probe_items, probe_output_path, probe_spec, score_probe
from mast.prompts import format_prompt
from mast.sampling_seeds import prompt_seed

CACHE_VERSION = 3  # bump when the record format or the generation semantics change (3: per-prompt sampling seeds)
# a validation suite's name where one evaluate_many call also scores the test suites (names may not clash)
VALIDATION_PREFIX = "validation/"


# --------------------------------------------------------------------------- pure helpers


def problem_accuracy(record: dict) -> float:
    """A problem's score: the mean correctness over its samples (``accuracy``; n = 1: ``correct``)."""
    return float(record["accuracy"]) if "accuracy" in record else float(bool(record["correct"]))


def accuracy(records: list[dict]) -> float:
    """Mean over problems of :func:`problem_accuracy` (avg@n; n = 1: #correct / N; 0 for no records)."""
    return sum(problem_accuracy(r) for r in records) / len(records) if records else 0.0


def sample_matrix(records: list[dict], field: str = "correct") -> list[list]:
    """Per problem, `field` of each sample (a record without ``samples`` is one sample: itself)."""
    return [[s[field] for s in r["samples"]] if "samples" in r else [r[field]] for r in records]


def truncated_rate(records: list[dict]) -> float | None:
    """Share of samples cut at max_tokens (finish_reason "length") over all problems and samples.

    None when the backend did not say (a record without ``truncated``).
    """
    flags = [f for row in sample_matrix(records, "truncated") if row for f in row] if all(
        "truncated" in r for r in records) else []
    if not records or not flags or any(f is None for f in flags):
        return None
    return sum(bool(f) for f in flags) / len(flags)


def sha16(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------- suites


def load_suite_problems(suite: SuiteSpec, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """The suite's problems in file order; `limit` keeps the first N (deterministic)."""
    if suite.benchmark == "jsonl":
        if not suite.path:
            raise InputError(f"suite {suite.name}: no 'path' to a problem file (a split_role suite gets its "
                             "problems from the sweep; to run it standalone add path: <problems.jsonl>)")
        problems = read_jsonl(suite.path, required=("id", "prompt", "answer"))
    else:
        problems = load_benchmark(suite.benchmark, split=suite.split, data_dir=data_dir)
    if suite.limit is not None:
        problems = problems[: suite.limit]
    return problems


# --------------------------------------------------------------------------- evaluate


@dataclass
class EvalResult:
    """Per-problem records, accuracy (avg@n: mean over problems of the mean over samples), cache hit, probe."""

    records: list[dict]
    accuracy: float
    cache_hit: bool
    probe: dict | None = None
    key: str = ""
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.records)

    @property
    def n_correct(self) -> int:
        """Problems whose FIRST sample is correct (the McNemar view; n = 1: #correct)."""
        return sum(bool(r["correct"]) for r in self.records)

    @property
    def n_samples(self) -> int:
        return max((len(r.get("samples") or [r]) for r in self.records), default=0)

    @property
    def truncated_rate(self) -> float | None:
        return truncated_rate(self.records)

    def metrics(self) -> dict:
        """Suite metrics for tracking/reports: accuracy (avg@n), first-sample accuracy, truncated_rate, tokens."""
        toks = [t for row in sample_matrix(self.records, "n_tokens") for t in row if t is not None] \
            if all("samples" in r for r in self.records) else [r.get("response_tokens") for r in self.records]
        toks = [t for t in toks if t is not None]
        return {
            "accuracy": self.accuracy,
            "accuracy_first_sample": self.n_correct / self.n if self.n else 0.0,
            "truncated_rate": self.truncated_rate,
            "mean_response_tokens": sum(toks) / len(toks) if toks else None,
            "n": self.n,
            "n_samples": self.n_samples,
        }


def _check_problems(problems: list[dict], source: str) -> None:
    seen = set()
    for i, p in enumerate(problems):
        missing = [k for k in ("id", "prompt", "answer") if k not in p]
        if missing:
            raise InputError(f"{source}: problem {i}: missing field(s) {', '.join(missing)}")
        if p["id"] in seen:
            raise InputError(f"{source}: duplicate problem id {p['id']!r}")
        seen.add(p["id"])


def eval_cache_key(model_dir: str | os.PathLike, suite: SuiteSpec, problems: list[dict], backend: str) -> str:
    """Content key of an evaluation: everything that can change its records, nothing else.

    hash(model fingerprint (weights, config, tokenizer files, chat template), the source of
    mast/prompts.py, the problems (id, question, gold answer; solutions when probed), grader,
    template, decoding, backend, probe). Computed without loading the model or transformers,
    so a cache hit costs a file read.
    """
    model_dir = Path(model_dir)
    probe = probe_spec(suite)
    templates = sorted(model_dir.glob("*.jinja")) + sorted(model_dir.glob("chat_template.json"))
    return stable_hash({
        "v": CACHE_VERSION,
        "model": fingerprint_model(model_dir),
        "chat_template": [[f.name, sha16(f.read_text(encoding="utf-8"))] for f in templates],
        "prompts_code": _prompts_code_sha(),
        "problems": [[p["id"], sha16(str(p["prompt"])), str(p["answer"])] for p in problems],
        "solutions": [sha16(p.get("solution") or "") for p in problems] if probe else None,
        "grader": suite.grader,
        "template": suite.template,
        "decoding": suite.decoding.model_dump(),
        "backend": backend,
        "probe": probe.model_dump() if probe else None,
    })


def _prompts_code_sha() -> str:  # noqa: N802  (a memoised constant)
    global _PROMPTS_SHA
    if _PROMPTS_SHA is None:
        _PROMPTS_SHA = sha16(Path(prompts_module.__file__).read_text(encoding="utf-8"))
    return _PROMPTS_SHA


_PROMPTS_SHA: str | None = None


def _unusual_finish(sample: dict) -> dict:
    """``{"finish_reason": ...}`` for a sample that ended other than "stop"/"length" (vLLM's
    "repetition"), else nothing: records of ordinary runs keep their keys."""
    reason = sample.get("finish_reason")
    return {} if reason in (None, "stop", "length") else {"finish_reason": reason}


def build_records(problems: list[dict], prompts: list[str], prompt_ids: list[list[int]],
                  samples: list[list[dict]], graded: list[dict], n: int) -> list[dict]:
    """Per-problem records from the samples and their grades (``graded``: problem-major, n per problem).

    Always: ``id, correct, response, extracted, prompt_sha, prompt_tokens, response_tokens,
    truncated`` of the FIRST sample (the McNemar view; n = 1: the record), and ``finish_reason``
    where it is unusual (:func:`_unusual_finish`). With n > 1 also
    ``samples: [{response, extracted, correct, truncated, n_tokens}]`` (all n) and
    ``accuracy`` = mean correctness over the samples (the problem's score in avg@n).
    """
    records = []
    for i, (p, pr, ids, smp) in enumerate(zip(problems, prompts, prompt_ids, samples)):
        g = graded[i * n:(i + 1) * n]
        rec = {
            "id": p["id"],
            "correct": bool(g[0]["correct"]),
            "response": g[0]["response"],
            "extracted": g[0].get("extracted"),
            "prompt_sha": sha16(pr),
            "prompt_tokens": len(ids),
            "response_tokens": smp[0]["n_tokens"],
            "truncated": smp[0].get("truncated"),
            **_unusual_finish(smp[0]),
        }
        if n > 1:
            rec["samples"] = [{"response": gj["response"], "extracted": gj.get("extracted"),
                               "correct": bool(gj["correct"]), "truncated": sj.get("truncated"),
                               "n_tokens": sj["n_tokens"], **_unusual_finish(sj)} for gj, sj in zip(g, smp)]
            rec["accuracy"] = sum(x["correct"] for x in rec["samples"]) / n
        records.append(rec)
    return records


def evaluate(model_dir: str | os.PathLike, suite: SuiteSpec, backend: str | Backend = "hf",
             data_dir: str | os.PathLike | None = None, problems: list[dict] | None = None,
             cache_dir: str | os.PathLike | None = None, batch_size: int | None = None,
             use_cache: bool = True, backend_options: dict | None = None, progress: bool = True) -> EvalResult:
    """Evaluate `model_dir` on `suite` (or on `problems`, which override the suite's data).

    `backend` is a name in :data:`BACKENDS` or an already-built backend (reused across suites).
    Records: :func:`build_records` in problem order. With ``suite.probe`` the prefix-recovery
    curve is computed too (:func:`mast.probe.prefix_recovery`). One suite of :func:`evaluate_many`.
    """
    return evaluate_many(model_dir, [suite], backend=backend, data_dir=data_dir,
                         problems={suite.name: problems} if problems is not None else None,
                         cache_dir=cache_dir, batch_size=batch_size, use_cache=use_cache,
                         backend_options=backend_options, progress=progress)[suite.name]


@dataclass
class _Job:
    """One suite on its way through :func:`evaluate_many`: its problems and cache files, then
    (:func:`_request`) its prompts, their token ids and the probe's items."""

    suite: SuiteSpec
    problems: list[dict]
    probe: ProbeSpec | None
    key: str
    path: Path
    prompts: list[str] = field(default_factory=list)
    prompt_ids: list[list[int]] = field(default_factory=list)
    items: list[tuple] = field(default_factory=list)

    @property
    def probe_path(self) -> Path:
        return self.path.with_suffix(".probe.json")


def evaluate_many(model_dir: str | os.PathLike, suites: list[SuiteSpec], backend: str | Backend = "hf",
                  data_dir: str | os.PathLike | None = None, problems: dict[str, list[dict]] | None = None,
                  cache_dir: str | os.PathLike | None = None, batch_size: int | None = None,
                  use_cache: bool = True, backend_options: dict | None = None,
                  progress: bool = True) -> dict[str, EvalResult]:
    """Evaluate `model_dir` on several suites with ONE generation call: ``{suite.name: EvalResult}``.

    Cache hits are read first; every missing suite's prompts (and probe prefixes) go to the
    backend together: with vLLM one worker process, one engine start and one ``generate()``
    (each suite keeps its own decoding), so a trial pays one cold start instead of one per
    suite and the suites' long tails overlap. `problems` maps a suite name to the problems
    that override its data (the sweep's own splits). Each suite is cached under its own key.
    """
    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    _check_call(model_dir, suites, backend)
    backend_name = backend if isinstance(backend, str) else backend.name
    results: dict[str, EvalResult] = {}
    todo: list[_Job] = []
    for suite in suites:  # 1. problems and cache lookup
        job = _job(model_dir, suite, (problems or {}).get(suite.name), data_dir, cache_dir, backend_name)
        hit = _cached(job, t0) if use_cache else None
        if hit is not None:
            results[suite.name] = hit
        else:
            todo.append(job)
    if todo:
        owned = isinstance(backend, str)
        gen = make_backend(backend, model_dir, batch_size=batch_size,
                           **{"progress": progress, **(backend_options or {})}) if owned else backend
        t_gen = time.perf_counter()
        try:
            requests = [_request(job, gen.tokenizer) for job in todo]  # 2. prompts (+ probe prefixes)
            outs = gen.generate(requests)  # 3. every suite in one call
        finally:
            if owned:
                gen.close()
        for job, out in zip(todo, outs):  # 4. grade, records, probe, cache
            results[job.suite.name] = _finish(job, out, use_cache, t0, t_gen)
    return {s.name: results[s.name] for s in suites}


def _check_call(model_dir: Path, suites: list[SuiteSpec], backend: str | Backend) -> None:
    """The model folder exists, suite names are unique, a backend name is known."""
    if not model_dir.is_dir() or not (model_dir / "config.json").is_file():
        raise InputError(f"{model_dir}: model folder not found (no config.json)")
    names = [s.name for s in suites]
    if len(set(names)) != len(names):
        raise InputError(f"evaluate_many: duplicate suite names {names}")
    if isinstance(backend, str) and backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")


def _job(model_dir: Path, suite: SuiteSpec, override: list[dict] | None, data_dir, cache_dir,
         backend_name: str) -> _Job:
    """The suite's problems (`override`, else its data; `limit` applied) checked, and its cache key."""
    if override is None:
        probs = load_suite_problems(suite, data_dir)
    else:
        probs = list(override[: suite.limit] if suite.limit else override)
    _check_problems(probs, suite.name)
    key = eval_cache_key(model_dir, suite, probs, backend_name)
    return _Job(suite, probs, probe_spec(suite), key, cache_root(cache_dir) / "eval" / f"{key}.jsonl")


def _cached(job: _Job, t0: float) -> EvalResult | None:
    """The cached result of `job` (records for the same problem ids, and its probe when it has one), or None."""
    if not job.path.is_file() or (job.probe is not None and not job.probe_path.is_file()):
        return None
    records = read_jsonl(job.path)
    if [r["id"] for r in records] != [p["id"] for p in job.problems]:
        return None
    probe_res = read_json(job.probe_path) if job.probe else None
    return EvalResult(records, accuracy(records), True, probe_res, job.key, time.perf_counter() - t0)


def _request(job: _Job, tokenizer) -> GenerationRequest:
    """The suite's formatted prompts, then the probe's non-empty prefixes, as one request.

    An empty prefix (p = 0) reuses the evaluation's own response, so it is not generated again.
    Sampling: each prompt's seed from the decoding's seed and stream and its problem id
    (:func:`mast.sampling_seeds.prompt_seed`; a prefix's also from its fraction).
    """
    job.prompts = [format_prompt(tokenizer, p["prompt"], job.suite.template) for p in job.problems]
    job.prompt_ids = encode_prompts(tokenizer, job.prompts)
    job.items = probe_items(job.problems, job.prompts, job.probe) if job.probe else []
    prefixed = [it for it in job.items if it[2]]
    extra = encode_prompts(tokenizer, [it[3] for it in prefixed])
    dec = job.suite.decoding
    seeds = None if dec.greedy else (
        [prompt_seed(dec.seed, dec.stream, p["id"]) for p in job.problems]
        + [prompt_seed(dec.seed, dec.stream, it[1]["id"], "prefix", it[0]) for it in prefixed])
    return GenerationRequest(job.prompt_ids + extra, dec, seeds)


def _finish(job: _Job, out: list[list[dict]], use_cache: bool, t0: float, t_gen: float) -> EvalResult:
    """Grade the suite's samples into records, score its probe, write both to the cache."""
    suite, probs = job.suite, job.problems
    samples, probe_out = out[:len(probs)], out[len(probs):]
    n = suite.decoding.n
    flat = [smp["text"] for row in samples for smp in row[:n]]
    graded = grade_responses([p for p in probs for _ in range(n)], flat, suite.grader)
    records = build_records(probs, job.prompts, job.prompt_ids, samples, graded, n)
    probe_res = None
    if job.probe:
        it_extra = iter(probe_out)
        by_id = {p["id"]: row[0]["text"] for p, row in zip(probs, samples)}
        conts = [next(it_extra)[0]["text"] if it[2] else by_id[it[1]["id"]] for it in job.items]
        probe_res = score_probe(probs, job.items, conts, suite, job.probe)
    if use_cache:  # probe first: a results file without its probe is not a hit
        if probe_res is not None:
            write_json(job.probe_path, probe_res)
        write_jsonl(job.path, records)
    return EvalResult(records, accuracy(records), False, probe_res, job.key, time.perf_counter() - t0,
                      extra={"generate_seconds_shared": time.perf_counter() - t_gen})


# --------------------------------------------------------------------------- CLI


def cli_eval(args) -> int:
    """`mast eval --model DIR --suite SUITE.yaml [--backend] [--data-dir] [--limit] --out RESULTS.jsonl`."""
    suite = load_suite(args.suite)
    model = Path(resolve_model(args.model, "--model"))  # a folder or a Hub id (offline from the cache)
    check_output_path(args.out)
    if getattr(args, "limit", None) is not None:
        if args.limit <= 0:
            raise InputError("--limit: must be > 0")
        suite.limit = args.limit
    res = evaluate(model, suite, backend=args.backend, data_dir=getattr(args, "data_dir", None),
                   cache_dir=getattr(args, "cache_dir", None), batch_size=getattr(args, "batch_size", None),
                   use_cache=not getattr(args, "no_cache", False))
    out = Path(args.out)
    write_jsonl(out, res.records)
    if res.probe is not None:
        write_json(probe_output_path(out), res.probe)
    if res.n_samples > 1:
        print(f"accuracy (mean over {res.n_samples} samples per problem): {res.accuracy:.4f}; "
              f"first sample: {res.n_correct}/{res.n}")
    else:
        print(f"accuracy: {res.n_correct}/{res.n} = {res.accuracy:.4f}")
    if res.truncated_rate is not None:
        print(f"truncated at max_tokens: {res.truncated_rate:.1%} of answers")
    print(f"cache: {'hit' if res.cache_hit else 'miss'} ({res.seconds:.1f}s, key {res.key})")
    if res.probe is not None:
        curve = ", ".join(f"{p:g}: {a:.3f}" for p, a in zip(res.probe["fractions"], res.probe["accuracy"]))
        print(f"prefix recovery: {curve} -> {probe_output_path(out)}")
    return 0


