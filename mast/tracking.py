"""MLflow tracking for sweeps: one experiment per sweep, a parent run, one child run per trial.

Where runs go: the spec's ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite
store in the sweep folder (``sqlite:///<abs sweep dir>/mlflow.db``, artifacts beside it in
``mlartifacts/``). On a cluster, point it at the MLflow server on the head node.

The driver creates the store and the experiment (:func:`init_experiment`) before any trial
starts: trials that open a fresh SQLite store at the same time race on its schema
migration (alembic "expected to match one row").

Idempotence. Every run is found by tags before one is created:
- the parent run by ``mast.sweep_id`` + ``mast.role = parent``;
- a trial's run by ``mast.sweep_id`` + ``mast.trial_id`` (run name = trial id, tag
  ``mlflow.parentRunId`` = the parent run).
A retried or resumed trial reuses its run and overwrites it; metrics are logged with
timestamps fixed by the trial's result (identical (key, step, timestamp, value) rows are
dropped by the store), per-problem tables are rewritten rather than appended, and a run
ends FINISHED only when its trial succeeded. ``mast.sweep_id`` is fresh for every new sweep
(kept in sweep.json), so two sweeps sharing an experiment name on one server never mix.

Every MLflow access of the platform is in this module: the sweep's runs (:class:`Tracker`),
the parent run's summary (:func:`log_sweep_parent`) and reading a finished sweep back for a
report (:func:`fetch_sweep`), all through one run lookup (:func:`search_runs`).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mast.files import InputError, read_json, read_jsonl, write_json
from mast.floor import noise_floor
from mast.layout import PARENT_ARTIFACTS, SweepDir, TrialDir

TAG_SWEEP = "mast.sweep_id"
TAG_TRIAL = "mast.trial_id"
TAG_ROLE = "mast.role"
TAG_PARENT = "mlflow.parentRunId"
MAX_PARAM_LEN = 6000


def default_uri(sweep_dir: str | os.PathLike) -> str:
    """The default store: a SQLite file in the sweep folder (absolute, so Ray workers agree)."""
    return f"sqlite:///{SweepDir(sweep_dir).mlflow_db}"


def resolve_uri(spec_uri: str | None, sweep_dir: str | os.PathLike) -> str:
    """spec.tracking.uri > $MLFLOW_TRACKING_URI > sqlite:///<abs sweep dir>/mlflow.db."""
    return spec_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(sweep_dir)


def is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def init_experiment(uri: str, name: str, sweep_dir: str | os.PathLike) -> str:
    """Create (or find) the store and the sweep's experiment; return its id. Run on the driver.

    With a local store the artifacts live in ``<sweep>/mlartifacts`` (not the CWD's
    ``mlruns``); a tracking server decides for itself.
    """
    from mlflow.exceptions import MlflowException

    c = client(uri)  # a SQLite store is created and migrated here, once, before any trial
    exp = c.get_experiment_by_name(name)
    if exp is None:
        location = SweepDir(sweep_dir).mlartifacts.as_uri() if is_local_store(uri) else None
        try:
            return c.create_experiment(name, artifact_location=location)
        except MlflowException:  # created concurrently by another driver
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        c.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def trial_metrics(row: dict) -> dict[str, float]:
    """Flat per-trial metrics: ``{suite}/accuracy|delta|mcnemar_p|ci_low|ci_high|...`` and the SFT floor
    ``{suite}/reference_accuracy|gain_removed|below_reference`` (gain_removed only where defined), and
    ``evaluation/engine_starts`` (engines the trial's evaluation started) where the row has it."""
    out: dict[str, float] = {}
    for suite, m in (row.get("suites") or {}).items():
        out[f"{suite}/accuracy"] = float(m["acc_after"])
        out[f"{suite}/acc_before"] = float(m["acc_before"])
        out[f"{suite}/delta"] = float(m["delta"])
        out[f"{suite}/mcnemar_p"] = float(m["p_value"])
        out[f"{suite}/ci_low"] = float(m["ci_low"])
        out[f"{suite}/ci_high"] = float(m["ci_high"])
        out[f"{suite}/right_to_wrong"] = float(m["right_to_wrong"])
        out[f"{suite}/wrong_to_right"] = float(m["wrong_to_right"])
        out[f"{suite}/n"] = float(m["n"])
        if m.get("truncated_rate") is not None:
            out[f"{suite}/truncated_rate"] = float(m["truncated_rate"])
        if m.get("samples_test"):
            out[f"{suite}/samples_p"] = float(m["samples_test"]["p_value"])
            out[f"{suite}/accuracy_avg_n"] = float(m["samples_test"]["acc_after"])
    for suite, v in (row.get("validation") or {}).items():  # choices only: logged under validation/
        out[f"validation/{suite}/accuracy"] = float(v["acc_after"])
    if row.get("steps_run") is not None:
        out["unlearning/steps_run"] = float(row["steps_run"])
    if row.get("stop_reached") is not None:
        out["unlearning/stop_reached"] = float(bool(row["stop_reached"]))
    if row.get("engine_starts") is not None:
        out["evaluation/engine_starts"] = float(row["engine_starts"])
    for suite, f in (row.get("sft_floor") or {}).items():
        out[f"{suite}/reference_accuracy"] = float(f["reference_acc"])
        out[f"{suite}/below_reference"] = float(bool(f["below_reference"]))
        if f.get("gain_removed") is not None:
            out[f"{suite}/gain_removed"] = float(f["gain_removed"])
    return out


def _param_str(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s[:MAX_PARAM_LEN]


def _quote(v: str) -> str:
    return "'" + str(v).replace("'", "\\'") + "'"


def search_runs(c, experiment_id: str, tags: dict[str, str], newest_first: bool = False) -> list:
    """Active runs of an experiment carrying every tag given (keys may contain dots), all pages."""
    flt = " and ".join(f"tags.`{k}` = {_quote(v)}" for k, v in tags.items())
    order = ["attributes.start_time " + ("DESC" if newest_first else "ASC")]
    runs, token = [], None
    while True:
        page = c.search_runs([experiment_id], filter_string=flt, max_results=1000, order_by=order, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


@dataclass
class Tracker:
    """A picklable handle on one sweep's experiment (the client is made lazily per process)."""

    uri: str
    experiment_id: str
    sweep_id: str
    _client: Any = field(default=None, repr=False, compare=False)

    def __getstate__(self):
        return {"uri": self.uri, "experiment_id": self.experiment_id, "sweep_id": self.sweep_id, "_client": None}

    @property
    def client(self):
        if self._client is None:
            self._client = client(self.uri)
        return self._client

    # ------------------------------------------------------------------ lookup

    def find_runs(self, **tags: str) -> list:
        """Active runs of this sweep carrying every tag given (keys may contain dots)."""
        return search_runs(self.client, self.experiment_id, {TAG_SWEEP: self.sweep_id, **tags})

    def child_runs(self) -> list:
        return self.find_runs(**{TAG_ROLE: "trial"})

    def trial_run_ids(self) -> dict[str, str]:
        """trial id -> its child run id, for every trial run of this sweep."""
        return {r.data.tags.get(TAG_TRIAL): r.info.run_id for r in self.child_runs()}

    def _get_or_create(self, run_name: str, tags: dict[str, str], lookup: dict[str, str]) -> str:
        found = self.find_runs(**lookup)
        if found:
            run = found[0]
            if run.info.status != "RUNNING":
                self.client.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={TAG_SWEEP: self.sweep_id, **tags})
        return run.info.run_id

    # ------------------------------------------------------------------ parent

    def parent_run(self, sweep_name: str, params: dict | None = None) -> str:
        """The sweep's parent run: found by tag, else created. Returns its id."""
        run_id = self._get_or_create(sweep_name, {TAG_ROLE: "parent", "mast.sweep": sweep_name},
                                     {TAG_ROLE: "parent"})
        if params:
            self.log_params(run_id, params)
        return run_id

    # ------------------------------------------------------------------ trials

    def trial_run(self, parent_run_id: str, trial_id: str, params: dict) -> str:
        """The trial's child run (run name = trial id): reused by a retry or a resume, never duplicated."""
        run_id = self._get_or_create(
            trial_id, {TAG_ROLE: "trial", TAG_TRIAL: trial_id, TAG_PARENT: parent_run_id},
            {TAG_ROLE: "trial", TAG_TRIAL: trial_id})
        self.log_params(run_id, params)
        return run_id

    def log_params(self, run_id: str, params: dict) -> None:
        """Log params, skipping those already logged (a re-log of the same value is a no-op)."""
        from mlflow.entities import Param

        have = self.client.get_run(run_id).data.params
        new = [Param(str(k), _param_str(v)) for k, v in params.items() if str(k) not in have]
        if new:
            self.client.log_batch(run_id, params=new)

    def log_artifact(self, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0, timestamp: int | None = None) -> None:
        self.log_metric_rows(run_id, [(k, v, step) for k, v in metrics.items()], timestamp)

    def log_metric_rows(self, run_id: str, rows: list[tuple[str, float, int]], timestamp: int | None = None) -> None:
        """Log (key, value, step) rows in batches; a fixed timestamp makes a re-log a no-op."""
        from mlflow.entities import Metric

        ts = int(timestamp if timestamp is not None else time.time() * 1000)
        metrics = [Metric(k, float(v), ts, int(s)) for k, v, s in rows if v is not None]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[i:i + 1000])

    def log_table(self, run_id: str, table: dict[str, list], artifact_file: str) -> None:
        """`MlflowClient.log_table`, but a second call replaces the table instead of appending.

        log_table appends to an existing artifact; a retried trial must not double its rows,
        so an existing table is rewritten in log_table's own format (pandas ``orient=split``).
        """
        import pandas as pd

        c = self.client
        d = os.path.dirname(artifact_file) or None
        if artifact_file not in [f.path for f in c.list_artifacts(run_id, d)]:
            c.log_table(run_id, data=table, artifact_file=artifact_file)
            return
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / os.path.basename(artifact_file)
            pd.DataFrame(table).to_json(p, orient="split", index=False, date_format="iso")
            c.log_artifact(run_id, str(p), artifact_path=d)

    def log_trial(self, run_id: str, row: dict, trial_dir: TrialDir | str | os.PathLike, losses: list[dict],
                  tables: dict[str, dict[str, list]], timestamp: int | None = None) -> None:
        """Everything a finished trial leaves in MLflow (its run then ends FINISHED).

        metrics `{suite}/accuracy|delta|mcnemar_p|ci_low|ci_high` (step 0), training losses
        `train/{forget,retain,total}` by step, per-problem tables `results/{suite}.json`,
        and the trial's files (config, selection, result) as artifacts.
        """
        rows = [(k, v, 0) for k, v in trial_metrics(row).items()]
        for r in losses:
            for key in ("forget", "retain", "total"):
                if r.get(key) is not None:
                    rows.append((f"train/{key}", r[key], int(r["step"])))
        for h in row.get("stop_history") or []:  # unlearning.stop's check, by step (0 = before unlearning)
            rows.append(("stop/value", float(h["value"]), int(h["step"])))
        self.log_metric_rows(run_id, rows, timestamp)
        for suite, table in tables.items():
            self.log_table(run_id, table, f"results/{suite}.json")
        td = trial_dir if isinstance(trial_dir, TrialDir) else TrialDir(Path(trial_dir))
        for path in td.artifacts():
            self.client.log_artifact(run_id, str(path))
        self.client.set_tag(run_id, "mast.status", row.get("status", "ok"))
        self.client.set_terminated(run_id, "FINISHED")

    def fail_trial(self, run_id: str, error: str) -> None:
        """A failed attempt: the run is marked FAILED (a retry sets it RUNNING again)."""
        self.client.set_tag(run_id, "mast.error", error[:5000])
        self.client.set_tag(run_id, "mast.status", "failed")
        self.client.set_terminated(run_id, "FAILED")

    def run_status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)


# --------------------------------------------------------------------------- the sweep's parent run


def log_sweep_parent(tracker: Tracker, parent_run_id: str, sweep_dir: SweepDir, rows: list[dict],
                     table: dict | None, baseline_accuracy: dict[str, float], rl_gain: dict[str, dict] | None = None
                     ) -> None:
    """Parent run: spec, split ids, baselines, trials table, seed-level significance, Holm, report;
    the SFT floor (``reference/{suite}/accuracy``, ``rl_gain/{suite}/delta|mcnemar_p``) and the noise
    floor of the null trials (``noise_floor/{suite}/flip_rate|mcnemar_p``, ``noise_floor.json``)."""
    c, sd = tracker.client, sweep_dir
    ts = int(time.time() * 1000)
    floor = {}
    for n, g in (rl_gain or {}).items():
        floor |= {f"reference/{n}/accuracy": g["reference_acc"], f"rl_gain/{n}/delta": g["gain"],
                  f"rl_gain/{n}/mcnemar_p": g["mcnemar_p"]}
    noise = noise_floor(rows)
    for n, e in noise.items():
        floor |= {f"noise_floor/{n}/flip_rate": e["flip_rate"], f"noise_floor/{n}/mcnemar_p": e["mcnemar_p"]}
    tracker.log_metrics(parent_run_id, {f"baseline/{n}/accuracy": a for n, a in baseline_accuracy.items()}
                        | floor | {"trials/ok": sum(r["status"] == "ok" for r in rows),
                                   "trials/failed": sum(r["status"] != "ok" for r in rows)}, timestamp=ts)
    if noise:
        c.log_dict(parent_run_id, noise, "noise_floor.json")
    if rl_gain:
        c.log_dict(parent_run_id, rl_gain, "sft_floor.json")
    for path in (sd.spec, sd.manifest, sd.trials_jsonl, sd.seed_table):
        if path.is_file():
            c.log_artifact(parent_run_id, str(path))
    splits = {"forget_texts": [p["id"] for p in read_jsonl(sd.forget_texts)],
              "retain_texts": [p["id"] for p in read_jsonl(sd.retain_texts)]}
    for f in sorted(sd.suites.glob("*.jsonl")):
        splits[f"suite:{f.stem}"] = [p["id"] for p in read_jsonl(f)]
    c.log_dict(parent_run_id, splits, "splits/split_ids.json")
    c.log_artifacts(parent_run_id, str(sd.baseline), "baseline")
    c.log_artifact(parent_run_id, str(sd.prepared_manifest), "baseline")
    if table is not None:
        c.log_dict(parent_run_id, table, "significance/seed_table.json")
        holm = [{k: cmp.get(k) for k in ("suite", "condition", "baseline", "n", "mean_difference", "p_raw",
                                         "p_holm", "reject")} for cmp in table.get("comparisons", [])]
        c.log_dict(parent_run_id, {"family": table.get("family"), "comparisons": holm}, "significance/holm.json")
        for cmp in table.get("comparisons", []):
            if cmp.get("p_holm") is not None:
                key = re.sub(r"[^A-Za-z0-9_\-./ ]", "_", f"holm/{cmp['suite']}/{cmp['condition']}_vs_{cmp['baseline']}")
                tracker.log_metrics(parent_run_id, {key: cmp["p_holm"]}, timestamp=ts)
    if sd.report.is_dir():
        c.log_artifacts(parent_run_id, str(sd.report), "report")


# --------------------------------------------------------------------------- reading a sweep back


@dataclass
class FetchedSweep:
    """A sweep folder rebuilt from MLflow, and where its runs are."""

    sweep: SweepDir
    uri: str
    experiment_id: str
    parent_run_id: str

    def fetch_trial_file(self, trial_id: str, name: str, run_id: str | None = None) -> bool:
        """Download a trial's artifact (e.g. selection.json) into trials/<id>/; False when it has none."""
        import mlflow.artifacts

        c = client(self.uri)
        run_id = run_id or next((r.info.run_id for r in search_runs(
            c, self.experiment_id, {TAG_TRIAL: trial_id, TAG_PARENT: self.parent_run_id})), None)
        if not run_id or name not in {f.path for f in c.list_artifacts(run_id)}:
            return False
        td = self.sweep.trial(trial_id)
        td.root.mkdir(parents=True, exist_ok=True)
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=str(td.root),
                                            tracking_uri=self.uri)
        return True


def fetch_sweep(experiment: str, uri: str, dest: str | os.PathLike) -> FetchedSweep:
    """Rebuild a minimal sweep folder in `dest` from the experiment's latest parent run's artifacts.

    The parent run carries tag ``mast.role = parent``; its artifacts trials.jsonl (required),
    seed_table.json, spec.yaml and sweep.json are downloaded; without sweep.json the run's
    tags and params stand in.
    """
    import mlflow.artifacts

    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise InputError(f"--experiment {experiment}: no such experiment at {uri}")
    runs = search_runs(c, exp.experiment_id, {TAG_ROLE: "parent"}, newest_first=True)
    if not runs:
        raise InputError(f"--experiment {experiment}: no sweep parent run (tag {TAG_ROLE}=parent)")
    parent = runs[0]
    run_id = parent.info.run_id
    sd = SweepDir(dest)
    sd.root.mkdir(parents=True, exist_ok=True)
    have = {f.path for f in c.list_artifacts(run_id)}
    if sd.trials_jsonl.name not in have:
        raise InputError(f"--experiment {experiment}: parent run {run_id} has no trials.jsonl artifact "
                         f"(has: {', '.join(sorted(have)) or 'none'}); the sweep has not finished?")
    for name in PARENT_ARTIFACTS:
        if name in have:
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=str(sd.root),
                                                tracking_uri=uri)
    if not sd.manifest.is_file():
        tags, params = parent.data.tags, parent.data.params
        info = {"name": tags.get("mast.sweep") or parent.info.run_name, "experiment": experiment,
                "tracking_uri": uri, "parent_run_id": run_id, "sweep_id": tags.get(TAG_SWEEP)}
        for k in ("spec_hash", "code_version", "n_trials"):
            if k in params or f"mast.{k}" in tags:
                info[k] = params.get(k, tags.get(f"mast.{k}"))
        write_json(sd.manifest, info)
    if len(runs) > 1:
        info = read_json(sd.manifest)
        info["note"] = f"{len(runs)} parent runs in the experiment; the latest ({run_id}) is reported"
        write_json(sd.manifest, info)
    return FetchedSweep(sd, uri, exp.experiment_id, run_id)
