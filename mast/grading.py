"""Answer extraction and equivalence grading, with a hard per-answer timeout.

`extract_answer` pulls the final answer out of a response (last ``\\boxed{}``/``\\fbox{}`` with
brace matching; GSM8K ``####``, "the answer is", last number). `is_equivalent` asks
math-verify whether it equals the gold answer (gold parsed as LaTeX for MATH, as a number for
GSM8K). `grade_records` does both for a batch of rows in worker processes.

Why worker processes: math-verify's own timeouts use ``signal.alarm``, which only works on the
main thread of the main interpreter; inside a Ray worker or a thread they fail, and a
pathological answer (``2^{2^{2^{2^{2^{2}}}}}``, 10k digits, hundreds of nested ``\\frac``) can
hang sympy for ever. So the workers run math-verify with its timeouts *disabled* and the parent
enforces the timeout: each worker reports after every answer, an answer that takes longer than
``timeout_s`` counts as wrong and its worker is killed (SIGKILL, works even inside C code) and
replaced. Answers go to workers in chunks (throughput); after a kill the rest of the chunk is
re-queued, so one stuck answer costs ``timeout_s`` and nothing else.

Workers are fresh interpreters (``python -c ...``, the 'spawn' model: no fork of a threaded or
Ray process, no re-import of the caller's ``__main__``) talking over two private pipes, so
grading works from the main thread, any thread, and Ray workers. They are kept for reuse
between calls (one pool per process, calls serialised by a lock) and closed at exit. A worker
also caps its own CPU time per answer (RLIMIT_CPU, a kernel kill if the parent vanished) and
its address space (RLIMIT_AS, ``MAST_GRADER_MEMORY_GB``, default 4).
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from functools import lru_cache
from multiprocessing.connection import Connection, wait
from pathlib import Path

from mast.files import InputError, read_jsonl, write_jsonl

BENCHMARKS = ("math", "gsm8k")
log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)")
_NUMBER_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+")
_ANSWER_IS_RE = re.compile(
    r"(?:final answer|the answer)\s*(?:is|:|=)\s*:?\s*(.+?)\s*(?:\.\s|\.?$|\n)", re.IGNORECASE | re.DOTALL
)
_GSM_HASH_RE = re.compile(r"####\s*([^\n]*)")


def _brace_pairs(text: str) -> dict[int, int]:
    """{index of '{': index just past its matching '}'} in one pass (escaped ``\\{``/``\\}`` skipped)."""
    pairs, stack, i, n = {}, [], 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            pairs[stack.pop()] = i + 1
        i += 1
    return pairs


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (or ``\\boxed 5``) in `text`.

    Linear in len(text), however many boxes are left unclosed."""
    boxes = list(_BOX_RE.finditer(text))
    if not boxes:
        return None
    pairs = _brace_pairs(text)
    for m in reversed(boxes):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            end = pairs.get(i)
            if end is not None:
                return text[i + 1 : end - 1].strip()
        elif i > m.end() and i < len(text):  # "\\boxed 5": up to the next space or $
            tok = re.match(r"[^\s$]+", text[i:])
            if tok:
                return tok.group(0).strip()
    return None


def _strip_math(s: str) -> str:
    s = s.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            s = s[len(left) : len(s) - len(right)].strip()
    return s.rstrip(".").strip()


def _answer_is(text: str) -> str | None:
    hits = list(_ANSWER_IS_RE.finditer(text))
    if not hits:
        return None
    boxed = last_boxed(hits[-1].group(1))
    return boxed if boxed is not None else (_strip_math(hits[-1].group(1)) or None)


def _last_number(text: str) -> str | None:
    hits = _NUMBER_RE.findall(text)
    return hits[-1].replace(",", "") if hits else None


def _gsm8k_number(snippet: str) -> str:
    """A lone number in `snippet` (``\\$1,080``, ``18 dollars``) without separators; else `snippet`."""
    clean = re.sub(r"\\text\{[^{}]*\}|\\[,!;: ]|\\?\$|\\%|%", " ", snippet)
    nums = _NUMBER_RE.findall(clean)
    if len(nums) == 1 and not re.search(r"\\frac|\\sqrt|/|\^", clean):
        return nums[0].replace(",", "")
    return _strip_math(snippet)


def extract_answer(response: str | None, benchmark: str) -> str | None:
    """The final answer in `response`, or None.

    math: last ``\\boxed{}`` (None if the only box never closes: a truncated response), else
    "the answer is X", else the last number.
    gsm8k: ``#### X``, else last ``\\boxed{}``, else "the answer is X", else the last number;
    a lone number is returned without thousands separators, currency or units.
    """
    if benchmark not in BENCHMARKS:
        raise InputError(f"unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")
    if not isinstance(response, str) or not response.strip():
        return None
    if benchmark == "gsm8k":
        hashes = _GSM_HASH_RE.findall(response)
        snippet = hashes[-1].strip() if hashes and hashes[-1].strip() else None
        snippet = snippet or last_boxed(response) or _answer_is(response)
        if snippet:
            return _gsm8k_number(snippet) or None
        return _last_number(response)
    ans = last_boxed(response)
    if ans is None and _BOX_RE.search(response):
        return None  # a \boxed{ that never closes: the response was cut off mid-answer
    if ans is None:
        ans = _answer_is(response)
    if ans is None:
        ans = _last_number(response)
    return _strip_math(ans) if ans else None


# --------------------------------------------------------------------------- equivalence


def _quiet_math_verify() -> None:
    """Silence math-verify's 'timeout is disabled' warnings: the parent enforces timeouts."""
    import math_verify.grader
    import math_verify.parser

    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    logging.getLogger("latex2sympy2_extended").setLevel(logging.ERROR)


@lru_cache(maxsize=4096)
def _parse_gold(gold: str, benchmark: str):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    if benchmark == "gsm8k":
        num = gold.replace(",", "").strip()
        parsed = parse(num, extraction_config=[ExprExtractionConfig()], parsing_timeout=None)
        if parsed:
            return parsed
    return parse(
        "\\boxed{" + gold + "}",
        extraction_config=[LatexExtractionConfig(boxed_match_priority=0)],
        parsing_timeout=None,
    )


def _parse_pred(pred: str, benchmark: str):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    if benchmark == "gsm8k" and _NUMBER_RE.fullmatch(pred):
        return parse(pred, extraction_config=[ExprExtractionConfig()], parsing_timeout=None)
    return parse(
        "\\boxed{" + pred + "}",
        extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
        parsing_timeout=None,
    )


_PLAIN_NUMBER_RE = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
_PLAIN_INT_RE = re.compile(r"-?\d{1,15}")


def _numeric_verdict(gold: str, pred: str) -> bool | None:
    """Shortcut for plain decimal numbers (commas ignored): True when the values are equal; for two
    integers of <= 15 digits also False when they differ (math-verify could not say otherwise);
    None = undecided, ask math-verify."""
    a, b = gold.replace(",", ""), pred.replace(",", "")
    if len(a) > 50 or len(b) > 50 or not (_PLAIN_NUMBER_RE.fullmatch(a) and _PLAIN_NUMBER_RE.fullmatch(b)):
        return None
    from decimal import Decimal

    if Decimal(a) == Decimal(b):
        return True
    if _PLAIN_INT_RE.fullmatch(a) and _PLAIN_INT_RE.fullmatch(b):
        return False
    return None


def is_equivalent(gold: str, extracted: str | None, benchmark: str, fast_path: bool = True) -> bool:
    """math-verify equivalence of an extracted answer with the gold one (no timeout here:
    untrusted answers go through :func:`grade_records`). With `fast_path`, identical strings and
    plain numbers are decided without math-verify (see :func:`_numeric_verdict`)."""
    if benchmark not in BENCHMARKS:
        raise InputError(f"unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")
    if extracted is None or not str(extracted).strip():
        return False
    gold, extracted = str(gold).strip(), str(extracted).strip()
    if fast_path:
        if gold == extracted:
            return True
        verdict = _numeric_verdict(gold, extracted)
        if verdict is not None:
            return verdict
    from math_verify import verify

    _quiet_math_verify()
    try:
        g = _parse_gold(gold, benchmark)
        p = _parse_pred(extracted, benchmark)
        return bool(g and p and verify(g, p, timeout_seconds=None))
    except Exception:  # math-verify/sympy failure on odd input: the answer is not verified
        return False


# --------------------------------------------------------------------------- worker side


def _worker_main(rfd: int, wfd: int, memory_gb: float) -> None:
    """Worker loop: receive chunks [(idx, gold, extracted, benchmark)], send (idx, correct) each."""
    import resource
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if memory_gb > 0:
        cap = int(memory_gb * 2**30)
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard == resource.RLIM_INFINITY or hard > cap:
            resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    inbox, outbox = Connection(rfd, writable=False), Connection(wfd, readable=False)
    _quiet_math_verify()
    is_equivalent("1", "1.0", "math")  # warm sympy / the LaTeX parser before saying ready
    outbox.send(("ready", os.getpid()))
    _, cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)
    parent = os.getppid()
    while True:
        try:
            while not inbox.poll(5.0):
                if os.getppid() != parent:  # orphaned (the parent was killed): leave
                    return
            msg = inbox.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        timeout_s, fast_path, items = msg
        for idx, gold, extracted, benchmark in items:
            # kernel backstop if the parent is gone: SIGXCPU after this answer's CPU budget
            used = resource.getrusage(resource.RUSAGE_SELF)
            budget = int(used.ru_utime + used.ru_stime + 2 * timeout_s + 2)
            if cpu_hard == resource.RLIM_INFINITY or budget < cpu_hard:
                resource.setrlimit(resource.RLIMIT_CPU, (budget, cpu_hard))
            try:
                ok = is_equivalent(gold, extracted, benchmark, fast_path)
            except MemoryError:
                ok = False
            outbox.send((idx, ok))


# --------------------------------------------------------------------------- parent side


class _Worker:
    STARTUP_S = 120.0

    def __init__(self, memory_gb: float):
        r_in, w_in = os.pipe()  # parent -> worker
        r_out, w_out = os.pipe()  # worker -> parent
        src = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        code = f"from mast.grading import _worker_main; _worker_main({r_in}, {w_out}, {memory_gb!r})"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], pass_fds=(r_in, w_out), env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, close_fds=True,
        )
        os.close(r_in)
        os.close(w_out)
        self.tx = Connection(w_in, readable=False)
        self.rx = Connection(r_out, writable=False)
        self.ready = False
        self.items: deque = deque()
        self.deadline = time.monotonic() + self.STARTUP_S

    @property
    def busy(self) -> bool:
        return bool(self.items)

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=10)
        except Exception:
            pass
        for c in (self.tx, self.rx):
            try:
                c.close()
            except OSError:
                pass

    def close(self) -> None:
        try:
            self.tx.send(None)
            self.proc.wait(timeout=2)
        except Exception:
            pass
        self.kill()


class _Pool:
    """Persistent grading workers of this process; `run` is called under `_POOL_LOCK`."""

    def __init__(self, memory_gb: float):
        self.pid = os.getpid()
        self.memory_gb = memory_gb
        self.workers: list[_Worker] = []
        self.failed: set[int] = set()

    def _resize(self, n: int) -> None:
        self.workers = [w for w in self.workers if w.proc.poll() is None] or []
        while len(self.workers) < n:
            self.workers.append(_Worker(self.memory_gb))

    def close(self) -> None:
        for w in self.workers:
            w.close()
        self.workers = []

    def run(
        self, items: list[tuple], timeout_s: float, n_workers: int, chunk_size: int, fast_path: bool = True
    ) -> tuple[dict[int, bool], set[int]]:
        """Grade `items` [(idx, gold, extracted, benchmark)] -> ({idx: correct}, {idx that failed});
        an answer that timed out or crashed its worker is False and listed in the second."""
        results: dict[int, bool] = {}
        self.failed: set[int] = set()
        queue = deque(items[i : i + chunk_size] for i in range(0, len(items), chunk_size))
        self._resize(n_workers)
        active = self.workers[:n_workers]
        while len(results) < len(items):
            now = time.monotonic()
            for w in active:
                if w.ready and not w.busy and queue:
                    chunk = queue.popleft()
                    w.items = deque(chunk)
                    w.deadline = now + timeout_s
                    w.tx.send((timeout_s, fast_path, chunk))
            waiting = [w for w in active if w.busy or not w.ready]
            if not waiting:  # nothing left to dispatch and nothing in flight
                break
            delay = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
            for conn in wait([w.rx for w in waiting], timeout=delay):
                w = next(x for x in waiting if x.rx is conn)
                try:
                    msg = conn.recv()
                except (EOFError, OSError):  # worker died (crash, memory cap, CPU cap)
                    self._replace(w, active, queue, results, why="died")
                    continue
                if msg[0] == "ready":
                    w.ready = True
                    continue
                idx, ok = msg
                results[idx] = bool(ok)
                if w.items and w.items[0][0] == idx:
                    w.items.popleft()
                w.deadline = time.monotonic() + timeout_s
            now = time.monotonic()
            for w in list(active):
                if (w.busy or not w.ready) and now > w.deadline:
                    if not w.ready:
                        raise RuntimeError(f"grading worker did not start within {_Worker.STARTUP_S:.0f} s")
                    self._replace(w, active, queue, results, why="timeout")
        return results, self.failed

    def _replace(self, w: _Worker, active: list, queue: deque, results: dict, why: str) -> None:
        """Kill `w`; its current answer is wrong, the rest of its chunk goes back to the queue."""
        if not w.ready:
            w.kill()
            raise RuntimeError("grading worker exited during start-up (see stderr)")
        w.kill()
        if w.items:
            idx = w.items.popleft()[0]
            results[idx] = False
            self.failed.add(idx)
            if w.items:
                queue.appendleft(list(w.items))
        new = _Worker(self.memory_gb)
        self.workers[self.workers.index(w)] = new
        active[active.index(w)] = new


_POOL: _Pool | None = None
_POOL_LOCK = threading.Lock()


def shutdown_pool() -> None:
    """Stop this process's grading workers (they are restarted on the next call)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None and _POOL.pid == os.getpid():
            _POOL.close()
        _POOL = None


atexit.register(shutdown_pool)


def default_workers() -> int:
    try:
        return max(1, min(len(os.sched_getaffinity(0)), 8))
    except AttributeError:  # not Linux
        return max(1, min(os.cpu_count() or 1, 8))


def grade_records(
    rows: list[dict],
    timeout_s: float = 5.0,
    workers: int | None = None,
    chunk_size: int | None = None,
    fast_path: bool = True,
) -> list[dict]:
    """Rows {benchmark, gold, response, ...} -> same rows (copies, order kept) + `extracted`, `correct`.

    No answer -> wrong. With `fast_path`, identical strings and equal plain decimal numbers
    (``18.00`` = ``18``) are right, and two different plain integers wrong, without math-verify. Everything else is checked by math-verify in worker processes; an answer that
    takes longer than `timeout_s` seconds is wrong.
    """
    if timeout_s is None or timeout_s <= 0:
        raise InputError(f"timeout must be > 0 seconds, got {timeout_s}")
    out: list[dict] = []
    pending: list[tuple] = []
    for i, row in enumerate(rows):
        rid = row.get("id", i) if isinstance(row, dict) else i
        if not isinstance(row, dict):
            raise InputError(f"row {i}: expected an object, got {type(row).__name__}")
        for key in ("benchmark", "gold", "response"):
            if key not in row:
                raise InputError(f"row {rid}: missing field {key!r}")
        bench = row["benchmark"]
        if bench not in BENCHMARKS:
            raise InputError(f"row {rid}: benchmark: unknown {bench!r}; known: {', '.join(BENCHMARKS)}")
        r = dict(row)
        gold = "" if row["gold"] is None else str(row["gold"]).strip()
        r["extracted"] = extract_answer(row["response"], bench)
        if r["extracted"] is None or not gold:
            r["correct"] = False
        elif fast_path and r["extracted"] == gold:
            r["correct"] = True  # identical strings: no need for math-verify
        elif fast_path and _numeric_verdict(gold, r["extracted"]) is not None:
            r["correct"] = _numeric_verdict(gold, r["extracted"])  # plain numbers, decided exactly
        else:
            r["correct"] = None
            pending.append((i, gold, r["extracted"], bench))
        out.append(r)
    if not pending:
        return out
    n_workers = max(1, min(workers or default_workers(), len(pending)))
    if chunk_size is None:
        chunk_size = max(1, min(64, math.ceil(len(pending) / (4 * n_workers))))
    memory_gb = float(os.environ.get("MAST_GRADER_MEMORY_GB", "4"))
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():
            _POOL = _Pool(memory_gb)
        results, failed = _POOL.run(pending, float(timeout_s), n_workers, chunk_size, fast_path)
    for i, *_ in pending:
        out[i]["correct"] = results.get(i, False)
    if failed:
        ids = [str(out[i].get("id", i)) for i in sorted(failed)]
        log.warning("grading: %d answer(s) exceeded %.1f s or crashed a worker, counted wrong: %s",
                    len(ids), timeout_s, ", ".join(ids[:10]) + (" ..." if len(ids) > 10 else ""))
    return out


def accuracy(rows: list[dict]) -> float:
    return sum(bool(r.get("correct")) for r in rows) / len(rows) if rows else 0.0


def cli_grade(args) -> int:
    """`mast grade IN.jsonl [--out OUT.jsonl]`: rows + extracted, correct; accuracy on stderr."""
    import json

    path = Path(args.input)
    rows = read_jsonl(path)
    with path.open(encoding="utf-8") as f:  # line numbers of non-blank rows, for error messages
        lines = [n for n, line in enumerate(f, 1) if line.strip()]
    for row, lineno in zip(rows, lines):
        for key in ("id", "benchmark", "gold", "response"):
            if key not in row:
                raise InputError(f"{path}:{lineno}: missing field {key!r}")
        if row["benchmark"] not in BENCHMARKS:
            raise InputError(
                f"{path}:{lineno}: benchmark: unknown {row['benchmark']!r}; known: {', '.join(BENCHMARKS)}"
            )
        if row["response"] is not None and not isinstance(row["response"], str):
            raise InputError(f"{path}:{lineno}: response: expected a string, got {type(row['response']).__name__}")
    timeout = getattr(args, "timeout", 5.0)
    if timeout is None or timeout <= 0:
        raise InputError(f"--timeout: must be > 0 seconds, got {timeout}")
    workers = getattr(args, "workers", None)
    if workers is not None and workers <= 0:
        raise InputError(f"--workers: must be > 0, got {workers}")
    graded = grade_records(rows, timeout_s=timeout, workers=workers)
    if args.out:
        write_jsonl(args.out, graded)
    else:
        sys.stdout.write("".join(json.dumps(r) + "\n" for r in graded))
    n_ok = sum(r["correct"] for r in graded)
    print(f"accuracy {n_ok}/{len(graded)} = {accuracy(graded):.4f}", file=sys.stderr)
    return 0
