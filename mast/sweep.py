"""`mast sweep SPEC`: a grid of MAST trials under Ray Tune, tracked in MLflow, resumable.

Flow (ARCHITECTURE.md, "One trial, as data flows")::

    spec ─► grid expansion (cartesian product, meaningless points dropped, deterministic ids)
         ─► prepare once, on the driver (or one GPU task), cached in <sweep>/prepared:
              models (toy build or the given reference/target), splits, the TARGET's baseline
              results on every suite (one evaluation per suite, whatever the trial count),
              spectral statistics
         ─► Ray Tune, one function-trainable trial per grid point:
              select ─► unlearn ─► evaluate every suite ─► McNemar vs the cached baseline
              ─► tune.report + an MLflow child run
         ─► trials.jsonl, seed_table.json (stats.seed_level_table, Holm over the sweep),
            MLflow parent run artifacts, report

Which data is which:
- MATH (``models.reference/target``): the forget split (``data.forget_size`` problems of the
  MATH pool = MATH minus MATH-500) is both what is unlearned and the ``forget`` suite (the
  paper's 45/150 -> 37/150 is measured on the forget set itself); the ``retain`` suite is a
  disjoint draw (``data.retain_size``); the unlearning retain loss uses a third disjoint draw
  (``data.retain_train_size``), so the retain suite is scored on problems no stage trained on.
- toy (``models.toy``): unlearning texts are ``data/forget.jsonl`` / ``data/retain.jsonl``
  (drawn from the toy's training problems); the ``forget`` / ``retain`` suites are the held-out
  ``data/forget_eval.jsonl`` / ``data/retain_eval.jsonl``: forgetting is measured on problems
  of the forgotten skill the unlearning never saw (capability removal, not memorisation).
- any other suite name is a suite YAML (a path, or ``eval/<name>.yaml``).

Resume: ``--resume`` restores the Tune experiment (``Tuner.restore(..., resume_errored=True)``);
trials whose ``result.json`` says ok return their recorded metrics at once, and MLflow runs are
found by tag, so a resumed sweep has exactly one child run per trial.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

from mast.config import (
    SelectionSpec,
    SuiteSpec,
    SweepSpec,
    UnlearnSpec,
    load_suite,
    load_yaml,
    validate,
)
from mast.files import InputError, read_json, read_jsonl, stable_hash, write_json, write_jsonl

K_FREE_RULES = ("full", "attention")  # every parameter / every attention projection: k is meaningless
RHO_RULES = ("mast", "off_principal")  # the only rules whose choice depends on rho
OWN_SUITES = ("forget", "retain")  # the sweep's own splits
ID_KEYS = ("rule", "objective", "k", "seed")
REPO_ROOT = Path(__file__).resolve().parents[1]
PREPARED_VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _log(msg: str) -> None:
    print(f"[mast sweep] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- grid expansion (pure)


@dataclasses.dataclass(frozen=True)
class Trial:
    """One grid point: its id, the grid values (`config`) and the full specs it runs with."""

    trial_id: str
    config: dict
    selection: dict
    unlearning: dict


@dataclasses.dataclass
class Grid:
    trials: list[Trial]
    n_points: int  # size of the cartesian product
    dropped: list[str]  # why each dropped point went

    def summary(self) -> str:
        return (f"grid: {self.n_points} point(s) -> {len(self.trials)} trial(s), "
                f"{len(self.dropped)} dropped (rules that ignore k/rho, duplicates)")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}".replace("e+", "e")
    return str(v)


def trial_id(config: dict) -> str:
    """Deterministic, readable id: ``{rule}-{objective}-k{k}-s{seed}`` (no k for full/attention).

    Other grid fields are appended as ``-{field}{value}`` when short and filename-safe, else
    as an 8-hex hash of them, so the same grid point always gets the same id.
    """
    rule = config["rule"]
    parts = [str(rule), str(config["objective"])]
    if rule not in K_FREE_RULES:
        parts.append(f"k{config['k']}")
    parts.append(f"s{config['seed']}")
    extra = {k: v for k, v in sorted(config.items()) if k not in ID_KEYS}
    if extra:
        text = "-".join(f"{k}{_fmt(v)}" for k, v in extra.items())
        parts.append(text if len(text) <= 40 and re.fullmatch(r"[A-Za-z0-9._-]+", text) else stable_hash(extra)[:8])
    return "-".join(parts)


def expand_grid(spec: SweepSpec, source: str = "spec") -> Grid:
    """Cartesian product of ``spec.grid``; each point overrides selection/unlearning fields.

    ``seed`` sets the unlearning seed and the random rule's seed. ``k`` is meaningless for
    ``full``/``attention`` (one k kept) and ``rho`` for every rule but mast/off_principal
    (one rho kept): those points are dropped, as are exact duplicates.
    """
    keys = list(spec.grid)
    base_sel = spec.selection.model_dump()
    base_unl = spec.unlearning.model_dump()
    first = {k: spec.grid[k][0] for k in keys}
    values = [spec.grid[k] for k in keys]
    trials: list[Trial] = []
    seen: set[str] = set()
    dropped: list[str] = []
    n_points = 0
    for combo in itertools.product(*values):
        n_points += 1
        point = dict(zip(keys, combo))
        sel = dict(base_sel)
        unl = dict(base_unl)
        for k, v in point.items():
            if k in ("rule", "k", "rho"):
                sel[k] = v
            elif k == "seed":
                sel["seed"] = v
                unl["seed"] = v
            else:
                unl[k] = v
        rule = sel["rule"]
        config = {"rule": rule, "objective": unl["objective"], "k": sel["k"], "seed": unl["seed"]}
        config.update({k: v for k, v in point.items() if k not in config})
        if rule in K_FREE_RULES and "k" in point and point["k"] != first["k"]:
            dropped.append(f"{rule} ignores k (k={point['k']})")
            continue
        if rule not in RHO_RULES and "rho" in point and point["rho"] != first["rho"]:
            dropped.append(f"{rule} ignores rho (rho={point['rho']})")
            continue
        tid = trial_id(config)
        where = f"{source}: grid point {tid}"
        sel_spec = validate(SelectionSpec, sel, where)
        unl_spec = validate(UnlearnSpec, unl, where)
        if tid in seen:
            dropped.append(f"duplicate of {tid}")
            continue
        seen.add(tid)
        trials.append(Trial(tid, json.loads(json.dumps(config)), sel_spec.model_dump(mode="json"),
                            unl_spec.model_dump(mode="json")))
    return Grid(trials, n_points, dropped)


def check_spec(spec: SweepSpec, source: str = "spec") -> None:
    """Cross-field checks the pydantic model cannot do alone (one InputError line each)."""
    if not _NAME_RE.match(spec.name):
        raise InputError(f"{source}: name: {spec.name!r} must be letters, digits, '.', '_' or '-'")
    if not spec.evaluation.suites:
        raise InputError(f"{source}: evaluation.suites: at least one suite is needed")
    names = [suite_name(s) for s in spec.evaluation.suites]
    if len(set(names)) != len(names):
        raise InputError(f"{source}: evaluation.suites: duplicate suite names {names}")
    unknown = sorted(set(spec.evaluation.limits) - set(names))
    if unknown:
        raise InputError(f"{source}: evaluation.limits: {unknown[0]!r} is not one of the suites {names}")
    if spec.scheduler.kind == "asha":
        suite = spec.scheduler.metric.split("/", 1)[0]
        if suite not in names or "/" not in spec.scheduler.metric:
            raise InputError(f"{source}: scheduler.metric: {spec.scheduler.metric!r} must be '<suite>/<metric>' "
                             f"with a suite of evaluation.suites {names}")
    if spec.evaluation.backend == "vllm" and spec.resources.gpu <= 0:
        raise InputError(f"{source}: resources.gpu: the vllm backend needs a GPU per trial (gpu > 0)")


def suite_name(entry: str) -> str:
    """`forget` -> forget; `eval/gsm8k.yaml` -> gsm8k."""
    return Path(entry).stem if entry.endswith((".yaml", ".yml")) else entry


def spec_hash(spec: SweepSpec) -> str:
    """What a resume must match: the spec minus where it writes and where data is read from."""
    d = spec.model_dump(mode="json")
    d.pop("output_dir", None)
    d["data"].pop("data_dir", None)
    return stable_hash(d)


def ordered_suites(spec: SweepSpec) -> list[str]:
    """Suite entries, the scheduler's metric suite (forget by default) first."""
    entries = list(spec.evaluation.suites)
    first = spec.scheduler.metric.split("/", 1)[0]
    return sorted(entries, key=lambda e: suite_name(e) != first)


# --------------------------------------------------------------------------- sweep folder


def sweep_dir_for(spec: SweepSpec, out: str | os.PathLike | None) -> Path:
    """`--out` > spec.output_dir > runs/<name>; always absolute (Ray workers have other CWDs)."""
    return Path(out or spec.output_dir or Path("runs") / spec.name).resolve()


def code_version() -> str:
    try:
        r = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=10, check=False)
        return r.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# --------------------------------------------------------------------------- prepare (once per sweep)


def resolve_model(name: str | os.PathLike, field: str) -> str:
    """A local checkpoint folder (absolute) or a Hub id resolved to its local snapshot.

    On a cluster put HF_HOME on shared storage so the snapshot path is valid on every node.
    """
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise InputError(f"models.{field}: {p}: not a checkpoint folder (no config.json)")
        return str(p.resolve())
    if str(name).startswith((".", "/", "~")):
        raise InputError(f"models.{field}: {name}: folder not found")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(str(name), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model",
                                                            "*.tiktoken", "*.jinja"])
    except Exception as e:  # offline, unknown repo, gated
        raise InputError(f"models.{field}: cannot fetch {name!r} from the Hugging Face Hub ({type(e).__name__})") from None


def _find_suite_yaml(entry: str, spec_dir: Path | None, toy_dir: Path | None) -> Path | None:
    name = suite_name(entry)
    cands: list[Path] = []
    if entry.endswith((".yaml", ".yml")):
        cands += [Path(entry)] if Path(entry).is_absolute() else (
            ([spec_dir / entry] if spec_dir else []) + [Path.cwd() / entry, REPO_ROOT / entry])
    else:
        cands += [Path.cwd() / "eval" / f"{name}.yaml", REPO_ROOT / "eval" / f"{name}.yaml"]
        if toy_dir:
            cands.append(toy_dir / "suites" / f"{name}.yaml")
    return next((c for c in cands if c.is_file()), None)


def _suite_with_overrides(suite: SuiteSpec, name: str, spec: SweepSpec) -> SuiteSpec:
    d = suite.model_dump()
    d["name"] = name
    if spec.evaluation.template:
        d["template"] = spec.evaluation.template
    if spec.evaluation.decoding is not None:
        d["decoding"] = spec.evaluation.decoding.model_dump()
    if name in spec.evaluation.limits:
        d["limit"] = spec.evaluation.limits[name]
    return SuiteSpec.model_validate(d)


def _sweep_models_and_splits(spec: SweepSpec, sweep_dir: Path, data_dir: str | None) -> dict:
    """Models (paths) and the problems of the splits, before any evaluation."""
    if spec.models.toy is not None:
        from mast.toy import build_toy

        toy_dir = Path(spec.models.toy.out).expanduser().resolve() if spec.models.toy.out \
            else sweep_dir / "prepared" / "toy"
        _log(f"toy models: {toy_dir} (seed {spec.models.toy.seed}; built if missing)")
        t0 = time.time()
        build_toy(toy_dir, seed=spec.models.toy.seed)
        _log(f"toy ready in {time.time() - t0:.0f}s")
        data = toy_dir / "data"
        forget = read_jsonl(data / "forget.jsonl", required=("id", "prompt", "solution", "answer"))
        retain = read_jsonl(data / "retain.jsonl", required=("id", "prompt", "solution", "answer"))
        forget_eval = read_jsonl(data / "forget_eval.jsonl", required=("id", "prompt", "answer"))
        retain_eval = read_jsonl(data / "retain_eval.jsonl", required=("id", "prompt", "answer"))
        return {
            "kind": "toy", "toy_dir": str(toy_dir),
            "reference": str(toy_dir / "sft"), "target": str(toy_dir / "rlvr"), "base": str(toy_dir / "base"),
            "forget_texts": forget[: spec.data.forget_size], "retain_texts": retain[: spec.data.retain_size],
            "own": {"forget": forget_eval, "retain": retain_eval},
            "own_template": "qwen_boxed", "own_yaml": {n: toy_dir / "suites" / f"{n}.yaml" for n in OWN_SUITES},
        }
    from mast.data import build_splits, load_math_pool

    reference = resolve_model(spec.models.reference, "reference")
    target = resolve_model(spec.models.target, "target")
    base = resolve_model(spec.models.base, "base") if spec.models.base else None
    pool = load_math_pool(data_dir)
    d = spec.data
    n_forget = d.forget_size * (4 if d.require_target_correct else 1)
    forget, retain_all = build_splits(pool, n_forget, d.retain_size + d.retain_train_size, d.split_seed,
                                      levels=d.levels, subjects=d.subjects)
    retain, retain_train = retain_all[: d.retain_size], retain_all[d.retain_size:]
    return {
        "kind": "math", "reference": reference, "target": target, "base": base,
        "forget_texts": forget, "retain_texts": retain_train,
        "own": {"forget": forget, "retain": retain}, "own_template": "qwen_boxed",
        "own_yaml": {n: REPO_ROOT / "eval" / f"math_{n}.yaml" for n in OWN_SUITES},
    }


def _suites(spec: SweepSpec, info: dict, spec_dir: Path | None, data_dir: str | None) -> dict[str, dict]:
    """name -> {"spec": SuiteSpec dump, "problems": [...]} for every evaluation suite, in run order.

    `forget` / `retain` score the sweep's own splits: their settings come from the toy's
    ``suites/<name>.yaml`` or ``eval/math_<name>.yaml`` (else defaults), their problems from
    the sweep. A suite YAML with ``split_role`` is one of them too (named by its role).
    """
    from mast.evaluation import load_suite_problems

    toy_dir = Path(info["toy_dir"]) if info.get("toy_dir") else None
    out: dict[str, dict] = {}
    for entry in ordered_suites(spec):
        name = suite_name(entry)
        role = None
        if name in OWN_SUITES and not entry.endswith((".yaml", ".yml")):
            role = name
            yaml_path = info["own_yaml"].get(name)
            if yaml_path and Path(yaml_path).is_file():
                suite = load_suite(yaml_path)
            else:
                suite = SuiteSpec(name=name, benchmark="jsonl", split_role=name, grader="math",
                                  template=info["own_template"])
        else:
            path = _find_suite_yaml(entry, spec_dir, toy_dir)
            if path is None:
                raise InputError(f"evaluation.suites: unknown suite {entry!r} (not forget/retain, not a suite "
                                 f"file, not in eval/)")
            suite = load_suite(path)
            role = suite.split_role
            name = role or name
        if name in out:
            raise InputError(f"evaluation.suites: two suites are named {name!r}")
        suite = _suite_with_overrides(suite, name, spec)
        if role:
            problems = info["own"][role]
            problems = problems[: suite.limit] if suite.limit else problems
        else:
            problems = load_suite_problems(suite, data_dir)
        out[name] = {"spec": suite.model_dump(mode="json"), "problems": problems}
    return out


def _backend_options(spec: SweepSpec) -> dict:
    if spec.evaluation.backend != "vllm":
        return {}
    opts = {"tensor_parallel_size": spec.evaluation.tensor_parallel_size,
            "gpu_memory_utilization": spec.evaluation.gpu_memory_utilization}
    if spec.evaluation.max_model_len:
        opts["max_model_len"] = spec.evaluation.max_model_len
    return opts


def _needs_generated_texts(spec: SweepSpec) -> bool:
    return spec.unlearning.texts == "generated" or "generated" in spec.grid.get("texts", [])


def prepare(spec: SweepSpec, sweep_dir: Path, data_dir: str | None = None, spec_dir: Path | None = None) -> dict:
    """Trial-independent work, once per sweep, cached in ``<sweep>/prepared`` (content-addressed).

    Returns the prepared manifest (``prepared/prepared.json``) with ``evaluations``: how many
    baseline evaluations of the target THIS call ran per suite (0 on a cache hit).
    """
    from mast.evaluation import evaluate, make_backend

    pdir = sweep_dir / "prepared"
    pdir.mkdir(parents=True, exist_ok=True)
    info = _sweep_models_and_splits(spec, sweep_dir, data_dir)
    suites = _suites(spec, info, spec_dir, data_dir)
    from mast.files import fingerprint_model

    key = stable_hash({
        "v": PREPARED_VERSION,
        "reference": fingerprint_model(info["reference"]), "target": fingerprint_model(info["target"]),
        "forget_texts": [p["id"] for p in info["forget_texts"]], "retain_texts": [p["id"] for p in info["retain_texts"]],
        "suites": {n: {"spec": {k: v for k, v in s["spec"].items() if k != "path"},
                       "ids": [p["id"] for p in s["problems"]]} for n, s in suites.items()},
        "backend": spec.evaluation.backend, "generated": _needs_generated_texts(spec),
        "require_target_correct": spec.data.require_target_correct,
        "rhos": sorted({float(r) for r in spec.grid.get("rho", [spec.selection.rho])}),
    })
    manifest_path = pdir / "prepared.json"
    if manifest_path.is_file():
        old = read_json(manifest_path)
        if old.get("key") == key and all((pdir / "baseline" / f"{n}.jsonl").is_file() for n in suites):
            _log(f"prepared: reusing {pdir} (key {key}; no baseline re-evaluation)")
            return {**old, "evaluations": {n: 0 for n in suites}}
        if old.get("key") != key:
            raise InputError(f"{pdir}: the sweep's inputs changed since it started (models, data or suites; "
                             f"prepared key {old.get('key')} -> {key}); trials would be compared with another "
                             f"baseline: start a new sweep (another name or --out)")

    template = spec.evaluation.template or info["own_template"]
    evaluations: dict[str, int] = {}
    baseline: dict[str, list[dict]] = {}
    probes: dict[str, dict] = {}
    backend = make_backend(spec.evaluation.backend, info["target"], batch_size=spec.evaluation.batch_size,
                           **_backend_options(spec))
    try:
        if spec.data.require_target_correct and info["kind"] == "math" and "forget" in suites:
            # forget = the first forget_size candidates the target solves (the capability to remove)
            s = suites["forget"]
            res = evaluate(info["target"], SuiteSpec.model_validate(s["spec"]), backend=backend,
                           problems=s["problems"], cache_dir=pdir / "cache", progress=True)
            evaluations["forget"] = 1
            ok = [(p, r) for p, r in zip(s["problems"], res.records) if r["correct"]][: spec.data.forget_size]
            if len(ok) < spec.data.forget_size:
                raise InputError(f"data.require_target_correct: the target solves only {len(ok)} of "
                                 f"{len(s['problems'])} candidates; need forget_size={spec.data.forget_size}")
            s["problems"] = [p for p, _ in ok]
            info["forget_texts"] = s["problems"]
            baseline["forget"] = [r for _, r in ok]
        for name, s in suites.items():
            if name in baseline:
                continue
            _log(f"baseline: evaluating the target on {name} ({len(s['problems'])} problems)")
            res = evaluate(info["target"], SuiteSpec.model_validate(s["spec"]), backend=backend,
                           problems=s["problems"], cache_dir=pdir / "cache", progress=True)
            evaluations[name] = evaluations.get(name, 0) + 1
            baseline[name] = res.records
            if res.probe is not None:
                probes[name] = res.probe
            _log(f"baseline {name}: {res.n_correct}/{res.n} = {res.accuracy:.3f}"
                 f"{' (cache hit)' if res.cache_hit else ''} in {res.seconds:.0f}s")
        generated = None
        if _needs_generated_texts(spec):
            generated = _generated_texts(spec, info, suites, baseline, backend, template, pdir)
    finally:
        backend.close()

    # selection statistics that do not depend on the trial: spectra (every rho of the grid) and
    # the forget-gradient coupling (per forget-text variant), cached where select() looks
    sel_cache = pdir / "selection_cache"
    try:
        from mast.selection import coupling_stats, spectral_stats_multi
    except ImportError:
        _log("prepared: mast.selection caches unavailable; selection computes its statistics per trial")
    else:
        sel = spec.selection
        rhos = sorted({float(r) for r in spec.grid.get("rho", [sel.rho])})
        _log(f"spectral statistics (rho {rhos}) and forget-gradient coupling")
        spectral_stats_multi(info["reference"], info["target"], rhos, sel_cache, sel.candidates)
        for texts in [info["forget_texts"]] + ([generated] if generated is not None else []):
            coupling_stats(info["reference"], info["target"], texts, sel_cache, sel.candidates, template,
                           sel.max_length, sel.coupling_batch_size)

    write_jsonl(pdir / "forget.jsonl", info["forget_texts"])
    write_jsonl(pdir / "retain.jsonl", info["retain_texts"])
    if generated is not None:
        write_jsonl(pdir / "forget_generated.jsonl", generated)
    for name, s in suites.items():
        write_jsonl(pdir / "suites" / f"{name}.jsonl", s["problems"])
        write_jsonl(pdir / "baseline" / f"{name}.jsonl", baseline[name])
        if name in probes:
            write_json(pdir / "baseline" / f"{name}.probe.json", probes[name])
    manifest = {
        "key": key, "created": _now(), "kind": info["kind"], "toy_dir": info.get("toy_dir"),
        "reference": info["reference"], "target": info["target"], "base": info.get("base"),
        "template": template, "backend": spec.evaluation.backend,
        "suites": {n: s["spec"] for n, s in suites.items()},
        "baseline_accuracy": {n: sum(bool(r["correct"]) for r in baseline[n]) / max(1, len(baseline[n]))
                              for n in suites},
        "n": {"forget_texts": len(info["forget_texts"]), "retain_texts": len(info["retain_texts"]),
              **{n: len(s["problems"]) for n, s in suites.items()}},
        "selection_cache": str(sel_cache), "generated_texts": generated is not None,
    }
    write_json(manifest_path, manifest)  # written last: its presence means prepared/ is complete
    return {**manifest, "evaluations": evaluations}


def _generated_texts(spec, info, suites, baseline, backend, template, pdir) -> list[dict]:
    """Forget texts = the target's own correct greedy generation (reference solution otherwise)."""
    from mast.evaluation import evaluate

    ids = [p["id"] for p in info["forget_texts"]]
    if "forget" in suites and [p["id"] for p in suites["forget"]["problems"]] == ids:
        records = baseline["forget"]
    else:  # the toy: forget suite (held out) != unlearning texts; generate on the texts themselves
        d = (SuiteSpec.model_validate(suites["forget"]["spec"]) if "forget" in suites
             else SuiteSpec(name="forget_texts", benchmark="jsonl", path="<sweep>", template=template))
        suite = SuiteSpec.model_validate({**d.model_dump(), "name": "forget_texts", "limit": None, "probe": None})
        records = evaluate(info["target"], suite, backend=backend, problems=info["forget_texts"],
                           cache_dir=pdir / "cache").records
    out = []
    for p, r in zip(info["forget_texts"], records):
        out.append({**p, "solution": r["response"], "text_source": "target"} if r["correct"]
                   else {**p, "text_source": "reference"})
    _log(f"generated forget texts: {sum(o['text_source'] == 'target' for o in out)}/{len(out)} from the target")
    return out


# --------------------------------------------------------------------------- one trial (runs in a Ray worker)


def _mcnemar_row(before: list[dict], after: list[dict], spec_eval: dict) -> dict:
    from mast.stats import mcnemar_test

    return mcnemar_test(before, after, n_bootstrap=spec_eval["n_bootstrap"], confidence=spec_eval["confidence"],
                        seed=0)


def _table(before: list[dict], after: list[dict]) -> dict[str, list]:
    b = {r["id"]: r for r in before}
    return {
        "id": [r["id"] for r in after],
        "correct_before": [bool(b[r["id"]]["correct"]) if r["id"] in b else None for r in after],
        "correct_after": [bool(r["correct"]) for r in after],
        "extracted_before": [str(b[r["id"]].get("extracted")) if r["id"] in b else None for r in after],
        "extracted_after": [str(r.get("extracted")) for r in after],
        "response_after": [str(r.get("response", ""))[:4000] for r in after],
    }


def trial_tables(trial_dir: Path, baseline: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for name, before in baseline.items():
        p = trial_dir / "results" / f"{name}.jsonl"
        if p.is_file():
            out[name] = _table(before, read_jsonl(p))
    return out


def log_trial_to_mlflow(tracker, run_id: str, row: dict, trial_dir: Path, baseline: dict[str, list[dict]]) -> None:
    """Idempotent: everything from the trial's files; timestamps fixed by the trial's finish time."""
    losses = read_jsonl(trial_dir / "losses.jsonl") if (trial_dir / "losses.jsonl").is_file() else []
    ts = int(row.get("timing", {}).get("finished", time.time()) * 1000)
    tracker.log_trial(run_id, row, trial_dir, losses, trial_tables(trial_dir, baseline), timestamp=ts)


def run_trial(config: dict, ctx: dict) -> None:
    """The Ray Tune function trainable: select -> unlearn -> evaluate -> McNemar -> tune.report.

    `config["point"]` is the grid point (trial id, grid values, full selection/unlearning
    specs); `ctx` (via ``tune.with_parameters``) carries the prepared data and baselines,
    so trials never re-evaluate the target.
    """
    from ray import tune

    point = config["point"]
    tid = point["trial_id"]
    sweep_dir = Path(ctx["sweep_dir"])
    tdir = sweep_dir / "trials" / tid
    result_path = tdir / "result.json"
    tracker = ctx["tracker"]
    if result_path.is_file():  # finished before a driver crash/resume: report what it recorded
        row = read_json(result_path)
        if row.get("status") == "ok" and not row.get("partial"):
            if row.get("mlflow_run_id") and tracker.run_status(row["mlflow_run_id"]) != "FINISHED":
                log_trial_to_mlflow(tracker, row["mlflow_run_id"], row, tdir, ctx["baseline"])
            tune.report(_report_metrics(row, cached=True))
            return
    tdir.mkdir(parents=True, exist_ok=True)
    run_id = tracker.trial_run(ctx["parent_run_id"], tid, point["config"])
    try:
        _run_trial_body(point, ctx, tdir, run_id, tune.report)
    except BaseException as e:
        err = f"{type(e).__name__}: {e}"
        prev = read_json(tdir / "error.json") if (tdir / "error.json").is_file() else {}
        write_json(tdir / "error.json", {"error": err, "attempts": int(prev.get("attempts", 0)) + 1,
                                         "traceback": traceback.format_exc()[-8000:], "time": _now()})
        try:
            tracker.fail_trial(run_id, err)
        except Exception:  # the tracking store must not mask the trial's own error
            pass
        raise


def _report_metrics(row: dict, cached: bool = False) -> dict:
    from mast.tracking import trial_metrics

    return {**trial_metrics(row), "mast_trial_id": row["trial_id"], "cached": cached,
            "n_suites": len(row.get("suites") or {})}


def _run_trial_body(point: dict, ctx: dict, tdir: Path, run_id: str, report) -> None:
    import torch

    from mast.evaluation import evaluate, make_backend
    from mast.selection import select
    from mast.unlearn import unlearn

    t_start = time.time()
    tid = point["trial_id"]
    spec_eval = ctx["evaluation"]
    sel_spec = SelectionSpec.model_validate(point["selection"])
    unl_spec = UnlearnSpec.model_validate(point["unlearning"])
    forget = ctx["forget_generated"] if unl_spec.texts == "generated" else ctx["forget_texts"]
    retain = ctx["retain_texts"] or None
    write_json(tdir / "config.json", {"trial_id": tid, "config": point["config"], "selection": point["selection"],
                                      "unlearning": point["unlearning"]})
    # 1. select
    selection = select(ctx["reference"], ctx["target"], forget, sel_spec, cache_dir=ctx["selection_cache"],
                       template=ctx["template"], progress=False)
    write_json(tdir / "selection.json", selection)
    selected = [c["name"] for c in selection.get("candidates", []) if c.get("selected")]
    # 2. unlearn (checkpoint in a trial-local folder, deleted after evaluation unless kept)
    ckpt = tdir / "checkpoint"
    shutil.rmtree(ckpt, ignore_errors=True)
    row: dict = {"trial_id": tid, "status": "ok", "error": None, "config": point["config"], "suites": {},
                 "probe": None, "selected": selected, "mlflow_run_id": run_id,
                 "all_parameters": bool(selection.get("all_parameters"))}
    try:
        res = unlearn(ctx["target"], selection, forget, retain, unl_spec, ckpt, template=ctx["template"],
                      progress=False)
        write_jsonl(tdir / "losses.jsonl", res.losses)
        t_unlearn = time.time()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        assert Path(res.out_dir).resolve() != Path(ctx["target"]).resolve(), "a trial never evaluates the target"
        # 3. evaluate every suite on the unlearned checkpoint, 4. paired tests vs the cached baseline
        backend = make_backend(spec_eval["backend"], res.out_dir, batch_size=spec_eval["batch_size"],
                               progress=False, **ctx["backend_options"])
        try:
            for i, (name, s) in enumerate(ctx["suites"].items()):
                ev = evaluate(res.out_dir, SuiteSpec.model_validate(s), backend=backend, problems=ctx["problems"][name],
                              use_cache=False, progress=False)
                write_jsonl(tdir / "results" / f"{name}.jsonl", ev.records)
                row["suites"][name] = _mcnemar_row(ctx["baseline"][name], ev.records, spec_eval)
                if ev.probe is not None and row["probe"] is None and name in ctx["baseline_probe"]:
                    before = ctx["baseline_probe"][name]
                    row["probe"] = {"suite": name, "fractions": ev.probe["fractions"],
                                    "before": before["accuracy"], "after": ev.probe["accuracy"]}
                    write_json(tdir / "probe.json", {**row["probe"], "before_detail": before,
                                                     "after_detail": ev.probe})
                if ctx["report_each_suite"] and i < len(ctx["suites"]) - 1:
                    # ASHA: intermediate result after each suite (rung = suites scored); a stopped
                    # trial keeps the suites it has (partial row, reconciled by the driver)
                    row["timing"] = {"started": t_start, "finished": time.time()}
                    write_json(tdir / "result.json", {**row, "partial": True})
                    report(_report_metrics(row))
        finally:
            backend.close()
    finally:
        if not ctx["keep_checkpoints"]:
            shutil.rmtree(ckpt, ignore_errors=True)
    row["timing"] = {"started": t_start, "unlearned": t_unlearn, "finished": time.time()}
    write_json(tdir / "result.json", row)  # the trial's completion marker
    (tdir / "error.json").unlink(missing_ok=True)
    log_trial_to_mlflow(ctx["tracker"], run_id, row, tdir, ctx["baseline"])
    report(_report_metrics(row))


# --------------------------------------------------------------------------- Ray Tune


def _trial_resources(spec: SweepSpec):
    from ray import tune

    r = spec.resources
    tp = spec.evaluation.tensor_parallel_size
    if spec.evaluation.backend == "vllm" and tp > 1:
        # the vLLM worker is a subprocess of the trial on the same node, tensor-parallel over the
        # GPUs Ray gave the trial: one bundle holding them all, on one node
        return tune.PlacementGroupFactory([{"CPU": r.cpu, "GPU": max(r.gpu, float(tp))}], strategy="STRICT_PACK")
    res = {"cpu": r.cpu}
    if r.gpu > 0:
        res["gpu"] = r.gpu
    return res


def _scheduler(spec: SweepSpec, n_suites: int):
    if spec.scheduler.kind != "asha":
        return None  # FIFO
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(metric=spec.scheduler.metric, mode=spec.scheduler.mode, time_attr="training_iteration",
                         max_t=max(1, n_suites), grace_period=min(spec.scheduler.grace_period, max(1, n_suites)),
                         reduction_factor=spec.scheduler.reduction_factor)


def _trial_name(trial) -> str:
    return trial.config["point"]["trial_id"]


def _ray_init(spec: SweepSpec) -> bool:
    """Connect to $RAY_ADDRESS (a cluster, `ray job submit`) or start a local Ray; True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    env = {"env_vars": {k: v for k, v in os.environ.items()
                        if k.startswith(("MAST_", "HF_", "MLFLOW_")) or k in ("TOKENIZERS_PARALLELISM",)}}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        ncpu = int(os.environ.get("MAST_RAY_NUM_CPUS", os.cpu_count() or 1))
        ray.init(address="local", num_cpus=ncpu, include_dashboard=False, runtime_env=env,
                 object_store_memory=int(os.environ.get("MAST_RAY_OBJECT_STORE_MB", "256")) * 2**20)
    return True


def run_tune(spec: SweepSpec, grid: Grid, ctx: dict, storage: str, resume: bool):
    """Fit (or restore and continue) the sweep's Tune experiment; returns the ResultGrid."""
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), _trial_resources(spec))
    exp_path = storage.rstrip("/") + "/" + spec.name
    if resume and tune.Tuner.can_restore(exp_path):
        _log(f"resuming the Tune experiment at {exp_path}")
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        points = [{"trial_id": t.trial_id, "config": t.config, "selection": t.selection, "unlearning": t.unlearning}
                  for t in grid.trials]
        tuner = tune.Tuner(
            trainable,
            param_space={"point": tune.grid_search(points)},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=spec.resources.max_concurrent, scheduler=_scheduler(spec, len(ctx["suites"])),
                trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
                # CPU trials reuse worker processes (saves the torch import per trial); GPU
                # trials get a fresh process each, so nothing of one trial's GPU memory lingers
                reuse_actors=spec.resources.gpu == 0),
            run_config=tune.RunConfig(
                storage_path=storage, name=spec.name, verbose=1,
                failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures)),
        )
    return tuner.fit()


# --------------------------------------------------------------------------- after the trials


def collect_rows(grid: Grid, sweep_dir: Path, tune_errors: dict[str, str]) -> list[dict]:
    """One trials.jsonl row per grid trial: its result.json, else failed with its last error."""
    rows = []
    for t in grid.trials:
        tdir = sweep_dir / "trials" / t.trial_id
        p = tdir / "result.json"
        row = read_json(p) if p.is_file() else None
        if row is not None and row.get("status") == "ok":
            row = {k: v for k, v in row.items() if k != "partial"} | ({"stopped_early": True} if row.get("partial")
                                                                        else {})
            rows.append(row)
            continue
        err = tune_errors.get(t.trial_id)
        if (tdir / "error.json").is_file():
            e = read_json(tdir / "error.json")
            err = f"{e['error']} (after {e.get('attempts', 1)} attempt(s))"
        rows.append({"trial_id": t.trial_id, "status": "failed", "error": err or "did not run", "config": t.config,
                     "suites": {}, "probe": None, "selected": [], "mlflow_run_id": (row or {}).get("mlflow_run_id")})
    return rows


def _tune_errors(results) -> dict[str, str]:
    out = {}
    for r in results:
        if r.error is not None:
            tid = (r.config or {}).get("point", {}).get("trial_id")
            if tid:
                out[tid] = f"{type(r.error).__name__}: {str(r.error).strip().splitlines()[-1][:500]}"
    return out


def reconcile_mlflow(tracker, parent_run_id: str, rows: list[dict], sweep_dir: Path, baseline: dict) -> None:
    """Every trial ends with exactly one child run: FINISHED if ok, FAILED if not."""
    by_tid = {r.data.tags.get("mast.trial_id"): r for r in tracker.child_runs()}
    for row in rows:
        tdir = sweep_dir / "trials" / row["trial_id"]
        run = by_tid.get(row["trial_id"])
        if row["status"] == "ok":
            run_id = row.get("mlflow_run_id") or (run.info.run_id if run else None)
            if run_id is None:
                run_id = tracker.trial_run(parent_run_id, row["trial_id"], row["config"])
            if tracker.run_status(run_id) != "FINISHED":
                log_trial_to_mlflow(tracker, run_id, row, tdir, baseline)
        else:
            run_id = run.info.run_id if run else tracker.trial_run(parent_run_id, row["trial_id"], row["config"])
            row["mlflow_run_id"] = run_id
            if tracker.run_status(run_id) != "FAILED":
                tracker.fail_trial(run_id, row["error"] or "failed")


def log_parent(tracker, parent_run_id: str, sweep_dir: Path, rows: list[dict], table: dict | None,
               prepared: dict) -> None:
    """Parent run: spec, split ids, baselines, trials table, seed-level significance, Holm, plots."""
    c = tracker.client
    ts = int(time.time() * 1000)
    tracker.log_metrics(parent_run_id, {f"baseline/{n}/accuracy": a for n, a in prepared["baseline_accuracy"].items()}
                        | {"trials/ok": sum(r["status"] == "ok" for r in rows),
                           "trials/failed": sum(r["status"] != "ok" for r in rows)}, timestamp=ts)
    for name in ("spec.yaml", "sweep.json", "trials.jsonl", "seed_table.json"):
        if (sweep_dir / name).is_file():
            c.log_artifact(parent_run_id, str(sweep_dir / name))
    pdir = sweep_dir / "prepared"
    splits = {"forget_texts": [p["id"] for p in read_jsonl(pdir / "forget.jsonl")],
              "retain_texts": [p["id"] for p in read_jsonl(pdir / "retain.jsonl")]}
    for f in sorted((pdir / "suites").glob("*.jsonl")):
        splits[f"suite:{f.stem}"] = [p["id"] for p in read_jsonl(f)]
    c.log_dict(parent_run_id, splits, "splits/split_ids.json")
    c.log_artifacts(parent_run_id, str(pdir / "baseline"), "baseline")
    c.log_artifact(parent_run_id, str(pdir / "prepared.json"), "baseline")
    if table is not None:
        c.log_dict(parent_run_id, table, "significance/seed_table.json")
        holm = [{k: cmp.get(k) for k in ("suite", "condition", "baseline", "n", "mean_difference", "p_raw",
                                         "p_holm", "reject")} for cmp in table.get("comparisons", [])]
        c.log_dict(parent_run_id, {"family": table.get("family"), "comparisons": holm}, "significance/holm.json")
        for cmp in table.get("comparisons", []):
            if cmp.get("p_holm") is not None:
                key = re.sub(r"[^A-Za-z0-9_\-./ ]", "_", f"holm/{cmp['suite']}/{cmp['condition']}_vs_{cmp['baseline']}")
                tracker.log_metrics(parent_run_id, {key: cmp["p_holm"]}, timestamp=ts)
    report = sweep_dir / "report"
    if report.is_dir():
        c.log_artifacts(parent_run_id, str(report), "report")


def build_report_if_available(sweep_dir: Path) -> str | None:
    try:
        from mast.report import build_report
    except ImportError:
        return "mast.report.build_report is not available in this build"
    try:
        path = build_report(sweep_dir, sweep_dir / "report")
        _log(f"report: {path}")
        return None
    except Exception as e:  # the sweep's results stand without the report; `mast report` can retry
        _log(f"report failed ({type(e).__name__}: {e}); run `mast report {sweep_dir}` to retry")
        return f"{type(e).__name__}: {e}"


def headline(rows: list[dict], suites: list[str]) -> str:
    """Per trial: accuracy before -> after per suite, delta and McNemar p."""
    lines = [f"{'trial':<34} " + " ".join(f"{s:>26}" for s in suites)]
    for r in rows:
        cells = []
        for s in suites:
            m = (r.get("suites") or {}).get(s)
            cells.append(f"{m['acc_before']:.3f}->{m['acc_after']:.3f} ({m['delta']:+.3f}, p={m['p_value']:.3g})"
                         if m else r["status"])
        lines.append(f"{r['trial_id']:<34} " + " ".join(f"{c:>26}" for c in cells))
    return "\n".join(lines)


# --------------------------------------------------------------------------- the whole sweep


def run_sweep(spec_path: str | os.PathLike, out: str | os.PathLike | None = None, resume: bool = False,
              data_dir: str | os.PathLike | None = None) -> dict:
    """Run (or resume) a sweep; returns the final sweep.json. Raises InputError on bad input."""
    spec_path = Path(spec_path)
    spec = load_yaml(spec_path, SweepSpec)
    if data_dir is not None:
        spec.data.data_dir = str(data_dir)
    if spec.data.data_dir:
        dd = Path(spec.data.data_dir).expanduser()
        if not dd.is_absolute() and not dd.exists() and (spec_path.parent / dd).exists():
            dd = spec_path.parent / dd
        if not dd.is_dir():
            raise InputError(f"data_dir: {spec.data.data_dir}: folder not found")
        spec.data.data_dir = str(dd.resolve())
    check_spec(spec, str(spec_path))
    grid = expand_grid(spec, str(spec_path))

    sweep_dir = sweep_dir_for(spec, out)
    meta_path = sweep_dir / "sweep.json"
    h = spec_hash(spec)
    if resume:
        if not meta_path.is_file():
            raise InputError(f"{sweep_dir}: no sweep to resume (no sweep.json); run without --resume")
        meta = read_json(meta_path)
        if meta.get("spec_hash") != h:
            raise InputError(f"{spec_path}: spec changed since the sweep at {sweep_dir} started "
                             f"(hash {meta.get('spec_hash')} -> {h}); start a new sweep (another name or --out)")
        meta.pop("finished", None)
        _log(f"resuming {sweep_dir}")
    else:
        if meta_path.is_file() or (sweep_dir / "trials").is_dir():
            raise InputError(f"{sweep_dir}: already exists; use --resume to continue it (or pick another --out)")
        meta = {"name": spec.name, "spec_hash": h, "sweep_id": uuid.uuid4().hex[:12], "started": _now(),
                "baseline_evaluations": {}}
    _log(grid.summary())
    for why in sorted(set(grid.dropped)):
        _log(f"  dropped {grid.dropped.count(why)} x {why}")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        shutil.copyfile(spec_path, sweep_dir / "spec.yaml")
    meta.update({"code_version": code_version(), "n_trials": len(grid.trials), "n_grid_points": grid.n_points,
                 "n_dropped": len(grid.dropped), "data_dir": spec.data.data_dir,
                 "trial_ids": [t.trial_id for t in grid.trials]})
    write_json(meta_path, meta)

    # tracking: the store and the experiment exist before any trial starts
    from mast.tracking import Tracker, init_experiment, resolve_uri

    uri = resolve_uri(spec.tracking.uri, sweep_dir)
    experiment = spec.tracking.experiment or spec.name
    exp_id = init_experiment(uri, experiment, sweep_dir)
    tracker = Tracker(uri, exp_id, meta["sweep_id"])
    parent = tracker.parent_run(spec.name, {"spec_hash": h, "n_trials": len(grid.trials),
                                            "grid": json.dumps(spec.grid), "sweep_dir": str(sweep_dir),
                                            "code_version": meta["code_version"]})
    meta.update({"tracking_uri": uri, "experiment": experiment, "experiment_id": exp_id, "parent_run_id": parent})
    write_json(meta_path, meta)
    c = tracker.client
    c.log_artifact(parent, str(sweep_dir / "spec.yaml"))

    # prepare once (a GPU task on a cluster when trials need GPUs: the head may have none)
    started_ray = False
    try:
        if spec.resources.gpu > 0:
            started_ray = _ray_init(spec)
            import ray

            task = ray.remote(num_cpus=spec.resources.cpu, num_gpus=max(spec.resources.gpu,
                                                                         float(spec.evaluation.tensor_parallel_size)))
            prepared = ray.get(task(prepare).remote(spec, sweep_dir, spec.data.data_dir, spec_path.parent.resolve()))
        else:
            prepared = prepare(spec, sweep_dir, spec.data.data_dir, spec_path.parent.resolve())
        counts = dict(meta.get("baseline_evaluations") or {})
        for n, k in prepared["evaluations"].items():
            counts[n] = counts.get(n, 0) + k
        meta["baseline_evaluations"] = counts
        meta["prepared_key"] = prepared["key"]
        write_json(meta_path, meta)
        _log(f"baseline evaluations of the target: {counts}")

        pdir = sweep_dir / "prepared"
        baseline = {n: read_jsonl(pdir / "baseline" / f"{n}.jsonl") for n in prepared["suites"]}
        baseline_probe = {n: read_json(pdir / "baseline" / f"{n}.probe.json") for n in prepared["suites"]
                          if (pdir / "baseline" / f"{n}.probe.json").is_file()}
        ctx = {
            "sweep_dir": str(sweep_dir), "tracker": tracker, "parent_run_id": parent,
            "reference": prepared["reference"], "target": prepared["target"], "template": prepared["template"],
            "forget_texts": read_jsonl(pdir / "forget.jsonl"), "retain_texts": read_jsonl(pdir / "retain.jsonl"),
            "forget_generated": read_jsonl(pdir / "forget_generated.jsonl")
            if (pdir / "forget_generated.jsonl").is_file() else None,
            "suites": prepared["suites"], "problems": {n: read_jsonl(pdir / "suites" / f"{n}.jsonl")
                                                       for n in prepared["suites"]},
            "baseline": baseline, "baseline_probe": baseline_probe,
            "selection_cache": prepared["selection_cache"],
            "evaluation": spec.evaluation.model_dump(mode="json"), "backend_options": _backend_options(spec),
            "keep_checkpoints": spec.keep_checkpoints, "report_each_suite": spec.scheduler.kind == "asha",
        }
        started_ray = _ray_init(spec) or started_ray
        storage = spec.storage_path or str(sweep_dir / "tune")
        t0 = time.time()
        results = run_tune(spec, grid, ctx, storage, resume)
        _log(f"trials done in {time.time() - t0:.0f}s")
        rows = collect_rows(grid, sweep_dir, _tune_errors(results))
    finally:
        if started_ray:
            import ray

            ray.shutdown()

    # after the trials: rows, seed-level table, MLflow reconciliation, report, parent run
    reconcile_mlflow(tracker, parent, rows, sweep_dir, baseline)
    for row in rows:
        if row["status"] != "ok":
            write_json(sweep_dir / "trials" / row["trial_id"] / "result.json", row)
    write_jsonl(sweep_dir / "trials.jsonl", rows)
    table = None
    if any(r["status"] == "ok" for r in rows):
        from mast.stats import seed_level_table

        table = seed_level_table(rows, suite=None, confidence=spec.evaluation.confidence)
        write_json(sweep_dir / "seed_table.json", table)
    n_ok = sum(r["status"] == "ok" for r in rows)
    not_run = [r["trial_id"] for r in rows if r["error"] == "did not run"]
    if not_run:
        _log(f"{len(not_run)} trial(s) did not run (interrupted?): run the same command with --resume")
    meta.update({"finished": _now(), "n_ok": n_ok, "n_failed": len(rows) - n_ok, "n_not_run": len(not_run)})
    write_json(meta_path, meta)
    report_error = build_report_if_available(sweep_dir)
    if report_error:
        meta["report_error"] = report_error
        write_json(meta_path, meta)
    log_parent(tracker, parent, sweep_dir, rows, table, prepared)
    tracker.finish(parent, "FINISHED" if n_ok else "FAILED")
    print(headline(rows, list(prepared["suites"])))
    print(f"{n_ok}/{len(rows)} trials ok -> {sweep_dir}/trials.jsonl, seed_table.json; MLflow: {uri} "
          f"(experiment {experiment!r}, parent run {parent})")
    return meta


def cli_sweep(args) -> int:
    """`mast sweep SPEC.yaml [--resume] [--data-dir DIR] [--out DIR]`.

    Exit 0 when the sweep ran to the end (failed trials are recorded, not fatal: a warning
    line says how many), 1 when every trial failed, 2 on bad input.
    """
    meta = run_sweep(args.spec, out=getattr(args, "out", None), resume=bool(getattr(args, "resume", False)),
                     data_dir=getattr(args, "data_dir", None))
    if meta.get("n_failed"):
        print(f"mast sweep: warning: {meta['n_failed']}/{meta['n_trials']} trial(s) failed "
              f"(errors in trials.jsonl)", file=sys.stderr)
    return 1 if meta.get("n_trials") and not meta.get("n_ok") else 0
