"""Grading throughput on the MATH-500 + GSM8K gold set (1,819 reference solutions vs gold answers).

Baseline, measured in the same run: plain single-process math-verify, the way its README
uses it, ``verify(parse(gold), parse(response))`` on the main thread with its own SIGALRM
timeouts. Against it: ``mast.grading.grade_records`` (worker processes, hard per-answer
timeout of 5 s enforced by the parent): cold (worker start-up included), warm (workers kept
from the previous call), and warm with ``fast_path=False`` (every answer through math-verify,
no exact-string shortcut).

    .venv/bin/python benchmarks/grading.py [--data-dir ../shared/data] [--workers N] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def gold_rows(data_dir: Path) -> list[dict]:
    from mast.data import load_benchmark

    rows = [{"id": p["id"], "benchmark": "math", "gold": p["answer"], "response": p["solution"]}
            for p in load_benchmark("math500", data_dir=data_dir)]
    raw = [json.loads(line) for line in (data_dir / "gsm8k" / "test.jsonl").read_text().splitlines() if line.strip()]
    rows += [{"id": p["id"], "benchmark": "gsm8k", "gold": p["answer"], "response": r["answer"]}
             for p, r in zip(load_benchmark("gsm8k", data_dir=data_dir), raw)]
    return rows


def plain_math_verify(rows: list[dict]) -> list[bool]:
    """One process, math-verify's own (SIGALRM) timeouts, default extraction on the whole response."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    out = []
    for r in rows:
        if r["benchmark"] == "gsm8k":
            gold = parse(r["gold"], extraction_config=[ExprExtractionConfig()])
            # the final line '#### 18' is what a plain user would hand to math-verify
            pred = parse(r["response"].split("####")[-1])
        else:
            gold = parse(f"${r['gold']}$", extraction_config=[LatexExtractionConfig()])
            pred = parse(r["response"])
        out.append(bool(verify(gold, pred)))
    return out


def mismatched(rows: list[dict]) -> list[dict]:
    """Each response paired with the next problem's gold (same benchmark): nearly all wrong, so no
    shortcut applies and every answer goes through math-verify (the costly case in real grading)."""
    out = []
    for bench in ("math", "gsm8k"):
        sub = [r for r in rows if r["benchmark"] == bench]
        out += [{**r, "gold": sub[(i + 1) % len(sub)]["gold"]} for i, r in enumerate(sub)]
    return out


def _workers_cpu() -> float:
    """CPU seconds used so far by this process's live grading workers (Linux /proc), else 0."""
    from mast import grading

    total = 0.0
    for w in grading._POOL.workers if grading._POOL else []:
        try:
            fields = Path(f"/proc/{w.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def timed(fn, *a, **kw):
    """(result, wall seconds, CPU seconds of this process + its grading workers)."""
    w0, c0, t0 = _workers_cpu(), time.process_time(), time.perf_counter()
    res = fn(*a, **kw)
    wall = time.perf_counter() - t0
    return res, wall, time.process_time() - c0 + max(0.0, _workers_cpu() - w0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(ROOT / ".." / "shared" / "data"))
    ap.add_argument("--workers", type=int, default=None, help="grading workers (default: usable cores, <= 8)")
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    from mast.grading import default_workers, grade_records, shutdown_pool

    gold = gold_rows(Path(args.data_dir).resolve())[: args.limit]
    wrong = mismatched(gold)
    n = len(gold)
    workers = args.workers or default_workers()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    print(f"{n} answers per set (MATH-500 + GSM8K test); {cores} usable cores; {workers} grading workers; "
          f"load average {os.getloadavg()[0]:.1f} (other jobs on the machine slow every line)")

    def line(name, res, t, cpu, t_ref=None):
        ok = sum(bool(x) if isinstance(x, bool) else x["correct"] for x in res)
        ratio = f"  x{t_ref / t:4.1f} vs plain" if t_ref else " " * 17
        print(f"  {name:<36}: {n / t:9.1f} answers/s wall ({t:6.2f} s){ratio}; {n / cpu:9.1f} per CPU-s; "
              f"{ok}/{n} correct")

    summary = {}
    for set_name, rows in (("gold set (reference solutions vs own gold)", gold),
                           ("mismatched set (response vs another problem's gold)", wrong)):
        print(set_name)
        base, t_base, c_base = timed(plain_math_verify, rows)
        line("plain math-verify, 1 process", base, t_base, c_base)
        shutdown_pool()
        cold, t_cold, c_cold = timed(grade_records, rows, timeout_s=5.0, workers=workers)
        line("grade_records, cold (workers start)", cold, t_cold, c_cold, t_base)
        if not any(r["correct"] is None for r in cold):  # make sure workers are up for the warm runs
            grade_records(rows[:1], timeout_s=5.0, workers=workers, fast_path=False)
        warm, t_warm, c_warm = timed(grade_records, rows, timeout_s=5.0, workers=workers)
        line("grade_records, warm", warm, t_warm, c_warm, t_base)
        full, t_full, c_full = timed(grade_records, rows, timeout_s=5.0, workers=workers, fast_path=False)
        line("grade_records, warm, no shortcuts", full, t_full, c_full, t_base)
        summary[set_name.split()[0]] = (n / t_base, n / t_warm, n / t_full, n / c_full)
    shutdown_pool()
    print(f"load average now {os.getloadavg()[0]:.1f}; wall figures share the cores with other jobs, "
          "per-CPU-s figures do not")
    for k, (b, w, f, fc) in summary.items():
        print(f"{k}: plain math-verify {b:.0f}/s; grade_records {w:.0f}/s (x{w / b:.1f}); with no shortcuts "
              f"{f:.0f}/s (x{f / b:.1f}), {fc:.0f} per CPU-s -> ~{min(workers, cores) * fc:.0f}/s on "
              f"{min(workers, cores)} idle cores; goal >= 200 answers/s")


if __name__ == "__main__":
    main()
