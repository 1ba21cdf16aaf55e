"""Mechanism diagnostics: how the SFT update and the RLVR increment differ (`mast diagnose`).

Two views, for the matched triple base -> reference (SFT) -> target (RLVR):

- Behaviour: per-token change of the log-probability of the forget solutions (prompt tokens
  masked, texts built by `mast.prompts.problem_pair`), for the SFT update
  Δ_sft = log p_reference - log p_base and the RLVR increment Δ_rlvr = log p_target -
  log p_reference; summarised by mean, quantiles and the share of tokens with |Δ| > threshold,
  and plotted as histograms.
- Weights: for every candidate tensor, the rho-energy curve of the reference weight (fraction
  of ||W||_F^2 in its top ceil(rho min(m, n)) singular values, as a function of rho) and the
  off-principal energy of each update relative to the weight it was applied to (SFT: W_base,
  D = W_ref - W_base; RLVR: W_ref, D = W_target - W_ref), from the cached spectral statistics.

Outputs (written atomically into OUT): diagnostics.json, tokens.jsonl (per-problem token
deltas), delta_logprob_hist.png, energy_curves.png, off_principal.png.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mast.batching import encode_problems, in_order, pad_id_of, per_token_logprobs, to_device
from mast.energy import normalized_from_raw
from mast.files import InputError, atomic_dir, check_output_path, read_jsonl, write_json, write_jsonl
from mast.hub import resolve_model
from mast.models import DEFAULT_PATTERNS, check_model_dir
from mast.prompts import TEMPLATES
from mast.selection import _check_forget, default_device, spectral_stats
from mast.signals import rank_percentiles

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
PROJ_COLORS = {"q_proj": "#1f77b4", "k_proj": "#ff7f0e", "v_proj": "#2ca02c", "o_proj": "#d62728"}


# --------------------------------------------------------------------------- pure summaries


def delta_summary(delta: Sequence[float] | np.ndarray, threshold: float = 0.1) -> dict:
    """mean, std, mean |Δ|, quantiles, and the shares of tokens with |Δ| > t, Δ > t, Δ < -t."""
    d = np.asarray(delta, dtype=np.float64).ravel()
    if d.size == 0:
        return {"n_tokens": 0}
    return {
        "n_tokens": int(d.size),
        "mean": float(d.mean()),
        "std": float(d.std()),
        "mean_abs": float(np.abs(d).mean()),
        "quantiles": {f"q{round(q * 100):02d}": float(np.quantile(d, q)) for q in QUANTILES},
        "threshold": threshold,
        "share_moved": float((np.abs(d) > threshold).mean()),
        "share_up": float((d > threshold).mean()),
        "share_down": float((d < -threshold).mean()),
    }


def projection_of(name: str) -> str:
    """`q_proj` for `model.layers.3.self_attn.q_proj.weight`; the module's last name otherwise."""
    parts = name.removesuffix(".weight").split(".")
    return parts[-1] if parts else name


# --------------------------------------------------------------------------- model passes


def _tokenizer_vocab(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def solution_logprobs(model_dir, tokenizer, forget: Sequence[dict], template: str = "qwen_boxed",
                        max_length: int = 1024, batch_size: int = 8, device: str | None = None,
                        desc: str = "log-probs", progress: bool = True) -> list[np.ndarray]:
    """Per problem, log p(token) of each solution token under the model in `model_dir` (float32 model).

    Scored by :func:`mast.batching.per_token_logprobs`, the log-probs the unlearning loop uses.
    """
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    dev = device or default_device()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(dev)
    model.eval()
    batches = in_order(encode_problems(tokenizer, forget, template, max_length), batch_size, pad_id_of(tokenizer))
    out: list[np.ndarray] = []
    with torch.no_grad():
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, file=sys.stderr):
            out += [lp.cpu().numpy().astype(np.float64) for lp in per_token_logprobs(model, to_device(batch, dev))]
    del model
    return out


def _check_same_tokenizer(dirs: dict[str, Path]):
    toks = {role: _tokenizer_vocab(d) for role, d in dirs.items()}
    ref = toks["reference"]
    for role, tok in toks.items():
        if tok.get_vocab() != ref.get_vocab():
            raise InputError(f"{dirs[role]}: {role} tokenizer differs from the reference's; "
                             "per-token log-probs need one tokenizer")
    return ref


# --------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_delta_hist(sft: np.ndarray, rlvr: np.ndarray, threshold: float, path: Path) -> None:
    """Left: histograms of per-token Δ; right: share of tokens with |Δ| > t as a function of t."""
    plt = _plt()
    both = np.concatenate([sft, rlvr])
    lo, hi = np.quantile(both, [0.001, 0.999]) if both.size else (-1.0, 1.0)
    span = max(abs(lo), abs(hi), 2 * threshold, 1e-6)
    bins = np.linspace(-span, span, 81)
    series = ((sft, "SFT update (reference − base)", "#1f77b4"),
              (rlvr, "RLVR increment (target − reference)", "#d62728"))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [1.5, 1]})
    for data, label, color in series:
        ax.hist(np.clip(data, -span, span), bins=bins, histtype="stepfilled", alpha=0.35, color=color,
                edgecolor=color, linewidth=1.2, label=f"{label}, mean {data.mean():+.3f}")
    for x in (-threshold, threshold):
        ax.axvline(x, color="0.3", linestyle="--", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("Δ log p per solution token (nats; outer 0.1% clipped to the edges)")
    ax.set_ylabel("tokens (log scale)")
    ax.set_title("Distribution of per-token Δ log p", fontsize=10)
    ax.grid(alpha=0.3)

    mags = np.abs(both[both != 0])
    t_lo = max(float(np.quantile(mags, 0.01)) if mags.size else 1e-4, 1e-6)
    t_hi = max(float(mags.max()) if mags.size else 1.0, t_lo * 10)
    ts = np.geomspace(t_lo, t_hi, 200)
    for data, label, color in series:
        a = np.sort(np.abs(data))
        share = 1.0 - np.searchsorted(a, ts, side="right") / max(a.size, 1)
        moved = float((a > threshold).mean()) if a.size else 0.0
        ax2.plot(ts, 100 * share, color=color, linewidth=1.6,
                 label=f"{label.split(' (')[0]}: {100 * moved:.1f}% above {threshold:g}")
    ax2.axvline(threshold, color="0.3", linestyle="--", linewidth=0.8)
    ax2.set_xscale("log")
    ax2.set_ylim(0, 100)
    ax2.set_xlabel("threshold t on |Δ log p| (nats, log scale)")
    ax2.set_ylabel("tokens with |Δ log p| > t (%)")
    ax2.set_title("Share of tokens that move", fontsize=10)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8, loc="lower left")
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8.5, frameon=False)
    fig.suptitle(f"Forget-set solutions: how the SFT update and the RLVR increment change log p "
                 f"({sft.size} tokens)", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_energy_curves(curves: dict[str, list[float]], grid: list[float], rho: float, path: Path) -> None:
    """Every tensor's rho-energy curve (thin), the median per projection type (bold)."""
    from matplotlib.lines import Line2D

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    by_proj: dict[str, list[list[float]]] = {}
    for name, curve in curves.items():
        by_proj.setdefault(projection_of(name), []).append(curve)
    handles = []
    for proj, cs in by_proj.items():
        color = PROJ_COLORS.get(proj, "0.5")
        for c in cs:
            ax.plot(grid, c, color=color, alpha=0.25, linewidth=0.7)
        ax.plot(grid, np.median(np.asarray(cs), axis=0), color=color, linewidth=2.0)
        handles.append(Line2D([], [], color=color, linewidth=2.0, label=f"{proj} (median of {len(cs)})"))
    ax.plot([0, 1], [0, 1], color="0.55", linestyle=":", linewidth=1.0)
    handles.append(Line2D([], [], color="0.55", linestyle=":", label="flat spectrum"))
    ax.axvline(rho, color="0.2", linestyle="--", linewidth=0.9)
    handles.append(Line2D([], [], color="0.2", linestyle="--", label=f"rho = {rho:g} (selection)"))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("rho: fraction of singular values kept (top ceil(rho · min(m, n)))")
    ax.set_ylabel("fraction of ||W||²_F in those singular values")
    ax.set_title(f"Spectral energy curves of the reference (SFT) weights, {len(curves)} tensors", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_off_principal(sft: dict[str, float], rlvr: dict[str, float], rho: float, path: Path) -> None:
    """Per tensor: share of the update's energy inside the top-r block, SFT vs RLVR (log-log).

    Plotted as 1 - off-principal energy because the energy itself crowds near 1: an isotropic
    increment of a square matrix keeps only rho^2 of its energy in the r x r block.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 5.4))
    floor = 1e-6
    names = [n for n in rlvr if n in sft]
    xs = np.clip([1.0 - sft[n] for n in names], floor, 1.0)
    ys = np.clip([1.0 - rlvr[n] for n in names], floor, 1.0)
    seen = set()
    for n, x, y in zip(names, xs, ys, strict=True):
        proj = projection_of(n)
        ax.scatter(x, y, s=20, color=PROJ_COLORS.get(proj, "0.5"), alpha=0.8, label=proj if proj not in seen else None)
        seen.add(proj)
    vals = np.concatenate([xs, ys, [rho * rho]]) if names else np.array([rho * rho])
    lo, hi = max(vals.min() / 3, floor), min(vals.max() * 3, 1.0)
    ax.plot([lo, hi], [lo, hi], color="0.4", linestyle="--", linewidth=0.8, label="equal share")
    ax.axhline(rho * rho, color="0.6", linestyle=":", linewidth=1.0, label=f"isotropic increment (square): rho² = {rho * rho:.2g}")
    ax.axvline(rho * rho, color="0.6", linestyle=":", linewidth=1.0)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("SFT update: share of ||D||² in the top-r block of W_base")
    ax.set_ylabel("RLVR increment: share of ||D||² in the top-r block of W_SFT")
    ax.set_title(f"Principal-subspace share of each update (= 1 − off-principal energy, rho = {rho:g})", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7.5, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# --------------------------------------------------------------------------- orchestration


RANKED_SIGNALS = ("off_principal_energy", "off_principal_normalized", "update_magnitude")


def projection_ranks(rows: Sequence[dict], signals: Sequence[str] = RANKED_SIGNALS) -> dict:
    """Where each projection type ranks under each signal, over the moved candidates.

    {signal: {"mean_percentile": {proj: mean rank percentile (1 = top)}, "top_quarter": {proj: share
    of the top quarter}}}: a signal that ranks by shape puts all of k/v (or q/o) on top.
    """
    moved = [r for r in rows if r["moved"]]
    out = {}
    for sig in signals:
        if not moved:
            out[sig] = {"mean_percentile": {}, "top_quarter": {}}
            continue
        pct = rank_percentiles([r[sig] for r in moved])
        by_proj: dict[str, list[float]] = {}
        for r, p in zip(moved, pct, strict=True):
            by_proj.setdefault(projection_of(r["name"]), []).append(float(p))
        top = sorted(range(len(moved)), key=lambda i: (-moved[i][sig], moved[i]["name"]))[:max(1, len(moved) // 4)]
        share: dict[str, float] = {}
        for i in top:
            proj = projection_of(moved[i]["name"])
            share[proj] = share.get(proj, 0.0) + 1.0 / len(top)
        out[sig] = {"mean_percentile": {k: float(np.mean(v)) for k, v in sorted(by_proj.items())},
                    "top_quarter": dict(sorted(share.items()))}
    return out


def _signal_rows(stats: dict) -> list[dict]:
    """Per candidate of cached spectral statistics: its shape, signals and whether it moved."""
    return [{"name": c["name"], "shape": c["shape"], "update_magnitude": c["update_magnitude"],
             "off_principal_energy": c["off_principal_energy"],
             "off_principal_normalized": normalized_from_raw(c["off_principal_energy"], c["shape"], c["r"]),
             "moved": c["norm_d"] > 0}
            for c in stats["candidates"]]


def _mean_moved(rows: list[dict], key: str) -> float | None:
    """Mean of `key` over the candidates that moved (None when none did)."""
    vals = [r[key] for r in rows if r["moved"]]
    return float(np.mean(vals)) if vals else None


def _check_options(rho: float, threshold: float, template: str, max_length: int, batch_size: int) -> None:
    if not 0.0 < rho <= 1.0:
        raise InputError(f"rho: must be in (0, 1], got {rho}")
    if threshold < 0:
        raise InputError(f"threshold: must be >= 0, got {threshold}")
    if template not in TEMPLATES:
        raise InputError(f"template: unknown {template!r}; known: {sorted(TEMPLATES)}")
    if max_length < 2 or batch_size < 1:
        raise InputError("max_length must be >= 2 and batch_size >= 1")


def diagnose(base, reference, target, forget: Sequence[dict], out_dir, rho: float = 0.05, threshold: float = 0.1,
             template: str = "qwen_boxed", max_length: int = 1024, batch_size: int = 8,
             patterns: Sequence[str] = DEFAULT_PATTERNS, cache_dir=None, device: str | None = None,
             progress: bool = True) -> dict:
    """Compute the diagnostics and write them into `out_dir` (atomically); returns diagnostics.json's dict."""
    dirs = {"base": check_model_dir(base, "base"), "reference": check_model_dir(reference, "reference"),
            "target": check_model_dir(target, "target")}
    _check_forget(forget)
    _check_options(rho, threshold, template, max_length, batch_size)
    tok = _check_same_tokenizer(dirs)

    # spectral statistics first: a shape mismatch fails before any forward pass
    sft_spec = spectral_stats(base, reference, rho, cache_dir, patterns, device=device, progress=progress)
    rl_spec = spectral_stats(reference, target, rho, cache_dir, patterns, device=device, progress=progress,
                             curves=True)

    lp = {role: solution_logprobs(d, tok, forget, template, max_length, batch_size, device,
                                    desc=f"log-probs ({role})", progress=progress) for role, d in dirs.items()}
    d_sft = [r - b for r, b in zip(lp["reference"], lp["base"], strict=True)]
    d_rl = [t - r for t, r in zip(lp["target"], lp["reference"], strict=True)]
    flat_sft = np.concatenate(d_sft) if d_sft else np.zeros(0)
    flat_rl = np.concatenate(d_rl) if d_rl else np.zeros(0)
    if flat_sft.size == 0:
        raise InputError(f"forget: no solution tokens within max_length={max_length}")
    seq_sft = np.array([d.sum() for d in d_sft])
    seq_rl = np.array([d.sum() for d in d_rl])

    sft_rows, rl_rows = _signal_rows(sft_spec), _signal_rows(rl_spec)
    curves = {c["name"]: c["energy_curve"] for c in rl_spec["candidates"]}
    grid = rl_spec["curve_rho"]
    idx = int(round(rho * (len(grid) - 1)))
    result = {
        "base": str(base), "reference": str(reference), "target": str(target), "n_forget": len(forget),
        "template": template, "max_length": max_length, "rho": rho, "threshold": threshold,
        "logprob_delta": {"sft": delta_summary(flat_sft, threshold), "rlvr": delta_summary(flat_rl, threshold)},
        "sequence_logprob_delta": {"sft": delta_summary(seq_sft, threshold),
                                   "rlvr": delta_summary(seq_rl, threshold)},
        "mean_logprob": {role: float(np.concatenate(v).mean()) for role, v in lp.items()},
        "weights": {
            "sft": {"mean_update_magnitude": _mean_moved(sft_rows, "update_magnitude"),
                    "mean_off_principal_energy": _mean_moved(sft_rows, "off_principal_energy"),
                    "candidates": sft_rows},
            "rlvr": {"mean_update_magnitude": _mean_moved(rl_rows, "update_magnitude"),
                     "mean_off_principal_energy": _mean_moved(rl_rows, "off_principal_energy"),
                     "candidates": rl_rows},
        },
        "projection_ranks": {"sft": projection_ranks(sft_rows), "rlvr": projection_ranks(rl_rows)},
        "energy_curves": {"rho": grid, "reference": curves,
                          "mean_at_rho": float(np.mean([c[idx] for c in curves.values()])) if curves else None},
        "figures": ["delta_logprob_hist.png", "energy_curves.png", "off_principal.png"],
    }
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "diagnostics.json", result)
        write_jsonl(tmp / "tokens.jsonl", [
            {"id": p.get("id", i), "sft": np.round(a, 6).tolist(), "rlvr": np.round(b, 6).tolist()}
            for i, (p, a, b) in enumerate(zip(forget, d_sft, d_rl, strict=True))
        ])
        plot_delta_hist(flat_sft, flat_rl, threshold, tmp / "delta_logprob_hist.png")
        plot_energy_curves(curves, grid, rho, tmp / "energy_curves.png")
        plot_off_principal({r["name"]: r["off_principal_energy"] for r in sft_rows if r["moved"]},
                           {r["name"]: r["off_principal_energy"] for r in rl_rows if r["moved"]}, rho,
                           tmp / "off_principal.png")
    return result


def format_summary(result: dict) -> str:
    lines = [f"{'':26}{'SFT update':>14}{'RLVR increment':>16}"]
    s, r = result["logprob_delta"]["sft"], result["logprob_delta"]["rlvr"]
    thr = result["threshold"]
    for label, key in (("mean Δlog-prob / token", "mean"), ("mean |Δ| / token", "mean_abs")):
        lines.append(f"{label:<26}{s[key]:>14.4f}{r[key]:>16.4f}")
    lines.append(f"{f'tokens with |Δ| > {thr:g}':<26}{100 * s['share_moved']:>13.1f}%{100 * r['share_moved']:>15.1f}%")
    ws, wr = result["weights"]["sft"], result["weights"]["rlvr"]

    def fmt(x, spec):
        return format(x, spec) if x is not None else "n/a"

    lines.append(f"{'mean |D|/|W| (moved)':<26}{fmt(ws['mean_update_magnitude'], '>14.3e')}"
                 f"{fmt(wr['mean_update_magnitude'], '>16.3e')}")
    lines.append(f"{'mean off-principal energy':<26}{fmt(ws['mean_off_principal_energy'], '>14.4f')}"
                 f"{fmt(wr['mean_off_principal_energy'], '>16.4f')}")
    ranks = result.get("projection_ranks", {}).get("rlvr", {})
    if ranks:
        lines.append("RLVR increment, share of the top quarter by projection type:")
        for sig, r in ranks.items():
            lines.append(f"  {sig:<26}" + "  ".join(f"{p} {v:.2f}" for p, v in r["top_quarter"].items()))
    return "\n".join(lines)


def cli_diagnose(args) -> int:
    check_output_path(args.out, kind="dir")
    forget = read_jsonl(args.forget, required=("prompt", "solution"))
    if not forget:
        raise InputError(f"{args.forget}: no problems")
    for f in ("base", "reference", "target"):  # folders or Hub ids
        setattr(args, f, resolve_model(getattr(args, f), f"--{f}"))
    result = diagnose(args.base, args.reference, args.target, forget, args.out, rho=args.rho,
                      threshold=getattr(args, "threshold", 0.1), template=getattr(args, "template", "qwen_boxed"),
                      max_length=getattr(args, "max_length", 1024), batch_size=getattr(args, "batch_size", 8),
                      cache_dir=getattr(args, "cache_dir", None))
    print(format_summary(result))
    print(f"wrote {Path(args.out) / 'diagnostics.json'} and {len(result['figures'])} figures")
    return 0

