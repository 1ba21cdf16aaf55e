"""`mast sweep SPEC`: a grid of MAST trials under Ray Tune, tracked in MLflow, resumable (the driver).

Flow (docs/architecture.md, "One trial, as data flows")::

    spec (config.load_yaml: validated once)
         ─► grid.expand_grid (cartesian product, meaningless points dropped, deterministic ids,
            each point validated into typed selection / unlearning specs)
         ─► prepare.prepare once, on the driver (or one GPU task), cached in <sweep>/prepared:
              sources (toy build or the given reference/target, splits), suites, baselines (the
              TARGET's results on every suite: one evaluation per suite, whatever the trial
              count; the reference's; spectral statistics) -> a typed Prepared
         ─► Ray Tune, one function-trainable trial per grid point (trial.run_trial, with a typed
            TrialContext): select ─► unlearn ─► evaluate every suite ─► McNemar vs the cached
            baseline ─► tune.report + an MLflow child run
         ─► trials.jsonl, seed_table.json (seeds.seed_level_table, Holm over the sweep),
            MLflow parent run artifacts, report

Where each file lives: mast.layout.SweepDir; sweep.json is the :class:`SweepState`, written by
its ``record`` alone. :func:`run_sweep` reads as its steps, top to bottom. Resume: ``--resume`` restores the Tune experiment
(``Tuner.restore(..., resume_errored=True)``); trials whose ``result.json`` says ok return their
recorded metrics at once, and MLflow runs are found by tag, so a resumed sweep has exactly one
child run per trial.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

from mast.config import SweepSpec, load_yaml
from mast.files import InputError, log, now, read_json, write_json, write_jsonl
from mast.grid import Grid, check_spec, expand_grid, spec_hash
from mast.layout import REPO_ROOT, SweepDir
from mast.prepare import Prepared, check_inputs, prepare
from mast.report import build_report
from mast.resources import check_local_gpus, local_gpu_count
from mast.seeds import seed_level_table
from mast.tracking import Tracker, init_experiment, log_sweep_parent, resolve_uri
from mast.trial import TrialContext, TrialRow, log_trial_to_mlflow, open_trial_run, read_row, run_trial


def sweep_dir_for(spec: SweepSpec, out: str | os.PathLike | None) -> SweepDir:
    """`--out` > spec.output_dir > runs/<name>; always absolute (Ray workers have other CWDs)."""
    return SweepDir(out or spec.output_dir or Path("runs") / spec.name)


def code_version() -> str:
    try:
        r = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=10, check=False)
        return r.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_spec(spec_path: Path, data_dir: str | os.PathLike | None) -> SweepSpec:
    """The spec, validated once, with data_dir resolved (the flag, else the spec's, relative to it)."""
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
    return spec


def trial_gpus(spec: SweepSpec) -> float:
    """GPUs one trial needs: resources.gpu, and with vLLM on GPUs at least its tensor-parallel size
    (resources.gpu 0 with vLLM: its CPU build, :func:`mast.grid.check_spec`)."""
    if spec.evaluation.backend == "vllm" and spec.resources.gpu > 0:
        return max(spec.resources.gpu, float(spec.evaluation.tensor_parallel_size))
    return spec.resources.gpu


def check_resources(spec: SweepSpec) -> None:
    """Refuse a sweep whose trials could never be placed on the local Ray it would start.

    Skipped when Ray is already initialised (the caller chose the cluster). With $RAY_ADDRESS
    nothing is refused (a cluster may autoscale); otherwise the local Ray gets this machine's
    GPUs and ``MAST_RAY_NUM_CPUS`` (default: every core) CPUs (:func:`mast.resources.check_local_gpus`).
    """
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return
    addr = os.environ.get("RAY_ADDRESS")
    local = {} if addr and addr != "local" else {
        "GPU": local_gpu_count(), "CPU": int(os.environ.get("MAST_RAY_NUM_CPUS", os.cpu_count() or 1))}
    check_local_gpus(trial_gpus(spec), addr, local, spec_cpu=spec.resources.cpu)


# --------------------------------------------------------------------------- Ray Tune


def _trial_resources(spec: SweepSpec):
    from ray import tune

    r = spec.resources
    tp = spec.evaluation.tensor_parallel_size
    if spec.evaluation.backend == "vllm" and tp > 1 and r.gpu > 0:
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


def run_tune(spec: SweepSpec, grid: Grid, ctx: TrialContext, storage: str, resume: bool):
    """Fit (or restore and continue) the sweep's Tune experiment; returns the ResultGrid."""
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), _trial_resources(spec))
    exp_path = storage.rstrip("/") + "/" + spec.name
    if resume and tune.Tuner.can_restore(exp_path):
        log(f"resuming the Tune experiment at {exp_path}")
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        # the point names the trial (its validated specs travel in ctx); config shows in Tune's table
        points = [{"trial_id": t.trial_id, "config": t.config} for t in grid.trials]
        tuner = tune.Tuner(
            trainable,
            param_space={"point": tune.grid_search(points)},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=spec.resources.max_concurrent, scheduler=_scheduler(spec, len(ctx.suites)),
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


def collect_rows(grid: Grid, sd: SweepDir, tune_errors: dict[str, str]) -> list[TrialRow]:
    """One trials.jsonl row per grid trial: its result.json, else failed with its last error."""
    rows = []
    for t in grid.trials:
        td = sd.trial(t.trial_id)
        row = read_row(td)
        if row is not None and row.status == "ok":
            rows.append(row.final())
            continue
        err = tune_errors.get(t.trial_id)
        if td.error.is_file():
            e = read_json(td.error)
            err = f"{e['error']} (after {e.get('attempts', 1)} attempt(s))"
        rows.append(TrialRow.failed(t, err or "did not run", row.mlflow_run_id if row else None))
    return rows


def _tune_errors(results) -> dict[str, str]:
    out = {}
    for r in results:
        if r.error is not None:
            tid = (r.config or {}).get("point", {}).get("trial_id")
            if tid:
                out[tid] = f"{type(r.error).__name__}: {str(r.error).strip().splitlines()[-1][:500]}"
    return out


def reconcile_mlflow(tracker: Tracker, parent_run_id: str, rows: list[TrialRow], grid: Grid, sd: SweepDir,
                     baseline: dict) -> None:
    """Every trial ends with exactly one child run: FINISHED if ok, FAILED if not."""
    run_ids = tracker.trial_run_ids()
    trials = grid.by_id()
    for row in rows:
        if row.status == "ok":
            run_id = row.mlflow_run_id or run_ids.get(row.trial_id)
            if run_id is None:
                run_id = open_trial_run(tracker, parent_run_id, trials[row.trial_id])
            if tracker.run_status(run_id) != "FINISHED":
                log_trial_to_mlflow(tracker, run_id, row, sd.trial(row.trial_id), baseline)
        else:
            run_id = run_ids.get(row.trial_id) or open_trial_run(tracker, parent_run_id, trials[row.trial_id])
            row.mlflow_run_id = run_id
            if tracker.run_status(run_id) != "FAILED":
                tracker.fail_trial(run_id, row.error or "failed")


def build_report_if_available(sd: SweepDir) -> str | None:
    """Build the sweep's report; the error (one line) when it fails, None when it was built."""
    try:
        path = build_report(sd.root, sd.report)
        log(f"report: {path}")
        return None
    except Exception as e:  # the sweep's results stand without the report; `mast report` can retry
        log(f"report failed ({type(e).__name__}: {e}); run `mast report {sd.root}` to retry")
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


@dataclasses.dataclass
class SweepState:
    """The sweep's manifest (sweep.json) in memory; :meth:`record` is the one writer of the file.

    It is written at each step a resume or a reader relies on: started (spec hash, ids, grid
    counts), tracking (MLflow ids), prepared (baseline evaluation counts, the SFT floor),
    finished (trial counts), and a report error.
    """

    path: Path
    fields: dict

    def record(self, **changes) -> None:
        """Apply `changes` and write sweep.json (atomically)."""
        self.fields.update(changes)
        write_json(self.path, self.fields)

    def __getitem__(self, key: str):
        return self.fields[key]


def check_sweep_inputs(spec: SweepSpec, spec_path: Path, sd: SweepDir) -> None:
    """Every input checked before the sweep folder, spec.yaml, sweep.json, mlflow.db or the MLflow
    parent run exist: a refused sweep leaves nothing behind."""
    try:
        check_resources(spec)
        check_inputs(spec, spec_path.parent.resolve(), sd)
    except InputError as e:
        raise InputError(f"{spec_path}: {e}") from None


def start_state(spec: SweepSpec, spec_path: Path, sd: SweepDir, grid: Grid, resume: bool) -> SweepState:
    """Check the folder against --resume, write sweep.json (and spec.yaml for a new sweep)."""
    h = spec_hash(spec)
    if resume:
        if not sd.manifest.is_file():
            raise InputError(f"{sd.root}: no sweep to resume (no sweep.json); run without --resume")
        meta = read_json(sd.manifest)
        if meta.get("spec_hash") != h:
            raise InputError(f"{spec_path}: spec changed since the sweep at {sd.root} started "
                             f"(hash {meta.get('spec_hash')} -> {h}); start a new sweep (another name or --out)")
        meta.pop("finished", None)
        log(f"resuming {sd.root}")
    else:
        if sd.exists():
            raise InputError(f"{sd.root}: already exists; use --resume to continue it (or pick another --out)")
        meta = {"name": spec.name, "spec_hash": h, "sweep_id": uuid.uuid4().hex[:12], "started": now(),
                "baseline_evaluations": {}}
    log(grid.summary())
    for why in sorted(set(grid.dropped)):
        log(f"  dropped {grid.dropped.count(why)} x {why}")
    sd.root.mkdir(parents=True, exist_ok=True)
    if not resume:
        shutil.copyfile(spec_path, sd.spec)
    state = SweepState(sd.manifest, meta)
    state.record(code_version=code_version(), n_trials=len(grid.trials), n_grid_points=grid.n_points,
                 n_dropped=len(grid.dropped), data_dir=spec.data.data_dir,
                 trial_ids=[t.trial_id for t in grid.trials])
    return state


def start_tracking(spec: SweepSpec, sd: SweepDir, state: SweepState) -> tuple[Tracker, str]:
    """The store, the experiment and the parent run exist before any trial starts; returns
    (tracker, parent run id)."""
    uri = resolve_uri(spec.tracking.uri, sd.root)
    experiment = spec.tracking.experiment or spec.name
    exp_id = init_experiment(uri, experiment, sd.root)
    tracker = Tracker(uri, exp_id, state["sweep_id"])
    parent = tracker.parent_run(spec.name, {"spec_hash": state["spec_hash"], "n_trials": state["n_trials"],
                                            "grid": json.dumps(spec.grid), "sweep_dir": str(sd.root),
                                            "code_version": state["code_version"]})
    state.record(tracking_uri=uri, experiment=experiment, experiment_id=exp_id, parent_run_id=parent)
    tracker.log_artifact(parent, sd.spec)
    return tracker, parent


def _prepare(spec: SweepSpec, sd: SweepDir, spec_dir: Path) -> Prepared:
    """prepare.prepare, as a GPU task when trials need GPUs (a cluster's head may have none)."""
    if spec.resources.gpu <= 0:
        return prepare(spec, sd, spec.data.data_dir, spec_dir)
    import ray

    task = ray.remote(num_cpus=spec.resources.cpu,
                      num_gpus=max(spec.resources.gpu, float(spec.evaluation.tensor_parallel_size)))
    return ray.get(task(prepare).remote(spec, sd, spec.data.data_dir, spec_dir))


def record_prepared(state: SweepState, prepared: Prepared) -> None:
    """The baseline evaluations run so far (summed over resumes), the prepared key and the SFT floor
    (the report reads it from here, or from the trials)."""
    counts = dict(state.fields.get("baseline_evaluations") or {})
    for n, k in prepared.evaluations.items():
        counts[n] = counts.get(n, 0) + k
    state.record(baseline_evaluations=counts, prepared_key=prepared.key, sft_floor=prepared.rl_gain)
    log(f"baseline evaluations of the target: {counts}; reference (SFT) accuracy: "
        + ", ".join(f"{n} {a:.3f}" for n, a in prepared.reference_accuracy.items()))


class RaySession:
    """Ray for one sweep: connected or started on the first :meth:`need`, shut down at the end
    when this sweep started it."""

    def __init__(self, spec: SweepSpec) -> None:
        self.spec, self.started = spec, False

    def need(self) -> None:
        self.started = _ray_init(self.spec) or self.started

    def __enter__(self) -> RaySession:
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            import ray

            ray.shutdown()


def run_trials(spec: SweepSpec, grid: Grid, ctx: TrialContext, sd: SweepDir, resume: bool) -> list[TrialRow]:
    """Every trial under Ray Tune; one row per grid trial."""
    t0 = time.time()
    results = run_tune(spec, grid, ctx, spec.storage_path or str(sd.tune), resume)
    log(f"trials done in {time.time() - t0:.0f}s")
    return collect_rows(grid, sd, _tune_errors(results))


def record_trials(spec: SweepSpec, sd: SweepDir, grid: Grid, rows: list[TrialRow], tracker: Tracker, parent: str,
                  baseline: dict) -> tuple[list[dict], dict | None]:
    """One MLflow run per trial, failed rows' result.json, trials.jsonl and the seed-level table
    (None when no trial succeeded); returns (the rows as dicts, the table)."""
    reconcile_mlflow(tracker, parent, rows, grid, sd, baseline)
    for row in rows:
        if row.status != "ok":
            write_json(sd.trial(row.trial_id).result, row.to_dict())
    dicts = [r.to_dict() for r in rows]
    write_jsonl(sd.trials_jsonl, dicts)
    table = None
    if any(r.status == "ok" for r in rows):
        table = seed_level_table(dicts, suite=None, confidence=spec.evaluation.confidence)
        write_json(sd.seed_table, table)
    return dicts, table


def record_finished(state: SweepState, sd: SweepDir, rows: list[TrialRow]) -> int:
    """The trial counts in sweep.json, then the report (its error recorded); returns how many trials are ok."""
    n_ok = sum(r.status == "ok" for r in rows)
    not_run = [r.trial_id for r in rows if r.error == "did not run"]
    if not_run:
        log(f"{len(not_run)} trial(s) did not run (interrupted?): run the same command with --resume")
    state.record(finished=now(), n_ok=n_ok, n_failed=len(rows) - n_ok, n_not_run=len(not_run))
    report_error = build_report_if_available(sd)
    if report_error:
        state.record(report_error=report_error)
    return n_ok


def run_sweep(spec_path: str | os.PathLike, out: str | os.PathLike | None = None, resume: bool = False,
              data_dir: str | os.PathLike | None = None) -> dict:
    """Run (or resume) a sweep; returns the final sweep.json. Raises InputError on bad input."""
    spec_path = Path(spec_path)
    spec = load_spec(spec_path, data_dir)
    sd = sweep_dir_for(spec, out)
    check_sweep_inputs(spec, spec_path, sd)
    grid = expand_grid(spec, str(spec_path))
    state = start_state(spec, spec_path, sd, grid, resume)
    tracker, parent = start_tracking(spec, sd, state)
    with RaySession(spec) as ray_session:
        if spec.resources.gpu > 0:
            ray_session.need()  # prepare runs as a GPU task
        prepared = _prepare(spec, sd, spec_path.parent.resolve())
        record_prepared(state, prepared)
        ctx = TrialContext.build(spec, sd, prepared, grid.trials, tracker, parent)
        ray_session.need()
        rows = run_trials(spec, grid, ctx, sd, resume)
    dicts, table = record_trials(spec, sd, grid, rows, tracker, parent, ctx.baseline)
    n_ok = record_finished(state, sd, rows)
    log_sweep_parent(tracker, parent, sd, dicts, table, prepared.baseline_accuracy, prepared.rl_gain)
    tracker.finish(parent, "FINISHED" if n_ok else "FAILED")
    print(headline(dicts, list(prepared.suites)))
    print(f"{n_ok}/{len(rows)} trials ok -> {sd.root}/trials.jsonl, seed_table.json; MLflow: {state['tracking_uri']} "
          f"(experiment {state['experiment']!r}, parent run {parent})")
    return state.fields


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
