"""The grading worker pool: math-verify in worker processes, the timeout enforced by the parent.

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

:func:`grade_in_pool` grades the answers :func:`mast.grading.grade_records` could not settle by
its string rules; :func:`shutdown_pool` stops the workers (they restart on the next call).
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import Connection, wait
from pathlib import Path

from mast.answers import extract_and_verify, quiet_math_verify

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
    quiet_math_verify()
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
    quiet_math_verify()
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
        code = f"from mast.grading_pool import _template_main; _template_main({theirs.fileno()}, {memory_gb!r})"
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


def grade_in_pool(items: list[tuple], timeout_s: float, n_workers: int, chunk_size: int,
                  memory_gb: float) -> tuple[dict[int, tuple[bool, str | None]], set[int]]:
    """Grade `items` [(idx, gold, text, benchmark)] in this process's pool (started or resized as needed).

    ({idx: (correct, extracted)}, {idx that timed out or crashed its worker}); calls are
    serialised by a lock, so threads share one pool.
    """
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():
            _POOL = _Pool(memory_gb)
        return _POOL.run(items, float(timeout_s), n_workers, chunk_size)
