"""Bad input through the real `mast` command: exit 2, one line on stderr naming the file/field, no traceback.

`mast sweep` specs are covered through the loader it calls (a sweep needs models to get further).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mast.config import SweepSpec, UnlearnSpec, load_yaml
from mast.files import InputError

GOOD_ROW = {"id": "a", "benchmark": "math", "gold": "1", "response": "\\boxed{1}"}


def _jsonl(path: Path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _grade(tmp, rows, *flags):
    return ["grade", _jsonl(tmp / "in.jsonl", rows), *flags]


def _suite(tmp, text, *flags):
    """`mast eval` with a checkpoint-looking folder, so the suite/data checks are what fails."""
    model = tmp / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    suite = tmp / "suite.yaml"
    suite.write_text(text)
    return ["eval", "--model", str(model), "--suite", str(suite), "--out", str(tmp / "out.jsonl"), *flags]


def _select(tmp, *flags):
    return ["select", "--reference", str(tmp), "--target", str(tmp), "--forget", str(tmp / "f.jsonl"),
            "--out", str(tmp / "o"), *flags]


def _bad_data_dir(tmp):
    (tmp / "data" / "gsm8k").mkdir(parents=True)
    _jsonl(tmp / "data" / "gsm8k" / "test.jsonl", [{"question": "q", "answer": "x\n#### 2"}, {"question": "q2"}])
    return str(tmp / "data")


CASES = {
    # mast grade
    "grade_missing_file": (lambda t: ["grade", str(t / "nope.jsonl")], "nope.jsonl: file not found"),
    "grade_bad_json_line": (lambda t: _grade(t, [GOOD_ROW, "{not json"]), "in.jsonl:2: invalid JSON"),
    "grade_row_not_object": (lambda t: _grade(t, [[1, 2]]), "in.jsonl:1: expected a JSON object"),
    "grade_missing_field": (lambda t: _grade(t, [GOOD_ROW, {"id": "b", "benchmark": "math", "gold": "1"}]),
                            "in.jsonl:2: missing field 'response'"),
    "grade_unknown_benchmark": (lambda t: _grade(t, [{**GOOD_ROW, "benchmark": "mmlu"}]),
                                "in.jsonl:1: benchmark: unknown 'mmlu'"),
    "grade_response_wrong_type": (lambda t: _grade(t, [{**GOOD_ROW, "response": 42}]),
                                  "in.jsonl:1: response: expected a string"),
    "grade_zero_timeout": (lambda t: _grade(t, [GOOD_ROW], "--timeout", "0"), "--timeout: must be > 0"),
    "grade_zero_workers": (lambda t: _grade(t, [GOOD_ROW], "--workers", "0"), "--workers: must be > 0"),
    "grade_timeout_not_a_number": (lambda t: _grade(t, [GOOD_ROW], "--timeout", "soon"), "--timeout"),
    # evaluation suites (mast eval)
    "suite_missing_file": (lambda t: _suite(t, "")[:4] + [str(t / "none.yaml"), "--out", str(t / "o.jsonl")],
                           "none.yaml: file not found"),
    "suite_invalid_yaml": (lambda t: _suite(t, "name: x\nbenchmark: [math\n"), "suite.yaml: invalid YAML"),
    "suite_not_a_mapping": (lambda t: _suite(t, "- just\n- a list\n"), "expected a mapping"),
    "suite_unknown_field": (lambda t: _suite(t, "name: x\nbenchmark: math\ntemperature: 0.7\n"),
                            "suite.yaml: temperature: Extra inputs are not permitted"),
    "suite_wrong_type": (lambda t: _suite(t, "name: x\nbenchmark: math\ndecoding: {max_tokens: lots}\n"),
                         "suite.yaml: decoding.max_tokens"),
    "suite_negative_max_tokens": (lambda t: _suite(t, "name: x\nbenchmark: math\ndecoding: {max_tokens: -5}\n"),
                                  "decoding.max_tokens: Input should be greater than 0"),
    "suite_unknown_benchmark": (lambda t: _suite(t, "name: x\nbenchmark: mmlu\n"), "suite.yaml: benchmark"),
    "suite_missing_name": (lambda t: _suite(t, "benchmark: math\n"), "suite.yaml: name: Field required"),
    "suite_jsonl_without_path": (lambda t: _suite(t, "name: x\nbenchmark: jsonl\n"), "needs a 'path'"),
    "suite_split_role_not_jsonl": (lambda t: _suite(t, "name: x\nbenchmark: gsm8k\nsplit_role: forget\n"),
                                   "split_role needs benchmark 'jsonl'"),
    "suite_split_role_run_standalone": (lambda t: _suite(t, "name: f\nbenchmark: jsonl\nsplit_role: forget\n"),
                                        "no 'path' to a problem file"),
    "suite_problem_file_missing": (lambda t: _suite(t, "name: x\nbenchmark: jsonl\npath: gone.jsonl\n"),
                                   "gone.jsonl: file not found"),
    "suite_problem_file_missing_fields": (
        lambda t: (_jsonl(t / "p.jsonl", [{"id": "1", "prompt": "q"}]),
                   _suite(t, "name: x\nbenchmark: jsonl\npath: p.jsonl\n"))[1],
        "p.jsonl:1: missing field(s) answer"),
    "data_dir_missing": (lambda t: _suite(t, "name: x\nbenchmark: gsm8k\n", "--data-dir", str(t / "nodata")),
                         "nodata: data directory not found"),
    "data_file_missing_fields": (lambda t: _suite(t, "name: x\nbenchmark: gsm8k\n", "--data-dir", _bad_data_dir(t)),
                                 "gsm8k/test.jsonl:2: missing field(s) answer"),
    # unlearning flags and spec (mast unlearn)
    "unlearn_negative_steps": (
        lambda t: ["unlearn", "--target", str(t), "--selection", str(t / "s.json"), "--forget", str(t / "f.jsonl"),
                   "--steps", "-3", "--out", str(t / "o")], "steps: Input should be greater than 0"),
    "unlearn_spec_unknown_field": (
        lambda t: ((t / "u.yaml").write_text("objective: npo\nlearning_rate: 0.1\n"),
                   ["unlearn", "--target", str(t), "--selection", str(t / "s.json"), "--forget", str(t / "f.jsonl"),
                    "--spec", str(t / "u.yaml"), "--out", str(t / "o")])[1],
        "learning_rate: Extra inputs are not permitted"),
    "unlearn_unknown_objective": (
        lambda t: ["unlearn", "--target", str(t), "--selection", str(t / "s.json"), "--forget", str(t / "f.jsonl"),
                   "--objective", "dpo", "--out", str(t / "o")], "--objective"),
    "unlearn_spec_then_bad_flag": (
        lambda t: ((t / "u.yaml").write_text("objective: npo\nsteps: 3\n"),
                   ["unlearn", "--target", str(t), "--selection", str(t / "s.json"), "--forget", str(t / "f.jsonl"),
                    "--spec", str(t / "u.yaml"), "--lr", "-1", "--out", str(t / "o")])[1],
        "u.yaml with the command-line flags: lr: Input should be greater than 0"),
    # selection flags and spec (mast select): the same merge of --spec and flags as unlearn
    "select_unknown_rule": (lambda t: _select(t, "--rule", "best"), "command line: rule: Input should be"),
    "select_spec_unknown_field": (
        lambda t: ((t / "s.yaml").write_text("rule: mast\nkk: 3\n"), _select(t, "--spec", str(t / "s.yaml")))[1],
        "s.yaml: kk: Extra inputs are not permitted"),
    "select_spec_then_bad_flag": (
        lambda t: ((t / "s.yaml").write_text("rule: magnitude\n"),
                   _select(t, "--spec", str(t / "s.yaml"), "--k", "0"))[1],
        "s.yaml with the command-line flags: k: Input should be greater than 0"),
    # diagnostics (mast diagnose)
    "diagnose_missing_forget": (
        lambda t: ["diagnose", "--base", str(t), "--reference", str(t), "--target", str(t),
                   "--forget", str(t / "nope.jsonl"), "--out", str(t / "o")], "nope.jsonl: file not found"),
    # statistics (mast stats)
    "stats_missing_file": (lambda t: ["stats", "mcnemar", str(t / "before.jsonl"), str(t / "after.jsonl")],
                           "before.jsonl: file not found"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_bad_input_exits_2_with_one_line(case, tmp_path):
    build, expected = CASES[case]
    argv = build(tmp_path)
    p = subprocess.run([sys.executable, "-m", "mast.cli", *argv], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr
    assert len(lines) == 1, p.stderr
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "o").exists()  # nothing half-written


SWEEP_OK = "name: x\nmodels: {toy: {seed: 0}}\ngrid: {rule: [mast]}\n"


@pytest.mark.parametrize("text,expected", [
    (SWEEP_OK + "unlearning: {steps: -3}\n", "unlearning.steps: Input should be greater than 0"),
    (SWEEP_OK + "data: {forget_size: many}\n", "data.forget_size: Input should be a valid integer"),
    ("name: x\nmodels: {toy: {seed: 0}}\ngrid: {learning_rate: [0.1]}\n", "grid: unknown grid field 'learning_rate'"),
    ("name: x\nmodels: {}\ngrid: {rule: [mast]}\n", "models: give 'reference' and 'target'"),
    (SWEEP_OK + "selection: {rule: best}\n", "selection.rule"),
    (SWEEP_OK + "evaluation: {backend: tgi}\n", "evaluation.backend"),
    ("name: x\n\tgrid: {}\n", "invalid YAML"),
], ids=["negative_steps", "wrong_type", "unknown_grid_field", "no_models", "unknown_rule", "unknown_backend",
        "tab_yaml"])
def test_sweep_spec_errors_name_file_and_field(tmp_path, text, expected):
    """`mast sweep` loads its spec with load_yaml(SweepSpec); each problem is one line naming the field."""
    p = tmp_path / "sweep.yaml"
    p.write_text(text)
    with pytest.raises(InputError) as e:
        load_yaml(p, SweepSpec)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(p)) and expected in msg, msg


def test_unlearn_spec_loader_errors(tmp_path):
    p = tmp_path / "u.yaml"
    p.write_text("objective: npo\nbeta: -1\n")
    with pytest.raises(InputError, match=r"u.yaml: beta: Input should be greater than 0"):
        load_yaml(p, UnlearnSpec)
