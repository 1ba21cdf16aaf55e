"""The sweep folder's layout: every path from one place, absolute."""

from __future__ import annotations

from mast.layout import SweepDir


def test_sweep_dir_knows_every_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sd = SweepDir("runs/x")
    assert sd.root == tmp_path / "runs" / "x" and sd.root.is_absolute()  # Ray workers have other CWDs
    assert sd.manifest == sd.root / "sweep.json" and sd.spec == sd.root / "spec.yaml"
    assert sd.mlflow_db == sd.root / "mlflow.db" and sd.trials_jsonl == sd.root / "trials.jsonl"
    assert sd.baseline_results("forget") == sd.root / "prepared" / "baseline" / "forget.jsonl"
    assert sd.baseline_probe("forget") == sd.root / "prepared" / "baseline" / "forget.probe.json"
    assert sd.suite_problems("gsm8k") == sd.root / "prepared" / "suites" / "gsm8k.jsonl"
    td = sd.trial("mast-npo-k8-s0")
    assert td.result == sd.root / "trials" / "mast-npo-k8-s0" / "result.json" and td.trial_id == "mast-npo-k8-s0"
    assert td.results("retain") == td.root / "results" / "retain.jsonl"
    assert not sd.exists()
    td.root.mkdir(parents=True)
    assert sd.exists()  # a trials folder alone means a sweep started here
    (td.root / "selection.json").write_text("{}")
    (td.root / "result.json").write_text("{}")
    assert td.artifacts() == [td.selection, td.result]
