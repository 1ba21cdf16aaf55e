"""Benchmark: spectral statistics of a Qwen2.5-Math-1.5B-shaped checkpoint pair, fast path vs exact SVD.

    .venv/bin/python benchmarks/selection.py [--layers 28] [--rho 0.05] [--device cpu|cuda] [--dtype bfloat16]

Writes, once, a reference and a target checkpoint with Qwen2.5-Math-1.5B's attention shapes
(28 layers; q/o 1536x1536, k/v 256x1536; config.json + safetensors shards with an index):
reference weights W = U diag(s) V^T with a decaying power-law spectrum s_i ~ (1 + i/8)^-a,
a in [0.5, 0.9] per tensor (trained attention weights have a few large singular values and
a long tail; a Gaussian matrix's flat spectrum has no principal subspace to find), and
target = W + D with D a small rank-8 increment (||D||/||W|| in [3e-3, 3e-2]), part inside
the top-r subspace and part random, then both rounded to bf16 as real checkpoints are.

Then `mast.selection.spectral_stats` scores the pair end to end (fingerprints, inventory,
streaming reads, signals, cache write) once with method="fast" (float32 Gram
eigenproblem + float64 Rayleigh-Ritz with a residual certificate) and once with
method="exact" (float64 full SVD), each in its own subprocess so peak RSS
(resource.getrusage ru_maxrss) is per path. Prints: time of each path and the ratio (goal
>= 10x), the max signal error of fast vs exact (goal <= 1e-3), peak RSS (goal <= 1.5 GB).

The coupling signal is not part of this benchmark: it needs a forward/backward pass of a
real model on forget texts, not just the two weight files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HIDDEN, KV_DIM, HEADS, KV_HEADS, INTERMEDIATE, VOCAB = 1536, 256, 12, 2, 8960, 151936
SHAPES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (KV_DIM, HIDDEN), "v_proj": (KV_DIM, HIDDEN), "o_proj": (HIDDEN, HIDDEN)}


def _rss_mb() -> float:
    """Peak resident set of this process in MB: VmHWM (reset by exec, unlike ru_maxrss, which a
    child inherits from the parent that forked it), else getrusage's ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_pair_tensors(m: int, n: int, gen, rho: float):
    """(W, W + D) in float32: decaying spectrum, small rank-8 increment partly inside the top-r subspace."""
    import torch

    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=gen)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=gen)).Q
    a = 0.5 + 0.4 * float(torch.rand(1, generator=gen))
    s = (1.0 + torch.arange(k, dtype=torch.float32) / 8.0) ** -a
    W = (U * s) @ V.T
    W *= 0.02 * math.sqrt(m * n) / float(torch.linalg.vector_norm(W))  # entries ~ 0.02, like trained weights
    r = math.ceil(rho * k - 1e-9)
    inside = U[:, :r] @ torch.randn(r, 8, generator=gen) @ torch.randn(8, r, generator=gen) @ V[:, :r].T
    outside = torch.randn(m, 8, generator=gen) @ torch.randn(8, n, generator=gen)
    mix = float(torch.rand(1, generator=gen))  # share of the increment's direction inside the subspace
    D = mix * inside / torch.linalg.vector_norm(inside) + (1 - mix) * outside / torch.linalg.vector_norm(outside)
    size = 10 ** (-2.5 + float(torch.rand(1, generator=gen)))  # ||D|| / ||W|| in [3e-3, 3e-2]
    D *= size * float(torch.linalg.vector_norm(W)) / float(torch.linalg.vector_norm(D))
    return W, W + D


def build_pair(out: Path, layers: int, rho: float, dtype: str, seed: int = 0, layers_per_shard: int = 7):
    """Write reference/ and target/ (config.json + sharded safetensors with an index); returns both paths."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2Config

    tdtype = getattr(torch, dtype)
    cfg = Qwen2Config(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=VOCAB,
                      tie_word_embeddings=True, max_position_embeddings=4096)
    dirs = {"reference": out / "reference", "target": out / "target"}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(d)
    gen = torch.Generator().manual_seed(seed)
    n_shards = math.ceil(layers / layers_per_shard)
    maps = {role: {} for role in dirs}
    for shard in range(n_shards):
        tensors = {role: {} for role in dirs}
        for layer in range(shard * layers_per_shard, min(layers, (shard + 1) * layers_per_shard)):
            for proj, (m, n) in SHAPES.items():
                name = f"model.layers.{layer}.self_attn.{proj}.weight"
                W, T = make_pair_tensors(m, n, gen, rho)
                tensors["reference"][name] = W.to(tdtype).contiguous()
                tensors["target"][name] = T.to(tdtype).contiguous()
        fname = f"model-{shard + 1:05d}-of-{n_shards:05d}.safetensors"
        for role, d in dirs.items():
            save_file(tensors[role], str(d / fname), metadata={"format": "pt"})
            maps[role].update({k: fname for k in tensors[role]})
    for role, d in dirs.items():
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": maps[role]}))
    return dirs["reference"], dirs["target"]


def child(args) -> None:
    """One path in a fresh process: time spectral_stats end to end, report peak RSS and the signals.

    Fingerprinting both checkpoints (the cache key, identical work for both paths) is timed on
    its own first; fingerprint_model memoises, so the timed spectral_stats call that follows is
    the scoring itself (inventory, streaming reads, signals, cache write).
    """
    # imports and CUDA start-up before the clock (the same for both paths; not part of scoring)
    import torch
    from transformers import Qwen2ForCausalLM  # noqa: F401  (the inventory's meta model needs it)

    from mast.files import fingerprint_model
    from mast.selection import spectral_stats

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        x = torch.randn(64, 64, device="cuda")
        torch.linalg.svd(x.double()), torch.linalg.eigh(x @ x.T), torch.linalg.qr(x)
        torch.cuda.synchronize()
    rss_import = _rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    fingerprint_model(args.reference), fingerprint_model(args.target)
    t1, c1 = time.perf_counter(), time.process_time()
    stats = spectral_stats(args.reference, args.target, args.rho, cache_dir=args.cache, method=args.child,
                           device=args.device, progress=False)
    if args.device == "cuda":
        torch.cuda.synchronize()
    t2, c2 = time.perf_counter(), time.process_time()
    assert not stats["cache_hit"]
    out = {"method": args.child, "fingerprint": [t1 - t0, c1 - c0], "scoring": [t2 - t1, c2 - c1],
           "total": [t2 - t0, c2 - c0], "peak_rss_mb": _rss_mb(), "import_rss_mb": rss_import,
           "candidates": [{k: c[k] for k in ("name", "update_magnitude", "off_principal_energy", "method",
                                              "iterations")} for c in stats["candidates"]]}
    Path(args.result).write_text(json.dumps(out))


def run_child(method: str, ref: Path, tgt: Path, rho: float, device: str, work: Path, threads: int | None) -> dict:
    result = work / f"{method}.json"
    cache = work / f"cache-{method}"
    if cache.exists():
        shutil.rmtree(cache)
    cmd = [sys.executable, __file__, "--child", method, "--reference", str(ref), "--target", str(tgt), "--rho",
           str(rho), "--device", device, "--cache", str(cache), "--result", str(result)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if threads:
        cmd += ["--threads", str(threads)]
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    subprocess.run(cmd, check=True, env=env)
    return json.loads(result.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dir", type=Path, help="work folder, kept and reused (default: a temporary one, removed after)")
    p.add_argument("--threads", type=int, default=1, help="torch/MKL threads in both paths (default 1: on a shared, "
                   "oversubscribed machine more threads make small LAPACK calls erratic; 0 = torch's default)")
    p.add_argument("--repeat", type=int, default=1, help="run the paths alternately this many times; report the "
                   "fastest run of each (timings on a shared machine are noisy)")
    # child mode
    p.add_argument("--child", choices=["fast", "exact"], help=argparse.SUPPRESS)
    p.add_argument("--reference", help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tmp = None
    if args.dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="mast-bench-selection-")
        work = Path(tmp.name)
    else:
        work = args.dir
        work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        ref, tgt = work / "models" / "reference", work / "models" / "target"
        if not (args.dir and (tgt / "model.safetensors.index.json").is_file()):  # --dir: built once, reused
            ref, tgt = build_pair(work / "models", args.layers, args.rho, args.dtype)
        size = sum(f.stat().st_size for f in ref.glob("*.safetensors"))
        n_layers = len({k.split(".")[2] for k in json.loads((ref / "model.safetensors.index.json").read_text())[
            "weight_map"]})
        print(f"reference + target: {n_layers} layers x (q/o {HIDDEN}x{HIDDEN}, k/v {KV_DIM}x{HIDDEN}), "
              f"{size / 2**20:.0f} MiB each ({time.perf_counter() - t0:.1f}s to write or find)")
        threads = args.threads or torch.get_num_threads()
        print(f"device {device}, torch threads {threads}, rho {args.rho}, load average {os.getloadavg()[0]:.1f}")
        runs: dict[str, list[dict]] = {"fast": [], "exact": []}
        for i in range(args.repeat):
            for method in ("fast", "exact"):
                r = run_child(method, ref, tgt, args.rho, device, work, args.threads)
                runs[method].append(r)
                print(f"  run {i + 1} {method:>5}: total {r['total'][0]:7.2f}s wall {r['total'][1]:7.2f}s CPU "
                      f"(fingerprints {r['fingerprint'][1]:.2f}s CPU, scoring {r['scoring'][1]:.2f}s CPU), "
                      f"peak RSS {r['peak_rss_mb']:.0f} MB (after imports {r['import_rss_mb']:.0f} MB), "
                      f"load {os.getloadavg()[0]:.1f}")

        def best(method: str, part: str, i: int) -> float:
            return min(r[part][i] for r in runs[method])

        fast, exact = runs["fast"][-1], runs["exact"][-1]
        err_e = max(abs(a["off_principal_energy"] - b["off_principal_energy"])
                    for a, b in zip(fast["candidates"], exact["candidates"], strict=True))
        err_m = max(abs(a["update_magnitude"] - b["update_magnitude"])
                    for a, b in zip(fast["candidates"], exact["candidates"], strict=True))
        methods = [c["method"] for c in fast["candidates"]]
        steps = [c["iterations"] for c in fast["candidates"] if c["method"] == "fast"]
        energies = [c["off_principal_energy"] for c in exact["candidates"]]
        peak = max(r["peak_rss_mb"] for rs in runs.values() for r in rs)
        print(f"candidates: {len(methods)}; fast path converged on {methods.count('fast')}, fell back to the exact "
              f"SVD on {len(methods) - methods.count('fast')}; subspace-iteration steps: "
              f"{ {k: steps.count(k) for k in sorted(set(steps))} }")
        print(f"off-principal energy (exact) range {min(energies):.4f} .. {max(energies):.4f}")
        print(f"best of {args.repeat}: exact full SVD (baseline) vs fast path")
        for part, label in (("total", "end to end"), ("scoring", "scoring only (fingerprints excluded)")):
            for i, clock in ((0, "wall"), (1, "CPU")):
                e, f = best("exact", part, i), best("fast", part, i)
                print(f"  {label:<38} {clock:>4}: exact {e:7.2f}s  fast {f:6.2f}s  ratio {e / f:5.1f}x (goal >= 10x)")
        print(f"max |error| fast vs exact: off-principal energy {err_e:.2e}, update magnitude {err_m:.2e} "
              f"(goal <= 1e-3)")
        print(f"peak RSS over all runs: {peak:.0f} MB (goal <= 1536 MB: {'ok' if peak <= 1536 else 'OVER'})")
        print("coupling signal: not benchmarked (needs a forward/backward pass of a real model on forget texts)")
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
