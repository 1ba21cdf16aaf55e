"""Matched forgetting: validation suites disjoint from the reported ones, the matched reading
(mast.matched) and, slow, a toy sweep whose rules stop at the same forget-validation level."""

from __future__ import annotations

import json
import math
import random

import pytest

from mast.data import normalize_text
from mast.equivalence import NOT_SHOWN, PRESERVED
from mast.matched import matched_point, matched_rows, summarize
from mast.stats import holm, mcnemar_test

# --------------------------------------------------------------------------- validation vs test


def _disjoint(a: list[dict], b: list[dict]) -> None:
    assert not {p["id"] for p in a} & {p["id"] for p in b}
    assert not {normalize_text(p["prompt"]) for p in a} & {normalize_text(p["prompt"]) for p in b}


def test_toy_validation_sets_share_no_id_and_no_text_with_test_sets_or_unlearning_texts():
    from mast.toy_task import generate_task

    task = generate_task(0)
    for skill in ("forget", "retain"):
        val = task[f"{skill}_val"]
        assert len(val) >= 200
        for other in (f"{skill}_eval", skill, f"{skill}_train"):
            _disjoint(val, task[other])
    _disjoint(task["forget_val"], task["retain_eval"])
    _disjoint(task["retain_val"], task["forget_eval"])


def test_math_retain_validation_is_disjoint_from_forget_retain_and_the_retain_texts(tiny_pair, data_dir, tmp_path):
    from mast.config import SweepSpec
    from mast.layout import SweepDir
    from mast.sources import sources
    from mast.suites import resolve_validation

    ref, tgt = tiny_pair
    spec = SweepSpec.model_validate({
        "name": "v", "models": {"reference": str(ref), "target": str(tgt)}, "grid": {"rule": ["full"]},
        "data": {"forget_size": 40, "retain_size": 40, "retain_train_size": 40, "retain_val_size": 60},
        "evaluation": {"suites": ["forget", "retain"], "validation": ["retain_val"]}})
    src = sources(spec, SweepDir(tmp_path / "s"), str(data_dir))
    val = resolve_validation(spec, src)["retain_val"]
    assert len(val.problems) == 60 and val.spec.name == "retain_val" and val.spec.probe is None
    for other in (src.own["forget"], src.own["retain"], src.retain_texts):
        _disjoint(val.problems, other)
    # no retain-validation draw asked for: the sweep refuses a validation suite it cannot score
    from mast.files import InputError

    spec0 = spec.model_copy(update={"data": spec.data.model_copy(update={"retain_val_size": 0})})
    with pytest.raises(InputError, match="retain_val_size"):
        resolve_validation(spec0, sources(spec0, SweepDir(tmp_path / "s0"), str(data_dir)))


# --------------------------------------------------------------------------- the matched reading (pure)


def _records(n: int, correct: list[bool]) -> list[dict]:
    return [{"id": f"q{i}", "correct": c} for i, c in enumerate(correct[:n])]


def _mc(before: list[bool], after: list[bool]) -> dict:
    return mcnemar_test(_records(len(before), before), _records(len(after), after), n_bootstrap=1)


def _trial(tid, rule, seed, forget_after, retain_after, base_f, base_r, k=None, reached=None, steps=None,
           val_forget=None, **cfg):
    config = {"rule": rule, "objective": "npo", "k": k or 8, "seed": seed, **cfg}
    t = {"trial_id": tid, "status": "ok", "config": config,
         "suites": {"forget": _mc(base_f, forget_after), "retain": _mc(base_r, retain_after)}}
    if reached is not None:
        t.update(stop_reached=reached, steps_run=steps, stop_metric="forget_val_accuracy",
                 stop_history=[{"step": 0, "value": 0.8}, {"step": steps, "value": val_forget}])
    elif val_forget is not None:
        t["validation"] = {"forget_val": {"n": 100, "acc_before": 0.8, "acc_after": val_forget}}
    return t


def test_stop_mode_reads_each_trial_and_keeps_a_rule_that_never_reached_the_level():
    """Every rule is read where it stopped; `random` never reached the target within its cap and is
    reported with reached = False; p_vs_full is McNemar of the rule's vs full's retain answers,
    Holm-adjusted over the family, and None for full itself."""
    rng = random.Random(0)
    n = 200
    base_f = [rng.random() < 0.8 for _ in range(n)]
    base_r = [rng.random() < 0.9 for _ in range(n)]
    full_r = [c and rng.random() < 0.7 for c in base_r]  # full loses ~27 points of retain
    trials = [
        _trial("full-s0", "full", 0, [c and rng.random() < 0.3 for c in base_f], full_r, base_f, base_r,
               reached=True, steps=10, val_forget=0.28),
        _trial("mast-s0", "mast", 0, [c and rng.random() < 0.3 for c in base_f], list(base_r), base_f, base_r,
               reached=True, steps=25, val_forget=0.3),
        _trial("random-s0", "random", 0, [c and rng.random() < 0.9 for c in base_f], list(base_r), base_f,
               base_r, reached=False, steps=60, val_forget=0.7),
        {"trial_id": "null-s0", "status": "ok", "config": {"rule": "null", "seed": 0}, "suites": {}},
    ]
    trials[1]["suites"]["retain_val"] = _mc(base_r, base_r)  # a validation suite scored as a suite: never a reading
    rec = {(t["trial_id"], "retain"): _records(n, r) for t, r in
           zip(trials, [full_r, base_r, base_r])}
    m = matched_rows(trials, lambda tid, s: rec.get((tid, s)), margin=0.02)
    assert m["mode"] == "stop" and m["primary_retain"] == "retain"
    rows = {r["rule"]: r for r in m["rows"]}
    assert set(rows) == {"full", "mast", "random"}  # null is the noise floor, not a rule
    assert rows["random"]["reached"] is False and rows["random"]["steps"] == 60
    assert rows["mast"]["reached"] is True and rows["mast"]["steps"] == 25 and rows["full"]["k"] is None
    for key in ("objective", "k", "rule", "forget_drop", "retain_drop", "steps", "p_vs_full", "reached"):
        assert key in rows["mast"]
    assert rows["full"]["p_vs_full"] is None and set(rows["mast"]["retain"]) == {"retain"}
    raw = [mcnemar_test(_records(n, full_r), _records(n, base_r), n_bootstrap=1)["p_value"]] * 2
    assert [rows[r]["p_vs_full"] for r in ("mast", "random")] == pytest.approx(holm(raw))
    assert rows["mast"]["p_vs_full"] < 1e-6 and m["holm_family"] == 2
    # untouched retain answers on 200 problems: equivalence within +-2 points holds only with margin to spare
    assert rows["mast"]["retain"]["retain"]["verdict"] == PRESERVED
    assert rows["full"]["retain"]["retain"]["verdict"] == NOT_SHOWN
    assert rows["full"]["retain_drop"] == pytest.approx(-rows["full"]["retain"]["retain"]["delta"])
    s = {r["rule"]: r for r in summarize(m)}
    assert s["random"]["reached"] == 0 and s["mast"]["preserved"] == 1 and s["mast"]["vs_full_significant"] == 1


def test_axis_mode_chooses_the_level_on_validation_and_the_first_point_reaching_it():
    """Without stop, along an lr axis: the level is the strongest forgetting every curve reaches on
    validation, and each curve is read at its smallest lr that reaches it (no interpolation)."""
    base = [True] * 10
    mk = lambda tid, rule, lr, v: _trial(tid, rule, 0, [False] * 5 + [True] * 5, base, base, base,  # noqa: E731
                                         val_forget=v, lr=lr)
    trials = [mk("f1", "full", 1e-5, 0.5), mk("f2", "full", 3e-5, 0.2), mk("f3", "full", 1e-4, 0.0),
              mk("m1", "mast", 1e-5, 0.7), mk("m2", "mast", 3e-5, 0.4), mk("m3", "mast", 1e-4, 0.3)]
    m = matched_rows(trials, lambda *_: None, margin=0.02)
    assert m["mode"] == "axis" and m["axes"] == ["lr"] and m["level"] == pytest.approx(0.3)
    picked = {r["rule"]: (r["trial_id"], r["reached"], r["lr"]) for r in m["rows"]}
    assert picked == {"full": ("f2", True, 3e-5), "mast": ("m3", True, 1e-4)}
    # a fixed level (evaluation.matched_level) that mast never reaches: read at its best point, reached False
    m2 = matched_rows(trials, lambda *_: None, margin=0.02, level=0.1)
    picked = {r["rule"]: (r["trial_id"], r["reached"]) for r in m2["rows"]}
    assert picked == {"full": ("f3", True), "mast": ("m3", False)}
    assert all(r["p_vs_full"] is None for r in m2["rows"])  # no per-problem records: no test


def test_matched_point_prefers_the_smallest_axis_value_that_reached_the_stop_target():
    curve = [{"stop_reached": False, "trial_id": "a"}, {"stop_reached": True, "trial_id": "b"},
             {"stop_reached": True, "trial_id": "c"}]
    assert matched_point(curve, None) == (curve[1], True)
    assert matched_point(curve[:1], None) == (curve[0], False)


# --------------------------------------------------------------------------- slow: a toy sweep with stop


@pytest.mark.slow
def test_toy_sweep_with_stop_brings_mast_and_full_to_matched_forgetting(toy_dir, tmp_path):
    """A toy sweep whose trials stop at forget-validation accuracy <= target: mast and full both
    end within +-0.05 of the target on forget_val (or are marked reached: false), and report.json's
    matched table has a row for every rule."""
    import yaml

    from mast.files import read_jsonl
    from mast.report import build_report
    from mast.sweep import run_sweep

    summary = json.loads((toy_dir / "toy_summary.json").read_text())
    target, cap = 0.5, 30
    spec = {
        "name": "matched", "models": {"toy": {"seed": 0, "out": str(toy_dir)}},
        "data": {"forget_size": 32, "retain_size": 32},
        "grid": {"rule": ["mast", "full", "random"], "objective": ["npo"], "k": [4], "seed": [0]},
        "selection": {"rho": 0.05, "max_length": 128},
        # checked after every step: at this lr one step moves forget_val accuracy by < 0.05
        "unlearning": {"lr": 2e-5, "batch_size": 8, "max_length": 128, "bf16": False,
                       "gradient_checkpointing": False,
                       "stop": {"metric": "forget_val_accuracy", "target": target, "every": 1, "max_steps": cap}},
        "evaluation": {"suites": ["forget", "retain"], "validation": ["forget_val"], "backend": "hf",
                       "batch_size": 100, "noise_floor": False,
                       "limits": {"forget": 40, "retain": 40, "forget_val": 100}},
        "resources": {"cpu": 1, "max_concurrent": 2},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "sweep"
    run_sweep(path, out=out)
    trials = {t["config"]["rule"]: t for t in read_jsonl(out / "trials.jsonl")}
    assert all(t["status"] == "ok" for t in trials.values()), [t.get("error") for t in trials.values()]
    assert summary["rlvr"]["forget"] > target + 0.1  # the target has something to forget
    for rule in ("mast", "full"):
        t = trials[rule]
        hist = t["stop_history"]
        assert hist[0]["step"] == 0 and t["steps_run"] == hist[-1]["step"] <= cap
        if t["stop_reached"]:
            # stopped at the first check at or below the target, within 0.05 of it
            assert target - 0.05 <= hist[-1]["value"] <= target + 1e-9, (rule, hist)
            assert all(h["value"] > target for h in hist[:-1]), (rule, hist)
        # the stop check is the forget_val suite: the post-hoc validation score agrees with it
        assert math.isclose(t["validation"]["forget_val"]["acc_after"], hist[-1]["value"], abs_tol=1e-9)
    assert trials["mast"]["stop_reached"] or trials["mast"]["steps_run"] == cap
    assert len(trials["mast"]["validation"]["forget_val"]) and trials["mast"]["validation"]["forget_val"]["n"] == 100
    assert trials["full"]["stop_reached"]
    report = json.loads((build_report(out) / "report.json").read_text())
    rows = {r["rule"]: r for r in report["matched_forgetting"]}
    assert set(rows) == {"mast", "full", "random"}
    for rule, r in rows.items():
        assert r["reached"] == trials[rule]["stop_reached"]
        assert r["steps"] == trials[rule]["steps_run"]
    assert rows["full"]["p_vs_full"] is None and rows["mast"]["p_vs_full"] is not None
    assert rows["mast"]["retain"]["retain"]["verdict"] in (PRESERVED, NOT_SHOWN)
