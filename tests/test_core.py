"""The shared core: atomic files, typed specs, prompts, the CLI's exit codes."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from mast.config import SuiteSpec, SweepSpec, UnlearnSpec, load_suite, load_yaml
from mast.files import InputError, atomic_dir, read_jsonl, write_jsonl


def test_jsonl_roundtrip_and_errors(tmp_path):
    p = tmp_path / "a.jsonl"
    write_jsonl(p, [{"id": 1}, {"id": 2}])
    assert [r["id"] for r in read_jsonl(p, required=["id"])] == [1, 2]
    with pytest.raises(InputError, match="missing field"):
        read_jsonl(p, required=["id", "prompt"])
    p.write_text('{"id": 1}\nnot json\n')
    with pytest.raises(InputError, match=r"a.jsonl:2: invalid JSON"):
        read_jsonl(p)


def test_atomic_dir_keeps_old_folder_on_failure(tmp_path):
    final = tmp_path / "ckpt"
    with atomic_dir(final) as d:
        (d / "w").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(final) as d:
        (d / "w").write_text("half")
        raise RuntimeError("crash mid-write")
    assert (final / "w").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_paper_defaults():
    u = UnlearnSpec()
    assert UnlearnSpec(objective="npo").effective_beta == 0.1
    assert UnlearnSpec(objective="simnpo").effective_beta == 2.5 and u.gamma == 0.0 and u.alpha == 1.0
    s = SuiteSpec(name="x", benchmark="gsm8k")
    assert s.decoding.temperature == 0.0 and s.grader == "gsm8k" and s.template == "qwen_boxed"


def test_spec_errors_name_file_and_field(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: x\nmodels: {toy: {seed: 0}}\ngrid: {rule: [mast]}\nunlearning: {steps: -3}\n")
    with pytest.raises(InputError, match=r"s.yaml: unlearning.steps: .*greater than 0"):
        load_yaml(p, SweepSpec)
    p.write_text("name: x\nbenchmark: math\ndecodng: {}\n")
    with pytest.raises(InputError, match=r"s.yaml: decodng: Extra inputs"):
        load_suite(p)


CONTRACT = ["toy", "select", "diagnose", "unlearn", "eval", "grade", "stats", "sweep", "report"]


def test_cli_has_exactly_the_contract_subcommands():
    from mast.cli import HANDLERS, build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(sub.choices) == sorted(CONTRACT)
    assert sorted(HANDLERS) == sorted(CONTRACT)


@pytest.mark.parametrize("cmd", CONTRACT)
def test_cli_subcommand_help_exits_0(cmd, capsys):
    from mast.cli import main

    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: mast {cmd}")


def test_cli_import_error_inside_a_stage_is_an_internal_error(tmp_path):
    """A broken dependency of a stage (here torch, for `mast unlearn`) is exit 1, one line, not 'unavailable'."""
    code = ("import sys; sys.modules['torch'] = None; from mast.cli import main; "
            "sys.exit(main(['unlearn', '--target', 't', '--selection', 's', '--forget', 'f', '--out', 'o']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith("mast unlearn: internal error: ModuleNotFoundError: import of torch") and len(out.stderr.splitlines()) == 1


def test_cli_bad_flag_is_exit_2():
    out = subprocess.run([sys.executable, "-m", "mast.cli", "select", "--k", "x"], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr


def test_chat_prompt_and_mask(tiny_model):
    from transformers import AutoTokenizer

    from mast.prompts import format_prompt, problem_pair

    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompt = format_prompt(tok, "What is 2 + 3?")
    assert prompt.startswith("<|im_start|>system\nPlease reason step by step") and prompt.endswith("assistant\n")
    ids, mask = problem_pair(tok, {"prompt": "What is 2 + 3?", "solution": "\\boxed{5}"})
    assert len(ids) == len(mask) and mask[0] == 0 and mask[-1] == 1
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "\\boxed{5}<|im_end|>"
    assert all(type(v) is int for v in ids + mask) and set(mask) == {0, 1}  # plain ints, JSON-ready
