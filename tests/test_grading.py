"""Grading: answer extraction, math-verify equivalence, hard timeouts in worker processes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from mast.answers import answer_text, extract_and_verify, fast_candidate, is_equivalent, last_boxed
from mast.grading import grade_records

TOWER = "2^{2^{2^{2^{2^{2^{2}}}}}}"
NESTED = "\\frac{1}{" * 300 + "2" + "}" * 300
DIGITS = "9" * 10_000

# (benchmark, gold, response, correct)
TABLE = [
    # fractions, decimals, \dfrac
    ("math", "\\frac{1}{2}", "So the answer is $\\boxed{0.5}$.", True),
    ("math", "\\frac{1}{2}", "\\boxed{\\dfrac{1}{2}}", True),
    ("math", "\\dfrac{3}{4}", "\\boxed{\\frac34}", True),
    ("math", "0.75", "\\boxed{\\frac{3}{4}}", True),
    ("math", "\\frac{1}{3}", "\\boxed{0.33}", False),
    ("math", "\\frac{2}{3}", "\\boxed{\\tfrac{4}{6}}", True),
    ("math", "-\\frac{1}{2}", "\\boxed{-0.5}", True),
    # radicals
    ("math", "2\\sqrt{3}", "\\boxed{\\sqrt{12}}", True),
    ("math", "\\frac{\\sqrt{2}}{2}", "\\boxed{\\frac{1}{\\sqrt{2}}}", True),
    ("math", "3\\sqrt{2}", "\\boxed{2\\sqrt{3}}", False),
    # degrees
    ("math", "30^\\circ", "\\boxed{30}", True),
    ("math", "30", "The angle is \\boxed{30^{\\circ}}.", True),
    ("math", "45^\\circ", "\\boxed{40^\\circ}", False),
    # intervals
    ("math", "[1,2)", "\\boxed{[1, 2)}", True),
    ("math", "(-\\infty, 3]", "\\boxed{(-\\infty,3]}", True),
    ("math", "[1,2)", "\\boxed{(1,2]}", False),
    ("math", "(2,5)", "\\boxed{x \\in (2,5)}", True),
    # tuples, sets, matrices
    ("math", "\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\pi/2)}", True),
    ("math", "(3,-1)", "\\boxed{(-1,3)}", False),
    ("math", "1, 2", "\\boxed{2, 1}", True),
    ("math", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\boxed{\\begin{pmatrix}1\\\\2\\end{pmatrix}}", True),
    # percent and dollars
    ("math", "10\\%", "\\boxed{10}", True),
    ("math", "25\\%", "\\boxed{0.25}", True),
    ("math", "\\$18.90", "\\boxed{18.9}", True),
    ("math", "18.90", "\\boxed{\\$18.90}", True),
    # symbolic expressions, equations, text
    ("math", "x^2+2x+1", "\\boxed{(x+1)^2}", True),
    ("math", "y = 2x + 3", "\\boxed{y=3+2x}", True),
    ("math", "\\pi", "\\boxed{\\pi}", True),
    ("math", "2\\pi", "\\boxed{\\pi}", False),
    ("math", "\\text{(C)}", "The correct option is \\boxed{C}.", True),
    ("math", "x^2+2x+1", "\\boxed{x^2+2x+2}", False),
    ("math", "5", "\\boxed{6}", False),
    # nested braces, \fbox, last box wins, fallbacks
    ("math", "\\frac{3}{8}", "First \\boxed{1}, then corrected: \\boxed{\\frac{3}{8}}", True),
    ("math", "\\{1,2\\}", "\\boxed{\\{1,2\\}}", True),
    ("math", "7", "\\fbox{7}", True),
    ("math", "7", "After all that, the final answer is 7.", True),
    ("math", "12", "so we get 3 * 4 = 12", True),
    # missing / empty / truncated
    ("math", "7", "", False),
    ("math", "7", "I cannot solve this problem.", False),
    ("math", "7", "the result is \\boxed{7", False),
    ("math", "7", None, False),
    # GSM8K: ####, thousands separators, dollars, boxed, "the answer is", last number
    ("gsm8k", "18", "She makes 9 * 2 = $18 every day.\n#### 18", True),
    ("gsm8k", "1080", "In total \\boxed{\\$1,080}.", True),
    ("gsm8k", "70000", "Profit: 200,000 - 130,000 = 70,000\n#### 70,000", True),
    ("gsm8k", "5", "The answer is 5 apples.", True),
    ("gsm8k", "3", "2 + 1 = 3 bolts", True),
    ("gsm8k", "3.5", "\\boxed{3.50}", True),
    ("gsm8k", "-4", "#### -4", True),
    ("gsm8k", "18", "#### 19", False),
    ("gsm8k", "18", "", False),
    ("gsm8k", "20", "\\boxed{20\\%}", True),
    # pathological: must be wrong, within seconds
    ("math", "2", "\\boxed{" + TOWER + "}", False),
    ("math", "3", "\\boxed{" + DIGITS + "}", False),
    ("math", "1", "\\boxed{" + NESTED + "}", False),
    ("gsm8k", "3", "#### " + DIGITS, False),
]


def _rows(table):
    return [{"id": i, "benchmark": b, "gold": g, "response": r} for i, (b, g, r, _) in enumerate(table)]


def test_answer_text_states_the_project_rules():
    """Only linear string work runs in front of math-verify: where the answer text ends."""
    assert last_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{x^{2}}") == "x^{2}"
    assert last_boxed("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert last_boxed("\\boxed 5$") == "5"
    assert last_boxed("\\boxed{1} and \\boxed{2") == "1"
    assert answer_text("the result is \\boxed{7", "math") is None  # cut off mid-answer: no answer
    assert answer_text("so \\boxed{1} and \\boxed{2", "math") == "so \\boxed{1} and "  # the cut-off box dropped
    assert answer_text("work\n#### 1,234", "gsm8k") == "1,234"  # GSM8K: the last '####' line
    assert answer_text("The answer is 15.\n\nQuestion: how many? Answer: 3", "gsm8k") == "The answer is 15."
    assert answer_text("$1\\,000$ or 1 000", "math") == "$1000$ or 1000"  # digit groups
    assert answer_text("It costs \\$5.", "gsm8k") == "It costs 5."
    assert answer_text("   ", "math") is None and answer_text(None, "gsm8k") is None


def test_extract_and_verify_reports_what_was_compared():
    assert extract_and_verify("(2, 2), (6, 2)", "The pairs are \\boxed{(2,2)} and \\boxed{(6,2)}.", "math") == (
        True, "(2,2),(6,2)")
    # one answer asked for: the last box only, even right after another box
    assert extract_and_verify("\\frac{7}{2}", "I got \\boxed{3}; again, \\boxed{\\frac{7}{2}}.", "math")[0]
    assert not extract_and_verify("3", "I got \\boxed{3}; again, \\boxed{\\frac{7}{2}}.", "math")[0]
    # an explicit final-answer statement after the last box wins over it
    ok, got = extract_and_verify("10455", "First: $\\boxed{255}$. Redone: the final answer is $10,455$.", "math")
    assert ok and got.replace(",", "") == "10455"
    assert extract_and_verify("\\text{(B)}", "Final Answer: The final answer is (B). I hope it is correct.",
                              "math")[0]
    assert extract_and_verify("7", "The answer is 5. No: the answer is 7.", "gsm8k") == (True, "7")
    assert extract_and_verify("5", None, "math") == (False, None)


@pytest.mark.parametrize("text", ["\\boxed{" * 20000, "\\boxed{1} " + "\\boxed{" * 20000, "the answer is " * 5000,
                                  "9" * 200_000, "{" * 50000 + "\\boxed{3}", "1,000," * 20000],
                         ids=["unclosed_boxes", "box_then_unclosed", "answer_is_repeated", "digits", "braces",
                              "separators"])
def test_extraction_is_linear_on_adversarial_text(text):
    """Extraction runs in the caller's process, outside the timeout: it must stay fast on any input."""
    t0 = time.monotonic()
    for bench in ("math", "gsm8k"):
        fast_candidate(answer_text(text, bench), bench)
    assert time.monotonic() - t0 < 2.0


def test_grading_table(tmp_path):
    assert len(TABLE) >= 40
    t0 = time.monotonic()
    out = grade_records(_rows(TABLE), timeout_s=2.0)
    elapsed = time.monotonic() - t0
    wrong = [(TABLE[r["id"]][1], TABLE[r["id"]][2][:60] if TABLE[r["id"]][2] else None, r["extracted"] and r["extracted"][:40])
             for r in out if r["correct"] != TABLE[r["id"]][3]]
    assert not wrong, wrong
    assert [r["id"] for r in out] == list(range(len(TABLE)))
    assert all(set(r) >= {"id", "benchmark", "gold", "response", "extracted", "correct"} for r in out)
    # three answers may time out (2 s each) plus worker restarts; nothing may hang
    assert elapsed < 40, elapsed


def test_is_equivalent_direct():
    assert is_equivalent("\\frac{1}{2}", "0.5", "math")
    assert is_equivalent("1000", "1,000", "gsm8k")
    assert not is_equivalent("7", None, "math") and not is_equivalent("7", "", "math")


@pytest.mark.parametrize("answer", [TOWER, NESTED], ids=["tower", "nested_frac"])
def test_pathological_answer_is_wrong_within_timeout(answer):
    rows = [{"id": "bad", "benchmark": "math", "gold": "2", "response": f"\\boxed{{{answer}}}"},
            {"id": "good", "benchmark": "math", "gold": "\\frac{1}{2}", "response": "\\boxed{0.5}"}]
    t0 = time.monotonic()
    out = grade_records(rows, timeout_s=1.0, workers=1, chunk_size=2)
    assert time.monotonic() - t0 < 15
    assert [r["correct"] for r in out] == [False, True]  # the good answer after it in the chunk still graded


def test_grading_from_a_thread_honours_timeout():
    rows = _rows([("math", "2", "\\boxed{" + TOWER + "}", False), ("math", "\\frac{1}{2}", "\\boxed{0.5}", True),
                  ("gsm8k", "1080", "#### 1,080", True)])
    box: dict = {}

    def work():
        t0 = time.monotonic()
        box["out"] = grade_records(rows, timeout_s=1.0)
        box["t"] = time.monotonic() - t0

    th = threading.Thread(target=work)
    th.start()
    th.join(60)
    assert not th.is_alive()
    assert [r["correct"] for r in box["out"]] == [False, True, True] and box["t"] < 15


def test_grade_cli(tmp_path):
    src = tmp_path / "in.jsonl"
    cases = TABLE[:6] + [TABLE[-6], TABLE[-8]]
    rows = _rows(cases)
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dst = tmp_path / "out.jsonl"
    p = subprocess.run([sys.executable, "-m", "mast.cli", "grade", str(src), "--out", str(dst), "--timeout", "2"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    expected = [t[3] for t in cases]
    assert [r["correct"] for r in out] == expected
    assert f"accuracy {sum(expected)}/8" in p.stderr
    # no --out: rows on stdout (exact matches and missing answers need no worker)
    src.write_text(json.dumps({"id": "a", "benchmark": "gsm8k", "gold": "3", "response": "#### 3"}) + "\n\n"
                   + json.dumps({"id": "b", "benchmark": "math", "gold": "3", "response": ""}) + "\n")
    p = subprocess.run([sys.executable, "-m", "mast.cli", "grade", str(src)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and [json.loads(x)["correct"] for x in p.stdout.splitlines()] == [True, False]


def _gold_rows(data_dir):
    from mast.data import load_benchmark

    m500 = load_benchmark("math500", data_dir=data_dir)
    math_rows = [{"id": p["id"], "benchmark": "math", "gold": p["answer"], "response": p["solution"]} for p in m500]
    # GSM8K: the original reference text, reasoning then '#### <number>'
    raw = [json.loads(line) for line in (data_dir / "gsm8k" / "test.jsonl").read_text().splitlines()]
    gsm = load_benchmark("gsm8k", data_dir=data_dir)
    gsm_rows = [{"id": p["id"], "benchmark": "gsm8k", "gold": p["answer"], "response": r["answer"]}
                for p, r in zip(gsm, raw)]
    return math_rows, gsm_rows


def _check_gold(math_rows, gsm_rows, fast_path):
    out = grade_records(math_rows, fast_path=fast_path)
    assert len(out) == 500
    assert sum(r["correct"] for r in out) == 500, [(r["id"], r["gold"], r["extracted"]) for r in out
                                                   if not r["correct"]]
    out = grade_records(gsm_rows, fast_path=fast_path)
    assert sum(r["correct"] for r in out) == 1319 == len(out), [(r["id"], r["gold"], r["extracted"]) for r in out
                                                                if not r["correct"]]


def test_gold_self_grading(data_dir):
    """Reference solutions graded against their own gold answers: MATH-500 500/500, GSM8K 1319/1319."""
    _check_gold(*_gold_rows(data_dir), fast_path=True)


@pytest.mark.slow
def test_gold_self_grading_every_answer_through_math_verify(data_dir):
    """The same, with no exact-string shortcut: every answer is parsed and verified by math-verify."""
    _check_gold(*_gold_rows(data_dir), fast_path=False)


@pytest.mark.slow
def test_grading_inside_a_ray_worker():
    """Ray tasks run off the main thread's signal handling; the hard timeout must still hold there."""
    import shutil
    import tempfile
    from pathlib import Path

    import ray

    from mast.grading import grade_records as grade

    tmp = tempfile.mkdtemp(prefix="mastray", dir="/tmp")  # Ray's socket paths must stay < 108 bytes
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, _temp_dir=tmp,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    try:
        @ray.remote(max_concurrency=2)  # a threaded actor: methods run off the main thread
        class Grader:
            def grade(self, rows):
                import threading
                import time as _t

                t0 = _t.monotonic()
                out = grade(rows, timeout_s=1.0)
                on_main = threading.current_thread() is threading.main_thread()
                return [r["correct"] for r in out], _t.monotonic() - t0, on_main

        rows = _rows([("math", "2", "\\boxed{" + TOWER + "}", False), ("math", "\\frac{1}{2}", "\\boxed{0.5}", True),
                      ("gsm8k", "1080", "#### 1,080", True)])
        verdicts, seconds, on_main = ray.get(Grader.remote().grade.remote(rows), timeout=120)
        assert not on_main
        assert verdicts == [False, True, True] and seconds < 20
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


GOOD = {"id": "a", "benchmark": "math", "gold": "1", "response": "\\boxed{1}"}


def _write(path, rows):
    path.write_bytes(b"".join(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode() for r in rows))
    return str(path)


# name -> (rows of IN.jsonl, extra flags, text the one error line must contain)
GRADE_BAD = {
    "timeout_nan": ([GOOD], ["--timeout", "nan"], "--timeout: must be > 0 seconds and finite, got nan"),
    "timeout_inf": ([GOOD], ["--timeout", "inf"], "--timeout: must be > 0 seconds and finite, got inf"),
    "empty_file": ([], [], "in.jsonl: no rows to grade"),
    "blank_lines_only": ([b"\n  \n"], [], "in.jsonl: no rows to grade"),
    "gold_object": ([GOOD, {**GOOD, "id": "b", "gold": {"value": 1}}], [], "in.jsonl:2: gold: expected a string or a number, got dict"),
    "gold_list": ([{**GOOD, "gold": [1, 2]}], [], "in.jsonl:1: gold: expected a string or a number, got list"),
    "gold_null": ([{**GOOD, "gold": None}], [], "in.jsonl:1: gold: expected a string or a number, got null"),
    "gold_nan": ([b'{"id": "a", "benchmark": "math", "gold": NaN, "response": "1"}\n'], [], "in.jsonl:1: gold: expected a finite number"),
    "not_utf8": ([GOOD, b'{"id": "b", "benchmark": "math", "gold": "1", "response": "\xff\xfe"}\n'], [],
                 "in.jsonl: not UTF-8 text (byte 0xff at offset"),
    "out_is_a_directory": ([GOOD], ["--out", "{tmp}"], "is a directory"),
    "out_under_a_file": ([GOOD], ["--out", "{tmp}/in.jsonl/out.jsonl"], "in.jsonl is not a directory"),
}


@pytest.mark.parametrize("case", sorted(GRADE_BAD))
def test_grade_refuses_bad_input_before_any_work(case, tmp_path, capsys):
    """`mast grade` on bad input: exit 2, one stderr line naming the file/line/field, nothing written."""
    from mast.cli import main

    rows, flags, expected = GRADE_BAD[case]
    src = _write(tmp_path / "in.jsonl", rows)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code = main(["grade", src, *[f.replace("{tmp}", str(tmp_path)) for f in flags]])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert expected in err[0], err[0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


def test_grade_records_refuses_a_gold_that_is_no_answer():
    from mast.files import InputError

    with pytest.raises(InputError, match="row x: gold: expected a string or a number, got dict"):
        grade_records([{"id": "x", "benchmark": "math", "gold": {"a": 1}, "response": "1"}])
    with pytest.raises(InputError, match="finite"):
        grade_records([GOOD], timeout_s=float("nan"))


def _case_files():
    from pathlib import Path

    folder = Path(__file__).parent / "data" / "grading_cases"
    return {f.stem: [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
            for f in sorted(folder.glob("*.jsonl"))}


def test_case_files_are_split_by_source_with_licences():
    files = _case_files()
    assert {name.split("_")[0] for name in files} == {"dev", "frozen"}
    sources = {}
    for name, rows in files.items():
        assert rows and all({"id", "benchmark", "gold", "response", "correct", "source", "licence"} <= set(r) for r in rows)
        sources[name] = {r["source"].split("@")[0] for r in rows}
    dev = set().union(*(s for n, s in sources.items() if n.startswith("dev")))
    frozen = set().union(*(s for n, s in sources.items() if n.startswith("frozen")))
    assert not dev & frozen  # no source on both sides
    assert sum(len(r) for r in files.values()) >= 300


@pytest.mark.parametrize("part", ["dev", "frozen"])
def test_agreement_with_other_projects_verdicts(part):
    """>= 99 % agreement with the verdicts of Math-Verify's, Qwen2.5-Math's and lm-eval's test data."""
    rows = [r for name, rs in _case_files().items() if name.startswith(part) for r in rs]
    out = grade_records(rows, timeout_s=5.0)
    wrong = [(r["id"], r["gold"][:30], r["extracted"]) for r, o in zip(rows, out) if o["correct"] != r["correct"]]
    assert len(wrong) <= 0.01 * len(rows), wrong


def _descendants(pid: int) -> set[int]:
    """pids of the live processes below `pid` (Linux /proc)."""
    from pathlib import Path

    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parent[int(stat.parent.name)] = int(fields[1])
    out, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - out
        out |= frontier
    return out


def test_grading_processes_go_when_their_parent_is_killed():
    """The fork server and its workers (one stuck in sympy) leave when the grading process dies."""
    code = ("from mast.grading import grade_records; "
            f"grade_records([{{'benchmark': 'math', 'gold': '2', 'response': '\\\\boxed{{{TOWER}}}'}}], timeout_s=120)")
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 60
        while len(_descendants(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        kids = _descendants(proc.pid)
        assert len(kids) >= 2, "no template and worker started"
        time.sleep(1.0)  # the worker is inside the tower now
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 20
    while kids & _descendants(1) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not kids & _descendants(1)
