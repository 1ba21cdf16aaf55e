"""prepare on the MATH path with tiny models: splits, baselines once, the cache, generated texts,
require_target_correct's second run."""

from __future__ import annotations

import pytest
from builders import sweep_spec

from mast.evaluation import eval_cache_key
from mast.files import InputError, read_jsonl, write_jsonl
from mast.layout import SweepDir
from mast.prepare import prepare
from mast.sources import sources
from mast.stats import mcnemar_test
from mast.suites import resolve_suites
from mast.trial import load_baseline


def test_prepare_math_splits_baseline_once(tmp_path, tiny_pair, data_dir):
    """Splits are disjoint; the target is evaluated once per suite; a second prepare reuses it all."""

    reference, target = tiny_pair
    spec = sweep_spec(models={"reference": str(reference), "target": str(target)},
                 data={"forget_size": 4, "retain_size": 3, "retain_train_size": 2, "split_seed": 1},
                 selection={"max_length": 512},
                 evaluation={"suites": ["gsm8k", "retain", "forget"], "limits": {"gsm8k": 2},
                             "template": "boxed_user", "decoding": {"max_tokens": 4}, "batch_size": 8})
    out = tmp_path / "sweep"
    got = prepare(spec, out, str(data_dir))
    assert got.evaluations == {"forget": 1, "retain": 1, "gsm8k": 1}
    assert got.reference_evaluations == {"forget": 1, "retain": 1, "gsm8k": 1}  # the SFT floor, once per suite
    assert list(got.suites) == ["forget", "gsm8k", "retain"]  # forget (the scheduler's metric) first
    assert all(s.template == "boxed_user" and s.decoding.max_tokens == 4 for s in got.suites.values())
    p = out / "prepared"
    forget, retain_texts = read_jsonl(p / "forget.jsonl"), read_jsonl(p / "retain.jsonl")
    retain_suite = read_jsonl(p / "suites" / "retain.jsonl")
    sd = SweepDir(out)
    assert sd.prepared_manifest.is_file() and read_jsonl(sd.forget_texts) == forget
    assert all(sd.baseline_results(n).is_file() and sd.suite_problems(n).is_file() for n in got.suites)
    assert [len(forget), len(retain_texts), len(retain_suite)] == [4, 2, 3]
    ids = [x["id"] for x in forget + retain_texts + retain_suite]
    assert len(set(ids)) == len(ids)  # three disjoint draws
    assert [x["id"] for x in read_jsonl(p / "suites" / "forget.jsonl")] == [x["id"] for x in forget]
    assert len(read_jsonl(p / "baseline" / "gsm8k.jsonl")) == 2
    for n in got.suites:  # the reference on the same problems; what RL changed, per suite
        ref = read_jsonl(sd.reference_results(n))
        assert [r["id"] for r in ref] == [r["id"] for r in read_jsonl(sd.baseline_results(n))]
        assert got.reference_accuracy[n] == sum(r["correct"] for r in ref) / len(ref) == got.rl_gain[n]["reference_acc"]
    assert {q.parent.name for q in (p / "selection_cache").rglob("*.json")} >= {"spectral", "coupling"}
    again = prepare(spec, out, str(data_dir))
    assert again.evaluations == {"forget": 0, "retain": 0, "gsm8k": 0} and again.key == got.key
    assert again.reference_evaluations == again.evaluations and again.rl_gain == got.rl_gain
    assert again.suites == got.suites and again.manifest() == got.manifest()  # the cache reads back the same
    changed = sweep_spec(**{**spec.model_dump(), "data": {**spec.data.model_dump(), "split_seed": 2}})
    with pytest.raises(InputError, match="inputs changed since it started"):
        prepare(changed, out, str(data_dir))


def test_prepare_generated_texts_and_target_correct_forget(tmp_path, tiny_pair, data_dir):
    """texts=generated: the target's own correct answers replace the reference solutions (else kept);
    require_target_correct: an untrained target solving too few candidates is an input error."""

    reference, target = tiny_pair
    common = {"models": {"reference": str(reference), "target": str(target)},
              "data": {"forget_size": 3, "retain_size": 2, "retain_train_size": 2},
              "selection": {"max_length": 256},
              "evaluation": {"suites": ["forget", "retain"], "template": "boxed_user",
                             "decoding": {"max_tokens": 4}, "batch_size": 8}}
    got = prepare(sweep_spec(**common, unlearning={"texts": "generated"}), tmp_path / "gen", str(data_dir))
    sd = SweepDir(tmp_path / "gen")
    assert got.generated_texts and got.evaluations == {"forget": 1, "retain": 1}
    gen, forget = read_jsonl(sd.forget_generated), read_jsonl(sd.forget_texts)
    base = {r["id"]: r for r in read_jsonl(sd.baseline_results("forget"))}
    assert [g["id"] for g in gen] == [f["id"] for f in forget]
    for g, f in zip(gen, forget):
        own = base[g["id"]]
        assert g["text_source"] == ("target" if own["correct"] else "reference")
        assert g["solution"] == (own["response"] if own["correct"] else f["solution"])
    strict = sweep_spec(**{**common, "data": {**common["data"], "require_target_correct": True}})
    with pytest.raises(InputError, match=r"the target solves only \d+ of 12 candidates; need forget_size=3"):
        prepare(strict, tmp_path / "strict", str(data_dir))


def _plant(sd: SweepDir, model, suite, problems, correct, tag) -> None:
    """Stand in for a run of `model` through the evaluation cache (keyed exactly as evaluate() keys it)."""

    path = sd.eval_cache / "eval" / f"{eval_cache_key(model, suite, problems, 'hf')}.jsonl"
    write_jsonl(path, [{"id": p["id"], "correct": c, "response": tag, "extracted": None, "prompt_sha": "",
                        "prompt_tokens": 1, "response_tokens": 1} for p, c in zip(problems, correct)])


def test_require_target_correct_tests_against_a_second_independent_run(tmp_path, tiny_pair, data_dir):
    """The forget set is chosen on run 1 of the target; every trial's McNemar 'before' side is run 2
    (its own sampling stream), where a chosen problem may be missed: the baseline is not right by construction."""

    reference, target = tiny_pair
    spec = sweep_spec(models={"reference": str(reference), "target": str(target)},
                 data={"forget_size": 3, "retain_size": 2, "retain_train_size": 2, "require_target_correct": True},
                 selection={"max_length": 256},
                 evaluation={"suites": ["forget", "retain"], "template": "boxed_user",
                             "decoding": {"max_tokens": 4, "temperature": 0.7, "seed": 5}, "batch_size": 8})
    sd = SweepDir(tmp_path / "sweep")
    src = sources(spec, sd, str(data_dir))
    forget = resolve_suites(spec, src, None, str(data_dir))["forget"]
    cands, first = forget.problems, forget.spec
    second = first.independent_run()
    assert (first.decoding.stream, second.decoding.stream) == (None, "target/2") and second.model_copy(
        update={"decoding": first.decoding}) == first
    solved = [i % 2 == 0 for i in range(len(cands))]  # run 1 solves every other candidate
    _plant(sd, src.target, first, cands, solved, "run 1")
    chosen = [p for p, ok in zip(cands, solved) if ok][:3]
    _plant(sd, src.target, second, chosen, [True, False, True], "run 2")  # run 2 misses one of them

    got = prepare(spec, sd, str(data_dir))
    assert got.evaluations["forget"] == 2
    assert [p["id"] for p in read_jsonl(sd.forget_texts)] == [p["id"] for p in chosen]
    assert [(r["response"], r["correct"]) for r in read_jsonl(sd.baseline_selection_run("forget"))] == [
        ("run 1", True)] * 3
    before = load_baseline(sd, ["forget"])["forget"]  # what every trial is paired with
    assert [(r["response"], r["correct"]) for r in before] == [("run 2", True), ("run 2", False), ("run 2", True)]
    m = mcnemar_test(before, [{"id": r["id"], "correct": False} for r in before], n_bootstrap=10)
    assert m["acc_before"] == pytest.approx(2 / 3) and m["right_to_wrong"] == 2  # not 3/3 as run 1 has
