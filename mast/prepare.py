"""Once-per-sweep work, cached in ``<sweep>/prepared`` (content-addressed): models, splits,
suites, the TARGET's baseline results on every suite, the REFERENCE (SFT) model's results on
every suite (the SFT floor, :mod:`mast.floor`), selection statistics.

``data.require_target_correct`` (MATH): the forget set is chosen on one run of the target
(the candidates it solved) and trials are tested against a SECOND, independent run of the
target on the chosen problems (decoding seed + ``INDEPENDENT_SEED_OFFSET``). Testing against
the choosing run would make wrong->right flips impossible by construction, so evaluation noise
alone would look like forgetting. With greedy decoding on the CPU the two runs are identical
(nothing to correct); with sampling or vLLM batching they differ.

Sampling seeds (they matter only with temperature > 0): the baseline runs with the suite's
``decoding.seed`` s; require_target_correct's second run with s + 1; a trial of seed k (a null
trial included) with s + ``TRIAL_SEED_OFFSET`` + k (:func:`trial_run`), so a trial's run is
independent of the baseline's and the null trial measures exactly the noise a trial faces.

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
- validation suites (``evaluation.validation``: ``forget_val`` / ``retain_val``; the toy's
  ``data/*_val.jsonl``, MATH's ``data.retain_val_size`` draw) are evaluated on the target here and
  by every trial, for choices only (:mod:`mast.matched`), never reported; ``unlearning.stop``'s
  check scores forget_val (toy) or the forget problems themselves (MATH): ``prepared/suites/stop.jsonl``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

from mast.config import SuiteSpec, SweepSpec, load_suite
from mast.files import InputError, read_json, read_jsonl, stable_hash, write_json, write_jsonl
from mast.floor import rl_gain
from mast.grid import OWN_SUITES, VAL_SUITES, grid_rhos, needs_generated_texts, ordered_suites, suite_name
from mast.layout import SweepDir

REPO_ROOT = Path(__file__).resolve().parents[1]
PREPARED_VERSION = 2  # 2: the reference's results (SFT floor), require_target_correct's second run
INDEPENDENT_SEED_OFFSET = 1
TRIAL_SEED_OFFSET = 100


def _log(msg: str) -> None:
    print(f"[mast sweep] {msg}", file=sys.stderr, flush=True)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclasses.dataclass
class Sources:
    """Models and split problems of a sweep, before any evaluation."""

    kind: str  # "toy" | "math"
    reference: str
    target: str
    base: str | None
    forget_texts: list[dict]
    retain_texts: list[dict]
    own: dict[str, list[dict]]  # forget/retain suite problems
    own_template: str
    own_yaml: dict[str, Path]  # where forget/retain suite settings come from
    toy_dir: str | None = None


@dataclasses.dataclass
class Prepared:
    """What every trial shares: the manifest ``prepared/prepared.json`` plus how many baseline
    evaluations of the target (``evaluations``) and of the reference (``reference_evaluations``)
    THIS call ran per suite (0 on a cache hit)."""

    key: str
    created: str
    kind: str
    toy_dir: str | None
    reference: str
    target: str
    base: str | None
    template: str
    backend: str
    suites: dict[str, SuiteSpec]  # in run order
    baseline_accuracy: dict[str, float]
    n: dict[str, int]
    selection_cache: str
    generated_texts: bool
    reference_accuracy: dict[str, float] = dataclasses.field(default_factory=dict)
    rl_gain: dict[str, dict] = dataclasses.field(default_factory=dict)  # suite -> floor.rl_gain
    # validation suites (choices only, never reported): name -> spec, and the target's accuracy on them
    validation: dict[str, SuiteSpec] = dataclasses.field(default_factory=dict)
    validation_accuracy: dict[str, float] = dataclasses.field(default_factory=dict)
    # unlearning.stop: the suite and problems (prepared/suites/stop.jsonl) its check scores
    stop_suite: SuiteSpec | None = None
    evaluations: dict[str, int] = dataclasses.field(default_factory=dict)
    reference_evaluations: dict[str, int] = dataclasses.field(default_factory=dict)

    _RUN_COUNTS = ("evaluations", "reference_evaluations")

    def manifest(self) -> dict:
        """prepared.json (everything but the evaluation counts of this call)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self._RUN_COUNTS}
        d["suites"] = {n: s.model_dump(mode="json") for n, s in self.suites.items()}
        d["validation"] = {n: s.model_dump(mode="json") for n, s in self.validation.items()}
        d["stop_suite"] = self.stop_suite.model_dump(mode="json") if self.stop_suite is not None else None
        return d

    @classmethod
    def from_manifest(cls, d: dict, evaluations: dict[str, int]) -> Prepared:
        fields = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in fields}
        d["suites"] = {n: SuiteSpec.model_validate(s) for n, s in d["suites"].items()}
        d["validation"] = {n: SuiteSpec.model_validate(s) for n, s in (d.get("validation") or {}).items()}
        d["stop_suite"] = SuiteSpec.model_validate(d["stop_suite"]) if d.get("stop_suite") else None
        return cls(**{**d, "evaluations": evaluations, "reference_evaluations": dict(evaluations)})


# --------------------------------------------------------------------------- models, splits, suites


def resolve_model(name: str | os.PathLike, field: str) -> str:
    """A local checkpoint folder (absolute) or a Hub id resolved to its local snapshot (:mod:`mast.hub`).

    On a cluster put HF_HOME on shared storage so the snapshot path is valid on every node.
    """
    from mast.hub import resolve_model as resolve

    return resolve(name, f"models.{field}")


def sources(spec: SweepSpec, sd: SweepDir, data_dir: str | None) -> Sources:
    """Models (paths) and the problems of the splits (the toy's files, or draws from the MATH pool)."""
    if spec.models.toy is not None:
        from mast.toy import build_toy

        toy_dir = toy_dir_of(spec, sd)
        _log(f"toy models: {toy_dir} (seed {spec.models.toy.seed}; built if missing)")
        t0 = time.time()
        build_toy(toy_dir, seed=spec.models.toy.seed)
        _log(f"toy ready in {time.time() - t0:.0f}s")
        data = toy_dir / "data"
        full = ("id", "prompt", "solution", "answer")
        forget = read_jsonl(data / "forget.jsonl", required=full)
        retain = read_jsonl(data / "retain.jsonl", required=full)
        forget_eval = read_jsonl(data / "forget_eval.jsonl", required=("id", "prompt", "answer"))
        retain_eval = read_jsonl(data / "retain_eval.jsonl", required=("id", "prompt", "answer"))
        own = {"forget": forget_eval, "retain": retain_eval}
        for n in VAL_SUITES:  # the toy's validation sets (format >= 3), disjoint from everything else
            if (data / f"{n}.jsonl").is_file():
                own[n] = read_jsonl(data / f"{n}.jsonl", required=("id", "prompt", "answer"))
        return Sources(kind="toy", toy_dir=str(toy_dir), reference=str(toy_dir / "sft"),
                       target=str(toy_dir / "rlvr"), base=str(toy_dir / "base"),
                       forget_texts=forget[: spec.data.forget_size], retain_texts=retain[: spec.data.retain_size],
                       own=own, own_template="qwen_boxed",
                       own_yaml={n: toy_dir / "suites" / f"{n}.yaml" for n in OWN_SUITES + VAL_SUITES})
    from mast.data import build_splits, load_math_pool

    reference = resolve_model(spec.models.reference, "reference")
    target = resolve_model(spec.models.target, "target")
    base = resolve_model(spec.models.base, "base") if spec.models.base else None
    pool = load_math_pool(data_dir)
    d = spec.data
    n_forget = d.forget_size * (4 if d.require_target_correct else 1)
    forget, retain_all, *val = build_splits(pool, n_forget, d.retain_size + d.retain_train_size, d.split_seed,
                                            levels=d.levels, subjects=d.subjects, n_retain_val=d.retain_val_size)
    retain, retain_train = retain_all[: d.retain_size], retain_all[d.retain_size:]
    own = {"forget": forget, "retain": retain}
    if val:  # data.retain_val_size > 0: the MATH retain-validation draw (scored like the retain suite)
        own["retain_val"] = val[0]
    yamls = {n: REPO_ROOT / "eval" / f"math_{n}.yaml" for n in OWN_SUITES}
    return Sources(kind="math", reference=reference, target=target, base=base, forget_texts=forget,
                   retain_texts=retain_train, own=own, own_template="qwen_boxed",
                   own_yaml={**yamls, "retain_val": yamls["retain"]})


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


@dataclasses.dataclass
class Suite:
    spec: SuiteSpec
    problems: list[dict]


def _suite_entry(entry: str, spec: SweepSpec, own_yaml: dict[str, Path], own_template: str,
                 spec_dir: Path | None, toy_dir: Path | None) -> tuple[str, str | None, SuiteSpec]:
    """(name, split role or None, settings with the sweep's overrides) of one evaluation.suites entry."""
    name = suite_name(entry)
    if name in OWN_SUITES and not entry.endswith((".yaml", ".yml")):
        yaml_path = own_yaml.get(name)
        if yaml_path and Path(yaml_path).is_file():
            suite = load_suite(yaml_path)
        else:
            suite = SuiteSpec(name=name, benchmark="jsonl", split_role=name, grader="math", template=own_template)
        return name, name, _suite_with_overrides(suite, name, spec)
    path = _find_suite_yaml(entry, spec_dir, toy_dir)
    if path is None:
        raise InputError(f"evaluation.suites: unknown suite {entry!r} (not forget/retain, not a suite "
                         f"file, not in eval/)")
    suite = load_suite(path)
    role = suite.split_role
    name = role or name
    return name, role, _suite_with_overrides(suite, name, spec)


def resolve_suites(spec: SweepSpec, src: Sources, spec_dir: Path | None, data_dir: str | None) -> dict[str, Suite]:
    """Every evaluation suite with its problems, in run order.

    `forget` / `retain` score the sweep's own splits: their settings come from the toy's
    ``suites/<name>.yaml`` or ``eval/math_<name>.yaml`` (else defaults), their problems from
    the sweep. A suite YAML with ``split_role`` is one of them too (named by its role).
    """
    from mast.evaluation import load_suite_problems

    toy_dir = Path(src.toy_dir) if src.toy_dir else None
    out: dict[str, Suite] = {}
    for entry in ordered_suites(spec):
        name, role, suite = _suite_entry(entry, spec, src.own_yaml, src.own_template, spec_dir, toy_dir)
        if name in out:
            raise InputError(f"evaluation.suites: two suites are named {name!r}")
        if role:
            problems = src.own[role]
            problems = problems[: suite.limit] if suite.limit else problems
        else:
            problems = load_suite_problems(suite, data_dir)
        out[name] = Suite(suite, problems)
    return out


def _own_suite(src: Sources, name: str, spec: SweepSpec) -> SuiteSpec:
    """The settings of one of the sweep's own (or validation) suites, without a probe: the toy's
    ``suites/<name>.yaml`` or ``eval/math_*.yaml`` (else defaults), with the sweep's overrides."""
    yaml_path = src.own_yaml.get(name)
    if yaml_path and Path(yaml_path).is_file():
        suite = load_suite(yaml_path)
    else:
        suite = SuiteSpec(name=name, benchmark="jsonl", split_role="forget" if name.startswith("forget") else "retain",
                          grader="math", template=src.own_template)
    return _suite_with_overrides(suite, name, spec).model_copy(update={"probe": None, "limit": None})


def resolve_validation(spec: SweepSpec, src: Sources) -> dict[str, Suite]:
    """The validation suites of ``evaluation.validation`` (forget_val, retain_val) with their problems.

    They exist for choices (the matched-forgetting level, lr/steps): disjoint from the reported
    suites, scored by every trial, never reported as results. The toy has both; MATH has
    ``retain_val`` with ``data.retain_val_size`` > 0 (its forget set is both trained on and
    evaluated, as in the paper, so it has no forget_val).
    """
    out: dict[str, Suite] = {}
    for name in spec.evaluation.validation:
        if name not in src.own:
            how = ("set data.retain_val_size > 0" if name == "retain_val" and src.kind == "math"
                   else "the MATH forget set is trained on and evaluated itself" if src.kind == "math"
                   else "rebuild the toy (format >= 3 writes validation sets)")
            raise InputError(f"evaluation.validation: no {name!r} problems for this sweep ({how})")
        out[name] = Suite(_own_suite(src, name, spec), _limited(src.own[name], spec, name))
    return out


def _limited(problems: list[dict], spec: SweepSpec, name: str) -> list[dict]:
    """The first ``evaluation.limits[name]`` problems (all without a limit)."""
    n = spec.evaluation.limits.get(name)
    return problems[:n] if n else problems


def stop_suite(spec: SweepSpec, src: Sources) -> Suite | None:
    """What ``unlearning.stop``'s check scores: the forget-VALIDATION problems (toy), else the forget
    problems themselves (MATH, where forgetting those exact problems is the goal); None without stop."""
    if spec.unlearning.stop is None and not any(spec.grid.get("stop") or []):
        return None
    if "forget_val" in src.own:
        return Suite(_own_suite(src, "forget_val", spec).model_copy(update={"name": "stop"}),
                     _limited(src.own["forget_val"], spec, "forget_val"))
    return Suite(_own_suite(src, "forget", spec).model_copy(update={"name": "stop"}), src.forget_texts)
def toy_dir_of(spec: SweepSpec, sd: SweepDir) -> Path:
    """Where the toy triple is built (or reused): ``models.toy.out``, else inside the sweep folder."""
    return Path(spec.models.toy.out).expanduser().resolve() if spec.models.toy.out else sd.default_toy


def check_inputs(spec: SweepSpec, spec_dir: Path | None, sd: SweepDir) -> None:
    """Check every input of the sweep before anything is created (InputError, one line).

    The models (a folder with config.json and complete safetensors headers, or a Hub id resolved
    to its local snapshot: :func:`resolve_model`), the toy folder (a folder that is a toy build,
    or absent), the MATH pool in a local ``data_dir``, and every suite: its YAML found and valid,
    its problems readable (a jsonl file, or a benchmark in the local ``data_dir``; a benchmark
    from the Hub is fetched by :func:`prepare`). A wrong path then leaves no sweep folder behind,
    so the corrected re-run is not refused as "already exists".
    """
    from mast.evaluation import load_suite_problems

    data_dir = spec.data.data_dir
    toy_dir = None
    if spec.models.toy is not None:
        toy_dir = toy_dir_of(spec, sd)
        from mast.toy import SUMMARY

        if toy_dir.exists() and not toy_dir.is_dir():
            raise InputError(f"models.toy.out: {toy_dir}: exists and is not a folder")
        if spec.models.toy.out and toy_dir.is_dir() and any(toy_dir.iterdir()) \
                and not (toy_dir / SUMMARY).is_file():
            raise InputError(f"models.toy.out: {toy_dir}: folder exists and is not a toy build; pick another folder")
        own_yaml = {n: toy_dir / "suites" / f"{n}.yaml" for n in OWN_SUITES}
    else:
        for field in ("reference", "target", "base"):
            name = getattr(spec.models, field)
            if name:
                resolve_model(name, field)
        if data_dir:
            from mast.data import load_math_pool

            load_math_pool(data_dir)
        own_yaml = {n: REPO_ROOT / "eval" / f"math_{n}.yaml" for n in OWN_SUITES}
    names: set[str] = set()
    for entry in ordered_suites(spec):
        name, role, suite = _suite_entry(entry, spec, own_yaml, "qwen_boxed", spec_dir, toy_dir)
        if name in names:
            raise InputError(f"evaluation.suites: two suites are named {name!r}")
        names.add(name)
        if not role and (suite.benchmark == "jsonl" or data_dir):
            load_suite_problems(suite, data_dir)


def backend_options(spec: SweepSpec) -> dict:
    """Keyword options of the evaluation backend: vLLM's engine settings (memory, parallelism,
    ``dtype``, ``enforce_eager``) and the worker's ``timeout_s``; none for the hf backend."""
    ev = spec.evaluation
    if ev.backend != "vllm":
        return {}
    opts = {"tensor_parallel_size": ev.tensor_parallel_size, "gpu_memory_utilization": ev.gpu_memory_utilization,
            "dtype": ev.dtype, "enforce_eager": ev.enforce_eager, "timeout_s": ev.timeout_s}
    if ev.max_model_len:
        opts["max_model_len"] = ev.max_model_len
    return opts


# --------------------------------------------------------------------------- prepare


def prepared_key(spec: SweepSpec, src: Sources, suites: dict[str, Suite], validation: dict[str, Suite] | None = None,
                 stop: Suite | None = None) -> str:
    """Content address of prepared/: models' fingerprints, split and suite ids, what was evaluated
    (validation suites and the stop check's problems only when there are any: older keys stay)."""
    from mast.files import fingerprint_model

    extra = {}
    if validation:
        extra["validation"] = {n: {"spec": {k: v for k, v in s.spec.model_dump(mode="json").items() if k != "path"},
                                   "ids": [p["id"] for p in s.problems]} for n, s in validation.items()}
    if stop is not None:
        extra["stop"] = {"spec": {k: v for k, v in stop.spec.model_dump(mode="json").items() if k != "path"},
                         "ids": [p["id"] for p in stop.problems]}
    return stable_hash({
        **extra,
        "v": PREPARED_VERSION,
        "reference": fingerprint_model(src.reference), "target": fingerprint_model(src.target),
        "forget_texts": [p["id"] for p in src.forget_texts], "retain_texts": [p["id"] for p in src.retain_texts],
        "suites": {n: {"spec": {k: v for k, v in s.spec.model_dump(mode="json").items() if k != "path"},
                       "ids": [p["id"] for p in s.problems]} for n, s in suites.items()},
        "backend": spec.evaluation.backend, "generated": needs_generated_texts(spec),
        "require_target_correct": spec.data.require_target_correct,
        "rhos": grid_rhos(spec),
    })


def prepare(spec: SweepSpec, sweep_dir: SweepDir | str | os.PathLike, data_dir: str | None = None,
            spec_dir: Path | None = None) -> Prepared:
    """Trial-independent work, once per sweep, cached in ``<sweep>/prepared`` (content-addressed).

    A second call with the same inputs reuses it (no baseline re-evaluation); changed inputs
    are an InputError (trials would be compared with another baseline).
    """
    from mast.backends import make_backend

    sd = sweep_dir if isinstance(sweep_dir, SweepDir) else SweepDir(sweep_dir)
    sd.prepared.mkdir(parents=True, exist_ok=True)
    src = sources(spec, sd, data_dir)
    suites = resolve_suites(spec, src, spec_dir, data_dir)
    validation = resolve_validation(spec, src)
    stop = stop_suite(spec, src)
    key = prepared_key(spec, src, suites, validation, stop)
    if sd.prepared_manifest.is_file():
        old = read_json(sd.prepared_manifest)
        if old.get("key") == key and all(sd.baseline_results(n).is_file() and sd.reference_results(n).is_file()
                                         for n in suites):
            _log(f"prepared: reusing {sd.prepared} (key {key}; no baseline re-evaluation)")
            return Prepared.from_manifest(old, {n: 0 for n in suites})
        if old.get("key") != key:
            raise InputError(f"{sd.prepared}: the sweep's inputs changed since it started (models, data or suites; "
                             f"prepared key {old.get('key')} -> {key}); trials would be compared with another "
                             f"baseline: start a new sweep (another name or --out)")

    template = spec.evaluation.template or src.own_template
    backend = make_backend(spec.evaluation.backend, src.target, batch_size=spec.evaluation.batch_size,
                           **backend_options(spec))
    try:
        base = evaluate_baselines(spec, src, suites, sd, backend)
        val_acc = evaluate_validation(src, validation, sd, backend)
        generated = None
        if needs_generated_texts(spec):
            generated = _generated_texts(src, suites, base.records, backend, template, sd)
    finally:
        backend.close()
    baseline, probes, evaluations = base.records, base.probes, base.evaluations
    reference = evaluate_reference(spec, src, suites, sd)

    _selection_statistics(spec, src, generated, template, sd)
    write_jsonl(sd.forget_texts, src.forget_texts)
    write_jsonl(sd.retain_texts, src.retain_texts)
    if generated is not None:
        write_jsonl(sd.forget_generated, generated)
    for name, s in suites.items():
        write_jsonl(sd.suite_problems(name), s.problems)
        write_jsonl(sd.baseline_results(name), baseline[name])
        write_jsonl(sd.reference_results(name), reference.records[name])
        if name in probes:
            write_json(sd.baseline_probe(name), probes[name])
    for name, s in validation.items():
        write_jsonl(sd.suite_problems(name), s.problems)
    if stop is not None:  # MATH: the forget problems as chosen (require_target_correct may have changed them)
        write_jsonl(sd.suite_problems("stop"), stop.problems if "forget_val" in src.own else src.forget_texts)
    for name, records in base.selection_runs.items():
        write_jsonl(sd.baseline_selection_run(name), records)
    gains = {n: rl_gain(reference.records[n], baseline[n]) for n in suites}
    prepared = Prepared(
        key=key, created=now(), kind=src.kind, toy_dir=src.toy_dir, reference=src.reference, target=src.target,
        base=src.base, template=template, backend=spec.evaluation.backend,
        suites={n: s.spec for n, s in suites.items()},
        baseline_accuracy={n: sum(bool(r["correct"]) for r in baseline[n]) / max(1, len(baseline[n])) for n in suites},
        n={"forget_texts": len(src.forget_texts), "retain_texts": len(src.retain_texts),
           **{n: len(s.problems) for n, s in suites.items()}},
        selection_cache=str(sd.selection_cache), generated_texts=generated is not None,
        reference_accuracy={n: g["reference_acc"] for n, g in gains.items()}, rl_gain=gains,
        validation={n: s.spec for n, s in validation.items()}, validation_accuracy=val_acc,
        stop_suite=stop.spec if stop is not None else None,
        evaluations=evaluations, reference_evaluations=reference.evaluations)
    write_json(sd.prepared_manifest, prepared.manifest())  # written last: its presence means prepared/ is complete
    return prepared


@dataclasses.dataclass
class Baselines:
    """A model's results per suite: per-problem records, probe results, evaluations run, and
    (require_target_correct) the first run that chose the forget set, per suite."""

    records: dict[str, list[dict]]
    probes: dict[str, dict]
    evaluations: dict[str, int]
    selection_runs: dict[str, list[dict]] = dataclasses.field(default_factory=dict)


def evaluate_baselines(spec: SweepSpec, src: Sources, suites: dict[str, Suite], sd: SweepDir, backend) -> Baselines:
    """Evaluate the target once per suite (every trial is paired with these results).

    With ``data.require_target_correct`` (MATH) the forget split becomes the first forget_size
    candidates the target solves in a first run (the capability to remove; `suites` and `src`
    are updated), and the forget baseline is a second, independent run on them
    (:func:`independent_run`): the McNemar "before" side of every trial.
    """
    from mast.evaluation import evaluate

    out = Baselines({}, {}, {})
    if spec.data.require_target_correct and src.kind == "math" and "forget" in suites:
        s = suites["forget"]
        res = evaluate(src.target, s.spec, backend=backend, problems=s.problems, cache_dir=sd.eval_cache,
                       progress=True)
        ok = [(p, r) for p, r in zip(s.problems, res.records) if r["correct"]][: spec.data.forget_size]
        if len(ok) < spec.data.forget_size:
            raise InputError(f"data.require_target_correct: the target solves only {len(ok)} of "
                             f"{len(s.problems)} candidates; need forget_size={spec.data.forget_size}")
        s.problems = [p for p, _ in ok]
        src.forget_texts = s.problems
        out.selection_runs["forget"] = [r for _, r in ok]
        second = evaluate(src.target, independent_run(s.spec), backend=backend, problems=s.problems,
                          cache_dir=sd.eval_cache, progress=True)
        out.evaluations["forget"] = 2
        out.records["forget"] = second.records
        _log(f"baseline forget: chosen on run 1 ({len(ok)} solved); run 2 (independent) solves "
             f"{second.n_correct}/{second.n}")
    for name, s in suites.items():
        if name in out.records:
            continue
        _log(f"baseline: evaluating the target on {name} ({len(s.problems)} problems)")
        res = evaluate(src.target, s.spec, backend=backend, problems=s.problems, cache_dir=sd.eval_cache,
                       progress=True)
        out.evaluations[name] = out.evaluations.get(name, 0) + 1
        out.records[name] = res.records
        if res.probe is not None:
            out.probes[name] = res.probe
        _log(f"baseline {name}: {res.n_correct}/{res.n} = {res.accuracy:.3f}"
             f"{' (cache hit)' if res.cache_hit else ''} in {res.seconds:.0f}s")
    return out


def evaluate_validation(src: Sources, validation: dict[str, Suite], sd: SweepDir, backend) -> dict[str, float]:
    """The target's accuracy on each validation suite (records in baseline/<name>.jsonl): the
    starting point of the validation curves the matched level is chosen on."""
    from mast.evaluation import evaluate

    out = {}
    for name, s in validation.items():
        res = evaluate(src.target, s.spec, backend=backend, problems=s.problems, cache_dir=sd.eval_cache,
                       progress=True)
        write_jsonl(sd.baseline_results(name), res.records)
        out[name] = res.accuracy
        _log(f"baseline {name} (validation): {res.n_correct}/{res.n} = {res.accuracy:.3f}")
    return out


def independent_run(suite: SuiteSpec, offset: int = INDEPENDENT_SEED_OFFSET) -> SuiteSpec:
    """The suite with another sampling seed (decoding.seed + offset): a run of the same model whose
    sampling noise is independent of the first (identical under greedy decoding)."""
    d = suite.model_dump()
    d["decoding"] = {**d["decoding"], "seed": d["decoding"]["seed"] + offset}
    return SuiteSpec.model_validate(d)


def trial_run(suite: SuiteSpec, trial_seed: int) -> SuiteSpec:
    """How a trial of seed `trial_seed` evaluates `suite`: sampling seed s + TRIAL_SEED_OFFSET + seed."""
    return independent_run(suite, TRIAL_SEED_OFFSET + int(trial_seed))


def evaluate_reference(spec: SweepSpec, src: Sources, suites: dict[str, Suite], sd: SweepDir) -> Baselines:
    """Evaluate the reference (SFT) model once per suite, on the same problems as the target's
    baseline (cached like it): the SFT floor every trial is read against."""
    from mast.backends import make_backend
    from mast.evaluation import evaluate

    out = Baselines({}, {}, {})
    backend = make_backend(spec.evaluation.backend, src.reference, batch_size=spec.evaluation.batch_size,
                           **backend_options(spec))
    try:
        for name, s in suites.items():
            suite = s.spec.model_copy(update={"probe": None})  # the floor needs accuracy, not the probe
            res = evaluate(src.reference, suite, backend=backend, problems=s.problems, cache_dir=sd.eval_cache,
                           progress=True)
            out.records[name] = res.records
            out.evaluations[name] = 0 if res.cache_hit else 1
            _log(f"reference {name}: {res.n_correct}/{res.n} = {res.accuracy:.3f}"
                 f"{' (cache hit)' if res.cache_hit else ''} in {res.seconds:.0f}s")
    finally:
        backend.close()
    return out


def _selection_statistics(spec: SweepSpec, src: Sources, generated: list[dict] | None, template: str,
                          sd: SweepDir) -> None:
    """Selection statistics that do not depend on the trial: spectra (every rho of the grid) and
    the forget-gradient coupling (per forget-text variant), cached where select() looks."""
    try:
        from mast.selection import coupling_stats, spectral_stats_multi
    except ImportError:
        _log("prepared: mast.selection caches unavailable; selection computes its statistics per trial")
        return
    sel = spec.selection
    rhos = grid_rhos(spec)
    _log(f"spectral statistics (rho {rhos}) and forget-gradient coupling")
    spectral_stats_multi(src.reference, src.target, rhos, sd.selection_cache, sel.candidates)
    for texts in [src.forget_texts] + ([generated] if generated is not None else []):
        coupling_stats(src.reference, src.target, texts, sd.selection_cache, sel.candidates, template,
                       sel.max_length, sel.coupling_batch_size)


def first_correct_response(record: dict) -> str | None:
    """The target's first correct answer to a problem: sample 0 when right, else the first right one
    of its other samples (n > 1); None when it solved it in no sample."""
    if record.get("correct"):
        return record["response"]
    for sample in record.get("samples") or []:
        if sample.get("correct"):
            return sample["response"]
    return None


def _generated_texts(src: Sources, suites: dict[str, Suite], baseline: dict[str, list[dict]], backend,
                     template: str, sd: SweepDir) -> list[dict]:
    """Forget texts = the target's own correct greedy generation (reference solution otherwise)."""
    from mast.evaluation import evaluate

    ids = [p["id"] for p in src.forget_texts]
    if "forget" in suites and [p["id"] for p in suites["forget"].problems] == ids:
        records = baseline["forget"]
    else:  # the toy: forget suite (held out) != unlearning texts; generate on the texts themselves
        d = (suites["forget"].spec if "forget" in suites
             else SuiteSpec(name="forget_texts", benchmark="jsonl", path="<sweep>", template=template))
        suite = SuiteSpec.model_validate({**d.model_dump(), "name": "forget_texts", "limit": None, "probe": None})
        records = evaluate(src.target, suite, backend=backend, problems=src.forget_texts,
                           cache_dir=sd.eval_cache).records
    out = []
    for p, r in zip(src.forget_texts, records):
        response = first_correct_response(r)
        out.append({**p, "solution": response, "text_source": "target"} if response is not None
                   else {**p, "text_source": "reference"})
    _log(f"generated forget texts: {sum(o['text_source'] == 'target' for o in out)}/{len(out)} from the target")
    return out
