"""One trial (runs in a Ray worker): select -> unlearn -> evaluate every suite -> McNemar vs the
cached baseline -> the trial's row (``result.json``, one line of trials.jsonl) + its MLflow run.

With ``unlearning.stop`` the unlearning loop checks the forget criterion in-loop
(:func:`stop_check`) and the row records ``steps_run``, ``stop_reached``, ``stop_threshold`` and
``stop_history`` (matched forgetting; ``stopped_early`` keeps meaning "ASHA stopped it"). The
validation suites are scored last, into ``validation`` (choices only, never a reported result).

A trial's whole evaluation (every suite, the validation suites, the probe) is ONE
:func:`mast.evaluation.evaluate_many` call (:func:`evaluate_trial`): one backend, one engine start
(``engine_starts`` in the row), one ``generate()``. Every suite is scored with the evaluation cache
bypassed (a fresh backend, the suite's decoding), and read against the SFT floor (:mod:`mast.floor`: share of the RLVR gain removed, below the
reference). A ``null`` trial (the noise floor) selects nothing and skips unlearning: the target
itself goes through the same evaluation path; bypassing the cache matters most there, since the
cache is keyed by the model's fingerprint and would hand back the baseline's own records.

A typed :class:`TrialContext` comes in (the prepared data and baselines, shared by every
trial through ``tune.with_parameters``), a typed :class:`TrialRow` goes out; the row is built
here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

from mast.backends import make_backend
from mast.config import SuiteSpec
from mast.evaluation import VALIDATION_PREFIX, EvalResult, evaluate_many, truncated_rate
from mast.files import now, read_json, read_jsonl, write_json, write_jsonl
from mast.floor import sft_floor_entry
from mast.grid import Trial, trial_params
from mast.layout import SweepDir, TrialDir
from mast.prepare import Prepared
from mast.registry import RULE_FACTS
from mast.resources import require_cuda
from mast.selection import select
from mast.stats import mcnemar_test, paired_sample_tests
from mast.stopping import decide, make_check
from mast.tracking import trial_metrics
from mast.unlearn import unlearn


@dataclasses.dataclass
class TrialContext:
    """Everything a trial needs besides its grid point; built once by the driver."""

    sweep: SweepDir
    tracker: Any  # mast.tracking.Tracker (picklable)
    parent_run_id: str
    trials: dict[str, Trial]  # trial id -> its validated specs
    reference: str
    target: str
    template: str
    forget_texts: list[dict]
    retain_texts: list[dict]
    forget_generated: list[dict] | None
    suites: dict[str, SuiteSpec]  # in run order
    problems: dict[str, list[dict]]
    baseline: dict[str, list[dict]]  # the target's per-problem results per suite
    baseline_probe: dict[str, dict]
    reference_results: dict[str, list[dict]]  # the reference (SFT) model's per-problem results per suite
    rl_gain: dict[str, dict]  # suite -> floor.rl_gain (reference vs target)
    selection_cache: str
    backend: str
    batch_size: int
    n_bootstrap: int
    confidence: float
    backend_options: dict
    keep_checkpoints: bool
    report_each_suite: bool  # ASHA: an intermediate result after each suite
    gpu: float = 0.0  # resources.gpu: > 0 requires CUDA in the trial
    # validation suites (choices only, never reported): spec, problems, the target's records
    validation: dict[str, SuiteSpec] = dataclasses.field(default_factory=dict)
    validation_problems: dict[str, list[dict]] = dataclasses.field(default_factory=dict)
    validation_baseline: dict[str, list[dict]] = dataclasses.field(default_factory=dict)
    # unlearning.stop: the suite and problems its check scores (prepare.stop_suite)
    stop_suite: SuiteSpec | None = None
    stop_problems: list[dict] | None = None

    @classmethod
    def build(cls, spec, sd: SweepDir, prepared: Prepared, trials: list[Trial], tracker, parent_run_id: str
              ) -> TrialContext:
        """Read prepared/ (texts, suites' problems, baselines) into the context every trial shares."""
        names = list(prepared.suites)
        return cls(
            sweep=sd, tracker=tracker, parent_run_id=parent_run_id, trials={t.trial_id: t for t in trials},
            reference=prepared.reference, target=prepared.target, template=prepared.template,
            forget_texts=read_jsonl(sd.forget_texts), retain_texts=read_jsonl(sd.retain_texts),
            forget_generated=read_jsonl(sd.forget_generated) if sd.forget_generated.is_file() else None,
            suites=dict(prepared.suites), problems={n: read_jsonl(sd.suite_problems(n)) for n in names},
            baseline=load_baseline(sd, names),
            baseline_probe={n: read_json(sd.baseline_probe(n)) for n in names if sd.baseline_probe(n).is_file()},
            reference_results={n: read_jsonl(sd.reference_results(n)) for n in names},
            rl_gain=dict(prepared.rl_gain),
            selection_cache=prepared.selection_cache, backend=spec.evaluation.backend,
            batch_size=spec.evaluation.batch_size, n_bootstrap=spec.evaluation.n_bootstrap,
            confidence=spec.evaluation.confidence, backend_options=spec.evaluation.backend_options(),
            keep_checkpoints=spec.keep_checkpoints, report_each_suite=spec.scheduler.kind == "asha",
            gpu=spec.resources.gpu, validation=dict(prepared.validation),
            validation_problems={n: read_jsonl(sd.suite_problems(n)) for n in prepared.validation},
            validation_baseline=load_baseline(sd, list(prepared.validation)),
            stop_suite=prepared.stop_suite,
            stop_problems=read_jsonl(sd.suite_problems("stop")) if prepared.stop_suite is not None else None)


def load_baseline(sd: SweepDir, suites: list[str]) -> dict[str, list[dict]]:
    return {n: read_jsonl(sd.baseline_results(n)) for n in suites}


@dataclasses.dataclass
class TrialRow:
    """One line of trials.jsonl (and a trial's result.json). Optional fields are left out when None."""

    trial_id: str
    status: str  # "ok" | "failed"
    error: str | None
    config: dict
    suites: dict[str, dict] = dataclasses.field(default_factory=dict)  # suite -> McNemar dict
    probe: dict | None = None
    selected: list[str] = dataclasses.field(default_factory=list)
    mlflow_run_id: str | None = None
    all_parameters: bool | None = None
    timing: dict | None = None
    partial: bool | None = None  # ASHA: not every suite scored yet (result.json only)
    stopped_early: bool | None = None  # ASHA stopped it: in trials.jsonl instead of `partial`
    sft_floor: dict | None = None  # suite -> floor.sft_floor_entry (gain removed, below reference)
    # matched forgetting (unlearning.stop): optimiser steps run, whether the stop target was reached
    # within the cap, and the check history [{"step", "value"}] (step 0 = before unlearning)
    steps_run: int | None = None
    stop_reached: bool | None = None
    stop_metric: str | None = None
    stop_threshold: float | None = None
    stop_history: list[dict] | None = None
    # validation suites: {"n", "acc_before", "acc_after"} per suite (for choices; never reported)
    validation: dict[str, dict] | None = None
    # engines the trial's evaluation started (hf: model loads; vllm: worker processes): 1 per trial
    # (:func:`evaluate_trial`); the in-loop stop check's hf model is not one
    engine_starts: int | None = None

    _OPTIONAL = ("all_parameters", "timing", "partial", "stopped_early", "sft_floor", "steps_run", "stop_reached",
                 "stop_metric", "stop_threshold", "stop_history", "validation", "engine_starts")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if not (k in self._OPTIONAL and v is None)}

    @classmethod
    def from_dict(cls, d: dict) -> TrialRow:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def failed(cls, trial: Trial, error: str, mlflow_run_id: str | None = None) -> TrialRow:
        return cls(trial.trial_id, "failed", error, trial.config, mlflow_run_id=mlflow_run_id)

    def final(self) -> TrialRow:
        """The trials.jsonl form of a recorded ok row: an ASHA-stopped (partial) row says stopped_early."""
        return dataclasses.replace(self, partial=None, stopped_early=True if self.partial else None)


def read_row(td: TrialDir) -> TrialRow | None:
    return TrialRow.from_dict(read_json(td.result)) if td.result.is_file() else None


# --------------------------------------------------------------------------- MLflow (from the trial's files)


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


def trial_tables(td: TrialDir, baseline: dict[str, list[dict]]) -> dict[str, dict]:
    """Per suite, the per-problem before/after table MLflow shows."""
    return {name: _table(before, read_jsonl(td.results(name))) for name, before in baseline.items()
            if td.results(name).is_file()}


def log_trial_to_mlflow(tracker, run_id: str, row: TrialRow, td: TrialDir, baseline: dict[str, list[dict]]) -> None:
    """Idempotent: everything from the trial's files; timestamps fixed by the trial's finish time."""
    losses = read_jsonl(td.losses) if td.losses.is_file() else []
    ts = int((row.timing or {}).get("finished", time.time()) * 1000)
    tracker.log_trial(run_id, row.to_dict(), td, losses, trial_tables(td, baseline), timestamp=ts)


def open_trial_run(tracker, parent_run_id: str, trial: Trial) -> str:
    """The trial's MLflow child run, found or created, with its params (:func:`mast.grid.trial_params`):
    the one place a trial's MLflow identity is written, by the trial and by the driver's reconciliation."""
    return tracker.trial_run(parent_run_id, trial.trial_id, trial_params(trial))


def report_metrics(row: TrialRow, cached: bool = False) -> dict:
    """What a trial reports to Tune: the flat per-suite metrics plus its id."""
    return {**trial_metrics(row.to_dict()), "mast_trial_id": row.trial_id, "cached": cached,
            "n_suites": len(row.suites or {})}


# --------------------------------------------------------------------------- the trial


def run_trial(config: dict, ctx: TrialContext) -> None:
    """The Ray Tune function trainable: select -> unlearn -> evaluate -> McNemar -> tune.report.

    `config["point"]["trial_id"]` names the grid point; its validated specs are in
    ``ctx.trials``, so trials never re-evaluate the target nor re-validate the spec.
    """
    from ray import tune

    trial = ctx.trials[config["point"]["trial_id"]]
    td = ctx.sweep.trial(trial.trial_id)
    tracker = ctx.tracker
    row = read_row(td)
    if row is not None and row.status == "ok" and not row.partial:
        # finished before a driver crash/resume: report what it recorded
        if row.mlflow_run_id and tracker.run_status(row.mlflow_run_id) != "FINISHED":
            log_trial_to_mlflow(tracker, row.mlflow_run_id, row, td, ctx.baseline)
        tune.report(report_metrics(row, cached=True))
        return
    require_cuda(ctx.gpu)  # a GPU trial on a node whose torch cannot see CUDA fails loudly, never on the CPU
    td.root.mkdir(parents=True, exist_ok=True)
    run_id = open_trial_run(tracker, ctx.parent_run_id, trial)
    try:
        _run_trial_body(trial, ctx, td, run_id, tune.report)
    except BaseException as e:
        err = f"{type(e).__name__}: {e}"
        prev = read_json(td.error) if td.error.is_file() else {}
        write_json(td.error, {"error": err, "attempts": int(prev.get("attempts", 0)) + 1,
                              "traceback": traceback.format_exc()[-8000:], "time": now()})
        try:
            tracker.fail_trial(run_id, err)
        except Exception:  # the tracking store must not mask the trial's own error
            pass
        raise


def _run_trial_body(trial: Trial, ctx: TrialContext, td: TrialDir, run_id: str, report) -> None:
    import torch

    t_start = time.time()
    forget = ctx.forget_generated if trial.unlearning.texts == "generated" else ctx.forget_texts
    retain = ctx.retain_texts or None
    write_json(td.config, trial.specs_json())
    # 1. select
    selection = select(ctx.reference, ctx.target, forget, trial.selection, cache_dir=ctx.selection_cache,
                       template=ctx.template, progress=False)
    write_json(td.selection, selection)
    selected = [c["name"] for c in selection.get("candidates", []) if c.get("selected")]
    row = TrialRow(trial.trial_id, "ok", None, trial.config, selected=selected, mlflow_run_id=run_id,
                   all_parameters=bool(selection.get("all_parameters")))
    if not RULE_FACTS[trial.selection.rule].changes_weights:
        # the noise floor: nothing selected, nothing trained; the target goes through the trial's evaluation
        assert not selected and not row.all_parameters, "a null trial changes no weight"
        t_unlearn = time.time()
        evaluate_suites(ctx.target, ctx, td, row, t_start, report)
    else:
        # 2. unlearn (checkpoint in a trial-local folder, deleted after evaluation unless kept)
        ckpt = td.checkpoint
        shutil.rmtree(ckpt, ignore_errors=True)
        try:
            res = unlearn(ctx.target, selection, forget, retain, trial.unlearning, ckpt, template=ctx.template,
                          progress=False, stop_check=stop_check(trial, ctx))
            write_jsonl(td.losses, res.losses)
            row.steps_run = res.steps_run
            if trial.unlearning.stop is not None:
                d = decide(trial.unlearning.stop, res.stop_history)
                row.stop_reached, row.stop_threshold, row.stop_history = d.reached, d.threshold, res.stop_history
                row.stop_metric = trial.unlearning.stop.metric
            t_unlearn = time.time()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            assert Path(res.out_dir).resolve() != Path(ctx.target).resolve(), "a trial never evaluates the target"
            evaluate_suites(res.out_dir, ctx, td, row, t_start, report)
        finally:
            if not ctx.keep_checkpoints:
                shutil.rmtree(ckpt, ignore_errors=True)
    row.timing = {"started": t_start, "unlearned": t_unlearn, "finished": time.time()}
    write_json(td.result, row.to_dict())  # the trial's completion marker
    td.error.unlink(missing_ok=True)
    log_trial_to_mlflow(ctx.tracker, run_id, row, td, ctx.baseline)
    report(report_metrics(row))


def stop_check(trial: Trial, ctx: TrialContext):
    """The in-loop check of ``unlearning.stop`` (None without it): accuracy on the forget-validation
    problems under their suite's decoding, or the mean forget NLL per token on them."""
    stop = trial.unlearning.stop
    if stop is None:
        return None
    if ctx.stop_suite is None or not ctx.stop_problems:
        raise RuntimeError("unlearning.stop is set but the sweep prepared no stop problems")
    return make_check(stop, ctx.target, ctx.stop_problems, suite=ctx.stop_suite.trial_run(trial.trial_id, "stop"),
                      template=ctx.template,
                      max_length=trial.unlearning.max_length, batch_size=ctx.batch_size)


def evaluate_trial(model_dir: str | Path, ctx: TrialContext, trial_id: str) -> tuple[dict[str, EvalResult], int]:
    """Every suite, every validation suite and the probe of a trial on `model_dir` in ONE
    :func:`evaluate_many` call: one backend, one engine start (vLLM: one worker process), one
    ``generate()``; each suite keeps its decoding, sampled in the trial's own stream
    (SuiteSpec.trial_run), the evaluation cache bypassed. Returns (results by suite name, validation
    suites under ``validation/<name>``; the engine starts the backend counted)."""
    suites = [s.trial_run(trial_id) for s in ctx.suites.values()]
    problems = dict(ctx.problems)
    for name, suite in ctx.validation.items():
        suites.append(suite.trial_run(trial_id).model_copy(update={"name": VALIDATION_PREFIX + name}))
        problems[VALIDATION_PREFIX + name] = ctx.validation_problems[name]
    backend = make_backend(ctx.backend, model_dir, batch_size=ctx.batch_size, progress=False, **ctx.backend_options)
    try:
        results = evaluate_many(model_dir, suites, backend=backend, problems=problems, use_cache=False,
                                progress=False)
    finally:
        backend.close()
    assert not any(ev.cache_hit for ev in results.values()), "a trial's evaluation never reads the evaluation cache"
    return results, backend.engine_starts


def score_validation(name: str, ev: EvalResult, ctx: TrialContext, row: TrialRow, td: TrialDir) -> None:
    """Accuracy on a validation suite (records in results/<name>.jsonl): the input of choices
    (the matched level on an lr/steps axis), never a reported result."""
    write_jsonl(td.results(name), ev.records)
    before = ctx.validation_baseline.get(name) or []
    row.validation = {**(row.validation or {}), name: {
        "n": ev.n, "acc_after": ev.accuracy,
        "acc_before": sum(bool(r["correct"]) for r in before) / len(before) if before else None}}


def score_suite(name: str, ev: EvalResult, ctx: TrialContext, row: TrialRow, td: TrialDir) -> None:
    """The suite's records into `td`; its paired tests vs the cached baseline, the SFT floor and the
    probe into `row`."""
    write_jsonl(td.results(name), ev.records)
    m = mcnemar_test(ctx.baseline[name], ev.records, n_bootstrap=ctx.n_bootstrap, confidence=ctx.confidence, seed=0)
    rate = truncated_rate(ev.records)
    if rate is not None:
        m["truncated_rate"] = rate  # answers cut at max_tokens: never silently "wrong"
    if any(len(r.get("samples") or ()) > 1 for r in ev.records):
        m["samples_test"] = paired_sample_tests(ctx.baseline[name], ev.records)  # n > 1: avg@n, primary
    row.suites[name] = m
    if name in ctx.rl_gain and name in ctx.reference_results:
        vs_ref = mcnemar_test(ctx.reference_results[name], ev.records, n_bootstrap=1,
                              names=("reference", "unlearned"))["p_value"]
        row.sft_floor = {**(row.sft_floor or {}), name: sft_floor_entry(ctx.rl_gain[name], m["acc_after"], vs_ref)}
    if ev.probe is not None and row.probe is None and name in ctx.baseline_probe:
        before = ctx.baseline_probe[name]
        row.probe = {"suite": name, "fractions": ev.probe["fractions"],
                     "before": before["accuracy"], "after": ev.probe["accuracy"]}
        write_json(td.probe, {**row.probe, "before_detail": before, "after_detail": ev.probe})


def evaluate_suites(model_dir: str | Path, ctx: TrialContext, td: TrialDir, row: TrialRow, t_start: float,
                    report) -> None:
    """3. evaluate the trial on `model_dir` (:func:`evaluate_trial`: one engine start for everything),
    4. paired tests vs the cached baseline and the SFT floor, suite by suite, into `row` (per-problem
    results in `td`), then the validation suites.

    ASHA (``ctx.report_each_suite``): an intermediate report after each suite, in suite order, once
    everything is generated: ASHA still ranks trials by the first suites, but a stopped trial no
    longer saves the later suites' generation (docs/architecture.md).
    """
    results, row.engine_starts = evaluate_trial(model_dir, ctx, row.trial_id)
    for i, name in enumerate(ctx.suites):
        score_suite(name, results[name], ctx, row, td)
        if ctx.report_each_suite and i < len(ctx.suites) - 1:
            # ASHA: intermediate result after each suite (rung = suites scored); a stopped
            # trial keeps the suites it has (partial row, reconciled by the driver)
            row.timing = {"started": t_start, "finished": time.time()}
            write_json(td.result, dataclasses.replace(row, partial=True).to_dict())
            report(report_metrics(row))
    for name in ctx.validation:
        score_validation(name, results[VALIDATION_PREFIX + name], ctx, row, td)
