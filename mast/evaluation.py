"""The evaluator: generation backends, suites, cached per-problem results, prefix-recovery probe.

Two backends share one interface, ``generate(prompts, decoding) -> list[list[str]]`` (for each
prompt, ``decoding.n`` completions, in request order), and ``generate_samples(prompt_ids,
decoding)`` giving each completion as ``{"text", "n_tokens", "truncated", "finish_reason"}``:

- ``hf``: transformers batched generation (CPU or GPU): prompts sorted by token length,
  left padding, greedy (temperature 0) or seeded sampling, stop strings, ``inference_mode``.
- ``vllm``: ``vllm.LLM`` + ``SamplingParams`` in a *separate* process (``python -m
  mast.vllm_worker IN OUT``), so vLLM's GPU memory is released when the process ends and
  never shares a process with a training model; ``generate_groups`` runs several (prompts,
  decoding) groups in one process and one ``generate()`` call; a timeout kills the worker.

Both receive the same token ids (:func:`encode_prompts`), so their greedy answers agree, and
count tokens the same way (generated tokens without the EOS / stop token; ``truncated`` = the
answer stopped at ``max_tokens``).

:func:`evaluate` (one suite) and :func:`evaluate_many` (several suites, one generation call)
format each problem with :func:`mast.prompts.format_prompt`, generate ``n`` samples, grade every
sample with :func:`mast.grading.grade_records` and cache the per-problem records
(:func:`build_records`) under ``cache_root()/eval/<key>.jsonl``, key = hash(model fingerprint,
problems + formatted prompts, grader, decoding, backend, template). Accuracy = mean over problems
of the mean correctness over their samples (avg@n; n = 1: #correct / N).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mast.config import DecodingSpec, ProbeSpec, SuiteSpec
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

CACHE_VERSION = 2  # bump when the record format or the generation semantics change


# --------------------------------------------------------------------------- pure helpers


def truncate_at_stop(text: str, stop: list[str] | tuple[str, ...]) -> str:
    """Cut `text` before the earliest occurrence of any stop string (vLLM's default: stop excluded)."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if 0 <= i < cut:
                cut = i
    return text[:cut]


def solution_prefix(solution: str, fraction: float) -> str:
    """The first `fraction` of a solution, by characters, cut back to a whitespace boundary.

    ``cut = floor(fraction * len(solution))``; if that falls inside a word, the cut moves back
    to the end of the previous whitespace-separated word, so no word is split. The prefix
    keeps its trailing whitespace (if any) so the continuation starts a new word.
    fraction 0 -> "".
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    cut = int(fraction * len(solution))
    if cut <= 0:
        return ""
    if cut < len(solution) and not solution[cut].isspace() and not solution[cut - 1].isspace():
        j = cut
        while j > 0 and not solution[j - 1].isspace():
            j -= 1
        cut = j
    return solution[:cut]


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


def hf_sample(tokens: list[int], text: str, eos: set[int] | frozenset[int], pad_id: int | None,
              max_new_tokens: int, stop: list[str] | tuple[str, ...]) -> dict:
    """One transformers-generated row (ids after the prompt, decoded text up to eos) -> a sample dict.

    Counted like vLLM's :func:`mast.vllm_worker.completion_sample`: generated tokens up to, NOT
    including, the first eos; padding after a finished row is not counted. finish_reason:
    "stop" (an eos, or a stop string in the text), else "length" (ran to max_new_tokens);
    ``truncated`` = finish_reason == "length".
    """
    for j, t in enumerate(tokens):
        if t in eos:
            return {"text": truncate_at_stop(text, stop), "n_tokens": j, "truncated": False, "finish_reason": "stop"}
    cut = truncate_at_stop(text, stop)
    if cut != text:  # stopped by a stop string, then padded
        n = len(tokens)
        while n > 0 and pad_id is not None and tokens[n - 1] == pad_id:
            n -= 1
        return {"text": cut, "n_tokens": n, "truncated": False, "finish_reason": "stop"}
    reason = "length" if len(tokens) >= max_new_tokens else "stop"
    return {"text": cut, "n_tokens": len(tokens), "truncated": reason == "length", "finish_reason": reason}


def run_with_timeout(cmd: list[str], timeout_s: float | None, env: dict | None = None) -> int | None:
    """Run `cmd` in a session of its own; its exit status, or None when it ran past `timeout_s`.

    On timeout the whole process group is killed (SIGTERM, then SIGKILL after 10 s), so
    grandchildren (vLLM's engine-core and worker processes holding GPU memory) die with it.
    """
    import signal

    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        return None
    except BaseException:  # KeyboardInterrupt, a Ray cancel: never leave the worker behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def sha16(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------- tokenization


def load_tokenizer(model_dir: str | os.PathLike):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of already-formatted prompts.

    A chat-templated prompt already carries its special tokens, so none are added; a plain
    prompt gets the tokenizer's usual ones (a BOS where the model has one; Qwen has none).
    Both backends consume these ids, so they see the same input.
    """
    add = not bool(getattr(tokenizer, "chat_template", None))
    return [tokenizer(p, add_special_tokens=add)["input_ids"] for p in prompts]


def stop_token_ids(tokenizer, model_dir: str | os.PathLike | None = None) -> list[int]:
    """End-of-sequence ids: the tokenizer's eos plus the checkpoint's generation_config eos ids."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if model_dir is not None:
        gc = Path(model_dir) / "generation_config.json"
        if gc.is_file():
            eos = json.loads(gc.read_text()).get("eos_token_id")
            for e in eos if isinstance(eos, list) else [eos]:
                if e is not None and int(e) not in ids:
                    ids.append(int(e))
    return ids


# --------------------------------------------------------------------------- backends


class HFBackend:
    """Transformers batched generation.

    Prompts are sorted by token length (longest first, so an out-of-memory shows at once),
    cut into batches of `batch_size`, left-padded, generated, and put back in request order.
    temperature 0 -> greedy; otherwise sampling with ``torch.manual_seed(decoding.seed)``
    inside a forked RNG (the caller's global RNG state is left untouched).
    """

    name = "hf"

    def __init__(self, model_dir: str | os.PathLike, batch_size: int = 32, device: str | None = None,
                 dtype: Any = None, progress: bool = True):
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise InputError(f"{self.model_dir}: not a checkpoint folder (no config.json)")
        self.batch_size = int(batch_size)
        self._device, self._dtype = device, dtype
        self.progress = progress
        self._tokenizer = self._model = None

    # tokenizer and weights load on first use: a backend built for suites that are all cache
    # hits never loads the model
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_dir)
            self._eos_ids = stop_token_ids(self._tokenizer, self.model_dir)
            self._eos = set(self._eos_ids)
        return self._tokenizer

    @property
    def eos_ids(self) -> list[int]:
        self.tokenizer  # noqa: B018  (loads it)
        return self._eos_ids

    @property
    def device(self) -> str:
        if self._device is None:
            import torch

            self._device = "cuda" if torch.cuda.is_available() else "cpu"
        return self._device

    @property
    def model(self):
        if self._model is None:
            import torch
            from transformers import AutoModelForCausalLM

            dtype = self._dtype or (torch.bfloat16 if self.device.startswith("cuda") else torch.float32)
            self._model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=dtype).to(self.device)
            self._model.eval()
        return self._model

    def _generation_config(self, decoding: DecodingSpec):
        from transformers import GenerationConfig

        sample = decoding.temperature > 0
        return GenerationConfig(
            max_new_tokens=decoding.max_tokens,
            do_sample=sample,
            temperature=decoding.temperature if sample else 1.0,
            top_p=decoding.top_p if sample else 1.0,
            top_k=0 if sample else None,  # vLLM's default: no top-k truncation
            repetition_penalty=1.0,
            num_beams=1,
            num_return_sequences=decoding.n if sample else 1,
            eos_token_id=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            stop_strings=list(decoding.stop) or None,
        )

    def generate(self, prompts: list[str], decoding: DecodingSpec) -> list[list[str]]:
        """For each prompt, `decoding.n` completions (greedy: n copies of the one greedy text)."""
        return self.generate_ids(encode_prompts(self.tokenizer, prompts), decoding)

    def generate_ids(self, prompt_ids: list[list[int]], decoding: DecodingSpec) -> list[list[str]]:
        return self.generate_counted(prompt_ids, decoding)[0]

    def generate_counted(self, prompt_ids: list[list[int]], decoding: DecodingSpec):
        """(texts, counts): per prompt the n completions and their generated-token counts (eos excluded)."""
        rows = self.generate_samples(prompt_ids, decoding)
        return [[s["text"] for s in r] for r in rows], [[s["n_tokens"] for s in r] for r in rows]

    def generate_samples(self, prompt_ids: list[list[int]], decoding: DecodingSpec) -> list[list[dict]]:
        """Per prompt its n samples ``{"text", "n_tokens", "truncated", "finish_reason"}`` (request order)."""
        import torch
        from tqdm.auto import tqdm

        if not prompt_ids:
            return []
        gen_config = self._generation_config(decoding)
        sample = decoding.temperature > 0
        n_ret = decoding.n if sample else 1
        order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
        out: list = [None] * len(prompt_ids)
        pad = self.tokenizer.pad_token_id
        bar = tqdm(total=len(prompt_ids), desc=f"generate ({self.model_dir.name})", unit="prompt",
                   disable=not self.progress, file=sys.stderr, leave=False)
        with torch.random.fork_rng(devices=[self.device] if self.device.startswith("cuda") else []), \
                torch.inference_mode():
            torch.manual_seed(decoding.seed)
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                width = max(len(prompt_ids[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    p = prompt_ids[i]
                    ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
                    mask[row, width - len(p):] = 1
                seqs = self.model.generate(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                    generation_config=gen_config, tokenizer=self.tokenizer if decoding.stop else None,
                )
                new = seqs[:, width:].tolist()
                raw = self.tokenizer.batch_decode([self._strip(t) for t in new], skip_special_tokens=True)
                samples = [hf_sample(t, text, self._eos, pad, decoding.max_tokens, decoding.stop)
                           for t, text in zip(new, raw)]
                for row, i in enumerate(idx):
                    got = samples[row * n_ret:(row + 1) * n_ret]
                    out[i] = got if sample else [dict(got[0]) for _ in range(decoding.n)]
                bar.update(len(idx))
        bar.close()
        return out

    def _strip(self, tokens: list[int]) -> list[int]:
        """Generated ids up to (not including) the first eos; padding after it dropped."""
        for j, t in enumerate(tokens):
            if t in self._eos:  # set when the tokenizer loaded
                return tokens[:j]
        return tokens

    def close(self) -> None:
        """Drop the weights (and the CUDA cache); the backend reloads them if used again."""
        if self._model is not None:
            self._model = None
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()


class VLLMBackend:
    """vLLM generation in its own process (``python -m mast.vllm_worker IN OUT``).

    The parent tokenizes (same ids as the hf backend) and writes prompt ids + sampling
    parameters to a temporary JSON; the worker builds ``vllm.LLM(model=..., seed=...,
    tensor_parallel_size=..., gpu_memory_utilization=...)`` and ``SamplingParams(temperature,
    top_p, max_tokens, n, seed, stop, stop_token_ids)``, runs ``llm.generate`` (outputs come
    back in request order) and writes every sample (text, token count, truncated; see
    :mod:`mast.vllm_worker`). The process exits afterwards, which is what reliably frees vLLM's
    GPU memory. ``dtype`` and ``enforce_eager`` go to ``LLM()``; ``timeout_s`` bounds the worker.
    """

    name = "vllm"

    def __init__(self, model_dir: str | os.PathLike, batch_size: int | None = None, device: str | None = None,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.85,
                 max_model_len: int | None = None, dtype: str = "auto", enforce_eager: bool = False,
                 timeout_s: float | None = None, progress: bool = True):
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise InputError(f"{self.model_dir}: not a checkpoint folder (no config.json)")
        check_vllm_installed()
        self.tokenizer = load_tokenizer(self.model_dir)
        self.eos_ids = stop_token_ids(self.tokenizer, self.model_dir)
        self.options = {
            "tensor_parallel_size": int(tensor_parallel_size),
            "gpu_memory_utilization": float(gpu_memory_utilization),
            "max_model_len": max_model_len,
            "dtype": dtype,
            "enforce_eager": bool(enforce_eager),
        }
        self.timeout_s = timeout_s
        self.progress = progress

    def generate(self, prompts: list[str], decoding: DecodingSpec) -> list[list[str]]:
        return self.generate_ids(encode_prompts(self.tokenizer, prompts), decoding)

    def generate_ids(self, prompt_ids: list[list[int]], decoding: DecodingSpec) -> list[list[str]]:
        return self.generate_counted(prompt_ids, decoding)[0]

    def generate_counted(self, prompt_ids: list[list[int]], decoding: DecodingSpec):
        rows = self.generate_samples(prompt_ids, decoding)
        return [[s["text"] for s in r] for r in rows], [[s["n_tokens"] for s in r] for r in rows]

    def generate_samples(self, prompt_ids: list[list[int]], decoding: DecodingSpec) -> list[list[dict]]:
        return self.generate_groups([(prompt_ids, decoding)])[0]

    def _sampling(self, decoding: DecodingSpec) -> dict:
        return {"temperature": decoding.temperature, "top_p": decoding.top_p, "max_tokens": decoding.max_tokens,
                "n": decoding.n, "seed": decoding.seed, "stop": list(decoding.stop), "stop_token_ids": self.eos_ids}

    def generate_groups(self, groups: list[tuple[list[list[int]], DecodingSpec]]) -> list[list[list[dict]]]:
        """Every (prompt ids, decoding) group in ONE worker process and ONE ``LLM.generate`` call.

        Per group, per prompt, its n samples (see :func:`mast.vllm_worker.completion_sample`).
        The worker is killed (its whole process group: vLLM's engine-core and tensor-parallel
        processes too) after ``timeout_s`` seconds, and the call raises RuntimeError.
        """
        todo = [(i, ids, dec) for i, (ids, dec) in enumerate(groups) if ids]
        result: list[list[list[dict]]] = [[] for _ in groups]
        if not todo:
            return result
        seed = todo[0][2].seed
        job = {
            "model": str(self.model_dir.resolve()),
            "llm": {**self.options, "seed": seed},
            "groups": [{"sampling": self._sampling(dec), "prompt_token_ids": ids} for _, ids, dec in todo],
            "progress": self.progress,
        }
        with tempfile.TemporaryDirectory(prefix="mast-vllm-") as tmp:
            inp, outp = Path(tmp) / "in.json", Path(tmp) / "out.json"
            inp.write_text(json.dumps(job), encoding="utf-8")
            env = dict(os.environ)  # the worker must import this very `mast` (also from a Ray worker)
            pkg_root = str(Path(__file__).resolve().parents[1])
            env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
            rc = run_with_timeout([sys.executable, "-m", "mast.vllm_worker", str(inp), str(outp)], self.timeout_s,
                                  env=env)
            if rc is None:
                raise RuntimeError(f"vLLM worker timed out after {self.timeout_s:g}s on {self.model_dir} "
                                   "(killed; raise evaluation.timeout_s if the evaluation is just long)")
            if rc != 0 or not outp.is_file():
                raise RuntimeError(f"vLLM worker failed (exit {rc}) on {self.model_dir}")
            got = json.loads(outp.read_text(encoding="utf-8"))["groups"]
        for (i, ids, dec), rows in zip(todo, got):
            if len(rows) != len(ids):
                raise RuntimeError(f"vLLM worker returned {len(rows)} results for {len(ids)} prompts")
            result[i] = [[{**smp, "text": truncate_at_stop(smp["text"], dec.stop)} for smp in r] for r in rows]
        return result

    def close(self) -> None:
        pass


def check_vllm_installed() -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise InputError("backend 'vllm': vllm is not installed; install it with "
                         "pip install -e '.[vllm]' on a GPU machine, or use --backend hf")


BACKENDS: dict[str, type] = {"hf": HFBackend, "vllm": VLLMBackend}


def make_backend(name: str, model_dir: str | os.PathLike, batch_size: int | None = None, **options):
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    kw = dict(options)
    if batch_size is not None:
        kw["batch_size"] = batch_size
    return BACKENDS[name](model_dir, **kw)


# --------------------------------------------------------------------------- suites


def load_suite_problems(suite: SuiteSpec, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """The suite's problems in file order; `limit` keeps the first N (deterministic)."""
    if suite.benchmark == "jsonl":
        if not suite.path:
            raise InputError(f"suite {suite.name}: no 'path' to a problem file (a split_role suite gets its "
                             "problems from the sweep; to run it standalone add path: <problems.jsonl>)")
        problems = read_jsonl(suite.path, required=("id", "prompt", "answer"))
    else:
        from mast.data import load_benchmark

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


def _grade(problems: list[dict], responses: list[str], grader: str) -> list[dict]:
    from mast.grading import grade_records

    rows = [{"id": p["id"], "benchmark": grader, "gold": str(p["answer"]), "response": r}
            for p, r in zip(problems, responses)]
    return grade_records(rows)


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
    probe = _probe_spec(suite)
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
        import mast.prompts

        _PROMPTS_SHA = sha16(Path(mast.prompts.__file__).read_text(encoding="utf-8"))
    return _PROMPTS_SHA


_PROMPTS_SHA: str | None = None


def _generate_samples(gen, prompt_ids: list[list[int]], decoding: DecodingSpec) -> list[list[dict]]:
    """Per prompt its samples from any backend; one that only returns texts gets token counts by
    re-tokenizing and ``truncated``/``finish_reason`` None (unknown)."""
    if hasattr(gen, "generate_samples"):
        return gen.generate_samples(prompt_ids, decoding)
    if hasattr(gen, "generate_counted"):
        texts, counts = gen.generate_counted(prompt_ids, decoding)
    else:
        texts = gen.generate_ids(prompt_ids, decoding)
        counts = [[len(gen.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in row] for row in texts]
    return [[{"text": t, "n_tokens": c, "truncated": None, "finish_reason": None} for t, c in zip(tr, cr)]
            for tr, cr in zip(texts, counts)]


def _generate_groups(gen, groups: list[tuple[list[list[int]], DecodingSpec]]) -> list[list[list[dict]]]:
    """All groups in one backend call where the backend can (vLLM: one process, one generate())."""
    if hasattr(gen, "generate_groups"):
        return gen.generate_groups(groups)
    return [_generate_samples(gen, ids, dec) if ids else [] for ids, dec in groups]


def build_records(problems: list[dict], prompts: list[str], prompt_ids: list[list[int]],
                  samples: list[list[dict]], graded: list[dict], n: int) -> list[dict]:
    """Per-problem records from the samples and their grades (``graded``: problem-major, n per problem).

    Always: ``id, correct, response, extracted, prompt_sha, prompt_tokens, response_tokens,
    truncated`` of the FIRST sample (the McNemar view; n = 1: the record). With n > 1 also
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
        }
        if n > 1:
            rec["samples"] = [{"response": gj["response"], "extracted": gj.get("extracted"),
                               "correct": bool(gj["correct"]), "truncated": sj.get("truncated"),
                               "n_tokens": sj["n_tokens"]} for gj, sj in zip(g, smp)]
            rec["accuracy"] = sum(x["correct"] for x in rec["samples"]) / n
        records.append(rec)
    return records


def evaluate(model_dir: str | os.PathLike, suite: SuiteSpec, backend: str | Any = "hf",
             data_dir: str | os.PathLike | None = None, problems: list[dict] | None = None,
             cache_dir: str | os.PathLike | None = None, batch_size: int | None = None,
             use_cache: bool = True, backend_options: dict | None = None, progress: bool = True) -> EvalResult:
    """Evaluate `model_dir` on `suite` (or on `problems`, which override the suite's data).

    `backend` is a name in :data:`BACKENDS` or an already-built backend (reused across suites).
    Records: :func:`build_records` in problem order. With ``suite.probe`` the prefix-recovery
    curve is computed too (:func:`prefix_recovery`). One suite of :func:`evaluate_many`.
    """
    return evaluate_many(model_dir, [suite], backend=backend, data_dir=data_dir,
                         problems={suite.name: problems} if problems is not None else None,
                         cache_dir=cache_dir, batch_size=batch_size, use_cache=use_cache,
                         backend_options=backend_options, progress=progress)[suite.name]


def evaluate_many(model_dir: str | os.PathLike, suites: list[SuiteSpec], backend: str | Any = "hf",
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
    if not model_dir.is_dir() or not (model_dir / "config.json").is_file():
        raise InputError(f"{model_dir}: model folder not found (no config.json)")
    names = [s.name for s in suites]
    if len(set(names)) != len(names):
        raise InputError(f"evaluate_many: duplicate suite names {names}")
    if isinstance(backend, str) and backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    backend_name = backend if isinstance(backend, str) else backend.name
    results: dict[str, EvalResult] = {}
    todo = []
    for suite in suites:
        override = (problems or {}).get(suite.name)
        if override is None:
            probs = load_suite_problems(suite, data_dir)
        else:
            probs = list(override[: suite.limit] if suite.limit else override)
        _check_problems(probs, suite.name)
        probe = _probe_spec(suite)
        key = eval_cache_key(model_dir, suite, probs, backend_name)
        path = cache_root(cache_dir) / "eval" / f"{key}.jsonl"
        probe_path = path.with_suffix(".probe.json")
        if use_cache and path.is_file() and (probe is None or probe_path.is_file()):
            records = read_jsonl(path)
            if [r["id"] for r in records] == [p["id"] for p in probs]:
                probe_res = read_json(probe_path) if probe else None
                results[suite.name] = EvalResult(records, accuracy(records), True, probe_res, key,
                                                 time.perf_counter() - t0)
                continue
        todo.append({"suite": suite, "problems": probs, "probe": probe, "key": key, "path": path,
                     "probe_path": probe_path})
    if not todo:
        return {n: results[n] for n in names}

    owned = isinstance(backend, str)
    options = {"progress": progress, **(backend_options or {})}
    gen = make_backend(backend, model_dir, batch_size=batch_size, **options) if owned else backend
    t_gen = time.perf_counter()
    try:
        groups = []
        for job in todo:
            suite, probs = job["suite"], job["problems"]
            prompts = [_format(gen.tokenizer, p["prompt"], suite.template) for p in probs]
            prompt_ids = encode_prompts(gen.tokenizer, prompts)
            # the evaluation and the probe's non-empty prefixes in one group; an empty prefix
            # (p = 0) reuses the evaluation's own response
            items = probe_items(probs, prompts, job["probe"]) if job["probe"] else []
            extra = [it for it in items if it[2]]
            job.update(prompts=prompts, prompt_ids=prompt_ids, items=items)
            groups.append((prompt_ids + encode_prompts(gen.tokenizer, [it[3] for it in extra]), suite.decoding))
        outs = _generate_groups(gen, groups)
    finally:
        if owned:
            gen.close()
    for job, out in zip(todo, outs):
        suite, probs = job["suite"], job["problems"]
        samples, probe_out = out[:len(probs)], out[len(probs):]
        n = suite.decoding.n
        flat = [smp["text"] for row in samples for smp in row[:n]]
        graded = _grade([p for p in probs for _ in range(n)], flat, suite.grader)
        records = build_records(probs, job["prompts"], job["prompt_ids"], samples, graded, n)
        probe_res = None
        if job["probe"]:
            it_extra = iter(probe_out)
            by_id = {p["id"]: row[0]["text"] for p, row in zip(probs, samples)}
            conts = [next(it_extra)[0]["text"] if it[2] else by_id[it[1]["id"]] for it in job["items"]]
            probe_res = score_probe(probs, job["items"], conts, suite, job["probe"])
        if use_cache:  # probe first: a results file without its probe is not a hit
            if probe_res is not None:
                write_json(job["probe_path"], probe_res)
            write_jsonl(job["path"], records)
        results[suite.name] = EvalResult(records, accuracy(records), False, probe_res, job["key"],
                                         time.perf_counter() - t0, extra={"generate_seconds_shared":
                                                                          time.perf_counter() - t_gen})
    return {n: results[n] for n in names}


def _format(tokenizer, question: str, template: str) -> str:
    from mast.prompts import format_prompt

    return format_prompt(tokenizer, question, template)


def _probe_spec(suite: SuiteSpec) -> ProbeSpec | None:
    if suite.probe is None:
        return None
    return suite.probe if isinstance(suite.probe, ProbeSpec) else ProbeSpec()


# --------------------------------------------------------------------------- prefix-recovery probe


def prefix_recovery(gen, problems: list[dict], prompts: list[str], suite: SuiteSpec,
                    probe: ProbeSpec) -> dict:
    """Solve rate when the assistant turn starts with the first p of the reference solution.

    For each fraction p and problem: input = formatted prompt + :func:`solution_prefix`
    (solution, p) (character fraction, cut back to a whitespace boundary); the model continues
    with the suite's decoding. Two scores per p, each #correct / N:

    - ``accuracy``: prefix + continuation graded as one response (the PUM prefix-gain view);
    - ``accuracy_continuation``: the continuation alone, so a prefix that already states an
      intermediate number the grader's fallback extraction picks up cannot score by itself.

    A model that only hides the skill recovers with short prefixes; one that lost it does not.
    Returns ``{"fractions", "accuracy", "accuracy_continuation", "n", "correct": {p: [ids]}, "cut"}``.
    """
    items = probe_items(problems, prompts, probe)
    texts = gen.generate_ids(encode_prompts(gen.tokenizer, [it[3] for it in items]), suite.decoding)
    return score_probe(problems, items, [t[0] for t in texts], suite, probe)


def probe_items(problems: list[dict], prompts: list[str], probe: ProbeSpec) -> list[tuple]:
    """(fraction, problem, prefix, input text) for every fraction (outer) and problem (inner)."""
    missing = [p["id"] for p in problems if not p.get("solution")]
    if missing:
        raise InputError(f"probe needs a 'solution' for every problem; missing for {missing[:5]}")
    items = []
    for p_frac in probe.fractions:
        for prob, prompt in zip(problems, prompts):
            prefix = solution_prefix(prob["solution"], p_frac)
            items.append((p_frac, prob, prefix, prompt + prefix))
    return items


def score_probe(problems: list[dict], items: list[tuple], continuations: list[str], suite: SuiteSpec,
                probe: ProbeSpec) -> dict:
    """Grade prefix + continuation and the continuation alone; per fraction, #correct / N."""
    probs = [it[1] for it in items]
    graded = _grade(probs + probs, [it[2] + c for it, c in zip(items, continuations)] + continuations,
                    suite.grader)
    graded, graded_cont = graded[:len(items)], graded[len(items):]
    n = len(problems)
    acc, acc_cont, correct = [], [], {}
    for j, p_frac in enumerate(probe.fractions):
        rows, rows_c = graded[j * n:(j + 1) * n], graded_cont[j * n:(j + 1) * n]
        acc.append(sum(bool(r["correct"]) for r in rows) / n if n else 0.0)
        acc_cont.append(sum(bool(r["correct"]) for r in rows_c) / n if n else 0.0)
        correct[str(p_frac)] = [r["id"] for r in rows if r["correct"]]
    return {"fractions": list(probe.fractions), "accuracy": acc, "accuracy_continuation": acc_cont, "n": n,
            "correct": correct, "cut": "character fraction, moved back to a whitespace boundary"}


# --------------------------------------------------------------------------- CLI


def cli_eval(args) -> int:
    """`mast eval --model DIR --suite SUITE.yaml [--backend] [--data-dir] [--limit] --out RESULTS.jsonl`."""
    from mast.config import load_suite
    from mast.hub import resolve_model

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


def probe_output_path(out: str | os.PathLike) -> Path:
    """RESULTS.jsonl -> RESULTS.probe.json (next to the results)."""
    out = Path(out)
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(stem + ".probe.json")
