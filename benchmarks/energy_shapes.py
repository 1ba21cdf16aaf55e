"""Which projection types does the off-principal signal pick, raw vs normalized? (Qwen2.5-Math-1.5B shapes)

A synthetic pair with the attention shapes of Qwen2.5-Math-1.5B: 28 layers, q/o 1536x1536,
k/v 256x1536, rho 0.05 (r = 77 for q/o, 13 for k/v). Every increment has the same relative
magnitude; most are direction-free (i.i.d. Gaussian), a few are planted three times more
concentrated in W's principal subspace than chance (half of them q/o, half k/v) and a few
planted off-principal (a fifth of the chance concentration, q/o and k/v alike). The signals
depend on W only through its top-r singular vectors, and a Gaussian increment's law is
rotation invariant, so W's principal subspace is taken as the first r coordinates
(U_r, V_r = identity columns): no SVD of 56 1536x1536 matrices (or QR of random bases) on a
2-core machine, and the principal fraction is computed exactly.

Prints, per top-k and per score, the share of k/v projections among the selected tensors,
and how many planted concentrated / off-principal tensors were selected, averaged over seeds:

    python benchmarks/energy_shapes.py [--seeds 5] [--layers 28] [--toy TOY_DIR]

With ``--toy`` it also ranks the real attention increments of a toy build (reference =
``sft``, target = ``rlvr``; exact SVD, the matrices are small).
"""

from __future__ import annotations

import argparse
import os
import time

# one BLAS thread: the matrices are small and a shared 2-core machine oversubscribes otherwise
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from mast import energy as en  # noqa: E402

SHAPES = {"q_proj": (1536, 1536), "k_proj": (256, 1536), "v_proj": (256, 1536), "o_proj": (1536, 1536)}
RHO = 0.05


def _coordinate_basis(m, r):
    return np.eye(m, r)


def _with_fraction(rng, U, V, f):
    """Unit-norm increment with principal fraction exactly f."""
    inside = U @ rng.standard_normal((U.shape[1], V.shape[1])) @ V.T
    noise = rng.standard_normal((U.shape[0], V.shape[0]))
    outside = noise - U @ (U.T @ noise @ V) @ V.T
    return np.sqrt(f) * inside / np.linalg.norm(inside) + np.sqrt(1 - f) * outside / np.linalg.norm(outside)


def synthetic_pair(layers: int, seed: int, n_planted: int = 4) -> list[dict]:
    """One row per tensor: name, type, planted kind, raw / normalized / standardized signals."""
    rng = np.random.default_rng(seed)
    names = [(i, t) for i in range(layers) for t in SHAPES]
    picks = rng.permutation(len(names))
    qo = [j for j in picks if names[j][1] in ("q_proj", "o_proj")]
    kv = [j for j in picks if names[j][1] in ("k_proj", "v_proj")]
    h = n_planted // 2
    planted = {j: "concentrated" for j in qo[:h] + kv[:h]}
    planted.update({j: "off_principal" for j in qo[h:2 * h] + kv[h:2 * h]})
    rows = []
    for j, (layer, t) in enumerate(names):
        shape = SHAPES[t]
        r = en.rank_for(RHO, shape)
        U, V = _coordinate_basis(shape[0], r), _coordinate_basis(shape[1], r)
        e = en.direction_free_fraction(shape, r)
        kind = planted.get(j, "direction_free")
        if kind == "concentrated":
            D = _with_fraction(rng, U, V, 3 * e)
        elif kind == "off_principal":
            D = _with_fraction(rng, U, V, 0.2 * e)
        else:
            D = rng.standard_normal(shape)
        f = en.principal_fraction(U, V, D)
        rows.append({"name": f"layers.{layer}.{t}", "type": t, "kind": kind, "raw": 1 - f,
                     "normalized": en.normalized_off_principal(f, shape, r),
                     "standardized": -en.standardized_concentration(f, shape, r)})
    return rows


def top_k(rows: list[dict], score: str, k: int) -> list[dict]:
    return sorted(rows, key=lambda x: (-x[score], x["name"]))[:k]


def toy_rows(toy_dir: str) -> list[dict]:
    """Raw / normalized / standardized signals of the toy's attention increments (sft -> rlvr)."""
    from pathlib import Path

    from safetensors.numpy import load_file

    def weights(d):
        out = {}
        for f in sorted(Path(toy_dir, d).glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    ref, tgt = weights("sft"), weights("rlvr")
    rows = []
    for name in sorted(ref):
        t = next((t for t in SHAPES if name.endswith(f"{t}.weight")), None)
        if t is None:
            continue
        W = ref[name].astype(np.float64)
        s = en.energy_signals(W, tgt[name].astype(np.float64) - W, RHO)
        rows.append({"name": name, "type": t, "kind": "toy", "shape": W.shape, "raw": s["off_principal_raw"],
                     "normalized": s["off_principal_normalized"], "standardized": -s["concentration_z"],
                     "concentration": s["concentration"]})
    return rows


def print_toy(toy_dir: str) -> None:
    rows = toy_rows(toy_dir)
    shapes = sorted({(r["type"], r["shape"]) for r in rows})
    print(f"\ntoy {toy_dir}: {len(rows)} attention tensors, shapes {shapes}, rho {RHO}")
    print(f"{'score':<13}{'top-k':>6}{'k/v share':>11}")
    for s in ("raw", "normalized", "standardized"):
        for k in (2, 4, 8):
            top = top_k(rows, s, k)
            print(f"{s:<13}{k:>6}{sum(x['type'] in ('k_proj', 'v_proj') for x in top) / k:>11.2f}   "
                  + " ".join(x["name"].replace("model.layers.", "L").replace(".self_attn.", ".").removesuffix(".weight")
                             for x in top))
    by_type = {t: [r["concentration"] for r in rows if r["type"] == t] for t in SHAPES}
    print("concentration c = f / (r^2/mn) by type (1 = direction-free): "
          + ", ".join(f"{t} {np.mean(v):.2f} [{min(v):.2f}, {max(v):.2f}]" for t, v in by_type.items() if v))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--planted", type=int, default=4, help="planted tensors of each kind (half q/o, half k/v)")
    ap.add_argument("--toy", help="a toy build (mast toy) whose sft -> rlvr increments to rank too")
    args = ap.parse_args()
    t0 = time.time()
    ks, scores = (4, 8, 16, 32), ("raw", "normalized", "standardized")
    acc = {(s, k): [] for s in scores for k in ks}
    for seed in range(args.seeds):
        rows = synthetic_pair(args.layers, seed, args.planted)
        for s in scores:
            for k in ks:
                top = top_k(rows, s, k)
                kv = sum(x["type"] in ("k_proj", "v_proj") for x in top) / k
                conc = sum(x["kind"] == "concentrated" for x in top)
                off = sum(x["kind"] == "off_principal" for x in top)
                acc[(s, k)].append((kv, conc, off))
    n = args.layers * 4
    print(f"{args.layers} layers x q/k/v/o = {n} tensors (k/v are half of them), rho {RHO}, {args.seeds} seeds; "
          f"planted per seed: {args.planted} concentrated (3x chance), {args.planted} off-principal (0.2x chance)")
    print(f"{'score':<13}{'top-k':>6}{'k/v share':>11}{'q/o share':>11}{'planted conc. in top-k':>24}"
          f"{'planted off-pr. in top-k':>26}")
    for s in scores:
        for k in ks:
            a = np.array(acc[(s, k)])
            print(f"{s:<13}{k:>6}{a[:, 0].mean():>11.2f}{1 - a[:, 0].mean():>11.2f}{a[:, 1].mean():>24.1f}"
                  f"{a[:, 2].mean():>26.1f}")
    print(f"({time.time() - t0:.0f} s)")
    if args.toy:
        print_toy(args.toy)


if __name__ == "__main__":
    main()
