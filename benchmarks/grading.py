"""Grading agreement and speed: `mast grade`'s path vs plain math-verify, measured in the same run.

1. Case file (``tests/data/grading_cases``: gold/response pairs with verdicts from Math-Verify's,
   Qwen2.5-Math's and lm-evaluation-harness's test data, split by source into a dev and a frozen
   part): agreement with the verdicts per file and part, wall time and answers/s of each grader,
   with the ratio, and every disagreement of `mast grade` (``--show``).
2. Gold set (MATH-500 + GSM8K reference solutions vs their own gold, 1,819 answers, and the same
   responses against another problem's gold): throughput.

Baseline, measured in the same run: plain single-process math-verify, the way its README
uses it, ``verify(parse(gold), parse(response))`` on the main thread with its own SIGALRM
timeouts. Against it: ``mast.grading.grade_records`` (worker processes, hard per-answer
timeout of 5 s enforced by the parent): cold (worker start-up included), warm (workers kept
from the previous call), and warm with ``fast_path=False`` (every answer through math-verify,
no exact-string shortcut).

    .venv/bin/python benchmarks/grading.py [--cases DIR] [--data-dir ../shared/data] [--workers N] [--limit N]
        [--sets cases,gold] [--show]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
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


def load_cases(folder: Path) -> dict[str, list[dict]]:
    """{file stem: rows} of the case files (``dev_*`` / ``frozen_*``)."""
    return {f.stem: [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
            for f in sorted(folder.glob("*.jsonl"))}


def _fresh_process_seconds(argv: list[str]) -> tuple[float, float]:
    """(wall, CPU seconds of it and its processes) of a command in a fresh interpreter."""
    import resource

    r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime


def case_agreement(cases: dict[str, list[dict]], workers: int, show: bool, repeat: int = 3) -> None:
    """Agreement of plain math-verify and of grade_records with the case verdicts, per file and
    part, and the speed of each on the whole case file (same run, same machine), two ways:
    fresh (a new interpreter each: ``mast grade IN --out OUT`` vs a script calling plain
    math-verify) and warm (a second call in this process: grade_records with its workers kept vs
    plain math-verify with its caches filled). Runs interleaved, best of `repeat`."""
    import tempfile

    from mast.grading import grade_records

    rows = [r for part in cases.values() for r in part]
    n = len(rows)
    print(f"case file: {n} gold/response pairs in {len(cases)} files; load average {os.getloadavg()[0]:.1f}")
    tmp = Path(tempfile.mkdtemp(prefix="mastgrade"))
    src = tmp / "cases.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    plain_cmd = [sys.executable, "-c", "import json, sys; from benchmarks.grading import plain_math_verify; "
                 f"plain_math_verify([json.loads(x) for x in open({str(src)!r})])"]
    cli_cmd = [sys.executable, "-m", "mast.cli", "grade", str(src), "--out", str(tmp / "out.jsonl")]
    runs: dict[str, list] = {"plain": [], "warm": [], "plain fresh": [], "cli fresh": []}
    for _ in range(repeat):  # interleaved, best of `repeat`: other jobs on the machine add noise
        runs["plain fresh"].append(_fresh_process_seconds(plain_cmd))
        runs["cli fresh"].append(_fresh_process_seconds(cli_cmd))
        runs["plain"].append(timed(plain_math_verify, rows))
        runs["warm"].append(timed(grade_records, rows, timeout_s=5.0, workers=workers))
    (base, t_base, c_base), (warm, t_warm, c_warm) = (min(runs[k], key=lambda x: x[1]) for k in ("plain", "warm"))
    (t_pf, c_pf), (t_cf, c_cf) = min(runs["plain fresh"]), min(runs["cli fresh"])
    shutil.rmtree(tmp, ignore_errors=True)
    i = 0
    totals: dict[str, list[int]] = {}
    print(f"  {'file':<28} {'part':<7} {'n':>4}  {'plain math-verify':>18}  {'mast grade':>18}")
    for name, part in cases.items():
        k = len(part)
        b = sum(base[j] == rows[j]["correct"] for j in range(i, i + k))
        m = sum(warm[j]["correct"] == rows[j]["correct"] for j in range(i, i + k))
        kind = name.split("_")[0]
        t = totals.setdefault(kind, [0, 0, 0])
        t[0], t[1], t[2] = t[0] + k, t[1] + b, t[2] + m
        print(f"  {name:<28} {kind:<7} {k:>4}  {b:>5}/{k:<4} {100 * b / k:5.1f} %  {m:>5}/{k:<4} {100 * m / k:5.1f} %")
        i += k
    for kind, (k, b, m) in totals.items():
        print(f"  {'all ' + kind:<28} {kind:<7} {k:>4}  {b:>5}/{k:<4} {100 * b / k:5.1f} %  {m:>5}/{k:<4} {100 * m / k:5.1f} %")
    print(f"  speed, best of {repeat}, load average now {os.getloadavg()[0]:.1f}:")
    print(f"    fresh process: plain math-verify {t_pf:.2f} s ({n / t_pf:.0f}/s, {c_pf:.2f} CPU-s); `mast grade` "
          f"{t_cf:.2f} s ({n / t_cf:.0f}/s, {c_cf:.2f} CPU-s) = x{t_pf / t_cf:.2f} plain's speed")
    print(f"    warm, in this process: plain math-verify {t_base:.2f} s ({n / t_base:.0f}/s, {c_base:.2f} CPU-s); "
          f"grade_records {t_warm:.2f} s ({n / t_warm:.0f}/s, {c_warm:.2f} CPU-s with its workers) = "
          f"x{t_base / t_warm:.2f} plain's speed")
    for j, r in enumerate(rows):
        if show and warm[j]["correct"] != r["correct"]:
            print(f"  mast disagrees: {r['id']} verdict {r['correct']} gold {r['gold'][:40]!r} "
                  f"extracted {str(warm[j]['extracted'])[:40]!r} response ...{r['response'][-80:]!r}")
        if show and base[j] != r["correct"]:
            print(f"  plain disagrees: {r['id']} verdict {r['correct']} gold {r['gold'][:40]!r} "
                  f"response ...{r['response'][-80:]!r}")


def mismatched(rows: list[dict]) -> list[dict]:
    """Each response paired with the next problem's gold (same benchmark): nearly all wrong, so no
    shortcut applies and every answer goes through math-verify (the costly case in real grading)."""
    out = []
    for bench in ("math", "gsm8k"):
        sub = [r for r in rows if r["benchmark"] == bench]
        out += [{**r, "gold": sub[(i + 1) % len(sub)]["gold"]} for i, r in enumerate(sub)]
    return out


def _workers_cpu() -> float:
    """CPU seconds used so far by this process's live grading workers and their template (Linux /proc)."""
    from mast import grading_pool

    total = 0.0
    pool = grading_pool._POOL
    pids = [w.pid for w in pool.workers] + ([pool.template.proc.pid] if pool.template else []) if pool else []
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
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
    ap.add_argument("--cases", default=str(ROOT / "tests" / "data" / "grading_cases"))
    ap.add_argument("--sets", default="cases,gold", help="comma list of: cases, gold")
    ap.add_argument("--show", action="store_true", help="list every disagreement on the case file")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per grader on the case file (best kept)")
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    from mast.grading import grade_records
    from mast.grading_pool import default_workers, shutdown_pool

    sets = set(args.sets.split(","))
    workers = args.workers or default_workers()
    if "cases" in sets:
        case_agreement(load_cases(Path(args.cases)), workers, args.show, args.repeat)
    if "gold" not in sets:
        shutdown_pool()
        return
    gold = gold_rows(Path(args.data_dir).resolve())[: args.limit]
    wrong = mismatched(gold)
    n = len(gold)
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
