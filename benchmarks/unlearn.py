"""Step time and optimizer-state memory of MAST top-k (k = 8) against full-parameter unlearning.

A randomly initialised model with Qwen2 shapes (default: hidden 1024, 16 layers, GQA 16/4
heads, MLP 4096, vocab 32k, tied embeddings: ~0.28B parameters) runs the engine's own
`mast.unlearn.train_step` (NPO + retain NLL, the default spec) in three settings, in one
process, on the same batches:

- ``full``: every parameter trains (the baseline);
- ``top8 random``: 8 attention projections drawn with a seed (what the `random` rule picks);
- ``top8 low``: 8 attention projections including layer 0 (worst case for top-k: the
  backward pass has to reach the first layer).

It prints, per setting, the median step time, the AdamW state (bytes), the trainable
parameter count, and the ratios to ``full``. Optimizer state for k = 4, 8, 16 shows the state
grows with the selected parameters (∝ k for same-shaped tensors).

    .venv/bin/python benchmarks/unlearn.py                    # CPU defaults (a few minutes)
    .venv/bin/python benchmarks/unlearn.py --device cuda --layers 24 --hidden 1536 --seq 512 --batch 4
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


def measure(args, chosen, device, data):
    model = build(args)
    names = [n for n, _ in model.named_parameters() if n.split(".")[-2] in ATTN and n.endswith("weight")]
    use_amp = device.type == "cuda"
    trainable = trainable_parameters(model, selection(names, chosen))
    prepare_model(model, trainable, device, use_amp, gradient_checkpointing=use_amp)
    spec = UnlearnSpec(objective="npo", retain="nll", lr=1e-5, batch_size=args.batch)
    params = list(trainable.values())
    opt, sched = make_optimizer(params, spec)
    times = []
    for step in range(1, args.warmup + args.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        train_step(model, opt, sched, params, spec, [data[(step - 1) % len(data)]], step, "nll", None, use_amp)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step > args.warmup:
            times.append(time.perf_counter() - t)
    res = {"n_params": sum(p.numel() for p in model.parameters()), "trainable": sum(p.numel() for p in params),
           "state_bytes": optimizer_state_bytes(opt), "step_s": statistics.median(times), "times": times}
    del model, opt, sched, trainable, params
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per setting (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    probe = build(args)
    names = [n for n, _ in probe.named_parameters() if n.split(".")[-2] in ATTN and n.endswith("weight")]
    shapes = {n: tuple(p.shape) for n, p in probe.named_parameters()}
    total = sum(p.numel() for p in probe.parameters())
    del probe
    rng = random.Random(0)
    top_random = sorted(rng.sample(names, args.k), key=names.index)
    top_low = names[: args.k]  # layers 0-1: every backward pass reaches the embeddings' output
    print(f"model: Qwen2 hidden {args.hidden}, {args.layers} layers, heads {args.heads}/{args.kv_heads}, "
          f"MLP {args.intermediate}, vocab {args.vocab}: {total / 1e6:.1f}M parameters; batch {args.batch} x "
          f"{args.seq} tokens (half completion); NPO + retain NLL; device {device}, threads {torch.get_num_threads()}")
    print(f"top{args.k} random: {', '.join(n.removeprefix('model.layers.').removesuffix('.weight') for n in top_random)}")

    data = batches(args, device, 4)
    runs = {
        "full": measure(args, None, device, data),
        f"top{args.k} random": measure(args, top_random, device, data),
        f"top{args.k} low (layer 0-1)": measure(args, top_low, device, data),
    }
    base = runs["full"]
    print(f"\n{'setting':<24}{'trainable':>14}{'AdamW state':>14}{'step (median)':>16}{'state ratio':>14}"
          f"{'speed-up':>11}")
    for name, r in runs.items():
        print(f"{name:<24}{r['trainable'] / 1e6:>13.2f}M{r['state_bytes'] / 2**20:>12.1f}MiB{r['step_s']:>15.3f}s"
              f"{r['state_bytes'] / base['state_bytes']:>14.4f}{base['step_s'] / r['step_s']:>10.2f}x")
    print("  (step times of each setting: " + "; ".join(
        f"{n}: {', '.join(f'{t:.3f}' for t in r['times'])}" for n, r in runs.items()) + ")")

    # optimizer state vs k: exactly 8 bytes per selected parameter (+ 4 per tensor for `step`)
    print("\nAdamW state vs k (same seed order of random attention tensors; q/o are larger than k/v):")
    order = names[:]
    random.Random(0).shuffle(order)
    for k in (4, 8, 16):
        sel = order[:k]
        n_sel = sum(torch.Size(shapes[n]).numel() for n in sel)
        model = build(args)
        tr = trainable_parameters(model, selection(names, sel))
        prepare_model(model, tr, torch.device("cpu"), False, False)
        opt, sched = make_optimizer(list(tr.values()), UnlearnSpec())
        for p in tr.values():  # materialise AdamW's state without a forward pass
            p.grad = torch.zeros_like(p)
        opt.step()
        b = optimizer_state_bytes(opt)
        print(f"  k={k:<3} selected {n_sel / 1e6:6.2f}M params  state {b / 2**20:7.2f} MiB  "
              f"bytes/param {b / n_sel:.4f}  vs full {b / base['state_bytes']:.4f}")
        del model, opt, tr
        gc.collect()


if __name__ == "__main__":
    main()
