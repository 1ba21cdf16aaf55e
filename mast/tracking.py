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
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TAG_SWEEP = "mast.sweep_id"
TAG_TRIAL = "mast.trial_id"
TAG_ROLE = "mast.role"
TAG_PARENT = "mlflow.parentRunId"
MAX_PARAM_LEN = 6000


def default_uri(sweep_dir: str | os.PathLike) -> str:
    """The default store: a SQLite file in the sweep folder (absolute, so Ray workers agree)."""
    return f"sqlite:///{Path(sweep_dir).resolve() / 'mlflow.db'}"


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
        location = (Path(sweep_dir).resolve() / "mlartifacts").as_uri() if is_local_store(uri) else None
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
    """Flat per-trial metrics: ``{suite}/accuracy|delta|mcnemar_p|ci_low|ci_high|...``."""
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
    return out


def _param_str(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s[:MAX_PARAM_LEN]


def _quote(v: str) -> str:
    return "'" + str(v).replace("'", "\\'") + "'"


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
        tags = {TAG_SWEEP: self.sweep_id, **tags}
        flt = " and ".join(f"tags.`{k}` = {_quote(v)}" for k, v in tags.items())
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=flt, max_results=1000,
                                           order_by=["attributes.start_time ASC"], page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def child_runs(self) -> list:
        return self.find_runs(**{TAG_ROLE: "trial"})

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

    def log_trial(self, run_id: str, row: dict, trial_dir: str | os.PathLike, losses: list[dict],
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
        self.log_metric_rows(run_id, rows, timestamp)
        for suite, table in tables.items():
            self.log_table(run_id, table, f"results/{suite}.json")
        trial_dir = Path(trial_dir)
        for name in ("config.json", "selection.json", "losses.jsonl", "result.json", "probe.json"):
            if (trial_dir / name).is_file():
                self.client.log_artifact(run_id, str(trial_dir / name))
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
