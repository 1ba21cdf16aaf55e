"""Bad input through the real `mast` command: exit 2, one line on stderr naming the file/field, no traceback.

`mast sweep` specs are covered through the loader it calls (a sweep needs models to get further).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from mast.config import SelectionSpec, SweepSpec, UnlearnSpec, load_yaml, validate
from mast.files import InputError, cache_root, check_output_path, read_json, read_jsonl
from mast.models import INDEX_FILE, TensorStore, check_checkpoint, check_safetensors

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


def _safetensors(path: Path, cut: int = 0) -> None:
    """A valid two-tensor safetensors file written by hand (header length, JSON header, data), minus `cut` bytes."""
    header = json.dumps({"__metadata__": {"format": "pt"},
                         "a.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
                         "b.weight": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]}}).encode()
    blob = struct.pack("<Q", len(header)) + header + bytes(32)
    path.write_bytes(blob[: len(blob) - cut])


def _checkpoint(tmp: Path, name: str, weights: bytes | int | None = 0) -> str:
    """A folder with a config.json and a model.safetensors: valid (0), cut short by N bytes, or these raw bytes."""
    d = tmp / name
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text("{}")
    if isinstance(weights, bytes):
        (d / "model.safetensors").write_bytes(weights)
    elif weights is not None:
        _safetensors(d / "model.safetensors", cut=weights)
    return str(d)


GARBAGE = b"\xff" * 64  # a header length of ~1.8e19 bytes: must not become a read ("MemoryError: ")
LATIN1 = "caf\u00e9".encode("latin-1")  # b"caf\xe9": not UTF-8


def _bytes(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _unlearn(tmp, *flags, target=None, out=None):
    return ["unlearn", "--target", target or str(tmp), "--selection", str(tmp / "s.json"),
            "--forget", str(tmp / "f.jsonl"), "--out", out or str(tmp / "o"), *flags]


def _toy_with_summary(tmp, data: bytes):
    (tmp / "toy").mkdir()
    (tmp / "toy" / "toy_summary.json").write_bytes(data)
    return ["toy", str(tmp / "toy")]


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
    # non-UTF-8 bytes in any input file: the file and the byte's offset, never a UnicodeDecodeError
    "grade_not_utf8": (lambda t: ["grade", _bytes(t / "in.jsonl", json.dumps(GOOD_ROW).encode() + b"\n" + LATIN1)],
                       f"in.jsonl: not UTF-8 text (byte 0xe9 at offset {len(json.dumps(GOOD_ROW)) + 4})"),
    "select_forget_not_utf8": (
        lambda t: ["select", "--reference", _checkpoint(t, "ref"), "--target", _checkpoint(t, "tgt"),
                   "--forget", _bytes(t / "f.jsonl", b'{"prompt": "' + LATIN1 + b'"}\n'), "--out", str(t / "o")],
        "f.jsonl: not UTF-8 text (byte 0xe9 at offset 15)"),
    "select_spec_not_utf8": (lambda t: _select(t, "--spec", _bytes(t / "s.yaml", b"rule: " + LATIN1 + b"\n")),
                             "s.yaml: not UTF-8 text (byte 0xe9 at offset 9)"),
    "suite_not_utf8": (lambda t: _suite(t, "")[:4] + [_bytes(t / "s.yaml", b"name: " + LATIN1), "--out",
                                                      str(t / "out.jsonl")],
                       "s.yaml: not UTF-8 text (byte 0xe9 at offset 9)"),
    "suite_problem_file_not_utf8": (
        lambda t: (_bytes(t / "p.jsonl", b'{"id": "1", "prompt": "' + LATIN1 + b'", "answer": "1"}\n'),
                   _suite(t, "name: x\nbenchmark: jsonl\npath: p.jsonl\n"))[1],
        "p.jsonl: not UTF-8 text (byte 0xe9 at offset 26)"),
    "unlearn_selection_not_utf8": (
        lambda t: (_bytes(t / "s.json", b'{"' + LATIN1 + b'": 1}'), _unlearn(t, target=_checkpoint(t, "tgt")))[1],
        "s.json: not UTF-8 text (byte 0xe9 at offset 5)"),
    "stats_not_utf8": (lambda t: ["stats", "mcnemar", _bytes(t / "before.jsonl", LATIN1), str(t / "after.jsonl")],
                       "before.jsonl: not UTF-8 text (byte 0xe9 at offset 3)"),
    "toy_summary_not_utf8": (lambda t: _toy_with_summary(t, b'{"seed": "' + LATIN1 + b'"}'),
                             "toy_summary.json: not UTF-8 text (byte 0xe9 at offset 13)"),
    "toy_summary_a_list": (lambda t: _toy_with_summary(t, b"[1, 2]"),
                           "toy_summary.json: expected a JSON object, got an array"),
    # a broken model.safetensors behind a valid config.json: named before any model is loaded
    "select_truncated_weights": (
        lambda t: ["select", "--reference", _checkpoint(t, "ref"), "--target", _checkpoint(t, "tgt", 5),
                   "--forget", str(t / "f.jsonl"), "--out", str(t / "o")],
        "tgt/model.safetensors: not a valid safetensors file (truncated: the tensors need 32 bytes of data, "
        "the file has 27)"),
    "select_garbage_weights": (
        lambda t: ["select", "--reference", _checkpoint(t, "ref", GARBAGE), "--target", _checkpoint(t, "tgt"),
                   "--forget", str(t / "f.jsonl"), "--out", str(t / "o")],
        "ref/model.safetensors: not a valid safetensors file (a 18446744073709551615-byte header does not fit"),
    "unlearn_truncated_weights": (lambda t: _unlearn(t, target=_checkpoint(t, "tgt", 40)),
                                  "tgt/model.safetensors: not a valid safetensors file (a 177-byte header does not "
                                  "fit in the 177-byte file"),
    "eval_garbage_weights": (lambda t: (_checkpoint(t, "model", GARBAGE), _suite(t, "name: x\nbenchmark: math\n"))[1],
                             "model/model.safetensors: not a valid safetensors file"),
    "eval_config_not_an_object": (
        lambda t: (_suite(t, "name: x\nbenchmark: math\n"), (t / "model" / "config.json").write_text("[]"))[0],
        "model/config.json: expected a JSON object, got an array"),
    "unlearn_config_not_utf8": (
        lambda t: (_bytes(Path(_checkpoint(t, "tgt")) / "config.json", b'{"model_type": "' + LATIN1 + b'"}'),
                   _unlearn(t, target=str(t / "tgt")))[1],
        "tgt/config.json: not UTF-8 text (byte 0xe9 at offset 19)"),
    # numbers: counts > 0, floats finite (NaN passes no bound check, inf passes "> 0")
    "eval_batch_size_zero": (lambda t: _suite(t, "name: x\nbenchmark: math\n", "--batch-size", "0"),
                             "argument --batch-size: must be > 0, got 0"),
    "eval_limit_zero": (lambda t: _suite(t, "name: x\nbenchmark: math\n", "--limit", "0"),
                        "argument --limit: must be > 0, got 0"),
    "unlearn_lr_inf": (lambda t: _unlearn(t, "--lr", "inf"), "command line: lr: Input should be a finite number"),
    "unlearn_lr_nan": (lambda t: _unlearn(t, "--lr", "nan"), "command line: lr: Input should be a finite number"),
    "unlearn_spec_gamma_inf": (
        lambda t: ((t / "u.yaml").write_text("objective: simnpo\ngamma: .inf\n"), _unlearn(t, "--spec", str(t / "u.yaml")))[1],
        "u.yaml: gamma: Input should be a finite number"),
    "select_rho_nan": (lambda t: _select(t, "--rho", "nan"), "command line: rho: Input should be a finite number"),
    "select_spec_weight_inf": (
        lambda t: ((t / "s.yaml").write_text("weights: {coupling: .inf}\n"), _select(t, "--spec", str(t / "s.yaml")))[1],
        "s.yaml: weights.coupling: Input should be a finite number"),
    "suite_temperature_nan": (lambda t: _suite(t, "name: x\nbenchmark: math\ndecoding: {temperature: .nan}\n"),
                              "suite.yaml: decoding.temperature: Input should be a finite number"),
    # outputs of the wrong kind: refused before any work (here even before the models are looked at)
    "select_out_is_a_directory": (lambda t: ((t / "taken").mkdir(), _select(t)[:-1] + [str(t / "taken")])[1],
                                  "--out " + "{t}/taken: is a directory (expected a file path)"),
    "eval_out_is_a_directory": (lambda t: ((t / "taken").mkdir(), _suite(t, "name: x\nbenchmark: math\n")[:-1]
                                           + [str(t / "taken")])[1], "taken: is a directory (expected a file path)"),
    "unlearn_out_is_a_file": (lambda t: ((t / "taken").write_text("keep me"),
                                         _unlearn(t, target=_checkpoint(t, "tgt"), out=str(t / "taken")))[1],
                              "taken: exists and is not a folder"),
    "unlearn_out_is_the_target": (lambda t: _unlearn(t, target=_checkpoint(t, "tgt"), out=str(t / "tgt")),
                                  "tgt: is the --target folder"),
    "diagnose_out_is_a_file": (
        lambda t: ((t / "taken").write_text("keep me"),
                   ["diagnose", "--base", str(t), "--reference", str(t), "--target", str(t),
                    "--forget", str(t / "f.jsonl"), "--out", str(t / "taken")])[1],
        "--out " + "{t}/taken: exists and is not a folder"),
}


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its content (None for a folder): what a command left behind."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


# These go through a real `python -m mast.cli` process (interpreter exit status, nothing printed
# by Python itself); the others call the same `mast.cli.main` in-process, which is what the
# process runs, to keep the suite within its time budget.
IN_A_PROCESS = {"grade_missing_file", "select_truncated_weights", "eval_batch_size_zero", "unlearn_lr_inf",
                "suite_not_utf8", "diagnose_out_is_a_file", "stats_missing_file", "toy_summary_a_list"}


def _run_cli(argv: list[str], cwd: Path, in_a_process: bool, capsys, monkeypatch) -> tuple[int, str]:
    """(exit status, stderr) of `mast ARGV` run in `cwd`."""
    if in_a_process:
        p = subprocess.run([sys.executable, "-m", "mast.cli", *argv], capture_output=True, text=True, timeout=300,
                           cwd=cwd)
        return p.returncode, p.stderr
    from mast.cli import main

    monkeypatch.chdir(cwd)
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_bad_input_exits_2_with_one_line(case, tmp_path, capsys, monkeypatch):
    build, expected = CASES[case]
    argv = build(tmp_path)
    before = _tree(tmp_path)
    rc, stderr = _run_cli(argv, tmp_path, case in IN_A_PROCESS, capsys, monkeypatch)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert rc == 2, (rc, stderr[-2000:])
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr
    assert expected.replace("{t}", str(tmp_path)) in lines[0], lines[0]
    assert _tree(tmp_path) == before  # nothing created, half-written or replaced


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


def _assert_sweep_refused(spec: Path, tmp_path: Path, expected: str) -> None:
    """`mast sweep SPEC` (a real process) exits 2 with one line containing `expected` and creates nothing:
    no sweep folder, spec.yaml, sweep.json, mlflow.db, prepared/ or MLflow run."""
    before = _tree(tmp_path)
    p = subprocess.run([sys.executable, "-m", "mast.cli", "sweep", str(spec), "--out", str(tmp_path / "sw")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert len(lines) == 1 and expected.replace("{t}", str(tmp_path)) in lines[0], p.stderr
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("model,expected", [
    ("nope", "models.reference: {t}/nope: folder not found"),
    ("broken", "{t}/broken/model.safetensors: not a valid safetensors file"),
], ids=["missing_folder", "broken_weights"])
def test_sweep_bad_model_refused_before_creating_anything(tmp_path, data_dir, model, expected):
    """A wrong model path is refused like any bad input, and leaves no sweep folder behind (else a corrected
    re-run is refused as "already exists" and --resume fails on the changed spec hash)."""
    _checkpoint(tmp_path, "broken", GARBAGE)
    _checkpoint(tmp_path, "ok")
    spec = tmp_path / "sweep.yaml"
    spec.write_text(f"name: badmodel\nmodels: {{reference: {tmp_path / model}, target: {tmp_path / 'ok'}}}\n"
                    f"data: {{data_dir: {data_dir}, forget_size: 2, retain_size: 2, retain_train_size: 0}}\n"
                    "grid: {rule: [mast]}\n")
    _assert_sweep_refused(spec, tmp_path, expected)



@pytest.mark.parametrize("extra,expected", [
    ("models: {toy: {seed: 0, out: {t}/afile}}\ngrid: {rule: [mast]}\n", "models.toy.out: {t}/afile: exists and is not a folder"),
    ("models: {toy: {seed: 0, out: {t}/notes}}\ngrid: {rule: [mast]}\n", "{t}/notes: folder exists and is not a toy build"),
    ("models: {toy: {seed: 0}}\ngrid: {rule: [mast]}\nevaluation: {suites: [forget, nope]}\n",
     "evaluation.suites: unknown suite 'nope'"),
    ("models: {toy: {seed: 0}}\ngrid: {rule: [mast]}\nevaluation: {suites: [forget, {t}/s.yaml]}\n",
     "s.yaml: benchmark"),
], ids=["toy_out_is_a_file", "toy_out_not_a_toy", "unknown_suite", "bad_suite_yaml"])
def test_sweep_bad_toy_dir_or_suite_refused_before_creating_anything(tmp_path, extra, expected):
    """The toy folder and every suite are checked with the models, before the sweep folder exists."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    (tmp_path / "s.yaml").write_text("name: s\nbenchmark: mmlu\n")
    spec = tmp_path / "sweep.yaml"
    spec.write_text("name: badinput\n" + extra.replace("{t}", str(tmp_path)))
    _assert_sweep_refused(spec, tmp_path, expected)


def test_readers_split_rows_on_newlines_only_and_name_the_bad_byte(tmp_path):
    """A U+2028 inside a JSON string is not a line break; CRLF files read; a non-UTF-8 byte is located."""
    p = tmp_path / "rows.jsonl"
    p.write_bytes('{"a": "x\u2028y"}\r\n\r\n{"a": 2}\n'.encode())
    assert read_jsonl(p) == [{"a": "x\u2028y"}, {"a": 2}]
    p.write_bytes(b'{"a": 1}\n{"a": "\xc3"}\n')  # a UTF-8 sequence cut after its lead byte
    with pytest.raises(InputError, match=r"rows.jsonl: not UTF-8 text \(byte 0xc3 at offset 16\)$"):
        read_jsonl(p)
    with pytest.raises(InputError, match="is a directory, not a file"):
        read_json(tmp_path)
    (tmp_path / "x.json").write_text('"just a string"')
    with pytest.raises(InputError, match=r"x.json: expected a JSON object, got a string$"):
        read_json(tmp_path / "x.json", expect=dict)
    assert read_json(tmp_path / "x.json") == "just a string"


def test_output_paths_are_checked_for_their_kind(tmp_path):
    (tmp_path / "file").write_text("")
    assert check_output_path(tmp_path / "new" / "deeper" / "r.jsonl") == tmp_path / "new" / "deeper" / "r.jsonl"
    assert check_output_path(tmp_path, kind="dir") == tmp_path
    with pytest.raises(InputError, match="is a directory"):
        check_output_path(tmp_path)
    with pytest.raises(InputError, match="exists and is not a folder"):
        check_output_path(tmp_path / "file", kind="dir")
    with pytest.raises(InputError, match=r"file is not a folder"):
        check_output_path(tmp_path / "file" / "sub" / "r.jsonl")
    with pytest.raises(InputError, match=r"^cache folder .*file: exists and is not a folder$"):
        cache_root(tmp_path / "file")


def test_check_safetensors_accepts_real_files_and_names_each_defect(tmp_path):
    """The header check agrees with the safetensors library: real files pass, each defect is one message."""
    import torch
    from safetensors.torch import save_file

    real = tmp_path / "real.safetensors"
    save_file({"w": torch.zeros(3, 5), "b": torch.ones(7, dtype=torch.bfloat16)}, str(real), metadata={"k": "v"})
    assert check_safetensors(real) == {"w": {"dtype": "F32", "shape": [3, 5], "data_offsets": [0, 60]},
                                       "b": {"dtype": "BF16", "shape": [7], "data_offsets": [60, 74]}}
    blob = real.read_bytes()
    bad = tmp_path / "bad.safetensors"
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    header["w"]["shape"] = [3, 4]
    wrong_shape = json.dumps(header).encode()
    for data, why in [
        (b"", "0 bytes, shorter than the 8-byte header length"),
        (GARBAGE, "a 18446744073709551615-byte header does not fit in the 64-byte file: truncated, or not "
                  "safetensors"),
        (blob[:-1], "truncated: the tensors need 74 bytes of data, the file has 73"),
        (blob + b"\0", "trailing bytes: the tensors need 74 bytes of data, the file has 75"),
        (struct.pack("<Q", 4) + b"[1] ", "the header is not a JSON object"),
        (struct.pack("<Q", 2) + b"\xff\xfe", "the header is not UTF-8 JSON"),
        (struct.pack("<Q", len(wrong_shape)) + wrong_shape + blob[8 + n:], "tensor 'w': 60 bytes for F32 [3, 4]"),
    ]:
        bad.write_bytes(data)
        with pytest.raises(InputError) as e:
            check_safetensors(bad)
        assert str(e.value) == f"{bad}: not a valid safetensors file ({why})"


def test_sharded_checkpoint_checks_every_listed_shard(tmp_path):
    ckpt = Path(_checkpoint(tmp_path, "sharded", weights=None))
    _safetensors(ckpt / "part-1.safetensors")
    _safetensors(ckpt / "part-2.safetensors", cut=1)
    (ckpt / INDEX_FILE).write_text(json.dumps({"weight_map": {"a.weight": "part-1.safetensors"}}))
    assert TensorStore(ckpt).keys() == ["a.weight", "b.weight"]  # the unlisted, broken part-2 is not read
    (ckpt / INDEX_FILE).write_text(json.dumps({"weight_map": {"a.weight": "part-1.safetensors",
                                                              "b.weight": "part-2.safetensors"}}))
    with pytest.raises(InputError, match="part-2.safetensors: not a valid safetensors file .truncated"):
        check_checkpoint(ckpt)
    (ckpt / INDEX_FILE).write_text(json.dumps({"weight_map": {"a.weight": "part-3.safetensors"}}))
    with pytest.raises(InputError, match="lists part-3.safetensors, which is missing"):
        TensorStore(ckpt)


@pytest.mark.parametrize("spec,data,field", [
    (SelectionSpec, {"rho": float("nan")}, "rho"),
    (SelectionSpec, {"weights": {"coupling": float("inf")}}, "weights.coupling"),
    (UnlearnSpec, {"lr": float("inf")}, "lr"),
    (UnlearnSpec, {"max_grad_norm": float("inf")}, "max_grad_norm"),
    (SweepSpec, {"name": "x", "models": {"toy": {}}, "grid": {"rule": ["mast"]},
                 "evaluation": {"decoding": {"top_p": float("nan")}}}, "evaluation.decoding.top_p"),
], ids=["rho_nan", "weight_inf", "lr_inf", "grad_norm_inf", "nested_top_p_nan"])
def test_spec_floats_must_be_finite(spec, data, field):
    """NaN passes no bound check and inf passes "> 0": both are refused by name, not as an out-of-range value."""
    with pytest.raises(InputError) as e:
        validate(spec, data, "spec.yaml")
    assert str(e.value) == f"spec.yaml: {field}: Input should be a finite number"
