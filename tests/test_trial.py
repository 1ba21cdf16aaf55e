"""One trial: the row's shape, a null trial through the real evaluation path, its sampling seed."""

from __future__ import annotations

from builders import sweep_spec

from mast.config import SuiteSpec
from mast.evaluation import evaluate
from mast.files import read_json, read_jsonl, write_jsonl
from mast.floor import noise_floor
from mast.grid import expand_grid
from mast.layout import SweepDir
from mast.prepare import prepare
from mast.tracking import Tracker, default_uri, init_experiment
from mast.trial import TrialContext, TrialRow, _run_trial_body, open_trial_run


def test_trial_row_is_built_in_one_shape():

    grid = expand_grid(sweep_spec(grid={"rule": ["full"]}))
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


def test_null_trial_evaluates_the_target_again_with_the_cache_bypassed(tmp_path, tiny_pair, data_dir):
    """The noise floor on the CPU hf backend: greedy decoding is deterministic, so the null trial's
    answers equal the baseline's (flip rate 0, McNemar p = 1), although the evaluation cache (keyed by
    the target's fingerprint) was poisoned to say every answer flipped: the trial never reads it."""

    reference, target = tiny_pair
    spec = sweep_spec(models={"reference": str(reference), "target": str(target)},
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
    _run_trial_body(null, ctx, td, open_trial_run(tracker, parent, null), reports.append)

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
    # every suite in one evaluate_many call: the hf backend loaded the model once
    assert row["engine_starts"] == 1 and reports[-1]["evaluation/engine_starts"] == 1.0


def test_trials_sample_independently_of_the_baseline(tiny_model, problems):
    """With sampling, a trial (a null trial too) draws in its own stream trial/<trial_id>, not the baseline's:
    a null trial is then a second, independent run (not a replay of the baseline's random stream)."""

    suite = SuiteSpec(name="s", benchmark="jsonl", path="<test>", template="plain",
                      decoding={"temperature": 1.0, "max_tokens": 8, "seed": 5})
    assert [suite.trial_run(t).decoding.stream for t in ("null-s0", "null-s2")] == ["trial/null-s0", "trial/null-s2"]
    assert suite.trial_run("null-s0").decoding.seed == 5 and suite.decoding.stream is None

    def responses(sv):
        return [r["response"] for r in evaluate(tiny_model, sv, problems=problems[:6], use_cache=False,
                                                progress=False).records]

    baseline, null = responses(suite), responses(suite.trial_run("null-s0"))
    assert null != baseline and responses(suite.trial_run("null-s0")) == null  # independent, yet reproducible
