"""Batched `hf` backend vs one-example-at-a-time `model.generate`, same model, same prompts.

    .venv/bin/python benchmarks/generation.py [TOY_OR_MODEL_DIR] [--n 64] [--max-tokens 48] [--batch-size 32]

The model: a checkpoint folder given as argument (a `mast toy OUT` folder -> OUT/rlvr, its
prompts from OUT/data), else $MAST_TOY, else an untrained `mast.tiny` model built on the fly.
Both paths decode greedily with the same token ids, so their outputs must be identical
(asserted). Prints throughput (completions/s and generated tokens/s) of both and the ratio.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mast.backends import GenerationRequest, HFBackend, encode_prompts  # noqa: E402
from mast.config import DecodingSpec  # noqa: E402
from mast.files import read_jsonl  # noqa: E402
from mast.prompts import format_prompt  # noqa: E402


def _arithmetic(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        q = f"What is {a} + {b}?" + (" Show your work." if i % 3 == 0 else "")
        rows.append({"id": str(i), "prompt": q, "solution": f"{a} + {b} = {a + b}. \\boxed{{{a + b}}}",
                     "answer": str(a + b)})
    return rows


def resolve_model(arg: str | None) -> tuple[Path, list[dict], str]:
    """(model dir, problems, description)."""
    src = arg or os.environ.get("MAST_TOY")
    if src:
        p = Path(src)
        if (p / "rlvr" / "config.json").is_file():  # a toy folder
            files = sorted((p / "data").glob("*eval*.jsonl")) or sorted((p / "data").glob("*.jsonl"))
            problems = [r for f in files for r in read_jsonl(f)]
            return p / "rlvr", problems, f"toy {p}/rlvr"
        if (p / "config.json").is_file():
            return p, _arithmetic(256), f"model {p}"
        raise SystemExit(f"{p}: neither a toy folder nor a checkpoint")
    from mast.tiny import build_tiny

    texts = [f"What is {r['prompt']} {r['solution']}" for r in _arithmetic(300, seed=1)]
    out = build_tiny(Path(tempfile.mkdtemp(prefix="mast-bench-")) / "tiny", texts, seed=0)
    return out, _arithmetic(256), "untrained mast.tiny model (no toy given)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--n", type=int, default=64, help="number of prompts")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's); on a loaded "
                    "machine 1 avoids OpenMP threads waiting on each other")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    model_dir, problems, desc = resolve_model(args.model)
    problems = problems[: args.n]
    backend = HFBackend(model_dir, batch_size=args.batch_size, progress=False)
    tok = backend.tokenizer
    prompts = [format_prompt(tok, p["prompt"], "qwen_boxed") for p in problems]
    dec = DecodingSpec(max_tokens=args.max_tokens)
    ids = encode_prompts(tok, prompts)
    print(f"model: {desc}; {len(prompts)} prompts, max_tokens {args.max_tokens}, "
          f"torch threads {torch.get_num_threads()}, batch size {args.batch_size}")

    backend.generate([GenerationRequest(ids[:2], dec)])  # warm-up (allocator, kernels) for both paths

    t0 = time.perf_counter()
    [batched] = backend.generate([GenerationRequest(ids, dec)])
    t_batched = time.perf_counter() - t0

    gen_config = backend._generation_config(dec)
    t0 = time.perf_counter()
    single, n_tok = [], 0
    with torch.inference_mode():
        for p in ids:
            x = torch.tensor([p])
            seq = backend.model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gen_config)
            new = backend._strip(seq[0, x.shape[1]:].tolist())
            n_tok += len(new)
            single.append(tok.decode(new, skip_special_tokens=True))
    t_single = time.perf_counter() - t0

    mismatches = [i for i, (b, s) in enumerate(zip(batched, single)) if b[0]["text"] != s]
    assert not mismatches, f"batched and one-at-a-time outputs differ at {mismatches[:10]}"
    n = len(prompts)
    print(f"one-at-a-time generate: {t_single:7.2f} s  {n / t_single:8.2f} completions/s  {n_tok / t_single:9.1f} tok/s")
    print(f"batched hf backend:     {t_batched:7.2f} s  {n / t_batched:8.2f} completions/s  {n_tok / t_batched:9.1f} tok/s")
    print(f"outputs identical: {n}/{n}; generated tokens: {n_tok}")
    print(f"speed-up: {t_single / t_batched:.1f}x (goal >= 5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
