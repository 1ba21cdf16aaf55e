"""vLLM generation in a process of its own: ``python -m mast.vllm_worker IN.json OUT.json``.

IN: ``{"model", "llm": {tensor_parallel_size, gpu_memory_utilization, seed, ...},
"sampling": {temperature, top_p, max_tokens, n, seed, stop, stop_token_ids},
"prompt_token_ids": [[int, ...], ...], "progress": bool}``.
OUT: ``{"texts": [[text, ...n], ...], "token_counts": [[int, ...n], ...]}`` in request order
(``LLM.generate`` returns one RequestOutput per prompt, in input order). The process exits
when done, which is what frees vLLM's GPU memory; the parent
(:class:`mast.evaluation.VLLMBackend`) never imports vLLM.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path


def run(job: dict) -> dict:
    from vllm import LLM, SamplingParams  # lazy: only GPU installs have vLLM

    llm_kw = {k: v for k, v in job["llm"].items() if v is not None}
    llm = LLM(model=job["model"], tokenizer=job["model"], **llm_kw)
    s = job["sampling"]
    greedy = s["temperature"] <= 0
    # top_k left at vLLM's default (disabled), as in the hf backend; greedy when temperature == 0
    params = SamplingParams(
        n=s["n"],
        temperature=0.0 if greedy else s["temperature"],
        top_p=1.0 if greedy else s["top_p"],
        max_tokens=s["max_tokens"],
        seed=s["seed"],
        stop=s["stop"] or None,
        stop_token_ids=s["stop_token_ids"] or None,
        skip_special_tokens=True,
    )
    prompts = [{"prompt_token_ids": ids} for ids in job["prompt_token_ids"]]  # TokensPrompt dicts
    outputs = llm.generate(prompts, params, use_tqdm=bool(job.get("progress", True)))
    texts, counts = [], []
    for o in outputs:  # one RequestOutput per prompt, in request order
        comps = sorted(o.outputs, key=lambda c: c.index)
        texts.append([c.text for c in comps])
        counts.append([len(c.token_ids) for c in comps])
    return {"texts": texts, "token_counts": counts}


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
