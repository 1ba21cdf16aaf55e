"""Matched forgetting: the stopping rule's decisions (pure) and the unlearning loop that obeys it (tiny Qwen2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mast.batching import encode_problems
from mast.cli import main as mast_main
from mast.config import StopSpec, SuiteSpec, UnlearnSpec, validate
from mast.files import InputError, read_json, read_jsonl, write_json, write_jsonl
from mast.stopping import (
    accuracy_check,
    check_steps,
    criterion_met,
    decide,
    make_check,
    mean_completion_nll,
    nll_check,
    threshold,
)
from mast.unlearn import DELTA_FILE, LOSSES_FILE, MANIFEST_FILE, load_model, unlearn

SELECTED = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"]


def _selection():
    return {"rule": "mast", "k": 2, "rho": 0.05, "all_parameters": False,
            "candidates": [{"name": n, "selected": True, "score": 1.0} for n in SELECTED]
            + [{"name": "model.layers.0.self_attn.k_proj.weight", "selected": False, "score": 0.0}]}


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        if f.name != DELTA_FILE:
            with safe_open(str(f), "pt") as g:
                out.update({k: g.get_tensor(k) for k in g.keys()})  # noqa: SIM118
    return out


def _hist(*values):
    return [{"step": s, "value": v} for s, v in values]


# --------------------------------------------------------------------------- the spec


def test_stop_spec_validation_names_the_field():
    ok = validate(UnlearnSpec, {"stop": {"target": 0.2, "every": 5, "max_steps": 40}}, "s.yaml")
    assert ok.stop.metric == "forget_val_accuracy" and ok.step_cap == 40
    bad = [({"target": 1.5}, "stop: target must be in [0, 1]"),
           ({"target": float("inf")}, "stop.target: Input should be a finite number"),
           ({"target": 0.2, "every": 0}, "stop.every: Input should be greater than 0"),
           ({"target": 0.2, "max_steps": 0}, "stop.max_steps: Input should be greater than 0"),
           ({"metric": "forget_nll_rise", "target": 0.0}, "stop: target must be > 0"),
           ({"target": 0.2, "every": 20, "max_steps": 10}, "every (20) must be <= max_steps (10)"),
           ({"metric": "forget_loss", "target": 0.2}, "stop.metric"),
           ({"every": 5}, "stop.target: Field required")]
    for stop, msg in bad:
        with pytest.raises(InputError) as e:
            validate(UnlearnSpec, {"stop": stop}, "s.yaml")
        assert str(e.value).startswith("s.yaml: ") and msg in str(e.value), str(e.value)


def test_without_a_stopping_rule_the_spec_dump_is_unchanged():
    spec = UnlearnSpec(steps=7)
    assert "stop" not in spec.model_dump() and "stop" not in spec.model_dump(mode="json")
    assert spec.step_cap == 7
    with_stop = UnlearnSpec(stop={"target": 0.1})
    assert UnlearnSpec(**with_stop.model_dump()).stop == with_stop.stop  # round-trips


# --------------------------------------------------------------------------- pure decisions


def test_thresholds():
    acc = StopSpec(target=0.2)
    assert threshold(acc, 0.6) == 0.2
    assert threshold(StopSpec(target=0.5, relative=True), 0.6) == pytest.approx(0.3)
    nll = StopSpec(metric="forget_nll_rise", target=0.5)
    assert threshold(nll, 1.2) == pytest.approx(1.7)
    assert threshold(StopSpec(metric="forget_nll_rise", target=0.25, relative=True), 2.0) == pytest.approx(2.5)
    assert criterion_met(acc, 0.2, 0.6) and not criterion_met(acc, 0.21, 0.6)  # accuracy: at or below
    assert criterion_met(nll, 1.7, 1.2) and not criterion_met(nll, 1.69, 1.2)  # NLL: at or above


def test_checks_run_at_zero_every_n_steps_and_at_the_cap():
    assert check_steps(StopSpec(target=0.1, every=3, max_steps=10)) == [0, 3, 6, 9, 10]
    assert check_steps(StopSpec(target=0.1, every=5, max_steps=10)) == [0, 5, 10]


def test_decide_stops_at_the_first_check_that_meets_the_target_never_at_the_baseline():
    stop = StopSpec(target=0.2, every=5, max_steps=20)
    # the baseline already below the target does not end the run before any step
    assert not decide(stop, _hist((0, 0.1))).stop
    assert not decide(stop, _hist((0, 0.6), (5, 0.4))).stop
    d = decide(stop, _hist((0, 0.6), (5, 0.4), (10, 0.2)))
    assert d.stop and d.reached and d.step == 10 and d.threshold == 0.2
    cap = decide(stop, _hist((0, 0.6), (5, 0.5), (10, 0.4), (15, 0.4), (20, 0.3)))
    assert cap.stop and not cap.reached and cap.step == 20
    with pytest.raises(ValueError, match="step-0 baseline"):
        decide(stop, _hist((5, 0.4)))


# --------------------------------------------------------------------------- the loop on a tiny model


@pytest.fixture(scope="module")
def forget_sets(problems):
    return problems[:6], problems[6:10]  # training forget texts, forget-validation problems


def test_criterion_met_at_the_first_check_ends_training_after_every_steps(tiny_model, forget_sets, tmp_path):
    forget, val = forget_sets
    suite = SuiteSpec(name="forget_val", benchmark="jsonl", split_role="forget", decoding={"max_tokens": 12})
    spec = UnlearnSpec(objective="ga", lr=1e-3, batch_size=2, seed=0, stop={"target": 1.0, "every": 2, "max_steps": 10})
    res = unlearn(tiny_model, _selection(), forget, None, spec, tmp_path / "o", progress=False,
                  stop_check=accuracy_check(tiny_model, val, suite, batch_size=4))
    assert res.steps_run == 2 and res.stopped_early
    assert [h["step"] for h in res.stop_history] == [0, 2]
    assert len(read_jsonl(tmp_path / "o" / LOSSES_FILE)) == 2
    m = read_json(tmp_path / "o" / MANIFEST_FILE)
    assert (m["steps"], m["steps_run"], m["stopped_early"]) == (2, 2, True)
    assert m["stop"]["reached"] and m["stop"]["step_reached"] == 2 and m["stop"]["threshold"] == 1.0
    assert all(0.0 <= h["value"] <= 1.0 for h in m["stop"]["history"])


def test_unmet_criterion_runs_to_the_cap_and_the_checks_do_not_change_the_training(tiny_model, forget_sets, tmp_path):
    forget, val = forget_sets
    base = {"objective": "npo", "lr": 1e-3, "batch_size": 2, "seed": 0}
    stop = {"metric": "forget_nll_rise", "target": 100.0, "every": 2, "max_steps": 5}
    res = unlearn(tiny_model, _selection(), forget, None, UnlearnSpec(**base, stop=stop), tmp_path / "stop",
                  progress=False, stop_check=nll_check(tiny_model, val, max_length=256))
    assert res.steps_run == 5 and not res.stopped_early
    assert [h["step"] for h in res.stop_history] == [0, 2, 4, 5]
    assert res.manifest["stop"]["reached"] is False and res.manifest["stop"]["step_reached"] is None
    plain = unlearn(tiny_model, _selection(), forget, None, UnlearnSpec(**base, steps=5), tmp_path / "plain",
                    progress=False)
    assert plain.manifest["stop"] is None and plain.steps_run == 5
    before, a, b = _weights(tiny_model), _weights(tmp_path / "stop"), _weights(tmp_path / "plain")
    for name in before:
        assert torch.equal(a[name], b[name]), name  # bit-identical to the run without checks
        assert torch.equal(a[name], before[name]) == (name not in SELECTED), name  # frozen tensors kept
    # the recorded value is the mean forget-validation NLL of the weights at that step
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    enc = encode_problems(tok, val, "qwen_boxed", 256)
    final = mean_completion_nll(load_model(tmp_path / "stop").eval(), enc, tok.pad_token_id, 3)
    assert res.stop_history[-1]["value"] == pytest.approx(final, rel=1e-5)
    initial = mean_completion_nll(load_model(tiny_model).eval(), enc, tok.pad_token_id, 3)
    assert res.stop_history[0]["value"] == pytest.approx(initial, rel=1e-5)


def test_nll_rise_stops_at_the_first_check_past_the_threshold(tiny_model, forget_sets, tmp_path):
    forget, _ = forget_sets
    stop = StopSpec(metric="forget_nll_rise", target=0.1, every=1, max_steps=30)
    spec = UnlearnSpec(objective="ga", lr=3e-3, batch_size=3, seed=0, stop=stop)
    res = unlearn(tiny_model, _selection(), forget, None, spec, tmp_path / "o", progress=False,
                  stop_check=make_check(stop, tiny_model, forget, max_length=256))
    h = res.stop_history
    assert res.stopped_early and res.manifest["stop"]["reached"] and res.steps_run == h[-1]["step"] < 30
    assert h[-1]["value"] >= h[0]["value"] + 0.1 > max(x["value"] for x in h[:-1])
    assert [x["step"] for x in h] == list(range(res.steps_run + 1)) and res.steps_run > 1


def test_a_stopping_rule_needs_a_check(tiny_model, forget_sets, tmp_path):
    forget, _ = forget_sets
    spec = UnlearnSpec(objective="ga", lr=1e-3, batch_size=2, stop={"target": 0.1, "every": 1, "max_steps": 2})
    with pytest.raises(InputError, match="unlearning.stop is set but no stop check"):
        unlearn(tiny_model, _selection(), forget, None, spec, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_cli_unlearn_refuses_a_stopping_rule_in_one_line(tiny_model, problems, tmp_path, capsys):
    import yaml

    write_json(tmp_path / "sel.json", _selection())
    write_jsonl(tmp_path / "forget.jsonl", problems[:6])
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"objective": "ga", "stop": {"target": 0.1, "every": 1, "max_steps": 3}}))
    rc = mast_main(["unlearn", "--target", str(tiny_model), "--selection", str(tmp_path / "sel.json"),
                    "--forget", str(tmp_path / "forget.jsonl"), "--spec", str(spec), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and str(spec) in err and "stop" in err
    assert not (tmp_path / "o").exists()
