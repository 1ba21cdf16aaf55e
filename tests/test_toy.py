"""The toy world: task generator (fast) and the built base -> SFT -> RLVR triple (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mast.toy import (
    FORGET_SKILL,
    RETAIN_SKILL,
    ToyConfig,
    add_problem,
    build_toy,
    careless_mul_solution,
    generate_task,
    is_finished,
    mul_problem,
)

SPLITS = ("forget", "retain", "forget_eval", "retain_eval")


def test_task_answers_are_right_by_the_real_grader():
    from mast.grading import grade_records

    task = generate_task(seed=0)
    probs = task["forget_eval"] + task["retain_eval"] + task["forget"] + task["retain"]
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
    assert mul_problem(99, 9)["answer"] == "891"


def test_splits_disjoint_and_deterministic_by_seed():
    t0, again, t1 = generate_task(0), generate_task(0), generate_task(1)
    assert t0 == again
    assert [p["id"] for p in t0["forget_eval"]] != [p["id"] for p in t1["forget_eval"]]
    for skill in ("forget", "retain"):
        ev = {p["id"] for p in t0[f"{skill}_eval"]}
        train = {p["id"] for p in t0[f"{skill}_train"]}
        unlearn = {p["id"] for p in t0[skill]}
        assert len(ev) == 100 and len(unlearn) == 64
        assert not ev & train and not ev & unlearn  # held out from every training stage
        assert unlearn <= train
    assert {p["skill"] for p in t0["forget"]} == {FORGET_SKILL}
    assert {p["skill"] for p in t0["retain"]} == {RETAIN_SKILL}


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
    """RLVR adds >= 10 points of forget-skill accuracy over SFT and keeps retain >= 50%, held out."""
    s = json.loads((toy_dir / "toy_summary.json").read_text())
    assert s["seed"] == 0
    assert s["rlvr"]["forget"] >= s["sft"]["forget"] + 0.10, s
    assert s["rlvr"]["retain"] >= 0.50, s
    for name in SPLITS:
        rows = [json.loads(line) for line in (toy_dir / "data" / f"{name}.jsonl").read_text().splitlines()]
        assert rows and all({"id", "prompt", "solution", "answer"} <= set(r) for r in rows)
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
