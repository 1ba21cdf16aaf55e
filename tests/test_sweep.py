"""Sweeps: grid expansion, trial ids, spec errors (fast); real Ray + MLflow sweeps on the toy (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mast.cli import main
from mast.config import SweepSpec, load_yaml, validate
from mast.files import InputError
from mast.grid import expand_grid, spec_hash, trial_id, trial_params
from mast.layout import SweepDir

ROOT = Path(__file__).resolve().parents[1]


def _spec(**over) -> SweepSpec:
    d = {"name": "t", "models": {"toy": {"seed": 0}}, "grid": {"rule": ["mast"]}}
    d.update(over)
    return validate(SweepSpec, d, "spec.yaml")


# --------------------------------------------------------------------------- grid expansion


def test_grid_is_cartesian_and_drops_k_for_full():
    spec = _spec(grid={"rule": ["mast", "random", "full"], "objective": ["npo", "simnpo"], "k": [2, 4],
                       "seed": [0, 1, 2]})
    g = expand_grid(spec)
    assert g.n_points == 3 * 2 * 2 * 3
    # full ignores k: one k kept -> 2 objectives x 3 seeds; mast & random: 2 x 2 x 3 each; + a null per seed
    assert len(g.trials) == 12 + 12 + 6 + 3 and len(g.dropped) == 6
    ids = [t.trial_id for t in g.trials]
    assert len(set(ids)) == len(ids)
    assert "mast-npo-k2-s0" in ids and "full-simnpo-s2" in ids and not any(i.startswith("full-npo-k") for i in ids)
    assert ids[-3:] == ["null-s0", "null-s1", "null-s2"]
    assert "dropped" in g.summary() and "33 trial(s) (3 null" in g.summary()
    without = expand_grid(_spec(grid=spec.grid, evaluation={"noise_floor": False}))
    assert [t.trial_id for t in without.trials] == ids[:-3]


def test_null_rule_is_one_trial_per_seed_whatever_the_other_axes():
    """The noise floor: `null` ignores objective, k and unlearning fields (only the seed matters)."""
    spec = _spec(grid={"rule": ["null", "mast"], "objective": ["npo", "simnpo"], "k": [2, 4], "lr": [1e-5, 1e-4],
                       "seed": [0, 1]})
    nulls = [t for t in expand_grid(spec).trials if t.config["rule"] == "null"]
    assert [(t.trial_id, t.config) for t in nulls] == [("null-s0", {"rule": "null", "seed": 0}),
                                                       ("null-s1", {"rule": "null", "seed": 1})]
    assert all(t.selection.rule == "null" and t.selection.seed == t.unlearning.seed for t in nulls)
    assert trial_params(nulls[1]) == {"rule": "null", "seed": 1}


def test_grid_point_overrides_specs_and_seed_sets_both():
    spec = _spec(grid={"rule": ["random"], "seed": [7], "lr": [3e-4]}, selection={"k": 3},
                 unlearning={"steps": 5, "objective": "simnpo"})
    t, null = expand_grid(spec).trials
    assert null.trial_id == "null-s7" and null.unlearning.seed == 7
    assert t.selection.rule == "random" and t.selection.seed == 7 and t.selection.k == 3
    assert t.unlearning.seed == 7 and t.unlearning.lr == 3e-4 and t.unlearning.steps == 5
    assert t.config == {"rule": "random", "objective": "simnpo", "k": 3, "seed": 7, "lr": 3e-4}
    assert t.trial_id == "random-simnpo-k3-s7-lr0.0003"


def test_rho_only_varies_for_rules_that_use_it():
    spec = _spec(grid={"rule": ["mast", "magnitude"], "rho": [0.05, 0.1]})
    ids = [t.trial_id for t in expand_grid(spec).trials]
    assert ids == ["mast-npo-k8-s0-rho0.05", "mast-npo-k8-s0-rho0.1", "magnitude-npo-k8-s0-rho0.05", "null-s0"]


def test_trial_ids_are_deterministic_and_hash_long_extras():
    cfg = {"rule": "mast", "objective": "npo", "k": 8, "seed": 0}
    assert trial_id(cfg) == "mast-npo-k8-s0"
    assert trial_id({**cfg, "rule": "attention"}) == "attention-npo-s0"
    long = {**cfg, "texts": "generated", "retain": "kl", "max_grad_norm": 0.5, "warmup_steps": 10}
    tid = trial_id(long)
    assert tid == trial_id(dict(reversed(list(long.items()))))
    assert tid.startswith("mast-npo-k8-s0-") and len(tid.split("-")[-1]) == 8


def test_duplicate_grid_values_are_dropped():
    g = expand_grid(_spec(grid={"rule": ["mast"], "k": [2, 2]}))
    assert [t.trial_id for t in g.trials] == ["mast-npo-k2-s0", "null-s0"] and g.dropped == ["duplicate of mast-npo-k2-s0"]


def test_bad_grid_values_name_the_point():
    with pytest.raises(InputError, match=r"spec.yaml: grid point mast-npo-k0-s0: k: .*greater than 0"):
        expand_grid(_spec(grid={"rule": ["mast"], "k": [0]}), "spec.yaml")
    with pytest.raises(InputError, match=r"grid: unknown grid field 'kk'"):
        _spec(grid={"kk": [1]})


def test_spec_hash_ignores_where_not_what():
    a = _spec(output_dir="/a", data={"data_dir": "/x"})
    b = _spec(output_dir="/b", data={"data_dir": "/y"})
    assert spec_hash(a) == spec_hash(b) != spec_hash(_spec(grid={"rule": ["full"]}))


# --------------------------------------------------------------------------- MLflow params of a trial


def test_trial_params_are_the_resolved_config_without_ignored_fields():
    spec = _spec(grid={"rule": ["mast", "random", "full"], "objective": ["npo", "ga"], "k": [4]},
                 selection={"rho": 0.1}, unlearning={"lr": 3e-5, "steps": 20, "alpha": 0.5, "retain_scale": "match"})
    params = {t.trial_id: trial_params(t) for t in expand_grid(spec).trials}
    mast, rnd, full = params["mast-npo-k4-s0"], params["random-npo-k4-s0"], params["full-npo-s0"]
    # everything that determines the trial, not only the grid axes
    for p in (mast, rnd, full):
        assert (p["lr"], p["steps"], p["alpha"], p["retain"], p["retain_scale"]) == (3e-5, 20, 0.5, "nll", "match")
        assert {"batch_size", "max_length", "texts", "seed", "objective", "max_grad_norm", "bf16",
                "selection.seed", "selection.candidates", "selection.max_length"} <= set(p)
    # k / rho only where the rule uses them (registry facts)
    assert (mast["k"], mast["rho"]) == (4, 0.1)
    assert rnd["k"] == 4 and "rho" not in rnd
    assert "k" not in full and "rho" not in full and full["rule"] == "full"
    # beta is the effective one (unset: the objective's default); GA has none
    assert mast["beta"] == 0.1 and "beta" not in params["mast-ga-k4-s0"]
    assert trial_params(expand_grid(_spec(unlearning={"objective": "simnpo", "beta": 3.0})).trials[0])["beta"] == 3.0


# --------------------------------------------------------------------------- the sweep folder


def test_sweep_dir_knows_every_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sd = SweepDir("runs/x")
    assert sd.root == tmp_path / "runs" / "x" and sd.root.is_absolute()  # Ray workers have other CWDs
    assert sd.manifest == sd.root / "sweep.json" and sd.spec == sd.root / "spec.yaml"
    assert sd.mlflow_db == sd.root / "mlflow.db" and sd.trials_jsonl == sd.root / "trials.jsonl"
    assert sd.baseline_results("forget") == sd.root / "prepared" / "baseline" / "forget.jsonl"
    assert sd.baseline_probe("forget") == sd.root / "prepared" / "baseline" / "forget.probe.json"
    assert sd.suite_problems("gsm8k") == sd.root / "prepared" / "suites" / "gsm8k.jsonl"
    td = sd.trial("mast-npo-k8-s0")
    assert td.result == sd.root / "trials" / "mast-npo-k8-s0" / "result.json" and td.trial_id == "mast-npo-k8-s0"
    assert td.results("retain") == td.root / "results" / "retain.jsonl"
    assert not sd.exists()
    td.root.mkdir(parents=True)
    assert sd.exists()  # a trials folder alone means a sweep started here
    (td.root / "selection.json").write_text("{}")
    (td.root / "result.json").write_text("{}")
    assert td.artifacts() == [td.selection, td.result]


def test_trial_row_is_built_in_one_shape():
    from mast.trial import TrialRow

    grid = expand_grid(_spec(grid={"rule": ["full"]}))
    failed = TrialRow.failed(grid.trials[0], "did not run").to_dict()
    assert failed == {"trial_id": "full-npo-s0", "status": "failed", "error": "did not run",
                      "config": grid.trials[0].config, "suites": {}, "probe": None, "selected": [],
                      "mlflow_run_id": None}
    partial = TrialRow("t", "ok", None, {"rule": "mast", "seed": 0}, suites={"forget": {"delta": 0.1}},
                       all_parameters=False, timing={"finished": 1.0}, partial=True)
    assert TrialRow.from_dict(partial.to_dict()) == partial
    final = partial.final().to_dict()
    assert "partial" not in final and final["stopped_early"] is True and final["suites"] == {"forget": {"delta": 0.1}}
    assert "stopped_early" not in TrialRow.from_dict({**partial.to_dict(), "partial": None}).final().to_dict()


# --------------------------------------------------------------------------- shipped specs


@pytest.mark.parametrize("name", ["demo", "paper", "qwen3"])
def test_shipped_specs_load_and_expand(name):
    spec = load_yaml(ROOT / "sweeps" / f"{name}.yaml", SweepSpec)
    from mast.grid import check_spec

    check_spec(spec, name)
    g = expand_grid(spec, name)
    assert g.trials and len({t.trial_id for t in g.trials}) == len(g.trials)
    if name == "demo":
        assert {t.config["rule"] for t in g.trials} == {"mast", "random", "full", "null"}
        assert {t.config.get("objective") for t in g.trials if t.config["rule"] != "null"} == {"npo", "simnpo"}
        assert len({t.config["seed"] for t in g.trials}) == 3 and len(g.trials) == 18 + 3  # k 8 only; a null per seed
    if name == "paper":
        assert spec.data.forget_size == 150 and spec.evaluation.backend == "vllm" and spec.resources.gpu == 1
        assert spec.models.target == "agentica-org/DeepScaleR-1.5B-Preview"
        assert (spec.evaluation.decoding.max_tokens >= 8192)


# --------------------------------------------------------------------------- CLI errors: exit 2, one line


def _write(tmp_path, data, name="s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def _run(capsys, *argv) -> tuple[int, str]:
    code = main(["sweep", *map(str, argv)])
    err = capsys.readouterr().err.strip()
    return code, err


def test_spec_errors_exit_2_with_one_line(tmp_path, capsys):
    base = {"name": "t", "models": {"toy": {"seed": 0}}, "grid": {"rule": ["mast"]}}
    cases = [
        ({**base, "grid": {"rule": ["magic"]}}, "grid point"),
        ({**base, "resources": {"cpu": 0}}, "resources.cpu"),
        ({**base, "name": "bad name!"}, "name:"),
        ({**base, "evaluation": {"suites": ["forget", "nope"]}, "scheduler": {"kind": "asha", "metric": "x/delta"}},
         "scheduler.metric"),
        ({**base, "evaluation": {"suites": ["forget"], "limits": {"gsm8k": 3}}}, "evaluation.limits"),
        ({**base, "evaluation": {"backend": "vllm"}}, "resources.gpu"),
        ({"name": "t", "grid": {"rule": ["mast"]}}, "models"),
    ]
    for i, (data, field) in enumerate(cases):
        code, err = _run(capsys, _write(tmp_path, data, f"s{i}.yaml"), "--out", tmp_path / f"o{i}")
        assert code == 2, (field, err)
        assert len(err.splitlines()) == 1 and field in err and f"s{i}.yaml" in err, err
    code, err = _run(capsys, tmp_path / "missing.yaml")
    assert code == 2 and "file not found" in err


def test_existing_sweep_needs_resume_and_same_spec(tmp_path, capsys):
    spec = {"name": "t", "models": {"toy": {"seed": 0}}, "grid": {"rule": ["mast"]}}
    p = _write(tmp_path, spec)
    out = tmp_path / "sweep"
    code, err = _run(capsys, p, "--out", out, "--resume")
    assert code == 2 and "no sweep to resume" in err
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"spec_hash": spec_hash(validate(SweepSpec, spec, "x"))}))
    code, err = _run(capsys, p, "--out", out)
    assert code == 2 and "already exists; use --resume" in err and len(err.splitlines()) == 1
    p2 = _write(tmp_path, {**spec, "grid": {"rule": ["full"]}}, "s2.yaml")
    code, err = _run(capsys, p2, "--out", out, "--resume")
    assert code == 2 and "spec changed" in err


# --------------------------------------------------------------------------- prepare (MATH path, tiny models)


def test_prepare_math_splits_baseline_once(tmp_path, tiny_pair, data_dir):
    """Splits are disjoint; the target is evaluated once per suite; a second prepare reuses it all."""
    from mast.files import read_jsonl
    from mast.prepare import prepare

    reference, target = tiny_pair
    spec = _spec(models={"reference": str(reference), "target": str(target)},
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
    changed = _spec(**{**spec.model_dump(), "data": {**spec.data.model_dump(), "split_seed": 2}})
    with pytest.raises(InputError, match="inputs changed since it started"):
        prepare(changed, out, str(data_dir))


def test_prepare_generated_texts_and_target_correct_forget(tmp_path, tiny_pair, data_dir):
    """texts=generated: the target's own correct answers replace the reference solutions (else kept);
    require_target_correct: an untrained target solving too few candidates is an input error."""
    from mast.files import read_jsonl
    from mast.prepare import prepare

    reference, target = tiny_pair
    common = {"models": {"reference": str(reference), "target": str(target)},
              "data": {"forget_size": 3, "retain_size": 2, "retain_train_size": 2},
              "selection": {"max_length": 256},
              "evaluation": {"suites": ["forget", "retain"], "template": "boxed_user",
                             "decoding": {"max_tokens": 4}, "batch_size": 8}}
    got = prepare(_spec(**common, unlearning={"texts": "generated"}), tmp_path / "gen", str(data_dir))
    sd = SweepDir(tmp_path / "gen")
    assert got.generated_texts and got.evaluations == {"forget": 1, "retain": 1}
    gen, forget = read_jsonl(sd.forget_generated), read_jsonl(sd.forget_texts)
    base = {r["id"]: r for r in read_jsonl(sd.baseline_results("forget"))}
    assert [g["id"] for g in gen] == [f["id"] for f in forget]
    for g, f in zip(gen, forget):
        own = base[g["id"]]
        assert g["text_source"] == ("target" if own["correct"] else "reference")
        assert g["solution"] == (own["response"] if own["correct"] else f["solution"])
    strict = _spec(**{**common, "data": {**common["data"], "require_target_correct": True}})
    with pytest.raises(InputError, match=r"the target solves only \d+ of 12 candidates; need forget_size=3"):
        prepare(strict, tmp_path / "strict", str(data_dir))


def _plant(sd: SweepDir, model, suite, problems, correct, tag) -> None:
    """Stand in for a run of `model` through the evaluation cache (keyed exactly as evaluate() keys it)."""
    from mast.evaluation import eval_cache_key
    from mast.files import write_jsonl

    path = sd.eval_cache / "eval" / f"{eval_cache_key(model, suite, problems, 'hf')}.jsonl"
    write_jsonl(path, [{"id": p["id"], "correct": c, "response": tag, "extracted": None, "prompt_sha": "",
                        "prompt_tokens": 1, "response_tokens": 1} for p, c in zip(problems, correct)])


def test_require_target_correct_tests_against_a_second_independent_run(tmp_path, tiny_pair, data_dir):
    """The forget set is chosen on run 1 of the target; every trial's McNemar 'before' side is run 2
    (another sampling seed), where a chosen problem may be missed: the baseline is not right by construction."""
    from mast.files import read_jsonl
    from mast.prepare import independent_run, prepare, resolve_suites, sources
    from mast.stats import mcnemar_test
    from mast.trial import load_baseline

    reference, target = tiny_pair
    spec = _spec(models={"reference": str(reference), "target": str(target)},
                 data={"forget_size": 3, "retain_size": 2, "retain_train_size": 2, "require_target_correct": True},
                 selection={"max_length": 256},
                 evaluation={"suites": ["forget", "retain"], "template": "boxed_user",
                             "decoding": {"max_tokens": 4, "temperature": 0.7, "seed": 5}, "batch_size": 8})
    sd = SweepDir(tmp_path / "sweep")
    src = sources(spec, sd, str(data_dir))
    forget = resolve_suites(spec, src, None, str(data_dir))["forget"]
    cands, first = forget.problems, forget.spec
    second = independent_run(first)
    assert (first.decoding.seed, second.decoding.seed) == (5, 6) and second.model_copy(
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


def test_null_trial_evaluates_the_target_again_with_the_cache_bypassed(tmp_path, tiny_pair, data_dir):
    """The noise floor on the CPU hf backend: greedy decoding is deterministic, so the null trial's
    answers equal the baseline's (flip rate 0, McNemar p = 1), although the evaluation cache (keyed by
    the target's fingerprint) was poisoned to say every answer flipped: the trial never reads it."""
    from mast.evaluation import evaluate
    from mast.files import read_json, read_jsonl, write_jsonl
    from mast.floor import noise_floor
    from mast.prepare import prepare
    from mast.tracking import Tracker, default_uri, init_experiment
    from mast.trial import TrialContext, _run_trial_body

    reference, target = tiny_pair
    spec = _spec(models={"reference": str(reference), "target": str(target)},
                 data={"forget_size": 4, "retain_size": 3, "retain_train_size": 2},
                 selection={"max_length": 256}, grid={"rule": ["null"], "seed": [3]},
                 evaluation={"suites": ["forget", "retain"], "template": "boxed_user",
                             "decoding": {"max_tokens": 4}, "batch_size": 8})
    (null,) = expand_grid(spec).trials
    sd = SweepDir(tmp_path / "sweep")
    prepared = prepare(spec, sd, str(data_dir))
    for name, suite in prepared.suites.items():
        problems = read_jsonl(sd.suite_problems(name))
        cached = evaluate(prepared.target, suite, problems=problems, cache_dir=sd.eval_cache)
        assert cached.cache_hit  # the baseline's own records, under the target's fingerprint
        path = sd.eval_cache / "eval" / f"{cached.key}.jsonl"
        write_jsonl(path, [{**r, "correct": not r["correct"], "response": "poison"} for r in cached.records])
        assert evaluate(prepared.target, suite, problems=problems, cache_dir=sd.eval_cache).records[0][
            "response"] == "poison"
    uri = default_uri(sd.root)
    tracker = Tracker(uri, init_experiment(uri, "null", sd.root), "sweep-null")
    parent = tracker.parent_run("null")
    ctx = TrialContext.build(spec, sd, prepared, [null], tracker, parent)
    td = sd.trial(null.trial_id)
    td.root.mkdir(parents=True)
    reports: list[dict] = []
    _run_trial_body(null, ctx, td, tracker.trial_run(parent, null.trial_id, {"rule": "null"}), reports.append)

    row = read_json(td.result)
    assert row["trial_id"] == "null-s3" and row["selected"] == [] and not row["all_parameters"]
    assert not td.losses.is_file() and not td.checkpoint.exists()  # nothing trained
    for name in prepared.suites:
        assert [r["response"] for r in read_jsonl(td.results(name))] == [
            r["response"] for r in read_jsonl(sd.baseline_results(name))]
        assert row["sft_floor"][name]["below_reference"] == (
            row["suites"][name]["acc_after"] < prepared.reference_accuracy[name])
    nf = noise_floor([row])
    assert {s: (e["flip_rate"], e["mcnemar_p"], e["seeds"]) for s, e in nf.items()} == {
        "forget": (0.0, 1.0, [3]), "retain": (0.0, 1.0, [3])}
    assert reports[-1]["forget/mcnemar_p"] == 1.0 and tracker.run_status(row["mlflow_run_id"]) == "FINISHED"


def test_trials_sample_independently_of_the_baseline(tiny_model, problems):
    """With sampling, a trial of seed k (a null trial too) draws with seed s + 100 + k, not the baseline's s:
    a null trial is then a second, independent run (not a replay of the baseline's random stream)."""
    from mast.config import SuiteSpec
    from mast.evaluation import evaluate
    from mast.prepare import TRIAL_SEED_OFFSET, trial_run

    suite = SuiteSpec(name="s", benchmark="jsonl", path="<test>", template="plain",
                      decoding={"temperature": 1.0, "max_tokens": 8, "seed": 5})
    assert [trial_run(suite, k).decoding.seed for k in (0, 2)] == [5 + TRIAL_SEED_OFFSET, 7 + TRIAL_SEED_OFFSET]

    def responses(sv):
        return [r["response"] for r in evaluate(tiny_model, sv, problems=problems[:6], use_cache=False,
                                                progress=False).records]

    baseline, null = responses(suite), responses(trial_run(suite, 0))
    assert null != baseline and responses(trial_run(suite, 0)) == null  # independent, yet reproducible


# --------------------------------------------------------------------------- slow: real Ray + MLflow on the toy


def _toy_spec(toy: Path, name: str, grid: dict, **over) -> dict:
    spec = {
        "name": name,
        "models": {"toy": {"seed": 0, "out": str(toy)}},
        "data": {"forget_size": 16, "retain_size": 16},
        "grid": grid,
        "selection": {"k": 2, "max_length": 128},
        "unlearning": {"lr": 1e-3, "steps": 2, "batch_size": 4, "max_length": 128, "bf16": False,
                       "gradient_checkpointing": False},
        "evaluation": {"suites": ["forget", "retain"], "limits": {"forget": 16, "retain": 16}, "batch_size": 16},
        "resources": {"cpu": 1, "max_concurrent": 2, "max_failures": 1},
    }
    spec.update(over)
    return spec


def _child_runs(uri: str, exp_id: str):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    runs = c.search_runs([exp_id], filter_string="tags.`mast.role` = 'trial'", max_results=1000)
    return c, runs


@pytest.mark.slow
def test_sweep_on_toy_with_ray_and_mlflow(tmp_path, toy_dir, capsys):
    import ray

    from mast.seeds import seed_level_table
    from mast.sweep import run_sweep

    out = tmp_path / "sweep"
    spec = _write(tmp_path, _toy_spec(toy_dir, "small", {"rule": ["mast", "full"], "seed": [0, 1]}))
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20)
    try:
        meta = run_sweep(spec, out=out)
    finally:
        ray.shutdown()
    ids = ["mast-npo-k2-s0", "mast-npo-k2-s1", "full-npo-s0", "full-npo-s1", "null-s0", "null-s1"]
    assert meta["n_trials"] == 6 and meta["n_ok"] == 6 and meta["trial_ids"] == ids
    assert meta["baseline_evaluations"] == {"forget": 1, "retain": 1}  # once per suite, not per trial
    rows = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert [r["trial_id"] for r in rows] == ids and all(r["status"] == "ok" for r in rows)
    for r in rows:
        assert set(r["suites"]) == {"forget", "retain"} and r["suites"]["forget"]["n"] == 16
        assert set(r["sft_floor"]) == {"forget", "retain"}  # read against the SFT model on every suite
        tdir = out / "trials" / r["trial_id"]
        assert {"config.json", "selection.json", "result.json", "results"} <= {p.name for p in tdir.iterdir()}
        assert (tdir / "losses.jsonl").is_file() == (r["config"]["rule"] != "null")
        assert not (tdir / "checkpoint").exists()  # deleted after evaluation
        assert json.loads((tdir / "result.json").read_text()) == r
    assert len(rows[0]["selected"]) == 2 and rows[2]["all_parameters"]
    # the noise floor: the null trials (cache bypassed) reproduce the greedy CPU baseline exactly
    report_json = json.loads((out / "report" / "report.json").read_text())
    assert {s: (e["flip_rate"], e["mcnemar_p"], e["seeds"]) for s, e in report_json["noise_floor"].items()} == {
        "forget": (0.0, 1.0, [0, 1]), "retain": (0.0, 1.0, [0, 1])}
    assert set(report_json["sft_floor"]["suites"]) == {"forget", "retain"} == set(meta["sft_floor"])
    table = json.loads((out / "seed_table.json").read_text())
    assert table == json.loads(json.dumps(seed_level_table(rows, suite=None)))
    assert any(c["condition"] == "mast/npo/k=2" and c["baseline"] == "full" for c in table["comparisons"])
    assert not any(c["condition"].startswith("null") for c in table["conditions"])

    # MLflow: one parent, one FINISHED child per trial with the metric names, tables, artifacts
    c, runs = _child_runs(meta["tracking_uri"], meta["experiment_id"])
    assert sorted(r.info.run_name for r in runs) == sorted(ids)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all(r.data.tags["mlflow.parentRunId"] == meta["parent_run_id"] for r in runs)
    for r in runs:
        for s in ("forget", "retain"):
            assert {f"{s}/accuracy", f"{s}/delta", f"{s}/mcnemar_p", f"{s}/ci_low", f"{s}/ci_high",
                    f"{s}/reference_accuracy", f"{s}/below_reference"} <= set(r.data.metrics)
        p = r.data.params
        if p["rule"] == "null":
            assert p == {"rule": "null", "seed": r.info.run_name[-1]}
            continue
        assert p["rule"] in ("mast", "full") and "seed" in p
        # the resolved config, and k / rho only for the rule that uses them
        assert (p["lr"], p["steps"], p["batch_size"], p["beta"], p["retain"]) == ("0.001", "2", "4", "0.1", "nll")
        assert ("k" in p, "rho" in p) == ((True, True) if p["rule"] == "mast" else (False, False))
        assert len(c.get_metric_history(r.info.run_id, "train/total")) == 2  # 2 steps
        arts = {a.path for a in c.list_artifacts(r.info.run_id)}
        assert "selection.json" in arts and {a.path for a in c.list_artifacts(r.info.run_id, "results")} == {
            "results/forget.json", "results/retain.json"}
    parent = c.get_run(meta["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials/ok"] == 6
    pm = parent.data.metrics
    assert (pm["noise_floor/forget/flip_rate"], pm["noise_floor/forget/mcnemar_p"]) == (0.0, 1.0)
    assert pm["reference/forget/accuracy"] == meta["sft_floor"]["forget"]["reference_acc"]
    assert {"rl_gain/forget/delta", "rl_gain/retain/mcnemar_p", "noise_floor/retain/flip_rate"} <= set(pm)
    sig = {a.path for a in c.list_artifacts(parent.info.run_id, "significance")}
    assert {"significance/seed_table.json", "significance/holm.json"} <= sig
    holm = json.loads(open(c.download_artifacts(parent.info.run_id, "significance/holm.json", str(tmp_path))).read())
    assert holm["comparisons"] and all("p_holm" in x for x in holm["comparisons"])
    assert {"spec.yaml", "baseline", "splits", "noise_floor.json", "sft_floor.json"} <= {
        a.path for a in c.list_artifacts(parent.info.run_id)}
    assert "headline" not in capsys.readouterr().err  # (output goes to stdout)

    # a finished sweep: refused without --resume; --resume re-runs nothing and duplicates nothing
    assert main(["sweep", str(spec), "--out", str(out)]) == 2
    assert "already exists; use --resume" in capsys.readouterr().err
    before = {i: (out / "trials" / i / "result.json").stat().st_mtime_ns for i in ids}
    assert main(["sweep", str(spec), "--out", str(out), "--resume"]) == 0
    meta2 = json.loads((out / "sweep.json").read_text())
    assert meta2["baseline_evaluations"] == {"forget": 1, "retain": 1}
    assert {i: (out / "trials" / i / "result.json").stat().st_mtime_ns for i in ids} == before
    _, runs = _child_runs(meta["tracking_uri"], meta["experiment_id"])
    assert len(runs) == 6 and all(r.info.status == "FINISHED" for r in runs)


@pytest.mark.slow
def test_killed_driver_resumes_without_losing_or_duplicating_trials(tmp_path, toy_dir):
    """SIGKILL the driver after its first trial finished; --resume completes the rest, once each.

    Half of the grid diverges (full-parameter updates at lr 1e30, no clipping: NaN at step 2):
    those trials are retried per FailureConfig, then recorded as failed with their error; the
    sweep goes on.
    """
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "sweep"
    spec = _toy_spec(toy_dir, "killed", {"rule": ["full"], "lr": [1e-3, 1e30], "seed": [0, 1]},
                     resources={"cpu": 1, "max_concurrent": 1, "max_failures": 1})
    spec["unlearning"]["max_grad_norm"] = None
    spec["evaluation"]["noise_floor"] = False  # resume is the point here, not the floors
    p = _write(tmp_path, spec)
    cmd = [sys.executable, "-m", "mast.cli", "sweep", str(p), "--out", str(out)]
    env = {**os.environ, "MAST_RAY_NUM_CPUS": "2"}
    log = open(tmp_path / "run1.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    first = None
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None:
        done = [f for f in (out / "trials").glob("*/result.json") if json.loads(f.read_text())["status"] == "ok"]
        if done:
            first = done[0]
            break
        time.sleep(0.5)
    assert first is not None, (tmp_path / "run1.log").read_text()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "trials.jsonl").exists()  # it really died mid-sweep
    first_row = first.read_text()
    time.sleep(3)  # let Ray's fate-sharing processes exit

    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert first.read_text() == first_row  # the trial finished before the kill was not run again
    rows = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    meta = json.loads((out / "sweep.json").read_text())
    assert len(rows) == 4 and len({x["trial_id"] for x in rows}) == 4 and meta["trial_ids"] == [
        x["trial_id"] for x in rows]
    ok = [x for x in rows if x["status"] == "ok"]
    failed = [x for x in rows if x["status"] == "failed"]
    assert {x["config"]["lr"] for x in ok} == {1e-3} and len(ok) == 2
    assert {x["config"]["lr"] for x in failed} == {1e30} and len(failed) == 2
    assert all("diverged" in x["error"] for x in failed)
    assert meta["baseline_evaluations"] == {"forget": 1, "retain": 1}
    _, runs = _child_runs(meta["tracking_uri"], meta["experiment_id"])
    assert sorted(x.info.run_name for x in runs) == sorted(x["trial_id"] for x in rows)  # one run per trial
    status = {x.info.run_name: x.info.status for x in runs}
    assert all(status[x["trial_id"]] == "FINISHED" for x in ok)
    assert all(status[x["trial_id"]] == "FAILED" for x in failed)
