"""Answer extraction and equivalence grading, with a hard per-answer timeout.

math-verify does the extraction and the comparison (:func:`extract_and_verify`): its LaTeX and
expression configs, boxed answers at its default priority (a "final answer is" statement after the
last box wins), several answers compared as a set. In front of it only linear string rules run in
the caller's process (:func:`answer_text`): a box cut off mid-answer, a few-shot continuation,
the GSM8K ``####`` line, digit-group separators; and for a one-answer gold only the last box is
kept. A shortcut says *right* without math-verify when the ``####`` line or the last box is the
gold itself. `grade_records` grades a batch of rows in worker processes.

Why worker processes: math-verify's own timeouts use ``signal.alarm``, which only works on the
main thread of the main interpreter; inside a Ray worker or a thread they fail, and a
pathological answer (``2^{2^{2^{2^{2^{2}}}}}``, 10k digits, hundreds of nested ``\\frac``) can
hang sympy for ever. So the workers run math-verify with its timeouts *disabled* and the parent
enforces the timeout: each worker reports after every answer, an answer that takes longer than
``timeout_s`` counts as wrong and its worker is killed (SIGKILL, works even inside C code) and
replaced. Answers go to workers in chunks (throughput); after a kill the rest of the chunk is
re-queued, so one stuck answer costs ``timeout_s`` and nothing else.

Workers are forked by a fork server of our own (:func:`_template_main`): a fresh interpreter
(``python -c ...``: no fork of a threaded or Ray caller, no re-import of the caller's ``__main__``)
that imports sympy and math-verify and warms up once; its forks start warm in milliseconds, a
replacement after a timeout too. Each worker talks to the parent over two private pipes, so
grading works from the main thread, any thread, and Ray workers. The pool is kept for reuse
between calls (one per process, calls serialised by a lock) and closed at exit; when the parent
dies the fork server kills its workers. A worker also caps its own CPU time per answer
(RLIMIT_CPU) and its address space (RLIMIT_AS, ``MAST_GRADER_MEMORY_GB``, default 4).
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

from mast.files import InputError, read_text, write_jsonl

BENCHMARKS = ("math", "gsm8k")
log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- extraction
#
# math-verify does the extraction (its LaTeX and expression configs, boxed answers, "final answer
# is", several answers). In front of it only linear string work that states a project rule:
# where the answer text ends (a cut-off box, a few-shot continuation), the GSM8K ``####`` line,
# digit-group separators, and (for a one-answer gold) that only the last box is an answer.

_BOX_RE = re.compile(r"\\(?:boxed|fbox)")
_GSM_HASH_RE = re.compile(r"####\s*([^\n]*)")
# a few-shot continuation the model wrote after its answer (lm-eval stops generation there)
_CONTINUATION_RE = re.compile(r"\n\s*(?:Question|Problem|Q)\s*:")
# digit groups: "1 000", "1\,000", "1\ 000", "1~000" -> "1000" (math-verify reads "1\,000" as 1*0)
_DIGIT_GROUPS_RE = re.compile(r"(?<![\d.])\d{1,3}(?:(?:\\[,; ]|~| )\d{3})+(?![\d])")
_GROUP_SEP_RE = re.compile(r"\\[,; ]|~| ")
_STATEMENT_RE = re.compile(r"(?:final answer|the answer)\s*(?:is|:|=)\s*:?\s*([^\n]{1,200}?)\s*(?:\.\s|\.?$|\n|\. I hope)",
                           re.IGNORECASE)
_WORD_RE = re.compile(r"[A-Za-z][A-Za-z0-9]+")


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


def _boxes(text: str) -> list[tuple[int, int | None, str | None]]:
    """Every ``\\boxed``/``\\fbox``: (start, end or None if it never closes, content or None). Linear."""
    pairs, out = None, []
    for m in _BOX_RE.finditer(text):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            pairs = _brace_pairs(text) if pairs is None else pairs
            end = pairs.get(i)
            out.append((m.start(), end, text[i + 1 : end - 1].strip() if end else None))
        elif i > m.end() and i < len(text):  # "\\boxed 5": up to the next space or $
            tok = re.match(r"[^\s$]+", text[i:])
            out.append((m.start(), i + tok.end(), tok.group(0)) if tok else (m.start(), None, None))
        else:
            out.append((m.start(), None, None))
    return out


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (or ``\\boxed 5``) in `text`. Linear."""
    for _, end, content in reversed(_boxes(text)):
        if end is not None:
            return content
    return None


def answer_text(response: str | None, benchmark: str) -> str | None:
    """The part of `response` that math-verify extracts the answer from, or None (no answer).

    Cut at a few-shot continuation ("\\nQuestion:"); a last box that never closes (the response
    was cut off mid-answer) is dropped, and with no complete box before it there is no answer.
    GSM8K: the text after the last ``#### `` when there is one. Digit-group separators are
    removed ("1 000", "1\\,000") and ``\\$`` dropped (a currency sign, not a math delimiter).
    Linear in len(response): it runs in the caller's process, outside the timeout.
    """
    if benchmark not in BENCHMARKS:
        raise InputError(f"unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")
    if not isinstance(response, str) or not response.strip():
        return None
    text = response
    cont = _CONTINUATION_RE.search(text)
    if cont and text[: cont.start()].strip():
        text = text[: cont.start()]
    boxes = _boxes(text)
    if boxes and boxes[-1][1] is None:
        if not any(end is not None for _, end, _ in boxes):
            return None
        text = text[: boxes[-1][0]]
    if benchmark == "gsm8k":
        hashes = _GSM_HASH_RE.findall(text)
        if hashes and hashes[-1].strip():
            text = hashes[-1].strip()
    text = _DIGIT_GROUPS_RE.sub(lambda m: _GROUP_SEP_RE.sub("", m.group(0)), text.replace("\\$", ""))
    return text if text.strip() else None


def _only_last_box(text: str) -> str:
    """`text` with every box but the last unwrapped (``\\boxed{3}`` -> ``{3}``): one answer is asked for."""
    boxes = [b for b in _boxes(text) if b[1] is not None]
    for start, _, _ in reversed(boxes[:-1]):
        m = _BOX_RE.match(text, start)
        text = text[:start] + text[m.end():]
    return text


def _fast_candidate(text: str | None, benchmark: str) -> str | None:
    """A cheap guess at the answer for the exact-match shortcut: the GSM8K ``####`` line, or a
    last box with no final-answer statement after it. Only ever used to say *right*."""
    if text is None:
        return None
    if benchmark == "gsm8k":
        if "\n" in text.strip() or len(text) > 60:
            return None
        return text.strip().strip("$").strip().rstrip(".")
    boxes = [b for b in _boxes(text) if b[1] is not None]
    if not boxes or _STATEMENT_RE.search(text, boxes[-1][1]):
        return None
    return boxes[-1][2]


# --------------------------------------------------------------------------- equivalence


def _quiet_math_verify() -> None:
    """Silence math-verify's 'timeout is disabled' warnings: the parent enforces timeouts."""
    import math_verify.grader
    import math_verify.parser

    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    logging.getLogger("latex2sympy2_extended").setLevel(logging.ERROR)


# One LaTeX and one expression config everywhere (gold and response): math-verify caches the
# compiled extraction regexes of a single config (lru_cache(maxsize=1)); alternating two configs
# recompiles them on every call. A lone "\\boxed{gold}" is extracted the same at any box priority.


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
        extraction_config=[LatexExtractionConfig()],
        parsing_timeout=None,
    )


def _parse_pred(pred: str, benchmark: str):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    if benchmark == "gsm8k" and _PLAIN_NUMBER_RE.fullmatch(pred.replace(",", "")):
        return parse(pred, extraction_config=[ExprExtractionConfig()], parsing_timeout=None)
    return parse(
        "\\boxed{" + pred + "}",
        extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
        parsing_timeout=None,
    )


def _several(parsed) -> bool:
    """Whether a parsed gold holds several answers (a set of more than one element)."""
    from sympy import FiniteSet

    return bool(parsed) and isinstance(parsed[0], FiniteSet) and len(parsed[0]) > 1


def _shown(parsed) -> str | None:
    """What math-verify extracted, as text: its string form, else the sympy value."""
    if not parsed:
        return None
    text = parsed[-1] if isinstance(parsed[-1], str) else str(parsed[0])
    return text.strip() or None


def extract_and_verify(gold: str, text: str | None, benchmark: str) -> tuple[bool, str | None]:
    """(correct, extracted): math-verify extracts the answer from `text` (see :func:`answer_text`)
    and compares it with `gold`. No timeout here: untrusted text goes through :func:`grade_records`.

    Extraction is math-verify's ``parse`` with its LaTeX config (boxed answers at its default
    priority, so a "final answer is" statement after the last box wins over it; "final answer
    is X. I hope" first of all) and its expression config (numbers, ``$X``, "The answer is X",
    rightmost first). A gold with several answers is compared as a set with several boxes; for a
    one-answer gold only the last box counts. When math-verify finds nothing, the last "final
    answer is X" / "the answer is X" statement is parsed as the answer (choice letters, words).
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    if text is None or not gold:
        return False, None
    _quiet_math_verify()
    try:
        g = _parse_gold(gold, benchmark)
        if not g:
            return False, None
        if not _several(g):
            text = _only_last_box(text)
        p = parse(text, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=None)
        if not p:
            said = _STATEMENT_RE.findall(text)
            if said:
                ans = said[-1]
                while (inner := _STATEMENT_RE.search(ans + ".")) and inner.group(1) != ans:
                    ans = inner.group(1)  # "Final Answer: The final answer is X" -> X
                ans = ans.strip().strip("$").strip()
                p = _parse_pred("\\text{" + ans + "}" if _WORD_RE.fullmatch(ans) else ans, benchmark)
        return bool(p and verify(g, p, timeout_seconds=None)), _shown(p)
    except Exception:  # math-verify/sympy failure on odd input: the answer is not verified
        return False, None


_PLAIN_NUMBER_RE = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")


def _numeric_verdict(gold: str, pred: str) -> bool | None:
    """Shortcut for plain decimal numbers (commas ignored): True when the values are equal, else
    None = undecided, ask math-verify."""
    a, b = gold.replace(",", ""), pred.replace(",", "")
    if len(a) > 50 or len(b) > 50 or not (_PLAIN_NUMBER_RE.fullmatch(a) and _PLAIN_NUMBER_RE.fullmatch(b)):
        return None
    from decimal import Decimal

    return True if Decimal(a) == Decimal(b) else None


def is_equivalent(gold: str, extracted: str | None, benchmark: str, fast_path: bool = True) -> bool:
    """math-verify equivalence of an already extracted answer with the gold one (no timeout here).
    With `fast_path`, identical strings and equal plain numbers are decided without math-verify."""
    if benchmark not in BENCHMARKS:
        raise InputError(f"unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")
    if extracted is None or not str(extracted).strip():
        return False
    gold, extracted = str(gold).strip(), str(extracted).strip()
    if fast_path and (gold == extracted or _numeric_verdict(gold, extracted)):
        return True
    from math_verify import verify

    _quiet_math_verify()
    try:
        g, p = _parse_gold(gold, benchmark), _parse_pred(extracted, benchmark)
        return bool(g and p and verify(g, p, timeout_seconds=None))
    except Exception:  # math-verify/sympy failure on odd input: the answer is not verified
        return False


# --------------------------------------------------------------------------- worker side


# LaTeX forms common in answers: parsed once by the template so that every worker forked from it
# starts with math-verify's regexes compiled and the LaTeX parser's prediction cache (antlr's
# DFA, built per process as new input shapes are seen) already holding them.
_WARM_UP = [
    ("1", "so \\boxed{1.0}"), ("\\frac{1}{2}", "$\\dfrac{1}{2}$"), ("2\\sqrt{3}", "\\boxed{\\sqrt{12}}"),
    ("[1,2)", "\\boxed{[1, 2)}"), ("(3,-1)", "\\boxed{(3, -1)}"), ("\\{1,2\\}", "\\boxed{\\{1, 2\\}}"),
    ("30^\\circ", "\\boxed{30^{\\circ}}"), ("10\\%", "\\boxed{10\\%}"), ("x^2+2x+1", "\\boxed{(x+1)^2}"),
    ("y = 2x + 3", "\\boxed{y=3+2x}"), ("x \\geq 5", "\\boxed{x \\ge 5}"), ("\\text{(C)}", "\\boxed{C}"),
    ("2\\pi", "\\boxed{\\pi \\cdot 2}"), ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\boxed{\\begin{pmatrix}1\\\\2\\end{pmatrix}}"),
    ("-\\frac{3}{4}", "The answer is $-0.75$."), ("18", "She makes $18 every day. The answer is 18."),
    ("(2,2),(6,2)", "\\boxed{(2,2)} and \\boxed{(6,2)}"), ("\\infty", "\\boxed{\\infty}"),
    ("3^{10}", "\\boxed{59049}"), ("\\log_2 8", "\\boxed{3}"), ("\\sin x", "\\boxed{\\sin(x)}"),
]


def _warm_up() -> None:
    for gold, response in _WARM_UP:
        extract_and_verify(gold, response, "math")


def _template_main(sock_fd: int, memory_gb: float) -> None:
    """Fork server: warm up once, then fork a grading worker for each pair of pipe ends received.

    A fresh interpreter of our own (single-threaded, so forking it is safe), started by the
    parent; its forked children start warm in milliseconds, also when one replaces a worker
    killed for a timeout. It exits when the parent closes the socket (or dies)."""
    import signal
    import socket

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=sock_fd)
    _quiet_math_verify()
    _warm_up()
    sock.sendall(b"R")
    children: set[int] = set()
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 16, 2)
        except OSError:
            msg, fds = b"", []
        if not msg or len(fds) != 2:
            break
        children -= _reap(block=False)  # workers killed since the last fork (a zombie's pid is never reused)
        pid = os.fork()
        if pid == 0:  # the worker
            try:
                sock.close()
                _worker_main(fds[0], fds[1], memory_gb, warm=True)
            finally:
                os._exit(0)
        children.add(pid)
        for fd in fds:
            os.close(fd)
        sock.sendall(pid.to_bytes(8, "little"))
    # the parent closed the socket or is gone: nobody is left to report to
    for pid in children - _reap(block=False):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    _reap(block=True)


def _reap(block: bool) -> set[int]:
    """Collect exited workers (their CPU time then counts as the template's children's); their pids."""
    done = set()
    while True:
        try:
            pid, _ = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return done
        if pid == 0:
            return done
        done.add(pid)


def _worker_main(rfd: int, wfd: int, memory_gb: float, warm: bool = False) -> None:
    """Worker loop: receive chunks [(idx, gold, text, benchmark)], send (idx, correct, extracted) each."""
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
    if not warm:
        _warm_up()  # sympy, math-verify's regexes, the LaTeX parser, before saying ready
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
        timeout_s, items = msg
        for idx, gold, text, benchmark in items:
            # kernel backstop if the parent is gone: SIGXCPU after this answer's CPU budget
            used = resource.getrusage(resource.RUSAGE_SELF)
            budget = int(used.ru_utime + used.ru_stime + 2 * timeout_s + 2)
            if cpu_hard == resource.RLIM_INFINITY or budget < cpu_hard:
                resource.setrlimit(resource.RLIMIT_CPU, (budget, cpu_hard))
            try:
                ok, extracted = extract_and_verify(gold, text, benchmark)
            except MemoryError:
                ok, extracted = False, None
            outbox.send((idx, ok, extracted))


# --------------------------------------------------------------------------- parent side


class _Template:
    """The fork server of one pool (see :func:`_template_main`)."""

    def __init__(self, memory_gb: float):
        import socket

        ours, theirs = socket.socketpair()
        src = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        code = f"from mast.grading import _template_main; _template_main({theirs.fileno()}, {memory_gb!r})"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], pass_fds=(theirs.fileno(),), env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, close_fds=True,
        )
        theirs.close()
        self.sock = ours
        self.sock.settimeout(_Worker.STARTUP_S)
        try:
            ready = self.sock.recv(1)
        except OSError:
            ready = b""
        if ready != b"R":
            self.close()
            raise RuntimeError(f"grading worker template did not start within {_Worker.STARTUP_S:.0f} s "
                               "(see stderr)")
        self.sock.settimeout(30.0)

    def fork(self, rfd: int, wfd: int) -> int:
        """A new worker reading `rfd` and writing `wfd` (the worker's ends); its pid."""
        import socket

        socket.send_fds(self.sock, [b"F"], [rfd, wfd])
        pid = b""
        while len(pid) < 8:
            part = self.sock.recv(8 - len(pid))
            if not part:
                raise OSError("grading worker template exited")
            pid += part
        return int.from_bytes(pid, "little")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        try:
            self.sock.close()
            self.proc.wait(timeout=2)
        except Exception:
            pass
        try:
            self.proc.kill()
            self.proc.wait(timeout=10)
        except Exception:
            pass


class _Worker:
    STARTUP_S = 120.0

    def __init__(self, template: _Template):
        r_in, w_in = os.pipe()  # parent -> worker
        r_out, w_out = os.pipe()  # worker -> parent
        try:
            self.pid = template.fork(r_in, w_out)
        finally:
            os.close(r_in)
            os.close(w_out)
        self.tx = Connection(w_in, readable=False)
        self.rx = Connection(r_out, writable=False)
        self.alive = True
        self.ready = False
        self.items: deque = deque()
        self.deadline = time.monotonic() + self.STARTUP_S

    @property
    def busy(self) -> bool:
        return bool(self.items)

    def kill(self) -> None:
        """SIGKILL (works inside C code) unless it already exited, then drop the pipes."""
        import signal

        if self.alive:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except OSError:
                pass
        self.alive = False
        for c in (self.tx, self.rx):
            try:
                c.close()
            except OSError:
                pass

    def close(self) -> None:
        try:
            self.tx.send(None)
        except Exception:
            pass
        self.kill()


class _Pool:
    """Persistent grading workers of this process; `run` is called under `_POOL_LOCK`."""

    def __init__(self, memory_gb: float):
        self.pid = os.getpid()
        self.memory_gb = memory_gb
        self.template: _Template | None = None
        self.workers: list[_Worker] = []
        self.failed: set[int] = set()

    def _new_worker(self) -> _Worker:
        """A worker forked from the template; the template is (re)started when it is not running."""
        for attempt in (0, 1):
            if self.template is None or not self.template.alive():
                if self.template is not None:
                    self.template.close()
                self.template = _Template(self.memory_gb)
            try:
                return _Worker(self.template)
            except OSError:
                if attempt:
                    raise
                self.template.close()
                self.template = None
        raise AssertionError("unreachable")

    def _resize(self, n: int) -> None:
        self.workers = [w for w in self.workers if w.alive]
        while len(self.workers) < n:
            self.workers.append(self._new_worker())

    def close(self) -> None:
        for w in self.workers:
            w.close()
        self.workers = []
        if self.template is not None:
            self.template.close()
            self.template = None

    def run(
        self, items: list[tuple], timeout_s: float, n_workers: int, chunk_size: int
    ) -> tuple[dict[int, tuple[bool, str | None]], set[int]]:
        """Grade `items` [(idx, gold, text, benchmark)] -> ({idx: (correct, extracted)}, {idx that
        failed}); an answer that timed out or crashed its worker is (False, None), listed in the second."""
        results: dict[int, tuple[bool, str | None]] = {}
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
                    w.tx.send((timeout_s, chunk))
            waiting = [w for w in active if w.busy or not w.ready]
            if not waiting:  # nothing left to dispatch and nothing in flight
                break
            delay = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
            for conn in wait([w.rx for w in waiting], timeout=delay):
                w = next(x for x in waiting if x.rx is conn)
                try:
                    msg = conn.recv()
                except (EOFError, OSError):  # worker died (crash, memory cap, CPU cap)
                    w.alive = False
                    self._replace(w, active, queue, results, why="died")
                    continue
                if msg[0] == "ready":
                    w.ready = True
                    continue
                idx, ok, extracted = msg
                results[idx] = (bool(ok), extracted)
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
            results[idx] = (False, None)
            self.failed.add(idx)
            if w.items:
                queue.appendleft(list(w.items))
        new = self._new_worker()
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

    No answer -> wrong. With `fast_path`, a GSM8K ``####`` line or a last box (with no final-answer
    statement after it) that is the gold string or its plain-number value is right without
    math-verify. Everything else is extracted and checked by math-verify in worker processes
    (:func:`extract_and_verify`); an answer that takes longer than `timeout_s` seconds is wrong.
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
        guess = _fast_candidate(text, bench) if fast_path and gold else None
        r["extracted"], r["correct"] = None, False
        if guess is not None and (guess == gold or _numeric_verdict(gold, guess)):
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
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():
            _POOL = _Pool(memory_gb)
        results, failed = _POOL.run(pending, float(timeout_s), n_workers, chunk_size)
    for i, *_ in pending:
        out[i]["correct"], out[i]["extracted"] = results.get(i, (False, None))
    if failed:
        ids = [str(out[i].get("id", i)) for i in sorted(failed)]
        log.warning("grading: %d answer(s) exceeded %.1f s or crashed a worker, counted wrong: %s",
                    len(ids), timeout_s, ", ".join(ids[:10]) + (" ..." if len(ids) > 10 else ""))
    return out


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
    import json

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
    for lineno, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
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
