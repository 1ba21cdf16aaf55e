"""The evaluator: generation backends, suites, cached per-problem results, prefix-recovery probe.

Two backends share one interface, ``generate(prompts, decoding) -> list[list[str]]`` (for each
prompt, ``decoding.n`` completions, in request order):

- ``hf``: transformers batched generation (CPU or GPU): prompts sorted by token length,
  left padding, greedy (temperature 0) or seeded sampling, stop strings, ``inference_mode``.
- ``vllm``: ``vllm.LLM`` + ``SamplingParams`` in a *separate* process (``python -m
  mast.vllm_worker IN OUT``), so vLLM's GPU memory is released when the process ends and
  never shares a process with a training model.

Both receive the same token ids (:func:`encode_prompts`), so their greedy answers agree.

:func:`evaluate` formats each problem with :func:`mast.prompts.format_prompt`, generates,
grades with :func:`mast.grading.grade_records` and caches the per-problem records under
``cache_root()/eval/<key>.jsonl``, key = hash(model fingerprint, problems + formatted
prompts, grader, decoding, backend, template). Accuracy = (#correct) / N.
"""

from __future__ import annotations

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

CACHE_VERSION = 1  # bump when the record format or the generation semantics change


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


def accuracy(records: list[dict]) -> float:
    """Fraction of records with ``correct`` true (0 for no records)."""
    return sum(bool(r["correct"]) for r in records) / len(records) if records else 0.0


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
        import torch
        from tqdm.auto import tqdm

        if not prompt_ids:
            return [], []
        gen_config = self._generation_config(decoding)
        sample = decoding.temperature > 0
        n_ret = decoding.n if sample else 1
        order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
        out: list = [None] * len(prompt_ids)
        counts: list = [None] * len(prompt_ids)
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
                new = [self._strip(t) for t in seqs[:, width:].tolist()]
                texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
                texts = [truncate_at_stop(t, decoding.stop) for t in texts]
                for row, i in enumerate(idx):
                    got = texts[row * n_ret:(row + 1) * n_ret]
                    n_tok = [len(t) for t in new[row * n_ret:(row + 1) * n_ret]]
                    out[i] = got if sample else got * decoding.n
                    counts[i] = n_tok if sample else n_tok * decoding.n
                bar.update(len(idx))
        bar.close()
        return out, counts

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
    back in request order) and writes texts + generated-token counts. The process exits afterwards,
    which is what reliably frees vLLM's GPU memory.
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
        if not prompt_ids:
            return [], []
        job = {
            "model": str(self.model_dir.resolve()),
            "llm": {**self.options, "seed": decoding.seed},
            "sampling": {
                "temperature": decoding.temperature,
                "top_p": decoding.top_p,
                "max_tokens": decoding.max_tokens,
                "n": decoding.n,
                "seed": decoding.seed,
                "stop": list(decoding.stop),
                "stop_token_ids": self.eos_ids,
            },
            "prompt_token_ids": prompt_ids,
            "progress": self.progress,
        }
        with tempfile.TemporaryDirectory(prefix="mast-vllm-") as tmp:
            inp, outp = Path(tmp) / "in.json", Path(tmp) / "out.json"
            inp.write_text(json.dumps(job), encoding="utf-8")
            env = dict(os.environ)  # the worker must import this very `mast` (also from a Ray worker)
            pkg_root = str(Path(__file__).resolve().parents[1])
            env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
            proc = subprocess.run([sys.executable, "-m", "mast.vllm_worker", str(inp), str(outp)],
                                  timeout=self.timeout_s, check=False, env=env)
            if proc.returncode != 0 or not outp.is_file():
                raise RuntimeError(f"vLLM worker failed (exit {proc.returncode}) on {self.model_dir}")
            result = json.loads(outp.read_text(encoding="utf-8"))
        texts, counts = result["texts"], result["token_counts"]
        if len(texts) != len(prompt_ids):
            raise RuntimeError(f"vLLM worker returned {len(texts)} results for {len(prompt_ids)} prompts")
        return [[truncate_at_stop(t, decoding.stop) for t in row] for row in texts], counts

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
    """Per-problem records, accuracy = #correct / N, whether they came from the cache, probe curve."""

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
        return sum(bool(r["correct"]) for r in self.records)


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


def _generate_counted(gen, prompt_ids: list[list[int]], decoding: DecodingSpec):
    """(texts, generated-token counts) from a backend; counts re-tokenized for a backend without them."""
    if hasattr(gen, "generate_counted"):
        return gen.generate_counted(prompt_ids, decoding)
    texts = gen.generate_ids(prompt_ids, decoding)
    counts = [[len(gen.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in row] for row in texts]
    return texts, counts


def evaluate(model_dir: str | os.PathLike, suite: SuiteSpec, backend: str | Any = "hf",
             data_dir: str | os.PathLike | None = None, problems: list[dict] | None = None,
             cache_dir: str | os.PathLike | None = None, batch_size: int | None = None,
             use_cache: bool = True, backend_options: dict | None = None, progress: bool = True) -> EvalResult:
    """Evaluate `model_dir` on `suite` (or on `problems`, which override the suite's data).

    `backend` is a name in :data:`BACKENDS` or an already-built backend (reused across suites).
    Records: ``{"id", "correct", "response", "extracted", "prompt_sha", "prompt_tokens",
    "response_tokens"}`` in problem order. With ``suite.probe`` the prefix-recovery curve is
    computed too (:func:`prefix_recovery`).
    """
    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    if not model_dir.is_dir() or not (model_dir / "config.json").is_file():
        raise InputError(f"{model_dir}: model folder not found (no config.json)")
    if problems is None:
        problems = load_suite_problems(suite, data_dir)
    else:
        problems = list(problems[: suite.limit] if suite.limit else problems)
    _check_problems(problems, suite.name)
    backend_name = backend if isinstance(backend, str) else backend.name
    if isinstance(backend, str) and backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    decoding = suite.decoding
    probe = _probe_spec(suite)
    key = eval_cache_key(model_dir, suite, problems, backend_name)
    path = cache_root(cache_dir) / "eval" / f"{key}.jsonl"
    probe_path = path.with_suffix(".probe.json")
    if use_cache and path.is_file() and (probe is None or probe_path.is_file()):
        records = read_jsonl(path)
        if [r["id"] for r in records] == [p["id"] for p in problems]:
            probe_res = read_json(probe_path) if probe else None
            return EvalResult(records, accuracy(records), True, probe_res, key, time.perf_counter() - t0)

    owned = isinstance(backend, str)
    options = {"progress": progress, **(backend_options or {})}
    gen = make_backend(backend, model_dir, batch_size=batch_size, **options) if owned else backend
    try:
        prompts = [_format(gen.tokenizer, p["prompt"], suite.template) for p in problems]
        prompt_ids = encode_prompts(gen.tokenizer, prompts)
        # one generation call for the evaluation and the probe's non-empty prefixes (one vLLM
        # process, full batches); an empty prefix (p = 0) reuses the evaluation's own response
        items = probe_items(problems, prompts, probe) if probe else []
        extra = [it for it in items if it[2]]
        texts, counts = _generate_counted(gen, prompt_ids + encode_prompts(gen.tokenizer, [it[3] for it in extra]),
                                          decoding)
        texts, probe_texts, counts = texts[:len(problems)], texts[len(problems):], counts[:len(problems)]
        responses = [t[0] for t in texts]  # the first completion is the scored one (n=1 by default)
        graded = _grade(problems, responses, suite.grader)
        records = []
        for p, pr, ids, g, texts_i, n_tok in zip(problems, prompts, prompt_ids, graded, texts, counts):
            rec = {
                "id": p["id"],
                "correct": bool(g["correct"]),
                "response": g["response"],
                "extracted": g.get("extracted"),
                "prompt_sha": sha16(pr),
                "prompt_tokens": len(ids),
                "response_tokens": n_tok[0],
            }
            if decoding.n > 1:
                rec["responses"] = texts_i
            records.append(rec)
        probe_res = None
        if probe:
            it_extra = iter(probe_texts)
            by_id = dict(zip((p["id"] for p in problems), responses))
            conts = [next(it_extra)[0] if it[2] else by_id[it[1]["id"]] for it in items]
            probe_res = score_probe(problems, items, conts, suite, probe)
    finally:
        if owned:
            gen.close()
    if use_cache:  # probe first: a results file without its probe is not a hit
        if probe_res is not None:
            write_json(probe_path, probe_res)
        write_jsonl(path, records)
    return EvalResult(records, accuracy(records), False, probe_res, key, time.perf_counter() - t0)


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
    from mast.models import check_checkpoint

    model = Path(args.model)
    if not model.is_dir() or not (model / "config.json").is_file():
        raise InputError(f"--model {model}: not a checkpoint folder (no config.json)")
    check_checkpoint(model)
    suite = load_suite(args.suite)
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
    print(f"accuracy: {res.n_correct}/{res.n} = {res.accuracy:.4f}")
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
