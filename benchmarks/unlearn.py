"""Step time and optimizer-state memory of MAST top-k (k = 8) against full-parameter unlearning.

A randomly initialised model with Qwen2 shapes (default: hidden 1024, 16 layers, GQA 16/4
heads, MLP 4096, vocab 32k, tied embeddings: 276M parameters) runs the engine's own
`mast.unlearn.train_step` (NPO + retain NLL, the default spec) in four settings on the same
batches, measured in one process and interleaved round by round (so a busy, shared CPU
slows every setting alike):

- ``full``: every parameter trains (the baseline);
- ``top8 random``: 8 attention projections drawn with a seed (what the `random` rule picks);
- ``top8 low``: the 8 projections of layers 0-1 (worst case: backward reaches layer 0);
- ``top8 high``: the 8 projections of the last two layers (best case).

Autograd stops the backward pass at the lowest trainable tensor and computes weight
gradients for the trainable tensors only, and AdamW touches only them, so a top-k step
costs forward + activation-gradient backward down to that layer, against forward + full
backward + an optimizer pass over every parameter for ``full``.

It prints, per setting, the best (and median) wall and CPU (process) seconds per step, the AdamW state
(bytes) and the ratios to ``full``; then the AdamW state for k = 4, 8, 16 (8 bytes per
selected parameter: it grows with k).

    .venv/bin/python benchmarks/unlearn.py                    # CPU defaults (~4 min idle, ~10 min on a busy 2-core box)
    .venv/bin/python benchmarks/unlearn.py --device cuda --layers 28 --hidden 1536 --seq 512 --batch 4
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time

import torch

from mast.config import UnlearnSpec
from mast.unlearn import (
    make_optimizer,
    optimizer_state_bytes,
    prepare_model,
    train_step,
    trainable_parameters,
)

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def build(args):
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


def selection(names: list[str], chosen: list[str] | None) -> dict:
    if chosen is None:
        return {"rule": "full", "all_parameters": True, "candidates": []}
    return {"rule": "mast", "k": len(chosen), "all_parameters": False,
            "candidates": [{"name": n, "selected": n in chosen} for n in names]}


def batches(args, device, n):
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        def one():
            ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
            mask = torch.zeros_like(ids)
            mask[:, args.seq // 2:] = 1  # prompt = first half, completion = second half
            return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                    "completion_mask": mask.to(device)}
        fb, rb = one(), one()
        out.append((fb, torch.full((args.batch,), -float(args.seq), device=device), rb))
    return out


def settings(names: list[str], k: int) -> dict[str, list[str] | None]:
    top_random = sorted(random.Random(0).sample(names, k), key=names.index)
    return {"full": None, f"top{k} random": top_random, f"top{k} low": names[:k], f"top{k} high": names[-k:]}


def measure(args, device, data) -> dict:
    """One model; each setting has its own trainable set and AdamW; settings alternate per round."""
    model = build(args)
    names = [n for n, _ in model.named_parameters() if n.split(".")[-2] in ATTN and n.endswith("weight")]
    use_amp = device.type == "cuda"
    sets = settings(names, args.k)
    everything = trainable_parameters(model, selection(names, None))
    prepare_model(model, everything, device, use_amp, gradient_checkpointing=use_amp)
    spec = UnlearnSpec(objective="npo", retain="nll", lr=1e-5, batch_size=args.batch)
    runs = {}
    for name, chosen in sets.items():
        tr = trainable_parameters(model, selection(names, chosen))
        params = list(tr.values())
        opt, sched = make_optimizer(params, spec)
        runs[name] = {"params": params, "opt": opt, "sched": sched, "wall": [], "cpu": [], "chosen": chosen}
    order = list(runs)
    for rnd in range(args.warmup + args.steps):
        for name in order[rnd % len(order):] + order[: rnd % len(order)]:  # rotate who goes first
            r = runs[name]
            model.zero_grad(set_to_none=True)
            model.requires_grad_(False)
            for p in r["params"]:
                p.requires_grad_(True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            w, c = time.perf_counter(), time.process_time()
            train_step(model, r["opt"], r["sched"], r["params"], spec, [data[rnd % len(data)]], rnd + 1, "nll",
                       None, use_amp)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rnd >= args.warmup:
                r["wall"].append(time.perf_counter() - w)
                r["cpu"].append(time.process_time() - c)
    out = {}
    for name, r in runs.items():
        out[name] = {"trainable": sum(p.numel() for p in r["params"]), "state_bytes": optimizer_state_bytes(r["opt"]),
                     "wall": min(r["wall"]), "wall_median": statistics.median(r["wall"]), "cpu": min(r["cpu"]),
                     "walls": r["wall"], "chosen": r["chosen"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5, help="timed rounds (one step of each setting per round)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    probe = build(args)
    names = [n for n, _ in probe.named_parameters() if n.split(".")[-2] in ATTN and n.endswith("weight")]
    total = sum(p.numel() for p in probe.parameters())
    del probe
    gc.collect()
    print(f"model: Qwen2 hidden {args.hidden}, {args.layers} layers, heads {args.heads}/{args.kv_heads}, "
          f"MLP {args.intermediate}, vocab {args.vocab}: {total / 1e6:.1f}M parameters; per step {args.batch} forget + "
          f"{args.batch} retain texts x {args.seq} tokens (half completion); NPO + retain NLL; device {device}, "
          f"threads {torch.get_num_threads()}; {args.steps} timed rounds after {args.warmup} warm-up")
    data = batches(args, device, 4)
    runs = measure(args, device, data)
    short = ", ".join(n.removeprefix("model.layers.").removesuffix(".weight").replace("self_attn.", "")
                      for n in runs[f"top{args.k} random"]["chosen"])
    print(f"top{args.k} random = {short}")
    base = runs["full"]
    print("\nseconds per step: best of the timed rounds (least disturbed on a shared CPU) and median; "
          "speed-up = full / setting")
    print(f"{'setting':<16}{'trainable':>11}{'AdamW state':>14}{'state ratio':>13}{'wall best':>11}{'median':>9}"
          f"{'CPU best':>10}{'speed-up wall':>15}{'(median)':>10}{'CPU':>8}")
    for name, r in runs.items():
        print(f"{name:<16}{r['trainable'] / 1e6:>10.2f}M{r['state_bytes'] / 2**20:>11.1f}MiB"
              f"{r['state_bytes'] / base['state_bytes']:>13.4f}{r['wall']:>10.2f}s{r['wall_median']:>8.2f}s"
              f"{r['cpu']:>9.2f}s{base['wall'] / r['wall']:>14.2f}x{base['wall_median'] / r['wall_median']:>9.2f}x"
              f"{base['cpu'] / r['cpu']:>7.2f}x")
    print("  wall seconds per round: " + "; ".join(
        f"{n}: {', '.join(f'{t:.2f}' for t in r['walls'])}" for n, r in runs.items()))

    # optimizer state vs k: 8 bytes per selected parameter (+ 4 per tensor for AdamW's `step`)
    print("\nAdamW state vs k (q_proj tensors of the first k layers, all the same shape):")
    model = build(args)
    q_names = [n for n in names if ".q_proj." in n]
    for k in (4, 8, 16):
        tr = trainable_parameters(model, selection(names, q_names[:k]))
        model.requires_grad_(False)
        for p in tr.values():
            p.requires_grad_(True)
            p.grad = torch.zeros_like(p)  # materialise AdamW's state without a forward pass
        opt, _ = make_optimizer(list(tr.values()), UnlearnSpec())
        opt.step()
        n_sel = sum(p.numel() for p in tr.values())
        b = optimizer_state_bytes(opt)
        print(f"  k={k:<3} selected {n_sel / 1e6:6.2f}M params  state {b / 2**20:7.2f} MiB  "
              f"bytes/param {b / n_sel:.4f}  vs full {b / base['state_bytes']:.4f}")
        for p in tr.values():
            p.grad = None
        del opt, tr


if __name__ == "__main__":
    main()
