"""The sweep driver: CLI refusals (fast); real Ray + MLflow sweeps on the toy, resume after a kill (slow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from builders import write_yaml

from mast.cli import main
from mast.config import SweepSpec, validate
from mast.grid import spec_hash
from mast.resources import vllm_cpu_build
from mast.seeds import seed_level_table
from mast.sweep import run_sweep

# --------------------------------------------------------------------------- CLI errors: exit 2, one line


def _run(capsys, *argv) -> tuple[int, str]:
    code = main(["sweep", *map(str, argv)])
    err = capsys.readouterr().err.strip()
    return code, err


def test_spec_errors_exit_2_with_one_line(tmp_path, capsys):
    base = {"name": "t", "models": {"toy": {"seed": 0}}, "grid": {"rule": ["mast"]}}
    cases = [
        ({**base, "grid": {"rule": ["magic"]}}, "grid point"),
        ({**base, "resources": {"cpu": 0}}, "resources.cpu"),
        ({**base, "name": "bad name!"}, "name:"),
        ({**base, "evaluation": {"suites": ["forget", "nope"]}, "scheduler": {"kind": "asha", "metric": "x/delta"}},
         "scheduler.metric"),
        ({**base, "evaluation": {"suites": ["forget"], "limits": {"gsm8k": 3}}}, "evaluation.limits"),
        ({"name": "t", "grid": {"rule": ["mast"]}}, "models"),
    ]
    if not vllm_cpu_build():  # vLLM's CPU build evaluates without a GPU (tests/test_vllm_sweep.py)
        cases.append(({**base, "evaluation": {"backend": "vllm"}}, "resources.gpu"))
    for i, (data, field) in enumerate(cases):
        code, err = _run(capsys, write_yaml(tmp_path, data, f"s{i}.yaml"), "--out", tmp_path / f"o{i}")
        assert code == 2, (field, err)
        assert len(err.splitlines()) == 1 and field in err and f"s{i}.yaml" in err, err
    code, err = _run(capsys, tmp_path / "missing.yaml")
    assert code == 2 and "file not found" in err


def test_existing_sweep_needs_resume_and_same_spec(tmp_path, capsys):
    spec = {"name": "t", "models": {"toy": {"seed": 0}}, "grid": {"rule": ["mast"]}}
    p = write_yaml(tmp_path, spec)
    out = tmp_path / "sweep"
    code, err = _run(capsys, p, "--out", out, "--resume")
    assert code == 2 and "no sweep to resume" in err
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"spec_hash": spec_hash(validate(SweepSpec, spec, "x"))}))
    code, err = _run(capsys, p, "--out", out)
    assert code == 2 and "already exists; use --resume" in err and len(err.splitlines()) == 1
    p2 = write_yaml(tmp_path, {**spec, "grid": {"rule": ["full"]}}, "s2.yaml")
    code, err = _run(capsys, p2, "--out", out, "--resume")
    assert code == 2 and "spec changed" in err


# --------------------------------------------------------------------------- slow: real Ray + MLflow on the toy


def _toy_spec(toy: Path, name: str, grid: dict, **over) -> dict:
    spec = {
        "name": name,
        "models": {"toy": {"seed": 0, "out": str(toy)}},
        "data": {"forget_size": 16, "retain_size": 16},
        "grid": grid,
        "selection": {"k": 2, "max_length": 128},
        "unlearning": {"lr": 1e-3, "steps": 2, "batch_size": 4, "max_length": 128, "bf16": False,
                       "gradient_checkpointing": False},
        "evaluation": {"suites": ["forget", "retain"], "limits": {"forget": 16, "retain": 16}, "batch_size": 16},
        "resources": {"cpu": 1, "max_concurrent": 2, "max_failures": 1},
    }
    spec.update(over)
    return spec


def _child_runs(uri: str, exp_id: str):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    runs = c.search_runs([exp_id], filter_string="tags.`mast.role` = 'trial'", max_results=1000)
    return c, runs


@pytest.mark.slow
def test_sweep_on_toy_with_ray_and_mlflow(tmp_path, toy_dir, capsys):
    import ray

    out = tmp_path / "sweep"
    spec = write_yaml(tmp_path, _toy_spec(toy_dir, "small", {"rule": ["mast", "full"], "seed": [0, 1]}))
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20)
    try:
        meta = run_sweep(spec, out=out)
    finally:
        ray.shutdown()
    ids = ["mast-npo-k2-s0", "mast-npo-k2-s1", "full-npo-s0", "full-npo-s1", "null-s0", "null-s1"]
    assert meta["n_trials"] == 6 and meta["n_ok"] == 6 and meta["trial_ids"] == ids
    assert meta["baseline_evaluations"] == {"forget": 1, "retain": 1}  # once per suite, not per trial
    rows = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert [r["trial_id"] for r in rows] == ids and all(r["status"] == "ok" for r in rows)
    for r in rows:
        assert set(r["suites"]) == {"forget", "retain"} and r["suites"]["forget"]["n"] == 16
        assert set(r["sft_floor"]) == {"forget", "retain"}  # read against the SFT model on every suite
        tdir = out / "trials" / r["trial_id"]
        assert {"config.json", "selection.json", "result.json", "results"} <= {p.name for p in tdir.iterdir()}
        assert (tdir / "losses.jsonl").is_file() == (r["config"]["rule"] != "null")
        assert not (tdir / "checkpoint").exists()  # deleted after evaluation
        assert json.loads((tdir / "result.json").read_text()) == r
    assert len(rows[0]["selected"]) == 2 and rows[2]["all_parameters"]
    # the noise floor: the null trials (cache bypassed) reproduce the greedy CPU baseline exactly
    report_json = json.loads((out / "report" / "report.json").read_text())
    assert {s: (e["flip_rate"], e["mcnemar_p"], e["seeds"]) for s, e in report_json["noise_floor"].items()} == {
        "forget": (0.0, 1.0, [0, 1]), "retain": (0.0, 1.0, [0, 1])}
    assert set(report_json["sft_floor"]["suites"]) == {"forget", "retain"} == set(meta["sft_floor"])
    table = json.loads((out / "seed_table.json").read_text())
    assert table == json.loads(json.dumps(seed_level_table(rows, suite=None)))
    assert any(c["condition"] == "mast/npo/k=2" and c["baseline"] == "full" for c in table["comparisons"])
    assert not any(c["condition"].startswith("null") for c in table["conditions"])

    # MLflow: one parent, one FINISHED child per trial with the metric names, tables, artifacts
    c, runs = _child_runs(meta["tracking_uri"], meta["experiment_id"])
    assert sorted(r.info.run_name for r in runs) == sorted(ids)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all(r.data.tags["mlflow.parentRunId"] == meta["parent_run_id"] for r in runs)
    for r in runs:
        for s in ("forget", "retain"):
            assert {f"{s}/accuracy", f"{s}/delta", f"{s}/mcnemar_p", f"{s}/ci_low", f"{s}/ci_high",
                    f"{s}/reference_accuracy", f"{s}/below_reference"} <= set(r.data.metrics)
        p = r.data.params
        if p["rule"] == "null":
            assert p == {"rule": "null", "seed": r.info.run_name[-1]}
            continue
        assert p["rule"] in ("mast", "full") and "seed" in p
        # the resolved config, and k / rho only for the rule that uses them
        assert (p["lr"], p["steps"], p["batch_size"], p["beta"], p["retain"]) == ("0.001", "2", "4", "0.1", "nll")
        assert ("k" in p, "rho" in p) == ((True, True) if p["rule"] == "mast" else (False, False))
        assert len(c.get_metric_history(r.info.run_id, "train/total")) == 2  # 2 steps
        arts = {a.path for a in c.list_artifacts(r.info.run_id)}
        assert "selection.json" in arts and {a.path for a in c.list_artifacts(r.info.run_id, "results")} == {
            "results/forget.json", "results/retain.json"}
    parent = c.get_run(meta["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials/ok"] == 6
    pm = parent.data.metrics
    assert (pm["noise_floor/forget/flip_rate"], pm["noise_floor/forget/mcnemar_p"]) == (0.0, 1.0)
    assert pm["reference/forget/accuracy"] == meta["sft_floor"]["forget"]["reference_acc"]
    assert {"rl_gain/forget/delta", "rl_gain/retain/mcnemar_p", "noise_floor/retain/flip_rate"} <= set(pm)
    sig = {a.path for a in c.list_artifacts(parent.info.run_id, "significance")}
    assert {"significance/seed_table.json", "significance/holm.json"} <= sig
    holm = json.loads(open(c.download_artifacts(parent.info.run_id, "significance/holm.json", str(tmp_path))).read())
    assert holm["comparisons"] and all("p_holm" in x for x in holm["comparisons"])
    assert {"spec.yaml", "baseline", "splits", "noise_floor.json", "sft_floor.json"} <= {
        a.path for a in c.list_artifacts(parent.info.run_id)}
    assert "headline" not in capsys.readouterr().err  # (output goes to stdout)

    # a finished sweep: refused without --resume; --resume re-runs nothing and duplicates nothing
    assert main(["sweep", str(spec), "--out", str(out)]) == 2
    assert "already exists; use --resume" in capsys.readouterr().err
    before = {i: (out / "trials" / i / "result.json").stat().st_mtime_ns for i in ids}
    assert main(["sweep", str(spec), "--out", str(out), "--resume"]) == 0
    meta2 = json.loads((out / "sweep.json").read_text())
    assert meta2["baseline_evaluations"] == {"forget": 1, "retain": 1}
    assert {i: (out / "trials" / i / "result.json").stat().st_mtime_ns for i in ids} == before
    _, runs = _child_runs(meta["tracking_uri"], meta["experiment_id"])
    assert len(runs) == 6 and all(r.info.status == "FINISHED" for r in runs)


@pytest.mark.slow
def test_killed_driver_resumes_without_losing_or_duplicating_trials(tmp_path, toy_dir):
    """SIGKILL the driver after its first trial finished; --resume completes the rest, once each.

    Half of the grid diverges (full-parameter updates at lr 1e30, no clipping: NaN at step 2):
    those trials are retried per FailureConfig, then recorded as failed with their error; the
    sweep goes on.
    """
    out = tmp_path / "sweep"
    spec = _toy_spec(toy_dir, "killed", {"rule": ["full"], "lr": [1e-3, 1e30], "seed": [0, 1]},
                     resources={"cpu": 1, "max_concurrent": 1, "max_failures": 1})
    spec["unlearning"]["max_grad_norm"] = None
    spec["evaluation"]["noise_floor"] = False  # resume is the point here, not the floors
    p = write_yaml(tmp_path, spec)
    cmd = [sys.executable, "-m", "mast.cli", "sweep", str(p), "--out", str(out)]
    env = {**os.environ, "MAST_RAY_NUM_CPUS": "2"}
    log = open(tmp_path / "run1.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    first = None
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None:
        done = [f for f in (out / "trials").glob("*/result.json") if json.loads(f.read_text())["status"] == "ok"]
        if done:
            first = done[0]
            break
        time.sleep(0.5)
    assert first is not None, (tmp_path / "run1.log").read_text()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "trials.jsonl").exists()  # it really died mid-sweep
    first_row = first.read_text()
    time.sleep(3)  # let Ray's fate-sharing processes exit

    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert first.read_text() == first_row  # the trial finished before the kill was not run again
    rows = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    meta = json.loads((out / "sweep.json").read_text())
    assert len(rows) == 4 and len({x["trial_id"] for x in rows}) == 4 and meta["trial_ids"] == [
        x["trial_id"] for x in rows]
    ok = [x for x in rows if x["status"] == "ok"]
    failed = [x for x in rows if x["status"] == "failed"]
    assert {x["config"]["lr"] for x in ok} == {1e-3} and len(ok) == 2
    assert {x["config"]["lr"] for x in failed} == {1e30} and len(failed) == 2
    assert all("diverged" in x["error"] for x in failed)
    assert meta["baseline_evaluations"] == {"forget": 1, "retain": 1}
    _, runs = _child_runs(meta["tracking_uri"], meta["experiment_id"])
    assert sorted(x.info.run_name for x in runs) == sorted(x["trial_id"] for x in rows)  # one run per trial
    status = {x.info.run_name: x.info.status for x in runs}
    assert all(status[x["trial_id"]] == "FINISHED" for x in ok)
    assert all(status[x["trial_id"]] == "FAILED" for x in failed)
