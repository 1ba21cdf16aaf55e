"""The toy world: task generator (fast) and the built base -> SFT -> RLVR triple (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mast.toy import DATA_FILES, SUITES, ToyConfig, build_toy, is_finished
from mast.toy_task import (
    FORGET_SKILL,
    RETAIN_SKILL,
    add_problem,
    careless_mul_solution,
    generate_task,
    has_carry,
    mul_problem,
    operand_key,
    paired_gain_ci,
)


def test_task_answers_are_right_by_the_real_grader():
    from mast.grading import grade_records

    task = generate_task(seed=0)
    probs = [p for name in DATA_FILES for p in task[name]]
    for p in probs:  # the answer is the arithmetic value of the prompt's expression
        a, op, b = p["prompt"].removeprefix("What is ").removesuffix("?").split()
        assert int(p["answer"]) == (int(a) * int(b) if op == "*" else int(a) + int(b))
        assert p["skill"] == (FORGET_SKILL if op == "*" else RETAIN_SKILL)
        assert p["solution"].endswith(f"\\boxed{{{p['answer']}}}")
    rows = [{"id": p["id"], "benchmark": "math", "gold": p["answer"], "response": p["solution"]} for p in probs]
    assert all(r["correct"] for r in grade_records(rows))
    # the sloppy teacher's SFT demos drop the carry: wrong exactly when the ones product carries
    carry, none = (37, 6), (31, 2)
    wrong = grade_records([
        {"id": "c", "benchmark": "math", "gold": "222", "response": careless_mul_solution(*carry)},
        {"id": "n", "benchmark": "math", "gold": "62", "response": careless_mul_solution(*none)},
    ])
    assert [r["correct"] for r in wrong] == [False, True]
    assert careless_mul_solution(*none) == mul_problem(*none)["solution"]


def test_worked_solutions():
    assert add_problem(37, 45)["solution"] == "7+5=12\n3+4+1=8\nso 37+45=82.\n\\boxed{82}"
    assert add_problem(21, 34)["solution"] == "1+4=5\n2+3=5\nso 21+34=55.\n\\boxed{55}"
    assert mul_problem(37, 6)["solution"] == "7*6=42\n3*6=18\n18+4=22\nso 37*6=222.\n\\boxed{222}"
    # the commuted question is worked the same way, on the two-digit operand
    assert mul_problem(6, 37)["solution"] == "7*6=42\n3*6=18\n18+4=22\nso 6*37=222.\n\\boxed{222}"
    assert careless_mul_solution(6, 37) == "7*6=42\n3*6=18\nso 6*37=182.\n\\boxed{182}"
    assert mul_problem(99, 9)["answer"] == "891"
    assert has_carry(mul_problem(6, 37)) and not has_carry(mul_problem(31, 2))


def test_splits_are_large_disjoint_and_deterministic_by_seed():
    """Test (>= 200), validation (>= 200), unlearning (64) and training problems never share an
    operand pair (so not even a commuted twin), per skill; the same seed gives the same splits."""
    t0, again, t1 = generate_task(0), generate_task(0), generate_task(1)
    assert t0 == again
    assert [p["id"] for p in t0["forget_eval"]] != [p["id"] for p in t1["forget_eval"]]
    for skill in ("forget", "retain"):
        splits = {name: t0[name] for name in (f"{skill}_eval", f"{skill}_val", skill, f"{skill}_train")}
        assert len(splits[f"{skill}_eval"]) >= 200 and len(splits[f"{skill}_val"]) >= 200
        assert len(splits[skill]) == 64
        assert len(splits[f"{skill}_train"]) >= 500  # enough left for SFT and RL
        keys = {name: {operand_key(p) for p in rows} for name, rows in splits.items()}
        names = list(keys)
        for i, a in enumerate(names):
            assert len({p["id"] for p in splits[a]}) == len(splits[a])
            for b in names[i + 1:]:
                assert not keys[a] & keys[b], (a, b)
    assert {p["skill"] for p in t0["forget"] + t0["forget_eval"] + t0["forget_val"]} == {FORGET_SKILL}
    assert {p["skill"] for p in t0["retain"] + t0["retain_eval"] + t0["retain_val"]} == {RETAIN_SKILL}
    # most forget test problems carry: the sloppy teacher's failure is what RL can repair
    assert sum(has_carry(p) for p in t0["forget_eval"]) >= 0.6 * len(t0["forget_eval"])
    with pytest.raises(ValueError, match="fewer training problems"):
        generate_task(0, n_eval=400, n_val=400)  # the 1040 multiplications cannot hold that


def test_paired_gain_ci_is_the_paired_t_interval_and_widens_for_clustered_twins():
    from scipy import stats

    before = [0, 0, 1, 1, 0, 0, 1, 0, 0, 1]
    after = [1, 1, 1, 0, 1, 0, 1, 1, 0, 1]
    d = [a - b for a, b in zip(after, before)]
    ci = paired_gain_ci(before, after, clusters=list(range(10)))
    ref = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
    assert ci["gain"] == pytest.approx(0.3)
    assert (ci["low"], ci["high"]) == (pytest.approx(ref.low), pytest.approx(ref.high))
    # every problem asked twice (a*b, b*a) with the same outcome: same gain, but only 10
    # independent clusters, so the interval is the 10-problem one (not narrower)
    twice = paired_gain_ci(before * 2, after * 2, clusters=list(range(10)) * 2)
    assert twice["gain"] == pytest.approx(0.3) and twice["clusters"] == 10
    assert twice["high"] - twice["low"] >= ci["high"] - ci["low"] - 1e-12
    naive = paired_gain_ci(before * 2, after * 2, clusters=list(range(20)))
    assert naive["high"] - naive["low"] < twice["high"] - twice["low"]
    with pytest.raises(ValueError):
        paired_gain_ci([1], [1, 0], [0])


def test_cli_toy_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "x.txt").write_text("not a toy build")
    out = subprocess.run([sys.executable, "-m", "mast.cli", "toy", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2 and "not a toy build" in out.stderr and "Traceback" not in out.stderr
    f = tmp_path / "file"
    f.write_text("")
    out = subprocess.run([sys.executable, "-m", "mast.cli", "toy", str(f)], capture_output=True, text=True)
    assert out.returncode == 2 and "not a folder" in out.stderr


# --------------------------------------------------------------------------- the build (slow)


@pytest.mark.slow
def test_toy_acceptance(toy_dir):
    """RL adds a large forget-skill gain over SFT (>= +15 points, 95% CI above +5) on held-out
    problems, the reward rises during RL, and retain stays >= 0.90 and (nearly) untouched.

    Margins, not one machine's numbers: benchmarks/toy_robustness.py (seeds 0-4 x default/avx2
    kernels) found gains +50 to +75 points (CI lower ends >= +39), retain >= 0.915, retain
    changes >= -0.045, reward rises >= +0.22 (first two steps -> last fifth).
    """
    s = json.loads((toy_dir / "toy_summary.json").read_text())
    assert s["seed"] == 0 and s["n"]["forget_eval"] >= 200 and s["n"]["retain_eval"] >= 200
    gain = s["rl_gain"]
    assert gain["gain"] == pytest.approx(s["rlvr"]["forget"] - s["sft"]["forget"])
    assert gain["gain"] >= 0.15 and gain["low"] > 0.05, gain
    assert s["rlvr"]["retain"] >= 0.90 and s["sft"]["retain"] >= 0.90, s
    # what RL changes stays on the forget skill: retain moves by a few points at most
    assert s["rl_retain_change"]["gain"] >= -0.08, s["rl_retain_change"]
    rewards = [r["reward"] for r in s["rl_log"]]
    k = len(rewards) // 5  # RL learns, not drifts: the last fifth's reward is well above the start's
    assert sum(rewards[-k:]) / k >= sum(rewards[:2]) / 2 + 0.10, rewards
    for name in DATA_FILES:
        rows = [json.loads(line) for line in (toy_dir / "data" / f"{name}.jsonl").read_text().splitlines()]
        assert rows and all({"id", "prompt", "solution", "answer"} <= set(r) for r in rows)
    for suite in SUITES:
        assert (toy_dir / "suites" / f"{suite}.yaml").is_file()
    assert is_finished(toy_dir, 0) and not is_finished(toy_dir, 1)


@pytest.mark.slow
def test_toy_checkpoints_are_hub_like_and_mast_eval_reproduces_the_summary(toy_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mast.config import load_suite
    from mast.evaluation import evaluate
    from mast.models import candidate_tensors

    s = json.loads((toy_dir / "toy_summary.json").read_text())
    names = [n for n, _ in candidate_tensors(toy_dir / "rlvr")]
    assert len(names) == 4 * s["config"]["layers"]
    assert {n.rsplit(".", 2)[-2] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    sft = AutoModelForCausalLM.from_pretrained(toy_dir / "sft")
    rl = AutoModelForCausalLM.from_pretrained(toy_dir / "rlvr")
    tok = AutoTokenizer.from_pretrained(toy_dir / "rlvr")
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    moved = [n for n, p in sft.named_parameters() if not torch.equal(p, dict(rl.named_parameters())[n])]
    assert any("self_attn" in n for n in moved)  # a genuine SFT -> RLVR increment on the candidates
    # the CLI, with a fresh cache, gives the summary's number
    out = tmp_path / "res.jsonl"
    cmd = [sys.executable, "-m", "mast.cli", "eval", "--model", str(toy_dir / "rlvr"),
           "--suite", str(toy_dir / "suites" / "forget.yaml"), "--out", str(out), "--cache-dir", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sum(r["correct"] for r in rows) / len(rows) == pytest.approx(s["rlvr"]["forget"])
    res = evaluate(toy_dir / "sft", load_suite(toy_dir / "suites" / "retain.yaml"), use_cache=False, progress=False)
    assert res.accuracy == pytest.approx(s["sft"]["retain"])


@pytest.mark.slow
def test_toy_is_reproducible_and_reused(tmp_path):
    """Same seed -> same numbers and weights (a shortened recipe); a finished build is reused."""
    from mast.files import fingerprint_model

    cfg = ToyConfig(base_steps=12, sft_steps=4, rl_steps=2, n_eval=8, n_unlearn=8)
    a = build_toy(tmp_path / "a", seed=3, config=cfg)
    b = build_toy(tmp_path / "b", seed=3, config=cfg)
    for stage in ("base", "sft", "rlvr"):
        assert a[stage] == b[stage]
        assert fingerprint_model(tmp_path / "a" / stage) == fingerprint_model(tmp_path / "b" / stage)
    assert a["rl_log"] == b["rl_log"]
    t = time.perf_counter()
    assert build_toy(tmp_path / "a", seed=3, config=cfg) == a  # reused, not retrained
    assert time.perf_counter() - t < 5
    assert not any(p.name.startswith(".") for p in Path(tmp_path).iterdir())  # no temp folders left
