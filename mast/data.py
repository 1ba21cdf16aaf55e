"""MATH, MATH-500 and GSM8K loaders and the seeded forget/retain split builder.

Every loader returns problem records ``{"id", "prompt", "solution", "answer"}`` (plus
``level``/``subject`` for MATH), read from a local directory laid out like ``../shared/data``
(``gsm8k/{test,train}.jsonl``, ``math/test.jsonl``, ``math500/test.jsonl``) or, when
``data_dir`` is None, from the Hugging Face Hub: ``openai/gsm8k`` (config ``main``),
``HuggingFaceH4/MATH-500``, and ``EleutherAI/hendrycks_math`` (one config per subject).

- MATH: id = ``unique_id`` (``test/algebra/1.json``; on the Hub, which has no file names,
  ``<split>/<subject>/<sha1 of the problem>``), answer = last ``\\boxed{}`` of the solution,
  level = int (None for the few "Level ?"), subject = the MATH type ("Number Theory").
- MATH-500: the gold ``answer`` field; same ids as MATH.
- GSM8K: id = ``gsm8k/<split>/<row>``, answer = the text after ``####`` without thousands
  separators, solution = the text before it with the ``<<48/2=24>>`` calculator notes removed.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from pathlib import Path

import numpy as np

from mast.answers import last_boxed
from mast.files import InputError, read_jsonl

BENCHMARK_NAMES = ("math", "math500", "gsm8k")
MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")
_HUB = {"gsm8k": ("openai/gsm8k", "main"), "math500": ("HuggingFaceH4/MATH-500", None),
        "math": ("EleutherAI/hendrycks_math", None)}
_CALC_RE = re.compile(r"<<[^<>]*>>")


def normalize_text(text: str) -> str:
    """Problem text for duplicate checks: NFKC, lower case, without `$` math delimiters, TeX
    spacing commands or any whitespace, so a re-typeset copy of a problem is the same text."""
    t = unicodedata.normalize("NFKC", str(text)).lower().replace("$", "")
    t = re.sub(r"\\[ ,;:!]", "", t)
    return "".join(t.split())


def subject_key(subject: str) -> str:
    """'Counting & Probability' / 'counting_and_probability' -> 'counting_and_probability'."""
    return re.sub(r"[\s\-]+", "_", subject.strip().lower().replace("&", "and"))


def _level(value, where: str) -> int | None:
    if value is None or isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(?:Level\s*)?(\d+|\?)\s*", str(value))
    if not m:
        raise InputError(f"{where}: level: expected 'Level N' or an integer, got {value!r}")
    return None if m.group(1) == "?" else int(m.group(1))


# --------------------------------------------------------------------------- record builders


def _gsm8k_record(row: dict, split: str, i: int, where: str) -> dict:
    text = row["answer"]
    if not isinstance(text, str) or "####" not in text:
        raise InputError(f"{where}: answer: no '#### <number>' final answer")
    solution, _, final = text.rpartition("####")
    answer = final.strip().replace(",", "")
    if not answer:
        raise InputError(f"{where}: answer: empty after '####'")
    return {"id": f"gsm8k/{split}/{i}", "prompt": row["question"], "solution": _CALC_RE.sub("", solution).strip(),
            "answer": answer}


def _math_record(row: dict, uid: str, where: str) -> dict:
    answer = last_boxed(row["solution"]) if isinstance(row["solution"], str) else None
    if not answer:
        raise InputError(f"{where}: solution: no \\boxed{{}} final answer")
    return {"id": uid, "prompt": row["problem"], "solution": row["solution"], "answer": answer,
            "level": _level(row.get("level"), where), "subject": row.get("type") or row.get("subject")}


def _math500_record(row: dict, where: str) -> dict:
    return {"id": row["unique_id"], "prompt": row["problem"], "solution": row["solution"],
            "answer": str(row["answer"]).strip(), "level": _level(row.get("level"), where),
            "subject": row.get("subject")}


# --------------------------------------------------------------------------- sources


def _local(name: str, split: str, data_dir: str | os.PathLike) -> list[dict]:
    root = Path(data_dir)
    if not root.is_dir():
        raise InputError(f"{root}: data directory not found")
    folder = {"math": "math", "math500": "math500", "gsm8k": "gsm8k"}[name]
    path = root / folder / f"{split}.jsonl"
    if not path.is_file():
        raise InputError(f"{path}: file not found (no {split!r} split of {name} in {root})")
    required = {"gsm8k": ("question", "answer"), "math": ("unique_id", "problem", "solution"),
                "math500": ("unique_id", "problem", "solution", "answer")}[name]
    rows = read_jsonl(path, required=required)
    with path.open(encoding="utf-8") as f:
        linenos = [n for n, line in enumerate(f, 1) if line.strip()]
    out = []
    for i, (row, lineno) in enumerate(zip(rows, linenos)):
        where = f"{path}:{lineno}"
        if name == "gsm8k":
            out.append(_gsm8k_record(row, split, i, where))
        elif name == "math":
            out.append(_math_record(row, row["unique_id"], where))
        else:
            out.append(_math500_record(row, where))
    return out


def _hub(name: str, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a core dependency
        raise InputError(f"loading {name} from the Hub needs the 'datasets' package ({e}); or pass a data dir") from None
    repo, config = _HUB[name]

    def load(cfg):
        try:
            return datasets.load_dataset(repo, cfg, split=split)
        except Exception as e:  # offline, unknown split, ...: the user can fix it with a data dir
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise InputError(f"could not load {repo}{'/' + cfg if cfg else ''} split {split!r} from the "
                             f"Hugging Face Hub ({first}); pass a local data directory (--data-dir)") from None

    if name == "gsm8k":
        return [_gsm8k_record(r, split, i, f"{repo}:{split}:{i}") for i, r in enumerate(load(config))]
    if name == "math500":
        return [_math500_record(r, f"{repo}:{split}:{i}") for i, r in enumerate(load(config))]
    out = []
    for subject in MATH_SUBJECTS:
        for i, r in enumerate(load(subject)):
            uid = f"{split}/{subject}/{hashlib.sha1(r['problem'].encode()).hexdigest()[:12]}"
            out.append(_math_record(r, uid, f"{repo}/{subject}:{split}:{i}"))
    return out


def load_benchmark(name: str, split: str = "test", data_dir: str | os.PathLike | None = None) -> list[dict]:
    """Problems of `name` (math | math500 | gsm8k), from `data_dir` or the Hub when None."""
    if name not in BENCHMARK_NAMES:
        raise InputError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARK_NAMES)}")
    if name == "math500" and split != "test":
        raise InputError(f"math500 has only a 'test' split, not {split!r}")
    rows = _hub(name, split) if data_dir is None else _local(name, split, data_dir)
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InputError(f"{name}/{split}: duplicate problem id {dup!r}")
    return rows


def load_math_pool(data_dir: str | os.PathLike | None = None) -> list[dict]:
    """MATH test minus MATH-500 (by unique_id, and by problem text for Hub ids): 4,500 problems."""
    math = load_benchmark("math", "test", data_dir)
    held_out = load_benchmark("math500", "test", data_dir)
    ids = {r["id"] for r in held_out}
    texts = {r["prompt"].strip() for r in held_out}
    return [r for r in math if r["id"] not in ids and r["prompt"].strip() not in texts]


# --------------------------------------------------------------------------- splits


def build_splits(
    pool: list[dict],
    n_forget: int,
    n_retain: int,
    seed: int,
    levels: list[int] | None = None,
    subjects: list[str] | None = None,
    n_retain_val: int = 0,
) -> tuple[list[dict], ...]:
    """Disjoint forget (n_forget) and retain (n_retain) draws from `pool`, reproducible by `seed`.

    The pool (after the level/subject filters) is put in a canonical order, sorted by
    (problem text, id) so the same problems give the same split whatever their ids or file
    order, then permuted by numpy's PCG64 seeded with `seed`: forget = the first n_forget,
    retain = the next n_retain. A larger n_forget with the same seed extends the smaller set.

    With `n_retain_val` > 0 a third draw follows (the next n_retain_val of the same
    permutation) and `(forget, retain, retain_val)` is returned: a retain-VALIDATION set for
    choices (lr, steps, stopping) disjoint from the reported retain suite; forget and retain
    are exactly those of the call without it. The validation draw shares no id and no
    normalized problem text (:func:`normalize_text`) with forget or retain, nor within itself
    (a text already drawn is skipped).
    """
    if not isinstance(n_forget, int) or n_forget <= 0:
        raise InputError(f"forget size must be a positive integer, got {n_forget!r}")
    if not isinstance(n_retain, int) or n_retain < 0:
        raise InputError(f"retain size must be an integer >= 0, got {n_retain!r}")
    if not isinstance(n_retain_val, int) or n_retain_val < 0:
        raise InputError(f"retain-validation size must be an integer >= 0, got {n_retain_val!r}")
    if not isinstance(seed, int) or seed < 0:
        raise InputError(f"split seed must be an integer >= 0, got {seed!r}")
    for i, r in enumerate(pool):
        missing = [k for k in ("id", "prompt", "solution", "answer") if k not in r]
        if missing:
            raise InputError(f"pool row {i}: missing field(s) {', '.join(missing)}")
    rows = list(pool)
    if levels:
        want = {int(lv) for lv in levels}
        rows = [r for r in rows if r.get("level") in want]
    if subjects:
        want_s = {subject_key(s) for s in subjects}
        unknown = want_s - set(MATH_SUBJECTS)
        if unknown:
            raise InputError(f"unknown subject(s) {sorted(unknown)}; known: {', '.join(MATH_SUBJECTS)}")
        rows = [r for r in rows if r.get("subject") and subject_key(r["subject"]) in want_s]
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise InputError("pool has duplicate problem ids")
    need = n_forget + n_retain
    if len(rows) < need + n_retain_val:
        filt = f" with levels={levels} subjects={subjects}" if levels or subjects else ""
        val = f" + retain-validation {n_retain_val}" if n_retain_val else ""
        raise InputError(f"pool has {len(rows)} problems{filt}; forget {n_forget} + retain {n_retain}{val} "
                         f"needs {need + n_retain_val}")
    rows.sort(key=lambda r: (r["prompt"], str(r["id"])))
    order = np.random.Generator(np.random.PCG64(seed)).permutation(len(rows))
    picked = [dict(rows[i]) for i in order[:need]]
    if not n_retain_val:
        return picked[:n_forget], picked[n_forget:]
    seen = {normalize_text(r["prompt"]) for r in picked}
    val = []
    for i in order[need:]:
        key = normalize_text(rows[i]["prompt"])
        if key not in seen:
            seen.add(key)
            val.append(dict(rows[i]))
            if len(val) == n_retain_val:
                break
    if len(val) < n_retain_val:
        raise InputError(f"pool has only {len(val)} problems for retain-validation after forget and retain "
                         f"(distinct texts); {n_retain_val} asked")
    return picked[:n_forget], picked[n_forget:], val
