"""The masked unlearning loop on tiny real Qwen2 checkpoints: masking, determinism, safety, outputs."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from mast.batching import collate, completion_logprobs, encode_problems
from mast.cli import main as mast_main
from mast.config import UnlearnSpec
from mast.files import InputError, write_json, write_jsonl
from mast.unlearn import (
    DELTA_FILE,
    LOSSES_FILE,
    MANIFEST_FILE,
    UnlearnDiverged,
    apply_delta,
    load_model,
    unlearn,
)

SELECTED = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight",
            "model.layers.1.self_attn.v_proj.weight"]
NOT_SELECTED = ["model.layers.0.self_attn.k_proj.weight", "model.layers.1.self_attn.q_proj.weight"]


def _selection(selected=SELECTED, others=NOT_SELECTED, all_parameters=False) -> dict:
    cands = [{"name": n, "selected": True, "score": 1.0} for n in selected]
    cands += [{"name": n, "selected": False, "score": 0.0} for n in others]
    return {"rule": "full" if all_parameters else "mast", "k": len(selected), "rho": 0.05,
            "candidates": cands, "all_parameters": all_parameters}


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as g:
            out.update({k: g.get_tensor(k) for k in g.keys()})  # noqa: SIM118
    return out


def _spec(**kw) -> UnlearnSpec:
    base = {"objective": "npo", "lr": 1e-3, "steps": 3, "batch_size": 4, "seed": 0}
    return UnlearnSpec(**{**base, **kw})


def _mean_forget_logp(model_dir: Path, problems: list[dict]) -> float:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = load_model(model_dir).eval()
    enc = encode_problems(tok, problems, "qwen_boxed", 256)
    with torch.inference_mode():
        s, ln, _ = completion_logprobs(model, collate(enc, list(range(len(enc))), tok.pad_token_id))
    return float(s.sum() / ln.sum())


@pytest.fixture(scope="module")
def run(tiny_model, problems, tmp_path_factory):
    """One NPO + retain-NLL run shared by the output checks."""
    out = tmp_path_factory.mktemp("unlearn") / "out"
    res = unlearn(tiny_model, _selection(), problems[:6], problems[6:], _spec(), out, progress=False)
    return res


def test_only_selected_tensors_change_and_all_of_them_do(tiny_model, run):
    before, after = _weights(tiny_model), _weights(run.out_dir)
    assert before.keys() == after.keys()
    for name in before:
        same = torch.equal(before[name], after[name]) and before[name].dtype == after[name].dtype
        assert same == (name not in SELECTED), name
    assert run.manifest["changed_tensors"] == sorted(SELECTED)
    assert run.manifest["trainable_tensors"] == len(SELECTED)


def test_optimizer_state_only_for_selected(tiny_model, run):
    shapes = {n: t.shape for n, t in _weights(tiny_model).items()}
    n_params = sum(shapes[n].numel() for n in SELECTED)
    assert run.manifest["trainable_parameters"] == n_params
    # AdamW: exp_avg + exp_avg_sq (float32) per trainable element, plus one float32 step per tensor
    assert run.manifest["optimizer_state_bytes"] == 8 * n_params + 4 * len(SELECTED)


def test_outputs_manifest_losses_and_delta(tiny_model, run):
    out = run.out_dir
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    m = json.loads((out / MANIFEST_FILE).read_text())
    assert m["target_fingerprint"] and m["objective"] == "npo" and m["seed"] == 0 and m["steps"] == 3
    assert m["selection"]["selected"] == SELECTED and m["retain_term"] == "nll"
    rows = [json.loads(line) for line in (out / LOSSES_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows == run.losses
    assert all(set(r) >= {"step", "forget", "retain", "total"} for r in rows)
    assert rows[0]["forget"] == pytest.approx(2 / 0.1 * 0.6931471805599453, rel=1e-3)  # NPO at θ = ref
    assert rows[-1]["total"] == pytest.approx(rows[-1]["forget"] + rows[-1]["retain"], rel=1e-5)
    assert m["final_losses"]["total"] == rows[-1]["total"]
    with safe_open(str(out / DELTA_FILE), "pt") as f:
        assert sorted(f.keys()) == sorted(SELECTED)  # noqa: SIM118
    # the checkpoint folder's top level holds only the model's weights: vLLM loads every *.safetensors there
    assert DELTA_FILE == "delta/delta.safetensors" and m["delta"]["file"] == DELTA_FILE
    assert [f.name for f in out.glob("*.safetensors")] == ["model.safetensors"]
    assert not list(out.parent.glob(".out.*"))  # no temp folders left behind


def test_apply_delta_rebuilds_bit_for_bit(tiny_model, run, tmp_path):
    model = apply_delta(tiny_model, run.out_dir / DELTA_FILE, out_dir=tmp_path / "rebuilt")
    saved = _weights(run.out_dir)
    state = model.state_dict()
    for name, t in saved.items():
        assert torch.equal(state[name], t) and state[name].dtype == t.dtype, name
    rebuilt = _weights(tmp_path / "rebuilt")
    assert all(torch.equal(rebuilt[n], saved[n]) for n in saved)
    with pytest.raises(InputError, match="made from target"):
        apply_delta(run.out_dir, run.out_dir / DELTA_FILE)  # wrong base checkpoint


def test_same_seed_identical_weights_other_seed_differs(tiny_model, problems, tmp_path):
    spec = _spec(objective="ga", steps=2, batch_size=2)
    a = unlearn(tiny_model, _selection(), problems, None, spec, tmp_path / "a", progress=False)
    b = unlearn(tiny_model, _selection(), problems, None, spec, tmp_path / "b", progress=False)
    c = unlearn(tiny_model, _selection(), problems, None, spec.model_copy(update={"seed": 1}), tmp_path / "c",
                progress=False)
    wa, wb, wc = _weights(a.out_dir), _weights(b.out_dir), _weights(c.out_dir)
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
    assert a.losses == b.losses
    assert any(not torch.equal(wa[n], wc[n]) for n in SELECTED)


def test_divergence_stops_cleanly_with_the_step(tiny_model, problems, tmp_path):
    out = tmp_path / "diverged"
    spec = _spec(objective="ga", lr=1e30, steps=6, max_grad_norm=None)
    with pytest.raises(UnlearnDiverged) as err:
        unlearn(tiny_model, _selection(), problems, None, spec, out, progress=False)
    assert 1 < err.value.step <= 6
    assert str(err.value) == f"diverged at step {err.value.step}: {err.value.message}"
    assert re.fullmatch(r"(forget|retain|total) loss is (nan|-?inf)|gradient norm is (nan|inf)", err.value.message)
    again = pickle.loads(pickle.dumps(err.value))
    assert (again.step, again.message) == (err.value.step, err.value.message)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_full_rule_moves_every_tensor(tiny_model, problems, tmp_path):
    sel = _selection(all_parameters=True)
    res = unlearn(tiny_model, sel, problems, None, _spec(objective="ga", steps=2), tmp_path / "full", progress=False)
    before, after = _weights(tiny_model), _weights(res.out_dir)
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert unchanged == []
    total = sum(t.numel() for t in before.values())
    assert res.manifest["trainable_parameters"] == total
    assert res.manifest["optimizer_state_bytes"] == 8 * total + 4 * len(before)
    assert res.manifest["selection"]["all_parameters"] is True


@pytest.mark.parametrize("objective,retain", [("ga", "none"), ("npo", "kl"), ("simnpo", "none")])
def test_each_objective_lowers_forget_likelihood(tiny_model, problems, tmp_path, objective, retain):
    forget, keep = problems[:6], problems[6:]
    # SimNPO's β = 2.5 saturates on an untrained model (mean token log-prob ≈ −log V): use β = 0.1 here
    spec = _spec(objective=objective, retain=retain, steps=4, lr=3e-3, beta=0.1 if objective == "simnpo" else None)
    res = unlearn(tiny_model, _selection(), forget, keep, spec, tmp_path / "o", progress=False)
    assert _mean_forget_logp(res.out_dir, forget) < _mean_forget_logp(tiny_model, forget) - 1e-3
    if retain == "kl":
        assert res.losses[0]["retain"] == pytest.approx(0.0, abs=1e-6)  # KL to itself before any update
        assert res.losses[-1]["retain"] > 0
    assert (res.losses[-1]["retain"] is None) == (retain == "none")


def test_retain_scale_sequence_sums_per_text(tiny_model, problems, tmp_path):
    forget, keep = problems[:4], problems[4:8]
    tok_run = unlearn(tiny_model, _selection(), forget, keep, _spec(steps=1), tmp_path / "t", progress=False)
    seq_run = unlearn(tiny_model, _selection(), forget, keep, _spec(steps=1, retain_scale="match"), tmp_path / "s",
                      progress=False)
    from transformers import AutoTokenizer

    enc = encode_problems(AutoTokenizer.from_pretrained(tiny_model), keep, "qwen_boxed", 1024)
    mean_len = sum(sum(m[1:]) for _, m in enc) / len(enc)  # completion tokens per retain text
    assert seq_run.manifest["retain_scale"] == "sequence" and tok_run.manifest["retain_scale"] == "token"
    assert seq_run.losses[0]["retain"] == pytest.approx(tok_run.losses[0]["retain"] * mean_len, rel=1e-4)


def test_unknown_tensor_name_is_input_error(tiny_model, problems, tmp_path):
    sel = _selection(selected=[SELECTED[0], "model.layers.7.self_attn.q_proj.weight", "nope"])
    with pytest.raises(InputError, match=r"model\.layers\.7\.self_attn\.q_proj\.weight"):
        unlearn(tiny_model, sel, problems, None, _spec(), tmp_path / "x", progress=False)
    with pytest.raises(InputError, match="selected"):
        unlearn(tiny_model, _selection(selected=[]), problems, None, _spec(), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def _cli_files(tmp_path, problems, selection):
    write_json(tmp_path / "sel.json", selection)
    write_jsonl(tmp_path / "forget.jsonl", problems[:6])
    write_jsonl(tmp_path / "retain.jsonl", problems[6:])
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({"objective": "ga", "steps": 5, "lr": 1e-3, "batch_size": 2}))


def test_cli_unlearn_spec_and_flag_override(tiny_model, problems, tmp_path, capsys):
    _cli_files(tmp_path, problems, _selection())
    out = tmp_path / "out"
    rc = mast_main(["unlearn", "--target", str(tiny_model), "--selection", str(tmp_path / "sel.json"),
                    "--forget", str(tmp_path / "forget.jsonl"), "--retain", str(tmp_path / "retain.jsonl"),
                    "--spec", str(tmp_path / "spec.yaml"), "--objective", "npo", "--steps", "2", "--out", str(out)])
    assert rc == 0
    m = json.loads((out / MANIFEST_FILE).read_text())
    assert (m["objective"], m["steps"], m["spec"]["batch_size"], m["spec"]["lr"]) == ("npo", 2, 2, 1e-3)
    assert "3 tensors changed" in capsys.readouterr().out


def test_cli_bad_input_and_divergence(tiny_model, problems, tmp_path, capsys):
    _cli_files(tmp_path, problems, _selection(selected=["model.layers.0.self_attn.q_proj.weight", "missing.w"]))
    args = ["unlearn", "--target", str(tiny_model), "--selection", str(tmp_path / "sel.json"),
            "--forget", str(tmp_path / "forget.jsonl")]
    out = tmp_path / "out"
    assert mast_main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sel.json" in err and "missing.w" in err
    write_jsonl(tmp_path / "bad.jsonl", [{"id": "a", "prompt": "x"}])
    assert mast_main([*args[:-1], str(tmp_path / "bad.jsonl"), "--out", str(out)]) == 2
    assert "solution" in capsys.readouterr().err
    assert mast_main([*args, "--steps", "0", "--out", str(out)]) == 2
    assert "steps" in capsys.readouterr().err
    write_json(tmp_path / "sel.json", _selection())
    assert mast_main([*args, "--lr", "1e30", "--steps", "6", "--out", str(out)]) in (1,)
    err = capsys.readouterr().err.strip()  # the progress bar, then one line naming the step
    assert "diverged at step" in err.splitlines()[-1] and "Traceback" not in err
    assert not out.exists()


@pytest.mark.gpu
def test_gpu_bf16_checkpointing_masked_and_deterministic(tiny_model, problems, tmp_path):
    spec = _spec(steps=3, bf16=True, gradient_checkpointing=True, retain="kl")
    a = unlearn(tiny_model, _selection(), problems[:6], problems[6:], spec, tmp_path / "a", progress=False)
    b = unlearn(tiny_model, _selection(), problems[:6], problems[6:], spec, tmp_path / "b", progress=False)
    assert a.manifest["bf16_autocast"] and a.manifest["gradient_checkpointing"] and a.manifest["device"] == "cuda"
    before, wa, wb = _weights(tiny_model), _weights(a.out_dir), _weights(b.out_dir)
    for n in before:
        assert torch.equal(before[n], wa[n]) == (n not in SELECTED), n
        assert wa[n].dtype == before[n].dtype
    assert all(torch.equal(wa[n], wb[n]) for n in wa)


@pytest.mark.gpu
def test_gpu_bf16_checkpoint_keeps_frozen_bits_and_dtype(tiny_model, problems, tmp_path):
    from transformers import AutoTokenizer

    bf16 = tmp_path / "bf16"
    load_model(tiny_model).to(torch.bfloat16).save_pretrained(bf16)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(bf16)
    res = unlearn(bf16, _selection(), problems, None, _spec(objective="ga", steps=2, lr=1e-2), tmp_path / "o",
                  progress=False)
    before, after = _weights(bf16), _weights(res.out_dir)
    for n in before:
        assert after[n].dtype == torch.bfloat16
        assert torch.equal(before[n], after[n]) == (n not in SELECTED), n
    model = apply_delta(bf16, res.out_dir / DELTA_FILE)
    assert all(torch.equal(model.state_dict()[n], after[n]) for n in after)


# --------------------------------------------------------------------------- the toy (slow)

# Toy unlearning settings: lr 3e-5, 20 steps, with the retain NLL on NPO's scale (retain_scale
# "match"), scored on the toy's VALIDATION suites. Seed-0 format-3 toy: forget_val/retain_val
# 0.86/0.97 before, 0.675/1.00 after mast k8 (2-core CPU run of this test).
TOY_K = 8
TOY_SPEC = {"objective": "npo", "lr": 3e-5, "steps": 20, "batch_size": 8, "retain": "nll", "alpha": 1.0,
            "retain_scale": "match", "seed": 0}


@pytest.mark.slow
def test_toy_mast_topk_npo_forgets_the_forget_skill_and_keeps_the_retain_skill(toy_dir, tmp_path):
    from mast.config import SelectionSpec, load_suite
    from mast.evaluation import evaluate
    from mast.files import read_jsonl
    from mast.selection import select

    toy = toy_dir

    forget, retain = read_jsonl(toy / "data" / "forget.jsonl"), read_jsonl(toy / "data" / "retain.jsonl")
    # scored on the VALIDATION suites: the settings (and retain_scale "match") are choices, and choices
    # are never scored on the suites a sweep reports (forget / retain)
    suites = {n.removesuffix("_val"): load_suite(toy / "suites" / f"{n}.yaml") for n in ("forget_val", "retain_val")}

    def acc(model_dir):
        return {n: evaluate(model_dir, s, backend="hf", use_cache=False, progress=False).accuracy
                for n, s in suites.items()}

    sel = select(toy / "sft", toy / "rlvr", forget, SelectionSpec(rule="mast", k=TOY_K), progress=False)
    res = unlearn(toy / "rlvr", sel, forget, retain, UnlearnSpec(**TOY_SPEC), tmp_path / "u", progress=False)
    before, after = acc(toy / "rlvr"), acc(res.out_dir)
    print(f"toy accuracy before {before} after {after}; selected {res.manifest['selection']['selected']}")
    assert before["forget"] >= 0.2, f"toy target too weak to test unlearning: {before}"
    assert after["forget"] <= before["forget"] - 0.1
    assert after["retain"] >= before["retain"] - 0.05
    changed = set(res.manifest["changed_tensors"])
    assert changed == {c["name"] for c in sel["candidates"] if c["selected"]}
