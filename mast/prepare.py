"""Once-per-sweep work, cached in ``<sweep>/prepared`` (content-addressed): the sweep's sources
(:mod:`mast.sources`: models, splits), its suites (:mod:`mast.suites`), and what every trial is
read against (:mod:`mast.baselines`: the target's and the reference's results on every suite,
the validation baselines, generated forget texts, selection statistics), summed up in a typed
:class:`Prepared` (``prepared/prepared.json``, written last).

Sampling seeds (they matter only with temperature > 0): every run samples in a stream of its own
(:mod:`mast.sampling_seeds`): the target's baselines ``target``, require_target_correct's second run
``target/2``, the reference's ``reference``, a trial (a null trial included) ``trial/<trial_id>``
(:meth:`~mast.config.SuiteSpec.trial_run`), so no two runs share a sample of a problem and the null
trial measures exactly the noise a trial faces.

:func:`check_inputs` checks every input before the sweep folder exists.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from mast.backends import make_backend
from mast.baselines import (
    Baselines,
    evaluate_baselines,
    evaluate_reference,
    generated_texts,
    selection_statistics,
)
from mast.config import SuiteSpec, SweepSpec
from mast.data import load_math_pool
from mast.evaluation import load_suite_problems
from mast.files import (
    InputError,
    fingerprint_model,
    log,
    now,
    read_json,
    stable_hash,
    write_json,
    write_jsonl,
)
from mast.floor import rl_gain
from mast.grid import grid_rhos, needs_generated_texts, ordered_suites
from mast.layout import SweepDir
from mast.sources import OWN_TEMPLATE, Sources, own_suite_yamls, resolve_model, sources, toy_dir_of
from mast.suites import Suite, resolve_suites, resolve_validation, stop_suite, suite_entry
from mast.toy import SUMMARY as TOY_SUMMARY

PREPARED_VERSION = 2  # 2: the reference's results (SFT floor), require_target_correct's second run


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


def check_inputs(spec: SweepSpec, spec_dir: Path | None, sd: SweepDir) -> None:
    """Check every input of the sweep before anything is created (InputError, one line).

    The models (a folder with config.json and complete safetensors headers, or a Hub id resolved
    to its local snapshot: :func:`mast.sources.resolve_model`), the toy folder (a folder that is a
    toy build, or absent), the MATH pool in a local ``data_dir``, and every suite: its YAML found and
    valid, its problems readable (a jsonl file, or a benchmark in the local ``data_dir``; a benchmark
    from the Hub is fetched by :func:`prepare`). A wrong path then leaves no sweep folder behind,
    so the corrected re-run is not refused as "already exists".
    """
    data_dir = spec.data.data_dir
    toy_dir = _check_models(spec, sd, data_dir)
    names: set[str] = set()
    for entry in ordered_suites(spec):
        name, role, suite = suite_entry(entry, spec, own_suite_yamls(toy_dir), OWN_TEMPLATE, spec_dir, toy_dir)
        if name in names:
            raise InputError(f"evaluation.suites: two suites are named {name!r}")
        names.add(name)
        if not role and (suite.benchmark == "jsonl" or data_dir):
            load_suite_problems(suite, data_dir)


def _check_models(spec: SweepSpec, sd: SweepDir, data_dir: str | None) -> Path | None:
    """The toy folder (returned; None for MATH), or the given models and the local MATH pool."""
    if spec.models.toy is not None:
        toy_dir = toy_dir_of(spec, sd)
        if toy_dir.exists() and not toy_dir.is_dir():
            raise InputError(f"models.toy.out: {toy_dir}: exists and is not a folder")
        if spec.models.toy.out and toy_dir.is_dir() and any(toy_dir.iterdir()) \
                and not (toy_dir / TOY_SUMMARY).is_file():
            raise InputError(f"models.toy.out: {toy_dir}: folder exists and is not a toy build; pick another folder")
        return toy_dir
    for field in ("reference", "target", "base"):
        name = getattr(spec.models, field)
        if name:
            resolve_model(name, field)
    if data_dir:
        load_math_pool(data_dir)
    return None


def _suite_key(s: Suite) -> dict:
    """A suite in the prepared key: its settings but where its file lives, and its problems' ids."""
    return {"spec": {k: v for k, v in s.spec.model_dump(mode="json").items() if k != "path"},
            "ids": [p["id"] for p in s.problems]}


def prepared_key(spec: SweepSpec, src: Sources, suites: dict[str, Suite], validation: dict[str, Suite] | None = None,
                 stop: Suite | None = None) -> str:
    """Content address of prepared/: models' fingerprints, split and suite ids, what was evaluated
    (validation suites and the stop check's problems only when there are any: older keys stay)."""
    extra = {}
    if validation:
        extra["validation"] = {n: _suite_key(s) for n, s in validation.items()}
    if stop is not None:
        extra["stop"] = _suite_key(stop)
    return stable_hash({
        **extra,
        "v": PREPARED_VERSION,
        "reference": fingerprint_model(src.reference), "target": fingerprint_model(src.target),
        "forget_texts": [p["id"] for p in src.forget_texts], "retain_texts": [p["id"] for p in src.retain_texts],
        "suites": {n: _suite_key(s) for n, s in suites.items()},
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
    sd = sweep_dir if isinstance(sweep_dir, SweepDir) else SweepDir(sweep_dir)
    sd.prepared.mkdir(parents=True, exist_ok=True)
    src = sources(spec, sd, data_dir)
    suites = resolve_suites(spec, src, spec_dir, data_dir)
    validation = resolve_validation(spec, src)
    stop = stop_suite(spec, src)
    key = prepared_key(spec, src, suites, validation, stop)
    cached = _cached(sd, key, suites)
    if cached is not None:
        return cached

    template = spec.evaluation.template or src.own_template
    backend = make_backend(spec.evaluation.backend, src.target, batch_size=spec.evaluation.batch_size,
                           **spec.evaluation.backend_options())
    try:
        base, val_acc = evaluate_baselines(spec, src, suites, validation, sd, backend)
        generated = None
        if needs_generated_texts(spec):
            generated = generated_texts(src, suites, base.records, backend, template, sd)
    finally:
        backend.close()
    reference = evaluate_reference(spec, src, suites, sd)
    selection_statistics(spec, src, generated, template, sd)
    _write_prepared(sd, src, suites, validation, stop, base, reference, generated)

    baseline = base.records
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
        evaluations=base.evaluations, reference_evaluations=reference.evaluations)
    write_json(sd.prepared_manifest, prepared.manifest())  # written last: its presence means prepared/ is complete
    return prepared


def _cached(sd: SweepDir, key: str, suites: dict[str, Suite]) -> Prepared | None:
    """A complete prepared/ of the same inputs (no evaluation this call), None when there is none;
    an InputError when prepared/ was made from other inputs."""
    if not sd.prepared_manifest.is_file():
        return None
    old = read_json(sd.prepared_manifest)
    if old.get("key") != key:
        raise InputError(f"{sd.prepared}: the sweep's inputs changed since it started (models, data or suites; "
                         f"prepared key {old.get('key')} -> {key}); trials would be compared with another "
                         f"baseline: start a new sweep (another name or --out)")
    if not all(sd.baseline_results(n).is_file() and sd.reference_results(n).is_file() for n in suites):
        return None
    log(f"prepared: reusing {sd.prepared} (key {key}; no baseline re-evaluation)")
    return Prepared.from_manifest(old, {n: 0 for n in suites})


def _write_prepared(sd: SweepDir, src: Sources, suites: dict[str, Suite], validation: dict[str, Suite],
                    stop: Suite | None, base: Baselines, reference: Baselines, generated: list[dict] | None) -> None:
    """prepared/'s files: unlearning texts, each suite's problems, the target's and the reference's results."""
    write_jsonl(sd.forget_texts, src.forget_texts)
    write_jsonl(sd.retain_texts, src.retain_texts)
    if generated is not None:
        write_jsonl(sd.forget_generated, generated)
    for name, s in suites.items():
        write_jsonl(sd.suite_problems(name), s.problems)
        write_jsonl(sd.baseline_results(name), base.records[name])
        write_jsonl(sd.reference_results(name), reference.records[name])
        if name in base.probes:
            write_json(sd.baseline_probe(name), base.probes[name])
    for name, s in validation.items():
        write_jsonl(sd.suite_problems(name), s.problems)
    if stop is not None:  # MATH: the forget problems as chosen (require_target_correct may have changed them)
        write_jsonl(sd.suite_problems("stop"), stop.problems if "forget_val" in src.own else src.forget_texts)
    for name, records in base.selection_runs.items():
        write_jsonl(sd.baseline_selection_run(name), records)
