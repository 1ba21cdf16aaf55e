"""Grading: batches of answers graded against their gold, with a hard per-answer timeout; `mast grade`.

:func:`grade_records` settles what the string rules of :mod:`mast.answers` can in the caller's
process (no answer -> wrong; the ``####`` line or the last box being the gold itself -> right)
and sends every other answer to math-verify (:func:`mast.answers.extract_and_verify`) in worker
processes with a hard per-answer timeout (:mod:`mast.grading_pool`: why processes, how the
timeout is enforced). :func:`grade_responses` grades one response per problem.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

from mast.answers import BENCHMARKS, answer_text, fast_candidate, numeric_verdict
from mast.files import InputError, iter_jsonl, write_jsonl
from mast.grading_pool import default_workers, grade_in_pool

log = logging.getLogger(__name__)


def grade_records(
    rows: list[dict],
    timeout_s: float = 5.0,
    workers: int | None = None,
    chunk_size: int | None = None,
    fast_path: bool = True,
) -> list[dict]:
    """Rows {benchmark, gold, response, ...} -> same rows (copies, order kept) + `extracted`, `correct`.

    No answer -> wrong. With `fast_path`, a GSM8K ``####`` line or a last box (with no final-answer
    statement after it) that is the gold string or its plain-number value is right without
    math-verify. Everything else is extracted and checked by math-verify in worker processes
    (:func:`mast.answers.extract_and_verify`); an answer that takes longer than `timeout_s` seconds is wrong.
    `extracted` is what was compared.
    """
    if timeout_s is None or not math.isfinite(timeout_s) or timeout_s <= 0:
        raise InputError(f"timeout must be a finite number > 0 seconds, got {timeout_s}")
    out: list[dict] = []
    pending: list[tuple] = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise InputError(f"row {i}: expected an object, got {type(row).__name__}")
        rid = row.get("id", i)
        for key in ("benchmark", "gold", "response"):
            if key not in row:
                raise InputError(f"row {rid}: missing field {key!r}")
        bench = row["benchmark"]
        if bench not in BENCHMARKS:
            raise InputError(f"row {rid}: benchmark: unknown {bench!r}; known: {', '.join(BENCHMARKS)}")
        if row["gold"] is not None and _gold_problem(row["gold"]):
            raise InputError(f"row {rid}: gold: {_gold_problem(row['gold'])}")
        r = dict(row)
        gold = "" if row["gold"] is None else str(row["gold"]).strip()
        text = answer_text(row["response"], bench)
        guess = fast_candidate(text, bench) if fast_path and gold else None
        r["extracted"], r["correct"] = None, False
        if guess is not None and (guess == gold or numeric_verdict(gold, guess)):
            r["extracted"], r["correct"] = guess, True  # the gold itself: no need for math-verify
        elif text is not None and gold:
            r["correct"] = None
            pending.append((i, gold, text, bench))
        out.append(r)
    if not pending:
        return out
    n_workers = max(1, min(workers or default_workers(), len(pending)))
    if chunk_size is None:
        chunk_size = max(1, min(64, math.ceil(len(pending) / (4 * n_workers))))
    memory_gb = float(os.environ.get("MAST_GRADER_MEMORY_GB", "4"))
    results, failed = grade_in_pool(pending, float(timeout_s), n_workers, chunk_size, memory_gb)
    for i, *_ in pending:
        out[i]["correct"], out[i]["extracted"] = results.get(i, (False, None))
    if failed:
        ids = [str(out[i].get("id", i)) for i in sorted(failed)]
        log.warning("grading: %d answer(s) exceeded %.1f s or crashed a worker, counted wrong: %s",
                    len(ids), timeout_s, ", ".join(ids[:10]) + (" ..." if len(ids) > 10 else ""))
    return out


def grade_responses(problems: list[dict], responses: list[str], grader: str) -> list[dict]:
    """Grade one response per problem ({id, answer}) against its gold answer with `grader` (a benchmark)."""
    rows = [{"id": p["id"], "benchmark": grader, "gold": str(p["answer"]), "response": r}
            for p, r in zip(problems, responses)]
    return grade_records(rows)


def accuracy(rows: list[dict]) -> float:
    return sum(bool(r.get("correct")) for r in rows) / len(rows) if rows else 0.0


def _gold_problem(gold) -> str | None:
    """Why `gold` is no gold answer (a JSON object, list, bool, null, a non-finite number), or None."""
    if isinstance(gold, bool) or not isinstance(gold, (str, int, float)):
        return f"expected a string or a number, got {'null' if gold is None else type(gold).__name__}"
    if isinstance(gold, float) and not math.isfinite(gold):
        return f"expected a finite number, got {gold}"
    return None


def cli_grade(args) -> int:
    """`mast grade IN.jsonl [--out OUT.jsonl]`: rows + extracted, correct; accuracy on stderr.

    Every input is checked before any grading or writing: the options, then every row."""
    timeout = getattr(args, "timeout", 5.0)
    if timeout is None or not math.isfinite(timeout) or timeout <= 0:
        raise InputError(f"--timeout: must be > 0 seconds and finite, got {timeout}")
    workers = getattr(args, "workers", None)
    if workers is not None and workers <= 0:
        raise InputError(f"--workers: must be > 0, got {workers}")
    if args.out:
        out = Path(args.out)
        if out.is_dir():
            raise InputError(f"--out {out}: is a directory, expected a file path")
        parent = next((q for q in out.parents if q.exists()), None)
        if parent is not None and not parent.is_dir():
            raise InputError(f"--out {out}: {parent} is not a directory")
    path = Path(args.input)
    rows = []
    for lineno, row in iter_jsonl(path):
        for key in ("id", "benchmark", "gold", "response"):
            if key not in row:
                raise InputError(f"{path}:{lineno}: missing field {key!r}")
        if row["benchmark"] not in BENCHMARKS:
            raise InputError(
                f"{path}:{lineno}: benchmark: unknown {row['benchmark']!r}; known: {', '.join(BENCHMARKS)}"
            )
        why = _gold_problem(row["gold"])
        if why:
            raise InputError(f"{path}:{lineno}: gold: {why}")
        if row["response"] is not None and not isinstance(row["response"], str):
            raise InputError(f"{path}:{lineno}: response: expected a string, got {type(row['response']).__name__}")
        rows.append(row)
    if not rows:
        raise InputError(f"{path}: no rows to grade")
    graded = grade_records(rows, timeout_s=timeout, workers=workers)
    if args.out:
        write_jsonl(args.out, graded)
    else:
        sys.stdout.write("".join(json.dumps(r) + "\n" for r in graded))
    n_ok = sum(r["correct"] for r in graded)
    print(f"accuracy {n_ok}/{len(graded)} = {accuracy(graded):.4f}", file=sys.stderr)
    return 0
