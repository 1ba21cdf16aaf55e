"""Benchmark loaders (local data dir) and the seeded forget/retain split builder."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from mast.data import build_splits, load_benchmark, load_math_pool, normalize_text, subject_key
from mast.files import InputError


@pytest.fixture(scope="module")
def pool(data_dir):
    return load_math_pool(data_dir)


def test_loaders_shapes_and_answers(data_dir):
    sizes = {("math", "test"): 5000, ("math500", "test"): 500, ("gsm8k", "test"): 1319, ("gsm8k", "train"): 7473}
    for (name, split), n in sizes.items():
        rows = load_benchmark(name, split, data_dir)
        assert len(rows) == n and len({r["id"] for r in rows}) == n
        assert all({"id", "prompt", "solution", "answer"} <= set(r) and r["answer"] for r in rows)
    math = {r["id"]: r for r in load_benchmark("math", data_dir=data_dir)}
    assert math["test/algebra/1.json"]["answer"] == "2" and math["test/algebra/1.json"]["level"] == 3
    # MATH's last-\boxed answer agrees with MATH-500's gold answer on every shared problem
    m500 = load_benchmark("math500", data_dir=data_dir)
    assert all(math[r["id"]]["answer"] == r["answer"] and math[r["id"]]["prompt"] == r["prompt"] for r in m500)
    assert all(isinstance(r["level"], int) and r["subject"] for r in m500)
    g = load_benchmark("gsm8k", data_dir=data_dir)[0]
    assert g["id"] == "gsm8k/test/0" and g["answer"] == "18"
    assert "####" not in g["solution"] and "<<" not in g["solution"] and g["solution"].endswith("market.")
    assert all("," not in r["answer"] for r in load_benchmark("gsm8k", "train", data_dir))


def test_math_pool_excludes_math500(data_dir, pool):
    held = {r["id"] for r in load_benchmark("math500", data_dir=data_dir)}
    assert len(pool) == 4500 and not held & {r["id"] for r in pool}
    assert {subject_key(r["subject"]) for r in pool} == {
        "algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory", "prealgebra",
        "precalculus"}


def test_splits_are_disjoint_seeded_and_stable(pool):
    forget, retain = build_splits(pool, 150, 150, seed=0)
    f_ids, r_ids = [r["id"] for r in forget], [r["id"] for r in retain]
    assert len(set(f_ids)) == 150 and len(set(r_ids)) == 150 and not set(f_ids) & set(r_ids)
    # same seed -> same split, whatever the pool's order
    shuffled = list(pool)
    random.Random(7).shuffle(shuffled)
    f2, r2 = build_splits(shuffled, 150, 150, seed=0)
    assert [r["id"] for r in f2] == f_ids and [r["id"] for r in r2] == r_ids
    # pinned: the same on any machine (sorted canonical order + numpy PCG64 permutation)
    assert f_ids[:3] == ["test/prealgebra/1857.json", "test/intermediate_algebra/2172.json", "test/prealgebra/380.json"]
    assert r_ids[:2] == ["test/number_theory/699.json", "test/geometry/451.json"]
    # another seed -> another split; a bigger forget set extends the smaller one
    f3, _ = build_splits(pool, 150, 150, seed=1)
    assert len(set(f_ids) & {r["id"] for r in f3}) < 30
    f4, _ = build_splits(pool, 200, 0, seed=0)
    assert [r["id"] for r in f4[:150]] == f_ids
    # records are copies: editing a split does not touch the pool
    forget[0]["prompt"] = "edited"
    assert all(r["prompt"] != "edited" for r in pool)


def test_split_filters(pool):
    forget, retain = build_splits(pool, 40, 20, seed=3, levels=[4, 5], subjects=["Number Theory", "geometry"])
    rows = forget + retain
    assert all(r["level"] in (4, 5) for r in rows)
    assert {subject_key(r["subject"]) for r in rows} <= {"number_theory", "geometry"}
    with pytest.raises(InputError, match="pool has .* needs 1000"):
        build_splits(pool, 900, 100, seed=0, levels=[1], subjects=["geometry"])
    with pytest.raises(InputError, match="unknown subject"):
        build_splits(pool, 10, 10, seed=0, subjects=["calculus"])
    with pytest.raises(InputError, match="forget size"):
        build_splits(pool, 0, 10, seed=0)
    with pytest.raises(InputError, match="seed"):
        build_splits(pool, 10, 10, seed=-1)
    with pytest.raises(InputError, match="pool has 4500 problems; forget 4000 \\+ retain 1000 needs 5000"):
        build_splits(pool, 4000, 1000, seed=0)


def test_retain_validation_is_a_third_draw_that_leaves_forget_and_retain_unchanged(pool):
    forget, retain = build_splits(pool, 150, 300, seed=0)
    f2, r2, val = build_splits(pool, 150, 300, seed=0, n_retain_val=100)
    assert f2 == forget and r2 == retain
    assert build_splits(pool, 150, 300, seed=0, n_retain_val=0) == (forget, retain)
    assert len(val) == 100
    # disjoint by id and by normalized problem text, from both other draws and within itself
    ids = [r["id"] for r in forget + retain]
    texts = {normalize_text(r["prompt"]) for r in forget + retain}
    val_texts = [normalize_text(r["prompt"]) for r in val]
    assert not {r["id"] for r in val} & set(ids) and len({r["id"] for r in val}) == 100
    assert not set(val_texts) & texts and len(set(val_texts)) == 100
    # seeded: the same draw again, another seed another draw
    assert build_splits(pool, 150, 300, seed=0, n_retain_val=100)[2] == val
    other = build_splits(pool, 150, 300, seed=1, n_retain_val=100)[2]
    assert len({r["id"] for r in other} & {r["id"] for r in val}) < 20
    with pytest.raises(InputError, match="retain-validation size"):
        build_splits(pool, 10, 10, seed=0, n_retain_val=-1)
    with pytest.raises(InputError, match=r"forget 4000 \+ retain 400 \+ retain-validation 200 needs 4600"):
        build_splits(pool, 4000, 400, seed=0, n_retain_val=200)


def test_retain_validation_skips_a_retypeset_copy_of_a_drawn_problem():
    base = [{"id": f"p{i}", "prompt": f"What is ${i}+{i}$?", "solution": "s", "answer": str(2 * i)} for i in range(30)]
    # a copy of every problem under another id, typeset differently (spacing, case, no $...$)
    copies = [{**r, "id": f"copy{i}", "prompt": f"  WHAT is {i}+{i}?  "} for i, r in enumerate(base)]
    forget, retain, val = build_splits(base + copies, 10, 10, seed=0, n_retain_val=10)
    drawn = {normalize_text(r["prompt"]) for r in forget + retain}
    assert not drawn & {normalize_text(r["prompt"]) for r in val}
    assert len({normalize_text(r["prompt"]) for r in val}) == 10
    left = 30 - len(drawn)  # distinct texts not drawn yet: all the validation draw may take
    assert len(build_splits(base + copies, 10, 10, seed=0, n_retain_val=left)[2]) == left
    with pytest.raises(InputError, match="retain-validation"):
        build_splits(base + copies, 10, 10, seed=0, n_retain_val=left + 1)


def test_normalize_text_ignores_case_spacing_and_math_delimiters():
    assert normalize_text("Find  $x$ if\n$2x = 4$.") == normalize_text("find x if 2x = 4.")
    assert normalize_text("a\\,b") == normalize_text("a b")
    assert normalize_text("x = 1") != normalize_text("x = 2")


def test_bad_local_data(tmp_path):
    with pytest.raises(InputError, match="data directory not found"):
        load_benchmark("gsm8k", data_dir=tmp_path / "nope")
    with pytest.raises(InputError, match=r"gsm8k/test.jsonl: file not found"):
        load_benchmark("gsm8k", data_dir=tmp_path)
    (tmp_path / "gsm8k").mkdir()
    f = tmp_path / "gsm8k" / "test.jsonl"
    f.write_text(json.dumps({"question": "q", "answer": "a\n#### 3"}) + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(InputError, match=r"test.jsonl:2: missing field\(s\) answer"):
        load_benchmark("gsm8k", data_dir=tmp_path)
    f.write_text(json.dumps({"question": "q", "answer": "no final answer"}) + "\n")
    with pytest.raises(InputError, match=r"test.jsonl:1: answer: no '#### <number>'"):
        load_benchmark("gsm8k", data_dir=tmp_path)
    (tmp_path / "math").mkdir()
    (tmp_path / "math" / "test.jsonl").write_text(
        json.dumps({"unique_id": "a", "problem": "p", "solution": "no box", "level": "Level 2", "type": "Algebra"}))
    with pytest.raises(InputError, match=r"math/test.jsonl:1: solution: no \\boxed"):
        load_benchmark("math", data_dir=tmp_path)
    with pytest.raises(InputError, match="unknown benchmark"):
        load_benchmark("mmlu", data_dir=tmp_path)
    with pytest.raises(InputError, match="only a 'test' split"):
        load_benchmark("math500", "train", data_dir=tmp_path)


def test_hub_unreachable_is_one_line_input_error(tmp_path):
    """With the Hub offline, loading without a data dir says so and suggests --data-dir (no traceback)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code = ("from mast.data import load_benchmark\nfrom mast.files import InputError\n"
            "try:\n    load_benchmark('gsm8k')\nexcept InputError as e:\n    print('INPUTERROR', e)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0 and "INPUTERROR" in p.stdout and "openai/gsm8k" in p.stdout and "--data-dir" in p.stdout
