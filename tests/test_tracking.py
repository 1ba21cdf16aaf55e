"""MLflow tracking: real SQLite store in a temp dir; runs found by tag, never duplicated."""

from __future__ import annotations

import json

import pytest

from mast.tracking import Tracker, default_uri, init_experiment, resolve_uri, trial_metrics

MC = {"n": 10, "both_correct": 3, "right_to_wrong": 2, "wrong_to_right": 1, "both_wrong": 4, "acc_before": 0.5,
      "acc_after": 0.4, "delta": -0.1, "ci_low": -0.3, "ci_high": 0.1, "p_value": 1.0}


def _row(tid="mast-npo-k2-s0", run_id=None):
    return {"trial_id": tid, "status": "ok", "error": None, "config": {"rule": "mast", "k": 2},
            "suites": {"forget": MC, "retain": {**MC, "delta": 0.0}}, "probe": None, "selected": ["a"],
            "mlflow_run_id": run_id}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating one runs MLflow's migrations: seconds)."""
    d = tmp_path_factory.mktemp("mlflow")
    return d, default_uri(d)


@pytest.fixture
def tracker(store, request):
    d, uri = store
    exp = init_experiment(uri, request.node.name, d)
    return Tracker(uri, exp, "sweep1")


def test_uri_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://head:5000")
    assert resolve_uri(None, tmp_path) == "http://head:5000"
    assert resolve_uri("sqlite:////x/y.db", tmp_path) == "sqlite:////x/y.db"


def test_experiment_created_once_with_local_artifacts(store):
    d, uri = store
    a = init_experiment(uri, "exp", d)
    assert init_experiment(uri, "exp", d) == a
    assert (d / "mlflow.db").is_file()
    from mlflow.tracking import MlflowClient

    loc = MlflowClient(uri).get_experiment(a).artifact_location
    assert loc.endswith("/mlartifacts") and str(d.resolve()) in loc


def test_trial_run_is_idempotent(tmp_path, tracker):
    parent = tracker.parent_run("demo", {"n_trials": 2})
    assert tracker.parent_run("demo") == parent
    r1 = tracker.trial_run(parent, "mast-npo-k2-s0", {"rule": "mast", "k": 2, "seed": 0})
    tracker.fail_trial(r1, "RuntimeError: boom")  # attempt 1 fails
    r2 = tracker.trial_run(parent, "mast-npo-k2-s0", {"rule": "mast", "k": 2, "seed": 0})  # the retry
    assert r2 == r1 and tracker.run_status(r1) == "RUNNING"
    tdir = tmp_path / "trial"
    tdir.mkdir()
    (tdir / "selection.json").write_text(json.dumps({"rule": "mast"}))
    losses = [{"step": 1, "forget": 1.0, "retain": 2.0, "total": 3.0}, {"step": 2, "forget": 0.5, "total": 2.0}]
    table = {"id": ["a", "b"], "correct_before": [True, False], "correct_after": [False, False]}
    row = _row(run_id=r1)
    for _ in range(2):  # logging twice (a resume re-logs) changes nothing
        tracker.log_trial(r1, row, tdir, losses, {"forget": table}, timestamp=1_000)
    c = tracker.client
    runs = tracker.child_runs()
    assert [r.info.run_id for r in runs] == [r1]
    run = c.get_run(r1)
    assert run.info.status == "FINISHED" and run.info.run_name == "mast-npo-k2-s0"
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["mast.trial_id"] == "mast-npo-k2-s0"
    assert run.data.params["k"] == "2"
    assert run.data.metrics["forget/delta"] == pytest.approx(-0.1)
    assert {"forget/accuracy", "forget/mcnemar_p", "forget/ci_low", "forget/ci_high", "retain/delta"} <= set(
        run.data.metrics)
    hist = c.get_metric_history(r1, "train/forget")
    assert sorted((m.step, m.value) for m in hist) == [(1, 1.0), (2, 0.5)]
    assert len(c.get_metric_history(r1, "forget/delta")) == 1
    got = json.loads(open(c.download_artifacts(r1, "results/forget.json", str(tmp_path))).read())
    assert got["columns"][:2] == ["id", "correct_before"] and len(got["data"]) == 2  # rewritten, not appended
    assert {"path": "results/forget.json", "type": "table"} in json.loads(run.data.tags["mlflow.loggedArtifacts"])
    assert {a.path for a in c.list_artifacts(r1)} >= {"selection.json", "results"}


def test_other_sweeps_runs_are_not_reused(tmp_path, tracker):
    parent = tracker.parent_run("demo")
    r1 = tracker.trial_run(parent, "full-npo-s0", {"rule": "full"})
    other = Tracker(tracker.uri, tracker.experiment_id, "sweep2")
    assert other.trial_run(other.parent_run("demo"), "full-npo-s0", {"rule": "full"}) != r1
    assert len(tracker.child_runs()) == 1 and len(other.child_runs()) == 1
    assert tracker.trial_run_ids() == {"full-npo-s0": r1}


def test_trial_run_logs_the_resolved_config(tracker):
    """A sweep's child run carries grid.trial_params: the full config, no k for a rule without k."""
    from mast.config import SweepSpec, validate
    from mast.grid import expand_grid, trial_params

    spec = validate(SweepSpec, {"name": "t", "models": {"toy": {"seed": 0}}, "grid": {"rule": ["full", "mast"]},
                                "unlearning": {"lr": 3e-5, "steps": 20}}, "spec")
    parent = tracker.parent_run("demo")
    got = {}
    for t in expand_grid(spec).trials:
        run_id = tracker.trial_run(parent, t.trial_id, trial_params(t))
        got[t.trial_id] = tracker.client.get_run(run_id).data.params
    full, mast = got["full-npo-s0"], got["mast-npo-k8-s0"]
    assert (full["lr"], full["steps"], full["beta"], full["retain_scale"]) == ("3e-05", "20", "0.1", "token")
    assert "k" not in full and "rho" not in full
    assert (mast["k"], mast["rho"]) == ("8", "0.05")


def test_tracker_pickles_without_client(tracker):
    import pickle

    tracker.client  # noqa: B018 (make one)
    t2 = pickle.loads(pickle.dumps(tracker))
    assert t2._client is None and t2.uri == tracker.uri and t2.sweep_id == "sweep1"


def test_trial_metrics_names():
    m = trial_metrics(_row())
    assert m["forget/accuracy"] == 0.4 and m["forget/mcnemar_p"] == 1.0 and m["retain/delta"] == 0.0
    assert "evaluation/engine_starts" not in m  # rows written before the field had it
    assert trial_metrics({**_row(), "engine_starts": 1})["evaluation/engine_starts"] == 1.0
