"""Sweeps: grid expansion, trial ids, spec errors (fast); real Ray + MLflow sweeps on the toy (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mast.cli import main
from mast.config import SweepSpec, load_yaml, validate
from mast.files import InputError
from mast.sweep import expand_grid, spec_hash, trial_id

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
    # full ignores k: one k kept -> 2 objectives x 3 seeds; mast & random: 2 x 2 x 3 each
    assert len(g.trials) == 12 + 12 + 6 and len(g.dropped) == 6
    ids = [t.trial_id for t in g.trials]
    assert len(set(ids)) == len(ids)
    assert "mast-npo-k2-s0" in ids and "full-simnpo-s2" in ids and not any(i.startswith("full-npo-k") for i in ids)
    assert "dropped" in g.summary() and "30 trial(s)" in g.summary()


def test_grid_point_overrides_specs_and_seed_sets_both():
    spec = _spec(grid={"rule": ["random"], "seed": [7], "lr": [3e-4]}, selection={"k": 3},
                 unlearning={"steps": 5, "objective": "simnpo"})
    (t,) = expand_grid(spec).trials
    assert t.selection["rule"] == "random" and t.selection["seed"] == 7 and t.selection["k"] == 3
    assert t.unlearning["seed"] == 7 and t.unlearning["lr"] == 3e-4 and t.unlearning["steps"] == 5
    assert t.config == {"rule": "random", "objective": "simnpo", "k": 3, "seed": 7, "lr": 3e-4}
    assert t.trial_id == "random-simnpo-k3-s7-lr0.0003"


def test_rho_only_varies_for_rules_that_use_it():
    spec = _spec(grid={"rule": ["mast", "magnitude"], "rho": [0.05, 0.1]})
    ids = [t.trial_id for t in expand_grid(spec).trials]
    assert ids == ["mast-npo-k8-s0-rho0.05", "mast-npo-k8-s0-rho0.1", "magnitude-npo-k8-s0-rho0.05"]


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
    assert [t.trial_id for t in g.trials] == ["mast-npo-k2-s0"] and g.dropped == ["duplicate of mast-npo-k2-s0"]


def test_bad_grid_values_name_the_point():
    with pytest.raises(InputError, match=r"spec.yaml: grid point mast-npo-k0-s0: k: .*greater than 0"):
        expand_grid(_spec(grid={"rule": ["mast"], "k": [0]}), "spec.yaml")
    with pytest.raises(InputError, match=r"grid: unknown grid field 'kk'"):
        _spec(grid={"kk": [1]})


def test_spec_hash_ignores_where_not_what():
    a = _spec(output_dir="/a", data={"data_dir": "/x"})
    b = _spec(output_dir="/b", data={"data_dir": "/y"})
    assert spec_hash(a) == spec_hash(b) != spec_hash(_spec(grid={"rule": ["full"]}))


# --------------------------------------------------------------------------- shipped specs


@pytest.mark.parametrize("name", ["demo", "paper", "qwen3"])
def test_shipped_specs_load_and_expand(name):
    spec = load_yaml(ROOT / "sweeps" / f"{name}.yaml", SweepSpec)
    from mast.sweep import check_spec

    check_spec(spec, name)
    g = expand_grid(spec, name)
    assert g.trials and len({t.trial_id for t in g.trials}) == len(g.trials)
    if name == "demo":
        assert {t.config["rule"] for t in g.trials} == {"mast", "random", "full"}
        assert {t.config["objective"] for t in g.trials} == {"npo", "simnpo"}
        assert len({t.config["seed"] for t in g.trials}) == 3
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
