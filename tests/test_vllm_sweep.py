"""A whole sweep on vLLM's CPU build (``make test-vllm``, docs/vllm.md): one engine per trial, the
hf backend's answers.

One demo-shaped spec (sweeps/demo.yaml: rules mast and full, NPO, seed 0, its null trial, the
matched-forgetting stop rule, the prefix-recovery probe, the forget_val validation suite; smaller
limits) runs twice on the toy: with ``evaluation.backend: vllm`` (``resources.gpu: 0``, which
only the CPU build allows) and with ``backend: hf``. Unlearning is the same code with the same
seeds in both (the stop check is an hf model in the trial's process), so the checkpoints are the
same and the two sweeps differ in the evaluation backend alone. Skipped where vLLM is not
importable (the project's .venv). About 15 minutes on a busy 2-core machine (load 5 to 9), most of
it vLLM start-ups: prepare's five baseline evaluations (one engine each) and the three trials'.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import yaml

from mast.files import read_jsonl
from mast.resources import vllm_cpu_build
from mast.sweep import run_sweep

ROOT = Path(__file__).resolve().parents[1]
SUITES = ("forget", "retain", "forget_val")  # the two test suites and the validation suite
TRIALS = ["mast-npo-k8-s0", "full-npo-s0", "null-s0"]
MIN_AGREEMENT = 0.98

no_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (make test-vllm)")


def demo_shaped(toy: Path, backend: str) -> dict:
    """sweeps/demo.yaml on the session's toy: one seed, NPO, mast and full (+ the null trial), 100
    problems per test suite and 50 forget_val problems (the stop check's and the validation suite's)."""
    spec = yaml.safe_load((ROOT / "sweeps" / "demo.yaml").read_text(encoding="utf-8"))
    spec["name"] = f"demo-{backend}"
    spec["models"]["toy"] = {"seed": 0, "out": str(toy)}
    spec["grid"] = {"rule": ["mast", "full"], "objective": ["npo"], "k": [8], "seed": [0]}
    ev = spec["evaluation"]
    ev["suites"] = [str(ROOT / "eval" / "toy" / "forget.yaml"), "retain"]
    ev["limits"] = {"forget": 100, "retain": 100, "forget_val": 50}
    ev["backend"] = backend
    if backend == "vllm":
        ev["enforce_eager"] = True  # no torch.compile at each engine start (start-up time only)
    return spec


def _sweep(tmp_path: Path, toy: Path, backend: str) -> tuple[list[dict], float]:
    spec = tmp_path / f"{backend}.yaml"
    spec.write_text(yaml.safe_dump(demo_shaped(toy, backend)), encoding="utf-8")
    t0 = time.perf_counter()
    run_sweep(spec, out=tmp_path / backend)
    rows = [json.loads(line) for line in (tmp_path / backend / "trials.jsonl").read_text().splitlines()]
    return rows, time.perf_counter() - t0


def agreement(a: list[dict], b: list[dict], field: str) -> float:
    """Share of problems (matched by id) whose `field` is the same in both record lists."""
    by_id = {r["id"]: r for r in b}
    assert sorted(by_id) == sorted(r["id"] for r in a)
    return sum(r[field] == by_id[r["id"]][field] for r in a) / len(a)


@pytest.mark.vllm
@pytest.mark.slow
@no_vllm
def test_vllm_sweep_on_the_cpu_starts_one_engine_per_trial_and_answers_like_hf(tmp_path, toy_dir):
    import ray

    assert vllm_cpu_build(), "these tests run vLLM's CPU build (make test-vllm)"
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20)
    try:
        vllm_rows, vllm_s = _sweep(tmp_path, toy_dir, "vllm")
        hf_rows, hf_s = _sweep(tmp_path, toy_dir, "hf")
    finally:
        ray.shutdown()
    for rows in (vllm_rows, hf_rows):
        assert [r["trial_id"] for r in rows] == TRIALS and all(r["status"] == "ok" for r in rows), rows
        assert all(r["engine_starts"] == 1 for r in rows)  # every suite, validation and probe: one engine
    figures = {"seconds": {"vllm": round(vllm_s), "hf": round(hf_s)}, "load": os.getloadavg(), "agreement": {}}
    for tid in TRIALS:
        for suite in SUITES:
            got = read_jsonl(tmp_path / "vllm" / "trials" / tid / "results" / f"{suite}.jsonl")
            want = read_jsonl(tmp_path / "hf" / "trials" / tid / "results" / f"{suite}.jsonl")
            text, correct = agreement(got, want, "response"), agreement(got, want, "correct")
            figures["agreement"][f"{tid}/{suite}"] = {"n": len(got), "text": text, "correct": correct}
            assert correct >= MIN_AGREEMENT and text >= MIN_AGREEMENT, (tid, suite, text, correct)
    print(json.dumps(figures, indent=1))
