"""Grid expansion, trial ids, the spec hash, the MLflow params of a trial, the shipped specs."""

from __future__ import annotations

from pathlib import Path

import pytest
from builders import sweep_spec

from mast.config import SweepSpec, load_yaml
from mast.files import InputError
from mast.grid import check_spec, expand_grid, spec_hash, trial_id, trial_params

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- grid expansion


def test_grid_is_cartesian_and_drops_k_for_full():
    spec = sweep_spec(grid={"rule": ["mast", "random", "full"], "objective": ["npo", "simnpo"], "k": [2, 4],
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
    without = expand_grid(sweep_spec(grid=spec.grid, evaluation={"noise_floor": False}))
    assert [t.trial_id for t in without.trials] == ids[:-3]


def test_null_rule_is_one_trial_per_seed_whatever_the_other_axes():
    """The noise floor: `null` ignores objective, k and unlearning fields (only the seed matters)."""
    spec = sweep_spec(grid={"rule": ["null", "mast"], "objective": ["npo", "simnpo"], "k": [2, 4], "lr": [1e-5, 1e-4],
                       "seed": [0, 1]})
    nulls = [t for t in expand_grid(spec).trials if t.config["rule"] == "null"]
    assert [(t.trial_id, t.config) for t in nulls] == [("null-s0", {"rule": "null", "seed": 0}),
                                                       ("null-s1", {"rule": "null", "seed": 1})]
    assert all(t.selection.rule == "null" and t.selection.seed == t.unlearning.seed for t in nulls)
    assert trial_params(nulls[1]) == {"rule": "null", "seed": 1}


def test_grid_point_overrides_specs_and_seed_sets_both():
    spec = sweep_spec(grid={"rule": ["random"], "seed": [7], "lr": [3e-4]}, selection={"k": 3},
                 unlearning={"steps": 5, "objective": "simnpo"})
    t, null = expand_grid(spec).trials
    assert null.trial_id == "null-s7" and null.unlearning.seed == 7
    assert t.selection.rule == "random" and t.selection.seed == 7 and t.selection.k == 3
    assert t.unlearning.seed == 7 and t.unlearning.lr == 3e-4 and t.unlearning.steps == 5
    assert t.config == {"rule": "random", "objective": "simnpo", "k": 3, "seed": 7, "lr": 3e-4}
    assert t.trial_id == "random-simnpo-k3-s7-lr0.0003"


def test_rho_only_varies_for_rules_that_use_it():
    spec = sweep_spec(grid={"rule": ["mast", "magnitude"], "rho": [0.05, 0.1]})
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
    g = expand_grid(sweep_spec(grid={"rule": ["mast"], "k": [2, 2]}))
    assert [t.trial_id for t in g.trials] == ["mast-npo-k2-s0", "null-s0"] and g.dropped == ["duplicate of mast-npo-k2-s0"]


def test_bad_grid_values_name_the_point():
    with pytest.raises(InputError, match=r"spec.yaml: grid point mast-npo-k0-s0: k: .*greater than 0"):
        expand_grid(sweep_spec(grid={"rule": ["mast"], "k": [0]}), "spec.yaml")
    with pytest.raises(InputError, match=r"grid: unknown grid field 'kk'"):
        sweep_spec(grid={"kk": [1]})


def test_spec_hash_ignores_where_not_what():
    a = sweep_spec(output_dir="/a", data={"data_dir": "/x"})
    b = sweep_spec(output_dir="/b", data={"data_dir": "/y"})
    assert spec_hash(a) == spec_hash(b) != spec_hash(sweep_spec(grid={"rule": ["full"]}))


# --------------------------------------------------------------------------- MLflow params of a trial


def test_trial_params_are_the_resolved_config_without_ignored_fields():
    spec = sweep_spec(grid={"rule": ["mast", "random", "full"], "objective": ["npo", "ga"], "k": [4]},
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
    assert trial_params(expand_grid(sweep_spec(unlearning={"objective": "simnpo", "beta": 3.0})).trials[0])["beta"] == 3.0


# --------------------------------------------------------------------------- the sweep folder


# --------------------------------------------------------------------------- shipped specs


@pytest.mark.parametrize("name", ["demo", "paper", "qwen3"])
def test_shipped_specs_load_and_expand(name):
    spec = load_yaml(ROOT / "sweeps" / f"{name}.yaml", SweepSpec)
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
