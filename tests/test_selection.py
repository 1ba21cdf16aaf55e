"""Selection: the three signals on planted matrices, the rules, the inventory, and `mast select` on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mast.cli import main
from mast.config import SelectionSpec
from mast.files import InputError, write_jsonl
from mast.models import TensorStore, candidate_tensors, inventory
from mast.selection import RULES, apply_rule, select, spectral_stats, spectral_stats_multi

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


# --------------------------------------------------------------------------- rules on synthetic rows


def rows_with_unmoved():
    """Six candidates; c1 and c4 did not move (D = 0) but c4 would win on a raw tie-free ranking of nothing."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        moved = i not in (1, 4)
        rows.append({"name": f"c{i}", "norm_d": 1.0 if moved else 0.0,
                     "update_magnitude": float(rng.random()) if moved else 0.0,
                     "off_principal_energy": float(rng.random()) if moved else 0.0,
                     "off_principal_normalized": float(rng.random()) if moved else 0.0,
                     "coupling": float(rng.random()) if moved else 0.0,
                     "coupling_signed": float(rng.normal()) if moved else 0.0})
    return rows


@pytest.mark.parametrize("rule", ["mast", "off_principal", "off_principal_raw", "magnitude", "coupling",
                                  "coupling_signed"])
def test_unmoved_tensors_are_never_selected(rule):
    rows = rows_with_unmoved()
    for k in (1, 3, 4, 6):
        scores, selected, warnings = apply_rule(rows, SelectionSpec(rule=rule, k=k))
        assert not selected[1] and not selected[4]
        assert sum(selected) == min(k, 4)
        assert scores[1] == scores[4] == 0.0
        assert bool(warnings) == (k > 4)


def test_signal_rules_pick_the_top_k_by_their_signal():
    rows = rows_with_unmoved()
    for rule, signal in [("magnitude", "update_magnitude"), ("off_principal", "off_principal_normalized"),
                         ("off_principal_raw", "off_principal_energy"), ("coupling", "coupling"),
                         ("coupling_signed", "coupling_signed")]:
        _, selected, _ = apply_rule(rows, SelectionSpec(rule=rule, k=2))
        top = sorted((r for r in rows if r["norm_d"] > 0), key=lambda r: -r[signal])[:2]
        assert {r["name"] for r, s in zip(rows, selected, strict=True) if s} == {r["name"] for r in top}


def test_normalized_energy_no_longer_ranks_by_shape():
    """The issue's example at rho 0.05: a k_proj increment 3x more concentrated in the principal subspace
    than chance outranks a direction-free q_proj on the raw energy, and not on the normalized one."""
    from mast.selection import derived_signals
    from mast.signals import rank_for

    rows = []
    for name, shape, times in [("k_proj", [256, 1536], 3.0), ("q_proj", [1536, 1536], 1.0)]:
        r = rank_for(0.05, shape)
        raw = 1.0 - times * r * r / (shape[0] * shape[1])
        spectral = {"name": name, "shape": shape, "r": r, "norm_d": 1.0, "update_magnitude": 1.0,
                    "off_principal_energy": raw}
        rows.append({**spectral, "coupling": 1.0, **derived_signals(spectral, {"coupling": 1.0, "coupling_cosine": -1.0})})
    assert rows[0]["off_principal_energy"] == pytest.approx(0.99871, abs=1e-5)
    assert rows[1]["off_principal_energy"] == pytest.approx(0.99749, abs=1e-5)
    assert rows[1]["off_principal_normalized"] == pytest.approx(0.0, abs=1e-9)  # direction-free: 0
    assert rows[0]["off_principal_normalized"] == pytest.approx(-2.0)  # 3x concentrated: 1 - 3
    pick = {rule: [r["name"] for r, s in zip(rows, apply_rule(rows, SelectionSpec(rule=rule, k=1))[1]) if s]
            for rule in ("off_principal_raw", "off_principal")}
    assert pick == {"off_principal_raw": ["k_proj"], "off_principal": ["q_proj"]}
    assert rows[0]["coupling_signed"] == 1.0  # cosine < 0: the increment lowered the forget loss


def test_mast_score_is_the_weighted_mean_of_rank_percentiles():
    rows = [{"name": f"c{i}", "norm_d": 1.0, "update_magnitude": m, "off_principal_normalized": e, "coupling": c}
            for i, (m, e, c) in enumerate([(1, 3, 2), (2, 1, 3), (3, 2, 1)])]
    scores, selected, _ = apply_rule(rows, SelectionSpec(rule="mast", k=1))
    assert scores == pytest.approx([(1 + 3 + 2) / 9, (2 + 1 + 3) / 9, (3 + 2 + 1) / 9])
    # all tied: name decides (c0)
    assert selected == [True, False, False]
    spec = SelectionSpec(rule="mast", k=1, weights={"update_magnitude": 1.0, "coupling": 0.0,
                                                    "off_principal_energy": 0.0})
    scores, selected, _ = apply_rule(rows, spec)
    assert selected == [False, False, True]
    assert scores == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_random_rule_is_reproducible_by_seed():
    rows = [{"name": f"c{i:02d}", "norm_d": 1.0, "update_magnitude": 1.0, "off_principal_energy": 1.0,
             "coupling": 1.0} for i in range(40)]
    pick = {seed: apply_rule(rows, SelectionSpec(rule="random", k=5, seed=seed))[1] for seed in (0, 0, 1)}
    again = apply_rule(rows, SelectionSpec(rule="random", k=5, seed=0))[1]
    assert pick[0] == again and sum(again) == 5
    assert pick[1] != pick[0]
    expected = np.argsort(-np.random.default_rng(0).random(40), kind="stable")[:5]
    assert sorted(i for i, s in enumerate(again) if s) == sorted(expected.tolist())


@pytest.mark.parametrize("rule", ["attention", "full"])
def test_all_rules_mark_everything_and_ignore_k(rule):
    rows = rows_with_unmoved()
    _, selected, warnings = apply_rule(rows, SelectionSpec(rule=rule, k=2))
    assert all(selected) and not warnings


def test_rules_registry_is_complete():
    assert set(RULES) == {"mast", "off_principal", "off_principal_raw", "magnitude", "coupling", "coupling_signed",
                          "random", "attention", "full", "null"}


# --------------------------------------------------------------------------- inventory and streaming


def _save_config_model(cfg, out: Path, **save_kw) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out, **save_kw)
    return out


def test_inventory_finds_attention_projections_by_structure(tiny_model, tmp_path):
    from transformers import LlamaConfig

    from mast.tiny import tiny_config

    names = [n for n, _ in candidate_tensors(tiny_model)]
    assert names == [f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ATTN]
    assert dict(candidate_tensors(tiny_model))["model.layers.0.self_attn.k_proj.weight"] == (32, 64)

    qwen3 = _save_config_model(tiny_config(300, arch="qwen3"), tmp_path / "qwen3")
    assert len(candidate_tensors(qwen3)) == 8  # q_norm/k_norm are not Linear: not candidates
    llama = _save_config_model(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=4, num_key_value_heads=2), tmp_path / "llama")
    cands = candidate_tensors(llama)
    assert len(cands) == 12 and cands[-1] == ("model.layers.2.self_attn.o_proj.weight", (32, 32))

    # wider inventory for ablations; a tied lm_head appears once, under the canonical name
    wide = candidate_tensors(tiny_model, ["gate_proj", "lm_head"])
    assert [n for n, _ in wide] == ["model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.gate_proj.weight",
                                    "model.embed_tokens.weight"]
    with pytest.raises(InputError, match="no candidate tensors"):
        candidate_tensors(tiny_model, ["nope_proj"])


def test_sharded_checkpoint_streams_the_same_tensors(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    assert candidate_tensors(sharded) == candidate_tensors(tiny_model)
    store = TensorStore(sharded)
    params = dict(model.named_parameters())
    for c in inventory(sharded):
        assert torch.equal(store.get(c.key_in(store)), params[c.name].detach())


# --------------------------------------------------------------------------- select on the tiny pair

PLANTED = {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight",
           "model.layers.1.self_attn.o_proj.weight"}


@pytest.fixture(scope="module")
def forget_file(tmp_path_factory, problems) -> Path:
    path = tmp_path_factory.mktemp("forget") / "forget.jsonl"
    write_jsonl(path, problems)
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_select_signals_and_cache_hit(tiny_pair, problems, tmp_path):
    ref, tgt = tiny_pair
    first = select(ref, tgt, problems, SelectionSpec(k=2), cache_dir=tmp_path, progress=False)
    assert first["cache_hit"] == {"spectral": False, "coupling": False}
    second = select(ref, tgt, problems, SelectionSpec(k=3, rule="magnitude"), cache_dir=tmp_path, progress=False)
    assert second["cache_hit"] == {"spectral": True, "coupling": True}
    assert len(list((tmp_path / "spectral").glob("*.json"))) == 1
    for a, b in zip(first["candidates"], second["candidates"], strict=True):
        assert a["update_magnitude"] == b["update_magnitude"] and a["coupling"] == b["coupling"]
    moved = {c["name"] for c in first["candidates"] if c["moved"]}
    assert moved == PLANTED
    assert set(first["selected"]) <= PLANTED and len(first["selected"]) == 2
    assert set(second["selected"]) == PLANTED
    # the coupling is first-order: <G, D> against a finite difference of the forget loss is checked
    # in test_coupling_is_the_directional_derivative; here it is positive exactly where D moved
    for c in first["candidates"]:
        assert (c["coupling"] > 0) == (c["name"] in PLANTED)
    # rho changes the key; a different batch size does not change the coupling
    third = select(ref, tgt, problems, SelectionSpec(k=2, rho=0.5, coupling_batch_size=5), cache_dir=tmp_path,
                   progress=False)
    assert third["cache_hit"] == {"spectral": False, "coupling": True}


def test_coupling_is_the_directional_derivative(tiny_pair, problems, tmp_path):
    """|<G, D>| agrees with (L(W + eps D) - L(W - eps D)) / 2 eps at the target, L the unlearning NLL."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mast.batching import completion_logprobs, completion_nll, encode_problems, in_order, pad_id_of
    from mast.selection import coupling_stats

    ref, tgt = tiny_pair
    stats = coupling_stats(ref, tgt, problems, cache_dir=tmp_path, batch_size=5, progress=False)
    name = "model.layers.1.self_attn.o_proj.weight"
    model = AutoModelForCausalLM.from_pretrained(tgt, dtype=torch.float64)
    ref_w = TensorStore(ref).get(name, dtype=torch.float64)
    p = dict(model.named_parameters())[name]
    D = p.detach().clone() - ref_w
    tok = AutoTokenizer.from_pretrained(tgt)
    # one batch of all texts: the mean token NLL of the set, as unlearning's retain term computes it
    (batch,) = in_order(encode_problems(tok, problems, "qwen_boxed", 1024), len(problems), pad_id_of(tok))

    def loss() -> float:
        with torch.no_grad():
            s, lengths, _ = completion_logprobs(model, batch)
        return float(completion_nll(s, lengths))

    assert stats["forget_loss"] == pytest.approx(loss(), rel=1e-5)
    w0, eps = p.detach().clone(), 1e-3
    with torch.no_grad():
        p.copy_(w0 + eps * D)
    up = loss()
    with torch.no_grad():
        p.copy_(w0 - eps * D)
    down = loss()
    fd = (up - down) / (2 * eps)
    assert stats["candidates"][name]["coupling"] == pytest.approx(abs(fd), rel=1e-3)
    assert stats["candidates"][name]["coupling_cosine"] * fd > 0  # same sign


def run_cli(args: list[str]) -> int:
    return main(["select", *args])


@pytest.mark.parametrize("rule", sorted(RULES))
def test_cli_select_every_rule(rule, tiny_pair, forget_file, cache_dir, tmp_path, capsys):
    ref, tgt = tiny_pair
    out = tmp_path / "sel.json"
    rc = run_cli(["--reference", str(ref), "--target", str(tgt), "--forget", str(forget_file), "--rule", rule,
                  "--k", "2", "--seed", "3", "--cache-dir", str(cache_dir), "--out", str(out)])
    assert rc == 0
    sel = json.loads(out.read_text())
    assert sel["rule"] == rule and sel["k"] == 2 and sel["rho"] == 0.05
    assert sel["all_parameters"] is (rule == "full")
    assert len(sel["candidates"]) == 8
    for c in sel["candidates"]:
        assert set(c) >= {"name", "shape", "update_magnitude", "off_principal_energy", "coupling",
                          "coupling_cosine", "score", "selected"}
        assert isinstance(c["selected"], bool) and len(c["shape"]) == 2
    n_sel = sum(c["selected"] for c in sel["candidates"])
    assert n_sel == (8 if rule in ("attention", "full") else 0 if rule == "null" else 2)  # null: the noise floor
    if rule in ("mast", "off_principal", "magnitude", "coupling"):
        assert set(sel["selected"]) <= PLANTED
    table = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj.weight" in table and "off-prin" in table


def test_cli_spec_file_and_flags(tiny_pair, forget_file, cache_dir, tmp_path):
    ref, tgt = tiny_pair
    spec = tmp_path / "sel.yaml"
    spec.write_text("rule: magnitude\nk: 1\nweights: {update_magnitude: 2.0, coupling: 1.0}\n")
    out = tmp_path / "sel.json"
    base = ["--reference", str(ref), "--target", str(tgt), "--forget", str(forget_file), "--cache-dir",
            str(cache_dir), "--spec", str(spec), "--out", str(out)]
    assert run_cli(base) == 0
    sel = json.loads(out.read_text())
    assert (sel["rule"], sel["k"]) == ("magnitude", 1) and sel["weights"]["update_magnitude"] == 2.0
    assert run_cli([*base, "--k", "3"]) == 0  # the flag overrides the file, the rest of the file stays
    sel = json.loads(out.read_text())
    assert (sel["rule"], sel["k"]) == ("magnitude", 3)


def test_cli_bad_inputs_exit_2_with_one_line(tiny_pair, tiny_model, forget_file, tmp_path, capsys):
    from mast.tiny import build_tiny
    from tests.conftest import arithmetic_texts

    ref, tgt = tiny_pair
    out = tmp_path / "sel.json"

    def args(**over):
        a = {"--reference": str(ref), "--target": str(tgt), "--forget": str(forget_file), "--out": str(out),
             "--cache-dir": str(tmp_path / "c")}
        a.update(over)
        return [x for kv in a.items() for x in kv]

    bad_forget = tmp_path / "bad.jsonl"
    bad_forget.write_text('{"id": "a", "prompt": "1+1?"}\n')
    wide = build_tiny(tmp_path / "wide", arithmetic_texts(50), seed=0, hidden=32, heads=2, kv_heads=1)
    cases = [
        (args(**{"--reference": str(tmp_path / "nope")}), "nope"),
        (args(**{"--rule": "best"}), "rule"),
        (args(**{"--k": "0"}), "k"),
        (args(**{"--rho": "0"}), "rho"),
        (args(**{"--rho": "1.5"}), "rho"),
        (args(**{"--forget": str(bad_forget)}), "solution"),
        (args(**{"--forget": str(tmp_path / "missing.jsonl")}), "missing.jsonl"),
        (args(**{"--reference": str(wide)}), "shape"),
    ]
    for argv, needle in cases:
        capsys.readouterr()
        assert run_cli(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()


def test_spectral_stats_multi_fills_each_rho(tiny_pair, tmp_path):
    ref, tgt = tiny_pair
    multi = spectral_stats_multi(ref, tgt, [0.05, 0.25], tmp_path, progress=False)
    for rho in (0.05, 0.25):
        single = spectral_stats(ref, tgt, rho, tmp_path, progress=False)
        assert single["cache_hit"]
        assert [c["off_principal_energy"] for c in single["candidates"]] == \
            [c["off_principal_energy"] for c in multi[rho]["candidates"]]
    exact = spectral_stats(ref, tgt, 0.25, tmp_path, method="exact", progress=False)
    for a, b in zip(exact["candidates"], multi[0.25]["candidates"], strict=True):
        assert a["off_principal_energy"] == pytest.approx(b["off_principal_energy"], abs=1e-3)


@pytest.mark.slow
def test_select_on_the_toy_triple(toy_dir, tmp_path):
    """SFT as reference, RLVR as target: every rule runs end to end through the CLI."""
    toy = Path(toy_dir)
    forget = toy / "data" / "forget.jsonl"
    results = {}
    for rule in sorted(RULES):
        out = tmp_path / f"{rule}.json"
        rc = run_cli(["--reference", str(toy / "sft"), "--target", str(toy / "rlvr"), "--forget", str(forget),
                      "--rule", rule, "--k", "4", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
        assert rc == 0
        results[rule] = json.loads(out.read_text())
    mast = results["mast"]
    assert sum(c["selected"] for c in mast["candidates"]) == min(4, mast["n_moved"])
    assert all(c["moved"] for c in mast["candidates"] if c["selected"])
    assert results["full"]["all_parameters"] and all(c["selected"] for c in results["full"]["candidates"])
    assert all(0.0 <= c["off_principal_energy"] <= 1.0 for c in mast["candidates"])
