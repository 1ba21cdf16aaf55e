"""The masked unlearning loop: an objective of :mod:`mast.objectives` on exactly the selected tensors.

Given a target checkpoint and a selection (docs/architecture.md shape), only the selected tensors
get ``requires_grad`` and only they are in the AdamW optimizer; every other parameter keeps
its stored bits. The ``full`` rule (``selection["all_parameters"]``) trains every parameter in
the same loop: the full-parameter baseline.

Per optimiser step (``grad_accum`` micro-batches of ``batch_size`` forget texts, and as many
retain texts when a retain term is on)::

    total = L_f(forget batch) + α · L_r(retain batch),   L_r ∈ {nll, kl}  (token or sequence scale)

Texts are ``mast.prompts.problem_pair`` (prompt + solution, prompt tokens masked), right
padded and scored by :mod:`mast.batching`. ``π_ref`` is the frozen target: for NPO its summed log-probs of every forget text are
computed once, before the first update (inference mode); for the KL retain term a frozen
copy of the target scores each retain batch. Learning rate: linear warmup over
``warmup_steps``, then constant. Data order comes from a ``torch.Generator`` seeded with
``spec.seed`` (one permutation per pass over the texts); Python, NumPy and torch are seeded too,
so the same inputs and seed give the same weights on the same hardware.

On CUDA with ``spec.bf16``: bf16 autocast, fp32 master copies of the trainable tensors, frozen
tensors kept in the stored dtype; ``spec.gradient_checkpointing`` turns on activation
checkpointing. On CPU both are no-ops (float32 throughout).

Output folder (written atomically; nothing at all when the run fails):

- the full ``save_pretrained`` checkpoint in the target's stored dtype, with its tokenizer;
- ``delta/delta.safetensors`` (a subfolder, so vLLM and transformers never load it as weights): the NEW VALUES of the tensors that changed (not new − old: a float
  difference does not round-trip bit-for-bit). :func:`apply_delta` loads the target and
  overwrites those tensors, which rebuilds the saved weights exactly; ``new − target`` is one
  subtraction away for analysis;
- ``manifest.json`` (target fingerprint, selection summary, spec, seed, final losses, counts);
- ``losses.jsonl``: one ``{"step", "forget", "retain", "total", "lr", "grad_norm"}`` per step.

Matched forgetting (``spec.stop``, :mod:`mast.stopping`): the caller passes
``stop_check(step, model) -> float``; it is called (eval + inference mode) before the first
step and every ``stop.every`` steps, and training ends at the first check that meets the
criterion or at ``stop.max_steps``. ``steps_run``, ``stopped_early`` and the check history
(``stop``) are in the manifest and the result. Without ``spec.stop`` the loop is unchanged.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mast.batching import (
    collate,
    completion_logits,
    completion_logprobs,
    encode_problems,
    pad_id_of,
    to_device,
)
from mast.config import UnlearnSpec, merge_spec
from mast.files import (
    InputError,
    atomic_dir,
    check_output_path,
    fingerprint_model,
    read_json,
    read_jsonl,
    stable_hash,
    write_json,
    write_jsonl,
)
from mast.hub import resolve_model
from mast.objectives import forget_loss, kl, nll, retain_scale_for
from mast.registry import NEEDS_REFERENCE
from mast.seeding import seed_everything
from mast.stopping import decide, is_check_step, stop_summary

# in a subfolder: vLLM loads EVERY top-level *.safetensors of a checkpoint without an index, so a
# delta beside model.safetensors would be read as weights (a sibling file name would clash too)
DELTA_FILE = "delta/delta.safetensors"
MANIFEST_FILE = "manifest.json"
LOSSES_FILE = "losses.jsonl"
DELTA_FORMAT = "mast-delta-v1/replace"
PROBLEM_FIELDS = ("id", "prompt", "solution")


@dataclass
class UnlearnResult:
    out_dir: Path
    losses: list[dict] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)
    steps_run: int = 0
    stopped_early: bool = False
    stop_history: list[dict] = field(default_factory=list)  # [{"step", "value"}], step 0 = baseline


class UnlearnDiverged(RuntimeError):
    """The loss or the gradients went NaN/inf at optimiser step `step` (1-based); nothing was written."""

    def __init__(self, step: int, message: str):
        super().__init__(f"diverged at step {step}: {message}")
        self.step = step
        self.message = message

    def __reduce__(self):  # picklable with its fields (Ray ships exceptions between processes)
        return (type(self), (self.step, self.message))


# --------------------------------------------------------------------------- selection


def selection_names(selection: dict, source: str = "selection") -> list[str] | None:
    """Names of the tensors to train, or None for every parameter (``all_parameters``)."""
    if not isinstance(selection, dict):
        raise InputError(f"{source}: expected a JSON object with 'candidates'")
    if selection.get("all_parameters"):
        return None
    cands = selection.get("candidates")
    if not isinstance(cands, list):
        raise InputError(f"{source}: candidates: expected a list")
    names = []
    for i, c in enumerate(cands):
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            raise InputError(f"{source}: candidates[{i}]: expected an object with a 'name'")
        if c.get("selected"):
            names.append(c["name"])
    if not names:
        raise InputError(f"{source}: no candidate has \"selected\": true (and all_parameters is not set)")
    return names


def trainable_parameters(model: torch.nn.Module, selection: dict, source: str = "selection") -> dict:
    """{name: Parameter} to train; tied aliases (e.g. ``lm_head.weight``) resolve to their parameter.

    Raises InputError naming the first selected name that is not a parameter of the model.
    """
    canonical = dict(model.named_parameters())
    names = selection_names(selection, source)
    if names is None:
        return canonical
    alias = {}
    ident = {id(p): n for n, p in canonical.items()}
    for n, p in model.named_parameters(remove_duplicate=False):
        alias[n] = ident[id(p)]
    out = {}
    for n in names:
        if n not in alias:
            raise InputError(f"{source}: tensor {n!r} is not a parameter of the model")
        out[alias[n]] = canonical[alias[n]]
    return out


# --------------------------------------------------------------------------- data


def index_stream(n: int, generator: torch.Generator) -> Iterator[int]:
    """Endless stream of indices 0..n-1: one seeded permutation per pass."""
    while True:
        yield from torch.randperm(n, generator=generator).tolist()


def take(stream: Iterator[int], k: int) -> list[int]:
    return [next(stream) for _ in range(k)]


# --------------------------------------------------------------------------- model pieces


def stored_dtype(model) -> torch.dtype:
    """The dtype most parameters are stored in (what the checkpoint was saved as)."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


@contextlib.contextmanager
def quiet_loading():
    """Hide transformers' per-checkpoint "Loading weights" bars (the loop has its own progress bar)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_model(model_dir, dtype="auto"):
    from transformers import AutoModelForCausalLM

    with quiet_loading():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)


def _finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


# --------------------------------------------------------------------------- the loop


def prepare_model(model, trainable: dict, device, use_amp: bool, gradient_checkpointing: bool) -> None:
    """Freeze everything but `trainable`; trainable tensors become float32 masters with requires_grad.

    Frozen tensors stay in bf16 when the checkpoint is bf16 and autocast is on, else float32
    (a bf16/fp16 -> fp32 -> bf16/fp16 round trip is exact, so frozen bits survive the save).
    """
    stored = stored_dtype(model)
    model.to(device=device, dtype=stored if (use_amp and stored == torch.bfloat16) else torch.float32)
    model.requires_grad_(False)
    for p in trainable.values():
        p.data = p.data.float()
        p.requires_grad_(True)
    model.config.use_cache = False
    if use_amp and gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    model.train()


def make_optimizer(params: list, spec: UnlearnSpec):
    """AdamW over `params` only, and a linear-warmup-then-constant learning-rate schedule."""
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    warm = spec.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0)
    return opt, sched


def autocast_for(use_amp: bool):
    return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else contextlib.nullcontext


def train_step(model, opt, sched, params: list, spec: UnlearnSpec, micro_batches: list, step: int,
               retain_term: str = "none", ref_model=None, use_amp: bool = False) -> dict:
    """One optimiser step over `micro_batches` = [(forget_batch, ref_logp or None, retain_batch or None)].

    total = L_f + α L_r per micro-batch, gradients averaged over the micro-batches, clipped to
    `spec.max_grad_norm`; raises UnlearnDiverged when a loss or the gradient norm is not finite.
    Returns the step's row {"step", "forget", "retain", "total", "lr", "grad_norm"}.
    """
    amp = autocast_for(use_amp)
    scale = retain_scale_for(spec.objective, spec.retain_scale)
    n = len(micro_batches)
    opt.zero_grad(set_to_none=True)
    lr_now = opt.param_groups[0]["lr"]
    acc = {"forget": 0.0, "retain": 0.0, "total": 0.0}
    has_retain = False
    for fb, ref_logp, rb in micro_batches:
        with amp():
            s, ln, _ = completion_logprobs(model, fb)
            lf = forget_loss(spec.objective, s, ln, ref_logp, spec.effective_beta, spec.gamma)
            lr_term = None
            if rb is not None and retain_term == "nll":
                rs, rln, _ = completion_logprobs(model, rb)
                lr_term = nll(rs, rln, scale)
            elif rb is not None and retain_term == "kl":
                rows, _, _ = completion_logits(model, rb)
                with torch.inference_mode():
                    ref_rows, _, _ = completion_logits(ref_model, rb)
                lr_term = kl(rows, ref_rows.clone(), rb["input_ids"].shape[0] if scale == "sequence" else None)
            total = lf + spec.alpha * lr_term if lr_term is not None else lf
        for name, v in (("forget", lf), ("retain", lr_term), ("total", total)):
            if v is not None and not _finite(v.detach()):
                raise UnlearnDiverged(step, f"{name} loss is {v.item()}")
        (total / n).backward()
        acc["forget"] += lf.item() / n
        acc["total"] += total.item() / n
        if lr_term is not None:
            has_retain = True
            acc["retain"] += lr_term.item() / n
    max_norm = spec.max_grad_norm if spec.max_grad_norm is not None else math.inf
    gnorm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if not _finite(gnorm):
        raise UnlearnDiverged(step, f"gradient norm is {gnorm.item()}")
    opt.step()
    sched.step()
    return {"step": step, "forget": acc["forget"], "retain": acc["retain"] if has_retain else None,
            "total": acc["total"], "lr": lr_now, "grad_norm": float(gnorm)}


@dataclass
class _Run:
    """One run's state, passed between the steps of :func:`unlearn`."""

    spec: UnlearnSpec
    device: torch.device
    use_amp: bool
    retain_term: str  # spec.retain, or "none" without retain texts
    tokenizer: Any = None
    model: Any = None
    save_dtype: torch.dtype | None = None
    trainable: dict = field(default_factory=dict)  # {name: Parameter} being trained
    original: dict = field(default_factory=dict)  # {name: tensor} their stored values (CPU, save dtype)
    use_cache: bool = True
    pad_id: int = 0
    f_enc: list = field(default_factory=list)
    r_enc: list = field(default_factory=list)
    ref_logp: torch.Tensor | None = None  # π_ref's summed log-prob of each forget text (NPO-style objectives)
    ref_model: Any = None  # the frozen target for the KL retain term
    losses: list[dict] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    state_bytes: int = 0

    @property
    def amp(self):
        return autocast_for(self.use_amp)


def unlearn(
    target_dir,
    selection: dict,
    forget: list[dict],
    retain: list[dict] | None,
    spec: UnlearnSpec,
    out_dir,
    template: str = "qwen_boxed",
    progress: bool = True,
    device: str | torch.device | None = None,
    selection_source: str = "selection",
    stop_check: Callable[[int, Any], float] | None = None,
) -> UnlearnResult:
    """Unlearn `forget` from the target on the selected tensors; write the checkpoint to `out_dir`.

    With `spec.stop`, `stop_check(step, model)` measures the forget criterion (module docstring).
    Raises InputError on bad input (unknown tensor names, named by `selection_source`, e.g. the
    selection file; empty forget set; `spec.stop` without a check) and :class:`UnlearnDiverged`
    when a loss or the gradient norm is not finite (nothing written).
    """
    t0 = time.time()
    target_dir, out_dir = Path(target_dir), Path(out_dir)
    _check_inputs(forget, spec, stop_check)
    run = _load(target_dir, selection, selection_source, spec, retain, device)
    _encode(run, forget, retain, template)
    _reference(run, target_dir)
    _train(run, stop_check, progress)
    changed = _changed_tensors(run)
    target_fp = fingerprint_model(target_dir)
    manifest = _manifest(run, target_dir, target_fp, selection, selection_source, template, forget, retain,
                         changed)
    _save(run, out_dir, changed, manifest, target_fp, t0)
    steps_run = len(run.losses)
    return UnlearnResult(out_dir=out_dir, losses=run.losses, manifest=manifest, steps_run=steps_run,
                         stopped_early=steps_run < spec.step_cap, stop_history=run.history)


def _check_inputs(forget: list[dict], spec: UnlearnSpec, stop_check) -> None:
    if not forget:
        raise InputError("forget: no problems to unlearn")
    if spec.stop is not None and stop_check is None:
        raise InputError("unlearning.stop is set but no stop check was given (it needs forget-validation problems)")
    if spec.stop is None and stop_check is not None:
        raise ValueError("stop_check given without unlearning.stop")


def _load(target_dir: Path, selection: dict, selection_source: str, spec: UnlearnSpec, retain, device) -> _Run:
    """Seed, load the target and its tokenizer, and make the selected tensors the only trainable ones."""
    from transformers import AutoTokenizer

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run = _Run(spec=spec, device=device, use_amp=device.type == "cuda" and spec.bf16,
               retain_term=spec.retain if retain else "none")
    seed_everything(spec.seed)
    run.tokenizer = AutoTokenizer.from_pretrained(target_dir)
    model = run.model = load_model(target_dir)
    run.save_dtype = stored_dtype(model)
    run.trainable = trainable_parameters(model, selection, selection_source)
    run.original = {n: p.detach().to("cpu", run.save_dtype, copy=True) for n, p in run.trainable.items()}
    run.use_cache = model.config.use_cache
    prepare_model(model, run.trainable, device, run.use_amp, spec.gradient_checkpointing)
    return run


def _encode(run: _Run, forget: list[dict], retain, template: str) -> None:
    """Tokenise the forget texts, and the retain texts when a retain term is on."""
    run.pad_id = pad_id_of(run.tokenizer)
    run.f_enc = encode_problems(run.tokenizer, forget, template, run.spec.max_length)
    run.r_enc = encode_problems(run.tokenizer, retain, template, run.spec.max_length) \
        if run.retain_term != "none" else []


def _reference(run: _Run, target_dir: Path) -> None:
    """π_ref: the forget texts' log-probs under the target (once, before any update) and, for the
    KL retain term, a frozen copy of the target."""
    spec, device = run.spec, run.device
    if spec.objective in NEEDS_REFERENCE:
        model, f_enc = run.model, run.f_enc
        model.eval()
        ref_logp = torch.empty(len(f_enc), dtype=torch.float32)
        with torch.inference_mode(), run.amp():
            for i in range(0, len(f_enc), spec.batch_size):
                idx = list(range(i, min(i + spec.batch_size, len(f_enc))))
                s, _, _ = completion_logprobs(model, to_device(collate(f_enc, idx, run.pad_id), device))
                ref_logp[idx] = s.float().cpu()
        run.ref_logp = ref_logp.clone().to(device)
    if run.retain_term == "kl":
        ref_model = run.ref_model = load_model(target_dir)
        ref_model.to(device=device, dtype=torch.bfloat16 if run.use_amp else torch.float32)
        ref_model.requires_grad_(False).eval()
        ref_model.config.use_cache = False


def _micro_batch(run: _Run, f_stream: Iterator[int], r_stream: Iterator[int] | None) -> tuple:
    """(forget batch, its π_ref log-probs or None, retain batch or None), on the run's device."""
    bs, device = run.spec.batch_size, run.device
    idx = take(f_stream, bs)
    fb = to_device(collate(run.f_enc, idx, run.pad_id), device)
    rb = to_device(collate(run.r_enc, take(r_stream, bs), run.pad_id), device) if r_stream else None
    return fb, run.ref_logp[idx] if run.ref_logp is not None else None, rb


def _train(run: _Run, stop_check, progress: bool) -> None:
    """The optimiser steps, with the stopping rule's checks; fills run.losses, run.history, run.state_bytes.

    Raises UnlearnDiverged when a trained tensor ends non-finite.
    """
    from tqdm.auto import tqdm

    spec, model = run.spec, run.model
    params = list(run.trainable.values())
    opt, sched = make_optimizer(params, spec)
    gen = torch.Generator().manual_seed(spec.seed)
    f_stream = index_stream(len(run.f_enc), gen)
    r_stream = index_stream(len(run.r_enc), gen) if run.r_enc else None
    if spec.stop is not None:
        run.history.append({"step": 0, "value": _run_check(stop_check, 0, model, run.amp)})
    model.train()
    bar = tqdm(total=spec.step_cap, desc="unlearn", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for step in range(1, spec.step_cap + 1):
            micro = [_micro_batch(run, f_stream, r_stream) for _ in range(spec.grad_accum)]
            row = train_step(model, opt, sched, params, spec, micro, step, run.retain_term, run.ref_model,
                             run.use_amp)
            run.losses.append(row)
            bar.update(1)
            bar.set_postfix(forget=f"{row['forget']:.4g}", total=f"{row['total']:.4g}")
            if spec.stop is not None and is_check_step(spec.stop, step):
                run.history.append({"step": step, "value": _run_check(stop_check, step, model, run.amp)})
                if decide(spec.stop, run.history).stop:
                    break
    finally:
        bar.close()
    for n, p in run.trainable.items():
        if not _finite(p.detach()):
            raise UnlearnDiverged(len(run.losses), f"tensor {n} has non-finite values after the update")
    run.state_bytes = optimizer_state_bytes(opt)
    run.ref_model = None


def _changed_tensors(run: _Run) -> dict:
    """Put the model back as loaded (config, eval, CPU, stored dtype); {name: new value} of the trained
    tensors whose bits changed."""
    model = run.model
    model.config.use_cache = run.use_cache
    model.eval()
    if run.use_amp and run.spec.gradient_checkpointing:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()
    model.requires_grad_(False)
    model.to(device="cpu", dtype=run.save_dtype)
    now = dict(model.named_parameters())
    return {n: now[n].detach().contiguous() for n in run.trainable if not torch.equal(now[n], run.original[n])}


def _selection_summary(selection: dict, selection_source: str, n_selected: int) -> dict:
    names = selection_names(selection, selection_source)
    return {
        "rule": selection.get("rule"),
        "k": selection.get("k"),
        "rho": selection.get("rho"),
        "all_parameters": names is None,
        "selected": names if names is not None else [],
        "n_selected": n_selected,
        "hash": stable_hash(selection),
    }


def _manifest(run: _Run, target_dir: Path, target_fp: str, selection: dict, selection_source: str, template: str,
              forget: list[dict], retain, changed: dict) -> dict:
    """manifest.json (``seconds`` is filled in when the files are written)."""
    spec, retain_term, losses = run.spec, run.retain_term, run.losses
    steps_run = len(losses)
    return {
        "target": str(target_dir),
        "target_fingerprint": target_fp,
        "selection": _selection_summary(selection, selection_source, len(run.trainable)),
        "objective": spec.objective,
        "beta": spec.effective_beta if spec.objective != "ga" else None,
        "retain_term": retain_term,
        "retain_scale": retain_scale_for(spec.objective, spec.retain_scale) if retain_term != "none" else None,
        "spec": spec.model_dump(),
        "seed": spec.seed,
        "steps": steps_run,
        "steps_run": steps_run,
        "stopped_early": steps_run < spec.step_cap,
        "stop": stop_summary(spec.stop, run.history) if spec.stop is not None else None,
        "template": template,
        "n_forget": len(forget),
        "n_retain": len(retain or []) if retain_term != "none" else 0,
        "final_losses": {k: losses[-1][k] for k in ("forget", "retain", "total")} if losses else {},
        "trainable_tensors": len(run.trainable),
        "trainable_parameters": sum(p.numel() for p in run.trainable.values()),
        "optimizer_state_bytes": run.state_bytes,
        "changed_tensors": sorted(changed),
        "delta": {"file": DELTA_FILE, "format": DELTA_FORMAT, "dtype": str(run.save_dtype).removeprefix("torch.")},
        "device": str(run.device),
        "bf16_autocast": run.use_amp,
        "gradient_checkpointing": bool(run.use_amp and spec.gradient_checkpointing),
        "versions": _versions(),
        "seconds": None,
    }


def _save(run: _Run, out_dir: Path, changed: dict, manifest: dict, target_fp: str, t0: float) -> None:
    """Checkpoint + tokenizer, delta, losses and manifest into `out_dir`, atomically."""
    from safetensors.torch import save_file

    with atomic_dir(out_dir) as tmp, quiet_loading():
        run.model.save_pretrained(tmp)
        run.tokenizer.save_pretrained(tmp)
        (tmp / DELTA_FILE).parent.mkdir(parents=True, exist_ok=True)
        save_file(changed, str(tmp / DELTA_FILE),
                  metadata={"format": "pt", "mast_delta": DELTA_FORMAT, "target_fingerprint": target_fp})
        write_jsonl(tmp / LOSSES_FILE, run.losses)
        manifest["seconds"] = round(time.time() - t0, 3)
        write_json(tmp / MANIFEST_FILE, manifest)


def _run_check(stop_check, step: int, model, amp) -> float:
    """One stopping-rule measurement on the live model: eval + inference mode (+ autocast), then back to train."""
    model.eval()
    try:
        with torch.inference_mode(), amp():
            value = float(stop_check(step, model))
    finally:
        model.train()
    if not math.isfinite(value):
        raise UnlearnDiverged(step, f"stop check value is {value}")
    return value


def _versions() -> dict:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


# --------------------------------------------------------------------------- delta checkpoints


def apply_delta(target_dir, delta_path, out_dir=None, check: bool = True):
    """The target with the delta's tensors put in: bit-for-bit the weights `unlearn` saved.

    `delta.safetensors` holds the new values of the changed tensors (format ``mast-delta-v1/replace``).
    With `check`, the target must be the one the delta was made from (fingerprint). With
    `out_dir`, the rebuilt checkpoint (and tokenizer) is also saved there, atomically.
    """
    from safetensors import safe_open
    from transformers import AutoTokenizer

    delta_path = Path(delta_path)
    if not delta_path.is_file():
        raise InputError(f"{delta_path}: file not found")
    model = load_model(target_dir)
    params = dict(model.named_parameters(remove_duplicate=False))
    with safe_open(str(delta_path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("mast_delta") != DELTA_FORMAT:
            raise InputError(f"{delta_path}: not a {DELTA_FORMAT} delta")
        if check and meta.get("target_fingerprint") != fingerprint_model(target_dir):
            raise InputError(f"{delta_path}: made from target {meta.get('target_fingerprint')}, "
                             f"not {target_dir} ({fingerprint_model(target_dir)})")
        with torch.no_grad():
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if name not in params:
                    raise InputError(f"{delta_path}: tensor {name!r} is not a parameter of {target_dir}")
                t = f.get_tensor(name)
                if t.shape != params[name].shape:
                    raise InputError(f"{delta_path}: {name}: shape {tuple(t.shape)} != {tuple(params[name].shape)}")
                params[name].data = t.to(params[name].dtype)
    if out_dir is not None:
        with atomic_dir(out_dir) as tmp, quiet_loading():
            model.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(target_dir).save_pretrained(tmp)
    return model


# --------------------------------------------------------------------------- CLI


def cli_unlearn(args) -> int:
    """`mast unlearn`: read the selection and problem files, run :func:`unlearn`, print a summary."""
    spec = merge_spec(UnlearnSpec, args.spec, args, ("objective", "steps", "lr", "seed"))
    if spec.stop is not None:
        raise InputError(f"{args.spec}: stop: `mast unlearn` has no stop check (it needs forget-validation "
                         "problems); use it in a sweep, or remove it and set steps")
    args.target = resolve_model(args.target, "--target")  # a folder or a Hub id
    check_output_path(args.out, kind="dir")
    if Path(args.out).resolve() == Path(args.target).resolve():
        raise InputError(f"--out {args.out}: is the --target folder (it would be replaced); pick another")
    selection = read_json(args.selection)
    selection_names(selection, args.selection)
    forget = read_jsonl(args.forget, PROBLEM_FIELDS)
    if not forget:
        raise InputError(f"{args.forget}: no problems")
    retain = read_jsonl(args.retain, PROBLEM_FIELDS) if args.retain else None
    try:
        res = unlearn(args.target, selection, forget, retain, spec, args.out, selection_source=args.selection)
    except UnlearnDiverged as e:
        print(f"mast unlearn: {e} (nothing written to {args.out})", file=sys.stderr)
        return 1
    m = res.manifest
    fl = m["final_losses"]
    retain_txt = f", retain {fl['retain']:.4f}" if fl.get("retain") is not None else ""
    print(
        f"unlearned {m['n_forget']} forget texts with {m['objective']} for {m['steps']} steps "
        f"on {m['trainable_tensors']} tensors ({m['trainable_parameters']:,} parameters, "
        f"optimizer state {m['optimizer_state_bytes'] / 2**20:.1f} MiB); "
        f"final forget {fl['forget']:.4f}{retain_txt}, total {fl['total']:.4f}; "
        f"{len(m['changed_tensors'])} tensors changed -> {res.out_dir}"
    )
    return 0

