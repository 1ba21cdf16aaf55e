"""The SFT floor (share of the RLVR gain removed, below the reference) and the noise floor (null trials):
the pure functions, their MLflow metrics, the seed table leaving null trials out, and the report."""

from __future__ import annotations

import json

import pytest
from builders import make_trials  # tests/ is on sys.path under pytest

from mast import floor, report, seeds, stats
from mast.files import write_json, write_jsonl
from mast.tracking import trial_metrics


def _records(correct: list[bool]) -> list[dict]:
    return [{"id": f"p{i}", "correct": c} for i, c in enumerate(correct)]


# reference 3/10, target 9/10: six wrong->right, none back -> exact McNemar p = 2 * 0.5**6 = 0.03125
REFERENCE = _records([True] * 3 + [False] * 7)
TARGET = _records([True] * 9 + [False])


def test_rl_gain_is_established_only_when_mcnemar_is_significant():
    g = floor.rl_gain(REFERENCE, TARGET)
    assert (g["reference_acc"], g["target_acc"], g["n"]) == (0.3, 0.9, 10)
    assert g["gain"] == pytest.approx(0.6) and g["mcnemar_p"] == pytest.approx(2 * 0.5**6) and g["established"]
    small = floor.rl_gain(REFERENCE, _records([True] * 5 + [False] * 5))  # two flips: p = 0.5
    assert small["mcnemar_p"] == pytest.approx(0.5) and not small["established"]
    same = floor.rl_gain(REFERENCE, REFERENCE)
    assert same["gain"] == 0 and same["mcnemar_p"] == 1.0 and not same["established"]


def test_share_of_the_gain_removed():
    # (t - u) / (t - r): nothing removed 0, back to the SFT level 1, below it > 1
    assert floor.gain_removed(0.9, 0.9, 0.3, True) == 0.0
    assert floor.gain_removed(0.9, 0.6, 0.3, True) == pytest.approx(0.5)
    assert floor.gain_removed(0.9, 0.3, 0.3, True) == pytest.approx(1.0)
    assert floor.gain_removed(0.9, 0.1, 0.3, True) == pytest.approx(0.8 / 0.6)
    # empty where the RLVR change is within the noise (or zero)
    assert floor.gain_removed(0.9, 0.6, 0.3, False) is None
    assert floor.gain_removed(0.5, 0.4, 0.5, True) is None


def test_below_reference_flags_removing_more_than_rl_added():
    assert floor.below_reference(0.29, 0.3) and not floor.below_reference(0.3, 0.3)
    g = floor.rl_gain(REFERENCE, TARGET)
    e = floor.sft_floor_entry(g, 0.2, vs_reference_p=0.5)
    assert e["below_reference"] and e["gain_removed"] == pytest.approx(0.7 / 0.6)
    assert (e["reference_acc"], e["target_acc"], e["gain_p"], e["vs_reference_p"]) == (0.3, 0.9, g["mcnemar_p"], 0.5)
    # no established gain: no share, but going under the SFT model is still flagged
    flat = floor.sft_floor_entry(floor.rl_gain(REFERENCE, REFERENCE), 0.2, 1.0)
    assert flat["gain_removed"] is None and flat["below_reference"]


def _null_row(seed, before, after, status="ok"):
    return {"trial_id": f"null-s{seed}", "status": status, "error": None, "config": {"rule": "null", "seed": seed},
            "suites": {"forget": stats.mcnemar_test(_records(before), _records(after), n_bootstrap=10)}}


def test_noise_floor_pools_the_null_trials_per_suite():
    base = [True] * 5 + [False] * 5
    same = _null_row(0, base, base)
    flipped = _null_row(1, base, [False] + base[1:9] + [True])  # one right->wrong, one wrong->right
    other = {**same, "trial_id": "mast-npo-k2-s0", "config": {"rule": "mast", "seed": 0}}
    assert floor.noise_floor([same]) == {"forget": {
        "n": 10, "seeds": [0], "right_to_wrong": 0, "wrong_to_right": 0, "flips": 0, "flip_rate": 0.0,
        "mcnemar_p": 1.0, "per_seed": [{"seed": 0, "flip_rate": 0.0, "mcnemar_p": 1.0}]}}
    nf = floor.noise_floor([same, flipped, other, _null_row(2, base, [not x for x in base], status="failed")])
    f = nf["forget"]
    assert f["seeds"] == [0, 1] and f["flips"] == 2 and f["flip_rate"] == pytest.approx(2 / 20)
    assert f["mcnemar_p"] == 1.0 and [x["flip_rate"] for x in f["per_seed"]] == [0.0, 0.2]
    assert floor.noise_floor([other]) == {}


def test_trial_metrics_carry_the_sft_floor():
    g = floor.rl_gain(REFERENCE, TARGET)
    m = stats.mcnemar_test(TARGET, _records([True] * 6 + [False] * 4), n_bootstrap=10)
    row = {"suites": {"forget": m, "retain": m},
           "sft_floor": {"forget": floor.sft_floor_entry(g, m["acc_after"], 0.5),
                         "retain": floor.sft_floor_entry(floor.rl_gain(TARGET, TARGET), m["acc_after"], 0.5)}}
    out = trial_metrics(row)
    assert out["forget/gain_removed"] == pytest.approx(0.5) and out["forget/below_reference"] == 0.0
    assert out["forget/reference_accuracy"] == 0.3
    assert "retain/gain_removed" not in out and out["retain/below_reference"] == 1.0  # 0.6 < 0.9
    assert "forget/gain_removed" not in trial_metrics({"suites": {"forget": m}})  # older rows: no floor


def _sweep_with_floors(root):
    """A sweep folder whose trials carry sft_floor entries, plus one null trial per seed."""
    trials, baselines, _ = make_trials(n_seeds=2, ks=(2,), objectives=("npo",), rules=("mast", "full"),
                                       suites=(("forget", 60, 0.5), ("retain", 60, 0.8)), with_failed=False)
    # the SFT model solves a third of what the target solves on forget (RL added the rest), all of retain
    reference = {"forget": [{**r, "correct": r["correct"] and i % 3 == 0} for i, r in enumerate(baselines["forget"])],
                 "retain": baselines["retain"]}
    gains = {s: floor.rl_gain(reference[s], baselines[s]) for s in baselines}
    assert gains["forget"]["established"] and not gains["retain"]["established"]
    for t in trials:
        t["sft_floor"] = {s: floor.sft_floor_entry(gains[s], m["acc_after"], 1.0) for s, m in t["suites"].items()}
    for seed in (0, 1):
        suites = {s: stats.mcnemar_test(b, b, n_bootstrap=10) for s, b in baselines.items()}
        trials.append({"trial_id": f"null-s{seed}", "status": "ok", "error": None,
                       "config": {"rule": "null", "seed": seed}, "suites": suites, "probe": None, "selected": [],
                       "mlflow_run_id": None})
    write_jsonl(root / "trials.jsonl", trials)
    write_json(root / "sweep.json", {"name": "floors", "sft_floor": gains})
    return trials, gains


def test_seed_table_leaves_null_trials_out(tmp_path):
    trials, _ = _sweep_with_floors(tmp_path)
    with_null = seeds.seed_level_table(trials, suite=None)
    without = seeds.seed_level_table([t for t in trials if not floor.is_null(t)], suite=None)
    assert with_null["conditions"] == without["conditions"] and with_null["comparisons"] == without["comparisons"]
    assert not any(c["condition"].startswith("null") for c in with_null["conditions"])
    assert any("null trial(s)" in n for n in with_null["notes"])


def test_report_states_both_floors(tmp_path):
    trials, gains = _sweep_with_floors(tmp_path)
    out = report.build_report(tmp_path)
    data = json.loads((out / "report.json").read_text())
    nf = data["noise_floor"]
    assert set(nf) == {"forget", "retain"}
    assert {k: nf["forget"][k] for k in ("flip_rate", "mcnemar_p", "n", "seeds")} == {
        "flip_rate": 0.0, "mcnemar_p": 1.0, "n": 60, "seeds": [0, 1]}
    sft = data["sft_floor"]
    assert sft["suites"] == json.loads(json.dumps(gains))
    by = {(c["condition"], c["suite"]): c for c in sft["conditions"]}
    mast = [t for t in trials if t["config"]["rule"] == "mast"]
    shares = [t["sft_floor"]["forget"]["gain_removed"] for t in mast]
    assert by[("mast/npo/k=2", "forget")]["gain_removed"] == pytest.approx(sum(shares) / 2)
    assert by[("mast/npo/k=2", "forget")]["below_reference"] == sum(
        t["sft_floor"]["forget"]["below_reference"] for t in mast)
    assert by[("mast/npo/k=2", "retain")]["gain_removed"] is None  # RL did not change retain
    head = {r["condition"]: r for r in data["headline"]}
    assert "null" not in head and head["mast/npo/k=2"]["suites"]["forget"]["gain_removed"] == pytest.approx(
        sum(shares) / 2)
    md = (out / "report.md").read_text()
    assert "null (noise floor)" in md and "## Noise floor" in md and "## SFT floor" in md
    assert "forget RL gain removed" in md
