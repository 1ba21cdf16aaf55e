"""Which tensors to unlearn: the cached signal statistics, the selection rules, and `mast select`.

The signals themselves (update magnitude, off-principal energy, forget coupling, the MAST
score) are pure functions in :mod:`mast.signals`. Here are the two trial-independent,
disk-cached stages that feed them (`spectral_stats`: the checkpoints streamed one tensor at a
time; `coupling_stats`: one batched backward pass of the target on the forget texts, through
the NLL of :mod:`mast.batching`), the rule registry `RULES` (keyed by
:data:`mast.registry.RULE_NAMES`), `select` and the CLI.

Selection policy (documented choices):
- Signal rules (`mast`, `off_principal`, `magnitude`, `coupling`) never select a tensor
  with D = 0: it scores lowest (score 0) and is ineligible. When k exceeds the number of
  tensors that moved, only the moved ones are selected and the selection says so in
  `warnings` (padding with unmoved tensors would be arbitrary).
- `random` draws a priority per candidate from numpy's Generator(seed) in inventory order
  and takes the k highest, among all candidates (it is the signal-blind control).
- `attention` selects every candidate, `full` every parameter (`all_parameters: true`);
  both ignore k.
- Ties are broken by score (descending), then name (ascending).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from mast.batching import completion_logprobs, completion_nll, encode_problems, in_order, pad_id_of, to_device
from mast.config import SelectionSpec, merge_spec, validate
from mast.energy import normalized_from_raw
from mast.files import (
    InputError,
    cache_root,
    check_output_path,
    fingerprint_model,
    read_json,
    read_jsonl,
    stable_hash,
    write_json,
)
from mast.hub import resolve_model
from mast.models import DEFAULT_PATTERNS, check_model_dir, matched_inventory
from mast.prompts import TEMPLATES
from mast.registry import RULE_FACTS, uses_k
from mast.signals import CURVE_POINTS, SIGNALS, coupling, mast_score, rank_for, tensor_signals

SPECTRAL_VERSION = 1
COUPLING_VERSION = 1


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# =========================================================================== spectral statistics (cached)


def _spectral_key(ref_fp: str, tgt_fp: str, rho: float, patterns: Sequence[str], method: str, curves: bool) -> str:
    return stable_hash({"v": SPECTRAL_VERSION, "reference": ref_fp, "target": tgt_fp, "rho": float(rho),
                        "patterns": list(patterns), "method": method, "curves": bool(curves)})


def _read_cached(paths: dict) -> dict:
    """{key: entry with cache_hit=True} for every readable cache file (a corrupt one is recomputed)."""
    out = {}
    for key, path in paths.items():
        if path.is_file():
            try:
                out[key] = {**read_json(path), "cache_hit": True}
            except InputError:
                pass
    return out


def _stream_pairs(reference, target, patterns: Sequence[str], method: str, device: str | None, progress: bool):
    """(candidate, W, D = W_target - W) per candidate tensor, one at a time on `device`.

    The fast path works in float32 when both tensors are bf16/fp16 (those weights and their
    difference are exact in it), float64 otherwise.
    """
    from tqdm import tqdm

    dev = device or default_device()
    cands, ref_store, tgt_store = matched_inventory(reference, target, patterns)
    for c in tqdm(cands, desc="spectral stats", unit="tensor", disable=not progress, file=sys.stderr):
        rkey, tkey = c.key_in(ref_store), c.key_in(tgt_store)
        half = {ref_store.dtype(rkey), tgt_store.dtype(tkey)} <= {"BF16", "F16"}
        dtype = torch.float32 if method == "fast" and half else torch.float64
        W = ref_store.get(rkey, dtype=dtype, device=dev)
        D = tgt_store.get(tkey, dtype=dtype, device=dev)
        D.sub_(W)
        if W.dim() != 2:
            raise InputError(f"{reference}: candidate {c.name} is not a matrix (shape {list(W.shape)})")
        yield c, W, D
        del W, D  # one tensor pair in memory at a time


def spectral_rows(pairs: Iterable, rhos: Sequence[float], method: str = "fast", curves: bool = False) -> dict:
    """{rho: [candidate row]} from (candidate, W, D) pairs: :func:`mast.signals.tensor_signals` per tensor."""
    rows: dict[float, list[dict]] = {rho: [] for rho in rhos}
    for c, W, D in pairs:
        ranks = [rank_for(rho, W.shape) for rho in rhos]
        sig = tensor_signals(W, D, ranks, method, curves)
        for rho, r, e in zip(rhos, ranks, sig["energies"], strict=True):
            rows[rho].append({
                "name": c.name, "shape": list(c.shape), "norm_w": sig["norm_w"], "norm_d": sig["norm_d"],
                "update_magnitude": sig["update_magnitude"], "off_principal_energy": e, "r": r,
                "method": sig["method"], "iterations": sig["iterations"], "energy_curve": sig["energy_curve"],
            })
        del W, D
    return rows


def spectral_stats_multi(
    reference: str | os.PathLike, target: str | os.PathLike, rhos: Iterable[float],
    cache_dir: str | os.PathLike | None = None, patterns: Sequence[str] = DEFAULT_PATTERNS,
    method: str = "fast", device: str | None = None, progress: bool = True, curves: bool = False,
) -> dict[float, dict]:
    """Spectral statistics for several rho at once (one subspace per tensor, at the largest r).

    Each rho gets its own cache file `cache_root(cache_dir)/spectral/<hash>.json`, keyed by
    the fingerprints of both checkpoints, rho, the candidate patterns and the method, so a
    sweep's prepare step can fill the cache for every rho of its grid in one pass.
    `curves=True` adds each tensor's energy curve (the full spectrum of W: a diagnostic that
    costs the fast path about as much again; `select` does not need it).
    """
    rhos = sorted({float(r) for r in rhos})
    for rho in rhos:
        if not 0.0 < rho <= 1.0:
            raise InputError(f"rho: must be in (0, 1], got {rho}")
    if method not in ("fast", "exact"):
        raise InputError(f"method: unknown {method!r} (fast|exact)")
    check_model_dir(reference, "reference")
    check_model_dir(target, "target")
    patterns = list(patterns)
    ref_fp, tgt_fp = fingerprint_model(reference), fingerprint_model(target)
    folder = cache_root(cache_dir) / "spectral"
    paths = {rho: folder / f"{_spectral_key(ref_fp, tgt_fp, rho, patterns, method, curves)}.json" for rho in rhos}
    out = _read_cached(paths)
    todo = [rho for rho in rhos if rho not in out]
    if not todo:
        return out
    t0 = time.perf_counter()
    rows = spectral_rows(_stream_pairs(reference, target, patterns, method, device, progress), todo, method, curves)
    seconds = time.perf_counter() - t0
    for rho in todo:
        entry = {
            "version": SPECTRAL_VERSION, "reference": str(reference), "target": str(target),
            "fingerprints": {"reference": ref_fp, "target": tgt_fp}, "rho": rho, "patterns": patterns,
            "method": method, "seconds": round(seconds, 3),
            "curve_rho": [i / (CURVE_POINTS - 1) for i in range(CURVE_POINTS)], "candidates": rows[rho],
        }
        write_json(paths[rho], entry)
        out[rho] = {**entry, "cache_hit": False}
    return out


def spectral_stats(
    reference: str | os.PathLike, target: str | os.PathLike, rho: float = 0.05,
    cache_dir: str | os.PathLike | None = None, patterns: Sequence[str] = DEFAULT_PATTERNS,
    method: str = "fast", device: str | None = None, progress: bool = True, curves: bool = False,
) -> dict:
    """Per candidate: update magnitude, off-principal energy at rho (and energy curve); cached on disk.

    Trial-independent (a function of the two checkpoints, rho and the patterns only), so a
    sweep computes it once. Returns {"candidates": [{"name", "shape", "norm_w", "norm_d",
    "update_magnitude", "off_principal_energy", "r", "energy_curve" (None unless `curves`), ...}],
    "cache_hit", ...}.
    """
    return spectral_stats_multi(reference, target, [rho], cache_dir, patterns, method, device, progress,
                                curves)[float(rho)]


# =========================================================================== forget-gradient coupling (cached)


def _check_forget(forget: Sequence[dict], source: str = "forget") -> None:
    if not forget:
        raise InputError(f"{source}: no problems (the coupling signal needs forget texts)")
    for i, row in enumerate(forget):
        if not isinstance(row, dict):
            raise InputError(f"{source}[{i}]: expected a problem object")
        for key in ("prompt", "solution"):
            if not isinstance(row.get(key), str):
                raise InputError(f"{source}[{i}]: missing field {key!r}")


def coupling_stats(
    reference: str | os.PathLike, target: str | os.PathLike, forget: Sequence[dict],
    cache_dir: str | os.PathLike | None = None, patterns: Sequence[str] = DEFAULT_PATTERNS,
    template: str = "qwen_boxed", max_length: int = 1024, batch_size: int = 8,
    device: str | None = None, progress: bool = True,
) -> dict:
    """Per candidate: |<G, D>_F| and the cosine, G the gradient of the forget loss at the target.

    L_forget = (sum of completion-token NLL over all forget texts) / (number of those tokens):
    :func:`mast.batching.completion_nll`, the unlearning loop's NLL, accumulated over batches of
    `batch_size` (one backward pass per batch; the result does not depend on the batch size). Only candidate tensors require grad. Cached under
    `cache_root/coupling/` by both fingerprints, the forget texts, template, max_length, patterns.
    """
    _check_forget(forget)
    if template not in TEMPLATES:
        raise InputError(f"template: unknown {template!r}; known: {sorted(TEMPLATES)}")
    check_model_dir(reference, "reference")
    check_model_dir(target, "target")
    patterns = list(patterns)
    ref_fp, tgt_fp = fingerprint_model(reference), fingerprint_model(target)
    texts = [[p["prompt"], p["solution"]] for p in forget]
    key = stable_hash({"v": COUPLING_VERSION, "reference": ref_fp, "target": tgt_fp, "texts": texts,
                       "template": template, "max_length": max_length, "patterns": patterns})
    path = cache_root(cache_dir) / "coupling" / f"{key}.json"
    if path.is_file():
        try:
            return {**read_json(path), "cache_hit": True}
        except InputError:
            pass

    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = device or default_device()
    cands, ref_store, tgt_store = matched_inventory(reference, target, patterns)
    tok = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).to(dev)
    model.eval()
    model.requires_grad_(False)
    params = dict(model.named_parameters())
    missing = [c.name for c in cands if c.name not in params]
    if missing:
        raise InputError(f"{target}: candidate(s) {missing[:3]} are not parameters of the loaded model")
    for c in cands:
        params[c.name].requires_grad_(True)
    batches = in_order(encode_problems(tok, forget, template, max_length), batch_size, pad_id_of(tok))
    n_tokens = int(sum(int(b["completion_mask"][:, 1:].sum()) for b in batches))
    if n_tokens == 0:
        raise InputError(f"forget: no solution tokens within max_length={max_length}")
    total = 0.0
    t0 = time.perf_counter()
    for batch in tqdm(batches, desc="forget gradient", unit="batch", disable=not progress, file=sys.stderr):
        s, lengths, _ = completion_logprobs(model, to_device(batch, dev))
        completion_nll(s, lengths, n_tokens).backward()  # this batch's share of L_forget
        total -= float(s.detach().sum())
    rows = {}
    for c in cands:
        G = params[c.name].grad
        G = torch.zeros_like(params[c.name]) if G is None else G
        D = tgt_store.get(c.key_in(tgt_store), dtype=torch.float64, device=dev)
        D.sub_(ref_store.get(c.key_in(ref_store), dtype=torch.float64, device=dev))
        value, cosine = coupling(G, D)
        rows[c.name] = {"coupling": value, "coupling_cosine": cosine,
                        "grad_norm": float(torch.linalg.vector_norm(G.double()))}
    entry = {
        "version": COUPLING_VERSION, "reference": str(reference), "target": str(target),
        "fingerprints": {"reference": ref_fp, "target": tgt_fp}, "template": template, "max_length": max_length,
        "patterns": patterns, "forget_loss": total / n_tokens, "forget_tokens": n_tokens, "n_forget": len(forget),
        "seconds": round(time.perf_counter() - t0, 3), "candidates": rows,
    }
    del model, params
    write_json(path, entry)
    return {**entry, "cache_hit": False}


# =========================================================================== rules


def _moved(rows: Sequence[dict]) -> list[bool]:
    return [r["norm_d"] > 0 for r in rows]


def _top_k(rows: Sequence[dict], scores: Sequence[float], k: int, eligible: Sequence[bool]) -> list[bool]:
    """The k eligible rows with the highest score; ties by name."""
    order = sorted((i for i in range(len(rows)) if eligible[i]), key=lambda i: (-scores[i], rows[i]["name"]))
    chosen = set(order[:k])
    return [i in chosen for i in range(len(rows))]


def _signal_rule(signal: str):
    def rule(rows: Sequence[dict], spec: SelectionSpec) -> tuple[list[float], list[bool]]:
        moved = _moved(rows)
        scores = [float(r[signal]) if m else 0.0 for r, m in zip(rows, moved, strict=True)]
        return scores, _top_k(rows, scores, spec.k, moved)

    rule.__doc__ = f"Top-k moved tensors by {signal} (raw value is the score)."
    return rule


# the column each MAST signal ranks by: the off-principal signal is the shape-normalized energy
SCORE_COLUMNS = {"update_magnitude": "update_magnitude", "off_principal_energy": "off_principal_normalized",
                 "coupling": "coupling"}


def rule_mast(rows: Sequence[dict], spec: SelectionSpec) -> tuple[list[float], list[bool]]:
    """Top-k moved tensors by sum_s w_s pct_s / sum_s w_s (rank percentiles over all candidates);
    the off-principal signal enters as its shape-normalized value (:data:`SCORE_COLUMNS`)."""
    moved = _moved(rows)
    score = mast_score({s: [r[SCORE_COLUMNS[s]] for r in rows] for s in SIGNALS}, spec.weights)
    scores = [float(x) if m else 0.0 for x, m in zip(score, moved, strict=True)]
    return scores, _top_k(rows, scores, spec.k, moved)


def rule_random(rows: Sequence[dict], spec: SelectionSpec) -> tuple[list[float], list[bool]]:
    """k candidates by a uniform priority drawn from numpy.random.default_rng(seed), inventory order."""
    scores = np.random.default_rng(spec.seed).random(len(rows)).tolist()
    return scores, _top_k(rows, scores, spec.k, [True] * len(rows))


def rule_every(rows: Sequence[dict], spec: SelectionSpec) -> tuple[list[float], list[bool]]:
    """Every candidate tensor (ignores k); with `full` the selection also sets `all_parameters`."""
    return [1.0] * len(rows), [True] * len(rows)


def rule_none(rows: Sequence[dict], spec: SelectionSpec) -> tuple[list[float], list[bool]]:
    """`null`, the noise floor: nothing selected (the trial evaluates the target unchanged)."""
    return [0.0] * len(rows), [False] * len(rows)


# keyed by mast.registry.RULE_NAMES (a test checks); the facts (uses k, ranked, all parameters) live there
RULES = {
    "mast": rule_mast,
    "off_principal": _signal_rule("off_principal_normalized"),
    "off_principal_raw": _signal_rule("off_principal_energy"),
    "magnitude": _signal_rule("update_magnitude"),
    "coupling": _signal_rule("coupling"),
    "coupling_signed": _signal_rule("coupling_signed"),
    "random": rule_random,
    "attention": rule_every,
    "full": rule_every,
    "null": rule_none,
}


def apply_rule(rows: Sequence[dict], spec: SelectionSpec) -> tuple[list[float], list[bool], list[str]]:
    """(scores, selected, warnings) of `spec.rule` on candidate rows carrying the three signals."""
    if spec.rule not in RULES:
        raise InputError(f"rule: unknown {spec.rule!r}; known: {sorted(RULES)}")
    scores, selected = RULES[spec.rule](rows, spec)
    warnings = []
    n_sel = sum(selected)
    facts = RULE_FACTS[spec.rule]
    if uses_k(spec.rule) and n_sel < spec.k:
        if facts.ranked:
            n_moved = sum(_moved(rows))
            warnings.append(f"k={spec.k} exceeds the {n_moved} tensor(s) that moved (D != 0) among "
                            f"{len(rows)} candidates; selected {n_sel}")
        else:
            warnings.append(f"k={spec.k} exceeds the {len(rows)} candidates; selected {n_sel}")
    return scores, selected, warnings


# =========================================================================== select


def derived_signals(spectral_row: dict, coupling_row: dict) -> dict:
    """The ablation columns computed from the cached statistics (no cache change):
    ``off_principal_normalized`` = 1 − f / (r²/(mn)) with f = 1 − raw energy (:mod:`mast.energy`), and
    ``coupling_signed`` = −⟨G, D⟩ (> 0: the increment made the forget texts more likely)."""
    import math

    raw = float(spectral_row["off_principal_energy"])
    inner_abs, cos = float(coupling_row["coupling"]), float(coupling_row["coupling_cosine"])
    return {"off_principal_normalized": normalized_from_raw(raw, spectral_row["shape"], int(spectral_row["r"])),
            "coupling_signed": -math.copysign(inner_abs, cos) if cos != 0 else 0.0}


def _as_spec(spec) -> SelectionSpec:
    if spec is None:
        return SelectionSpec()
    if isinstance(spec, SelectionSpec):
        return validate(SelectionSpec, spec.model_dump(), "selection spec")
    if isinstance(spec, dict):
        return validate(SelectionSpec, spec, "selection spec")
    raise InputError(f"selection spec: expected a SelectionSpec or a mapping, got {type(spec).__name__}")


def select(
    reference: str | os.PathLike, target: str | os.PathLike, forget: Sequence[dict], spec: SelectionSpec | None = None,
    cache_dir: str | os.PathLike | None = None, template: str = "qwen_boxed", method: str = "fast",
    device: str | None = None, progress: bool = True,
) -> dict:
    """Rank the candidate tensors of (reference, target) and pick the tensors to unlearn.

    Returns the selection JSON of docs/architecture.md: {"rule", "k", "rho", "candidates": [{"name",
    "shape", "update_magnitude", "off_principal_energy", "coupling", "coupling_cosine", "score",
    "selected", "moved"}], "all_parameters", ...} plus provenance (fingerprints, cache hits, warnings).
    """
    spec = _as_spec(spec)
    check_model_dir(reference, "reference")
    check_model_dir(target, "target")
    _check_forget(forget)
    spectral = spectral_stats(reference, target, spec.rho, cache_dir, spec.candidates, method, device, progress)
    coup = coupling_stats(reference, target, forget, cache_dir, spec.candidates, template, spec.max_length,
                          spec.coupling_batch_size, device, progress)
    rows = []
    for c in spectral["candidates"]:
        cc = coup["candidates"].get(c["name"])
        if cc is None:
            raise InputError(f"{target}: candidate {c['name']} missing from the coupling statistics")
        rows.append({**c, **cc, **derived_signals(c, cc)})
    scores, selected, warnings = apply_rule(rows, spec)
    for w in warnings:
        print(f"mast select: warning: {w}", file=sys.stderr)
    candidates = [
        {"name": r["name"], "shape": r["shape"], "update_magnitude": r["update_magnitude"],
         "off_principal_energy": r["off_principal_energy"],
         "off_principal_normalized": r["off_principal_normalized"], "coupling": r["coupling"],
         "coupling_cosine": r["coupling_cosine"], "coupling_signed": r["coupling_signed"], "score": s,
         "selected": bool(sel), "moved": r["norm_d"] > 0}
        for r, s, sel in zip(rows, scores, selected, strict=True)
    ]
    return {
        "rule": spec.rule, "k": spec.k, "rho": spec.rho, "seed": spec.seed, "weights": spec.weights,
        "patterns": list(spec.candidates), "candidates": candidates,
        "all_parameters": RULE_FACTS[spec.rule].all_parameters,
        "selected": [c["name"] for c in candidates if c["selected"]],
        "n_moved": sum(c["moved"] for c in candidates), "warnings": warnings,
        "reference": str(reference), "target": str(target), "template": template,
        "fingerprints": spectral["fingerprints"], "spectral_method": method,
        "forget_loss": coup["forget_loss"], "forget_tokens": coup["forget_tokens"],
        "cache_hit": {"spectral": spectral["cache_hit"], "coupling": coup["cache_hit"]},
    }


# =========================================================================== CLI


def format_table(selection: dict) -> str:
    """A fixed-width table: name, shape, the three signals, score, selected."""
    rows = selection["candidates"]
    w = max([len("tensor")] + [len(r["name"]) for r in rows])
    head = (f"{'tensor':<{w}}  {'shape':>11}  {'|D|/|W|':>9}  {'off-prin':>8}  {'coupling':>9}  "
            f"{'cos':>6}  {'score':>6}  sel")
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = "x".join(str(s) for s in r["shape"])
        lines.append(
            f"{r['name']:<{w}}  {shape:>11}  {r['update_magnitude']:9.3e}  {r['off_principal_energy']:8.4f}  "
            f"{r['coupling']:9.3e}  {r['coupling_cosine']:6.3f}  {r['score']:6.3f}  {'*' if r['selected'] else ''}"
        )
    n_sel = sum(r["selected"] for r in rows)
    tail = "all parameters train" if selection["all_parameters"] else f"{n_sel} of {len(rows)} candidate(s) selected"
    lines.append(f"rule={selection['rule']} k={selection['k']} rho={selection['rho']}: {tail}")
    return "\n".join(lines)


def cli_select(args) -> int:
    spec = merge_spec(SelectionSpec, getattr(args, "spec", None), args, ("rule", "k", "rho", "seed"))
    check_output_path(args.out)
    args.reference = resolve_model(args.reference, "--reference")  # a folder or a Hub id
    args.target = resolve_model(args.target, "--target")
    check_model_dir(args.reference, "--reference")
    check_model_dir(args.target, "--target")
    forget = read_jsonl(args.forget, required=("prompt", "solution"))
    if not forget:
        raise InputError(f"{args.forget}: no problems")
    result = select(args.reference, args.target, forget, spec, cache_dir=getattr(args, "cache_dir", None),
                    template=getattr(args, "template", None) or "qwen_boxed",
                    method=getattr(args, "method", None) or "fast")
    write_json(Path(args.out), result)
    print(format_table(result))
    print(f"wrote {args.out}")
    return 0
