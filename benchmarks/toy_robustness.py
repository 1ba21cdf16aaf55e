"""Does the toy's RL stage add a large forget-skill gain on every seed and every CPU kernel?

Builds the toy (``mast.toy.build_toy``) for each seed x ``ATEN_CPU_CAPABILITY`` setting,
each in its own subprocess (the capability is read once, when torch loads; different
settings select different vectorised kernels and so stand in for another machine's
rounding), and prints one row per build:

    seed  kernel  SFT forget  RLVR forget  gain [95% CI]  SFT retain  RLVR retain  reward first->last
    build wall seconds  build CPU seconds (~ wall on an idle machine: one torch thread)

The gain is RLVR - SFT greedy accuracy on the same held-out ``forget_eval`` problems: a
*paired* difference, with a cluster-robust t interval over operand pairs (``a * b`` and
``b * a`` share the work, so they are one cluster; :func:`mast.toy_task.paired_gain_ci`).
Acceptance (issue 13): gain >= +15 points with the interval's lower end > +5, retain >= 0.90.

    .venv/bin/python benchmarks/toy_robustness.py --seeds 0 1 2 3 4 --kernels default avx2
    .venv/bin/python benchmarks/toy_robustness.py --seeds 0 --kernels default --out /tmp/toys

Builds go to OUT/s{seed}-{kernel} (kept; a finished build there is reused, pass --force to
rebuild). ~3-4 min per build on an idle 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = ("import sys, json; from mast.toy import build_toy; "
         "s = build_toy(sys.argv[1], seed=int(sys.argv[2]), force=sys.argv[3] == '1'); print(json.dumps(s['seconds']))")


def build(out: Path, seed: int, kernel: str, force: bool) -> dict:
    """One build in a fresh interpreter with ATEN_CPU_CAPABILITY=kernel; returns its summary."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if kernel != "native":
        env["ATEN_CPU_CAPABILITY"] = kernel
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        run = subprocess.run([sys.executable, "-c", BUILD, str(out), str(seed), "1" if force else "0"],
                             env=env, stdout=fh, stderr=subprocess.STDOUT)
    if run.returncode != 0:
        raise RuntimeError(f"build seed {seed} kernel {kernel} failed (rc {run.returncode}); see {log}")
    return json.loads((out / "toy_summary.json").read_text())


def row(seed: int, kernel: str, s: dict) -> dict:
    g = s["rl_gain"]
    rewards = [r["reward"] for r in s["rl_log"]]
    k = max(1, len(rewards) // 5)
    return {"seed": seed, "kernel": kernel, "sft_forget": s["sft"]["forget"], "rlvr_forget": s["rlvr"]["forget"],
            "gain": g["gain"], "ci_low": g["low"], "ci_high": g["high"], "sft_retain": s["sft"]["retain"],
            "retain": s["rlvr"]["retain"], "reward_first": sum(rewards[:k]) / k, "reward_last": sum(rewards[-k:]) / k,
            "seconds": s["seconds"], "cpu_seconds": s.get("cpu_seconds", float("nan")),
            "ok": g["gain"] >= 0.15 and g["low"] > 0.05 and s["rlvr"]["retain"] >= 0.90}


def fmt(r: dict) -> str:
    return (f"{r['seed']:>4}  {r['kernel']:<8} {r['sft_forget']:>10.3f} {r['rlvr_forget']:>11.3f}  "
            f"{100 * r['gain']:+6.1f} [{100 * r['ci_low']:+5.1f}, {100 * r['ci_high']:+5.1f}]  "
            f"{r['sft_retain']:>6.3f} {r['retain']:>6.3f}  {r['reward_first']:.2f}->{r['reward_last']:.2f}  "
            f"{r['seconds']:>7.0f} {r['cpu_seconds']:>7.0f}  {'ok' if r['ok'] else 'FAIL'}")


HEADER = (f"{'seed':>4}  {'kernel':<8} {'SFT forget':>10} {'RLVR forget':>11}  {'gain pts [95% CI]':<22}  "
          f"{'SFT rt':>6} {'retain':>6}  {'reward':<10}  {'wall s':>7} {'cpu s':>7}  verdict")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--kernels", nargs="+", default=["default", "avx2"],
                    help="ATEN_CPU_CAPABILITY values (default, avx2, avx512, ...; 'native': leave it unset)")
    ap.add_argument("--out", default=None, help="folder for the builds (default: a temporary folder)")
    ap.add_argument("--force", action="store_true", help="rebuild even where a finished build exists")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--jobs", type=int, default=1,
                    help="builds at once (each is single-threaded; build seconds then include the sharing)")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="toy-robustness-"))
    with open("/proc/loadavg") as fh:
        print(f"# builds in {out}; load average at start: {fh.read().split()[:3]}", flush=True)
    print("# gain: RLVR - SFT on the same forget_eval problems, paired, 95% cluster-robust t CI over "
          "operand pairs", flush=True)
    rows = []
    t0 = time.time()
    todo = [(seed, kernel) for seed in args.seeds for kernel in args.kernels]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(build, out / f"s{seed}-{kernel}", seed, kernel, args.force): (seed, kernel)
                   for seed, kernel in todo}
        done = {}
        for fut in as_completed(futures):
            done[futures[fut]] = fut.result()
            print(f"# done: seed {futures[fut][0]} kernel {futures[fut][1]} ({time.time() - t0:.0f}s)", flush=True)
    print(HEADER, flush=True)
    for seed, kernel in todo:
        r = row(seed, kernel, done[(seed, kernel)])
        rows.append(r)
        print(fmt(r), flush=True)
    with open("/proc/loadavg") as fh:
        print(f"# {len(rows)} builds, {sum(r['ok'] for r in rows)} ok, {time.time() - t0:.0f}s wall; "
              f"load average at end: {fh.read().split()[:3]}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
