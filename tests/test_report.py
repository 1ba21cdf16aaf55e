"""`mast report`: tables checked against the per-trial results, plots exist, self-contained HTML, MLflow source."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from builders import CANDIDATES, make_trials  # tests/ is on sys.path under pytest
from scipy.stats import binomtest

from mast import doc, plots, report, seeds
from mast.cli import main
from mast.files import read_jsonl, write_json, write_jsonl
from mast.trial import TrialRow

SPEC = """name: synthetic
models: {toy: {seed: 0}}
grid: {rule: [mast, full, random], objective: [npo, ga], k: [2, 4, 8], seed: [0, 1, 2]}
"""


def write_sweep(root: Path, n_seeds=3, ks=(2, 4, 8), with_probe=True, with_failed=True) -> Path:
    """A sweep folder in the layout of the brief, from simulated per-problem records run through mcnemar_test."""
    trials, baselines, records = make_trials(n_seeds=n_seeds, ks=ks, with_probe=with_probe, with_failed=with_failed)
    for suite, rows in baselines.items():
        write_jsonl(root / "prepared" / "baseline" / f"{suite}.jsonl", rows)
    for t in trials:
        tdir = root / "trials" / t["trial_id"]
        write_json(tdir / "config.json", t["config"])
        write_json(tdir / "result.json", t)
        for suite, rows in records.get(t["trial_id"], {}).items():
            write_jsonl(tdir / "results" / f"{suite}.jsonl", rows)
        if t["status"] == "ok":
            sel = set(t["selected"])
            write_json(tdir / "selection.json", {
                "rule": t["config"]["rule"], "k": t["config"]["k"], "rho": 0.05,
                "all_parameters": t["config"]["rule"] == "full",
                "candidates": [{**c, "selected": c["name"] in sel} for c in CANDIDATES]})
    write_jsonl(root / "trials.jsonl", trials)
    write_json(root / "seed_table.json", seeds.seed_level_table(trials, suite=None))
    (root / "spec.yaml").write_text(SPEC)
    write_json(root / "sweep.json", {"name": "synthetic", "spec_hash": "abc123", "code_version": "deadbeef0001",
                                     "n_trials": len(trials), "baseline_evaluations": {"forget": 1, "retain": 1},
                                     "tracking_uri": None, "experiment": "synthetic", "parent_run_id": None,
                                     "started": "2026-06-01T00:00:00", "finished": "2026-06-01T01:00:00"})
    return root


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    return write_sweep(tmp_path_factory.mktemp("sweep") / "synthetic")


@pytest.fixture(scope="module")
def built(sweep) -> Path:
    return report.build_report(sweep)


def _correct(path: Path) -> int:
    return sum(bool(r["correct"]) for r in read_jsonl(path))


def test_pure_helpers():
    pts = [(1, 1), (2, 0), (0, 2), (0.5, 0.5), (2, -1), (1, 1)]
    assert plots.pareto_front(pts) == [2, 0, 5, 1]
    assert plots.parse_tensor_name("model.layers.12.self_attn.v_proj.weight") == (12, "v_proj")
    assert plots.parse_tensor_name("model.embed_tokens.weight") is None
    layers, projs, freq, other = plots.selection_frequency(
        [["model.layers.1.self_attn.q_proj.weight", "lm_head.weight"], ["model.layers.1.self_attn.q_proj.weight",
                                                                         "model.layers.0.self_attn.o_proj.weight"]])
    assert (layers, projs, other) == ([0, 1], ["q_proj", "o_proj"], 1)
    assert freq == [[0.0, 0.5], [1.0, 0.0]]
    assert doc.fmt_pp(-8 / 150) == "-5.3" and doc.fmt_p(0.0078125) == "0.0078"


def test_fixture_is_what_a_sweep_writes(sweep):
    """Each trials.jsonl row has a sweep's TrialRow shape, and each suite dict holds the counts, accuracies,
    exact p and bootstrap interval of the per-problem records on disk, computed here independently."""
    rows = read_jsonl(sweep / "trials.jsonl")
    assert any(t["status"] == "ok" for t in rows) and any(t["status"] == "failed" for t in rows)
    for t in rows:
        assert TrialRow.from_dict(t).to_dict() == t  # the fields a sweep writes, no more, no fewer
        for suite, m in t["suites"].items():
            before = {r["id"]: r["correct"] for r in read_jsonl(sweep / "prepared" / "baseline" / f"{suite}.jsonl")}
            after = {r["id"]: r["correct"] for r in read_jsonl(sweep / "trials" / t["trial_id"] / "results" /
                                                               f"{suite}.jsonl")}
            assert set(before) == set(after)
            cells = Counter((before[i], after[i]) for i in before)
            n, b, c = len(before), cells[True, False], cells[False, True]
            assert (m["n"], m["both_correct"], m["right_to_wrong"], m["wrong_to_right"], m["both_wrong"]) == (
                n, cells[True, True], b, c, cells[False, False])
            assert m["acc_before"] == pytest.approx(sum(before.values()) / n)
            assert m["acc_after"] == pytest.approx(sum(after.values()) / n)
            assert m["delta"] == pytest.approx((c - b) / n)
            assert m["p_value"] == pytest.approx(binomtest(b, b + c, 0.5).pvalue if b + c else 1.0)
            assert m["ci_low"] <= m["delta"] <= m["ci_high"]
            draws = np.random.Generator(np.random.PCG64(m["seed"])).multinomial(
                n, [b / n, c / n, (n - b - c) / n], size=m["n_bootstrap"])
            lo, hi = np.quantile((draws[:, 1] - draws[:, 0]) / n, [0.025, 0.975])
            assert (m["ci_low"], m["ci_high"]) == pytest.approx((lo, hi)) and m["confidence"] == 0.95


def test_report_tables_match_per_trial_results(sweep, built):
    assert built == sweep / "report"
    for name in ("report.md", "report.html", "report.json", "tradeoff.png", "deltas_vs_k.png",
                 "prefix_recovery.png", "selection.png", "signals.png"):
        assert (built / name).is_file() and (built / name).stat().st_size > 0, name
    for png in built.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((built / "report.json").read_text())
    trials = read_jsonl(sweep / "trials.jsonl")
    # headline counts come from the per-problem records of the trials of each condition
    base_forget = _correct(sweep / "prepared" / "baseline" / "forget.jsonl")
    n_forget = len(read_jsonl(sweep / "prepared" / "baseline" / "forget.jsonl"))
    labels = [r["condition"] for r in data["headline"]]
    # grouped by objective, the baselines beside mast
    assert labels[:5] == ["mast/ga/k=2", "mast/ga/k=4", "mast/ga/k=8", "full/ga", "random/ga/k=2"]
    for row in data["headline"]:
        f = row["suites"]["forget"]
        assert f["n"] == n_forget and f["correct_before"] == [base_forget] * row["n_seeds"]
        assert f["correct_after"] == [_correct(sweep / "trials" / tid / "results" / "forget.jsonl")
                                      for tid in row["trial_ids"]]
        by_id = {t["trial_id"]: t for t in trials}
        assert f["p_values"] == [by_id[tid]["suites"]["forget"]["p_value"] for tid in row["trial_ids"]]
        for s in ("retain", "gsm8k"):
            deltas = [by_id[tid]["suites"][s]["delta"] for tid in row["trial_ids"]]
            assert row["suites"][s]["mean_delta"] == pytest.approx(sum(deltas) / len(deltas))
    # the seed table is seeds.seed_level_table over every suite (one Holm family)
    assert data["seed_table"] == json.loads(json.dumps(seeds.seed_level_table(trials, suite=None)))
    assert data["seed_table"] == json.loads((sweep / "seed_table.json").read_text())
    md = (built / "report.md").read_text()
    # the paper's form for one trial, in the every-trial table
    t = next(t for t in trials if t["trial_id"] == "mast_npo_k8_s0")
    m = t["suites"]["forget"]
    after = _correct(sweep / "trials" / "mast_npo_k8_s0" / "results" / "forget.jsonl")
    assert f"{base_forget}/{n_forget} → {after}/{n_forget}; p={doc.fmt_p(m['p_value'])}" in md
    # every comparison's raw and Holm p are in the significance table
    for c in data["seed_table"]["comparisons"]:
        assert re.search(rf"\| {re.escape(c['condition'])} \| {c['baseline']} \| 3 \|.*\| "
                         rf"\*?\*?{re.escape(doc.fmt_p(c['p_holm']))}", md), (c["condition"], c["baseline"])
    assert "mast_simnpo_k2_s0" in md and "UnlearnDiverged: loss is nan at step 3" in md
    assert "deadbeef0001" in md and "grid: {rule: [mast, full, random]" in md
    assert "cannot reach p < 0.05" in md


def test_html_is_self_contained(built):
    html = (built / "report.html").read_text()
    srcs = re.findall(r"src='([^']*)'", html)
    # five plots plus prefix recovery at matched forgetting (the grid has no lr/steps axis: no curves)
    assert len(srcs) == 6 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<table>" in html and "href=" not in html
    md = (built / "report.md").read_text()
    for png in ("tradeoff.png", "deltas_vs_k.png", "prefix_recovery.png", "prefix_recovery_matched.png",
                "selection.png", "signals.png"):
        assert f"]({png})" in md


def test_single_seed_sweep_paper_form(tmp_path):
    sweep = write_sweep(tmp_path / "one", n_seeds=1, ks=(4,), with_probe=False, with_failed=False)
    out = report.build_report(sweep, tmp_path / "out")
    data = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    trials = {t["trial_id"]: t for t in read_jsonl(sweep / "trials.jsonl")}
    for row in data["headline"]:
        m = trials[row["trial_ids"][0]]["suites"]["retain"]
        # one seed: the interval is the trial's own bootstrap interval
        assert (row["suites"]["retain"]["ci_low"], row["suites"]["retain"]["ci_high"]) == (m["ci_low"], m["ci_high"])
        f = trials[row["trial_ids"][0]]["suites"]["forget"]
        b, a = round(f["acc_before"] * f["n"]), round(f["acc_after"] * f["n"])
        assert f"| {row['condition']} | 1 | {b}/{f['n']} → {a}/{f['n']} | {doc.fmt_p(f['p_value'])} |" in md
    assert not (out / "prefix_recovery.png").exists() and "No prefix-recovery probe" in md
    assert "Failed trials" in md


def test_cli_and_bad_input(sweep, tmp_path, capsys):
    assert main(["report", str(sweep), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.html").is_file()
    assert main(["report"]) == 2
    assert "give a SWEEP_DIR" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nope")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no trials.jsonl" in capsys.readouterr().err
    # a sweep where every trial failed still gets a report listing them
    failed = [{"trial_id": "t0", "status": "failed", "error": "CUDA out of memory", "config": {"rule": "mast", "seed": 0}}]
    write_jsonl(tmp_path / "allfail" / "trials.jsonl", failed)
    out = report.build_report(tmp_path / "allfail")
    md = (out / "report.md").read_text()
    assert "No trial finished" in md and "CUDA out of memory" in md


@pytest.mark.slow
def test_report_from_mlflow(sweep, built, tmp_path, capsys):
    """Real MLflow (SQLite): the parent run's artifacts rebuild the same report."""
    from mast import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.init_experiment(uri, "synthetic-exp", tmp_path)
    tr = tracking.Tracker(uri, exp, "sweep-1")
    parent = tr.parent_run("synthetic")
    for name in ("trials.jsonl", "seed_table.json", "spec.yaml", "sweep.json"):
        tr.client.log_artifact(parent, str(sweep / name))
    child = tr.trial_run(parent, "mast_npo_k8_s0", {"rule": "mast"})
    tr.client.log_artifact(child, str(sweep / "trials" / "mast_npo_k8_s0" / "selection.json"))
    out = tmp_path / "from_mlflow"
    assert main(["report", "--experiment", "synthetic-exp", "--tracking-uri", uri, "--out", str(out)]) == 0
    a = json.loads((out / "report.json").read_text())
    b = json.loads((built / "report.json").read_text())
    assert a["headline"] == b["headline"] and a["seed_table"] == b["seed_table"]
    assert set(a["plots"]) == set(b["plots"])
    assert "deadbeef0001" in (out / "report.md").read_text()
    capsys.readouterr()
    assert main(["report", "--experiment", "no-such", "--tracking-uri", uri]) == 2
    assert "no such experiment" in capsys.readouterr().err
