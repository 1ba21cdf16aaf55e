"""A sweep's grid (pure): expansion into trials, deterministic trial ids, cross-field checks,
the spec hash a resume must match, and the MLflow params of a trial.

The grid points are validated here, once, into typed :class:`~mast.config.SelectionSpec` /
:class:`~mast.config.UnlearnSpec` objects that travel unchanged to the trial.
Which rules ignore ``k`` / ``rho`` comes from :mod:`mast.registry`.

The noise floor: the ``null`` rule (no weight change) is expanded once per seed whatever the
other axes (its config is only ``{rule, seed}``, id ``null-s{seed}``), and with
``evaluation.noise_floor`` (default true) one null trial per seed of the grid is appended to
every sweep, so each seed's results have their own null beside them.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path
from typing import Any

from mast.config import SelectionSpec, SweepSpec, UnlearnSpec, validate
from mast.files import InputError, stable_hash
from mast.registry import NULL_RULE, NULL_RULES, OBJECTIVE_FACTS, RHO_RULES, RULE_FACTS, uses_k
from mast.resources import vllm_cpu_build

OWN_SUITES = ("forget", "retain")  # the sweep's own splits
VAL_SUITES = ("forget_val", "retain_val")  # their validation splits: choices only, never reported
ID_KEYS = ("rule", "objective", "k", "seed")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclasses.dataclass(frozen=True)
class Trial:
    """One grid point: its id, the grid values (`config`, as trials.jsonl records them) and the
    validated specs it runs with."""

    trial_id: str
    config: dict
    selection: SelectionSpec
    unlearning: UnlearnSpec

    def specs_json(self) -> dict:
        """The trial's config.json: id, grid values and both full specs."""
        return {"trial_id": self.trial_id, "config": self.config,
                "selection": self.selection.model_dump(mode="json"),
                "unlearning": self.unlearning.model_dump(mode="json")}


@dataclasses.dataclass
class Grid:
    trials: list[Trial]
    n_points: int  # size of the cartesian product
    dropped: list[str]  # why each dropped point went

    def summary(self) -> str:
        n_null = sum(t.config["rule"] in NULL_RULES for t in self.trials)
        return (f"grid: {self.n_points} point(s) -> {len(self.trials)} trial(s) ({n_null} null: the noise floor), "
                f"{len(self.dropped)} dropped (rules that ignore k/rho, duplicates)")

    def by_id(self) -> dict[str, Trial]:
        return {t.trial_id: t for t in self.trials}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}".replace("e+", "e")
    return str(v)


def trial_id(config: dict) -> str:
    """Deterministic, readable id: ``{rule}-{objective}-k{k}-s{seed}`` (no k for rules without k).

    Other grid fields are appended as ``-{field}{value}`` when short and filename-safe, else
    as an 8-hex hash of them, so the same grid point always gets the same id. A null trial
    (no weight change) is ``null-s{seed}``.
    """
    rule = config["rule"]
    if rule in NULL_RULES:
        return f"{rule}-s{config['seed']}"
    parts = [str(rule), str(config["objective"])]
    if uses_k(rule):
        parts.append(f"k{config['k']}")
    parts.append(f"s{config['seed']}")
    extra = {k: v for k, v in sorted(config.items()) if k not in ID_KEYS}
    if extra:
        text = "-".join(f"{k}{_fmt(v)}" for k, v in extra.items())
        parts.append(text if len(text) <= 40 and re.fullmatch(r"[A-Za-z0-9._-]+", text) else stable_hash(extra)[:8])
    return "-".join(parts)


def expand_grid(spec: SweepSpec, source: str = "spec") -> Grid:
    """Cartesian product of ``spec.grid``; each point overrides selection/unlearning fields.

    ``seed`` sets the unlearning seed and the random rule's seed. ``k`` is meaningless for
    rules without k (one k kept) and ``rho`` for rules without rho (one rho kept): those
    points are dropped, as are exact duplicates.
    """
    keys = list(spec.grid)
    base_sel = spec.selection.model_dump()
    base_unl = spec.unlearning.model_dump()
    first = {k: spec.grid[k][0] for k in keys}
    trials: list[Trial] = []
    seen: set[str] = set()
    dropped: list[str] = []
    n_points = 0
    for combo in itertools.product(*(spec.grid[k] for k in keys)):
        n_points += 1
        point = dict(zip(keys, combo))
        sel, unl = dict(base_sel), dict(base_unl)
        for k, v in point.items():
            if k in ("rule", "k", "rho"):
                sel[k] = v
            elif k == "seed":
                sel["seed"] = v
                unl["seed"] = v
            else:
                unl[k] = v
        rule = sel["rule"]
        config = {"rule": rule, "objective": unl["objective"], "k": sel["k"], "seed": unl["seed"]}
        config.update({k: v for k, v in point.items() if k not in config})
        if rule in NULL_RULES:  # no weight change: only the seed matters
            config = {"rule": rule, "seed": unl["seed"]}
        if not uses_k(rule) and "k" in point and point["k"] != first["k"]:
            dropped.append(f"{rule} ignores k (k={point['k']})")
            continue
        if rule not in RHO_RULES and "rho" in point and point["rho"] != first["rho"]:
            dropped.append(f"{rule} ignores rho (rho={point['rho']})")
            continue
        tid = trial_id(config)
        where = f"{source}: grid point {tid}"
        sel_spec = validate(SelectionSpec, sel, where)
        unl_spec = validate(UnlearnSpec, unl, where)
        if tid in seen:
            dropped.append(f"duplicate of {tid}")
            continue
        seen.add(tid)
        trials.append(Trial(tid, json.loads(json.dumps(config)), sel_spec, unl_spec))
    if spec.evaluation.noise_floor:
        trials += [t for t in null_trials(spec, source) if t.trial_id not in seen]
    return Grid(trials, n_points, dropped)


def null_trials(spec: SweepSpec, source: str = "spec") -> list[Trial]:
    """One `null` trial per seed of the grid (else the unlearning seed): the noise floor."""
    out = []
    for seed in dict.fromkeys(spec.grid.get("seed", [spec.unlearning.seed])):
        config = {"rule": NULL_RULE, "seed": seed}
        tid = trial_id(config)
        sel = validate(SelectionSpec, {**spec.selection.model_dump(), "rule": NULL_RULE, "seed": seed},
                       f"{source}: {tid}")
        unl = validate(UnlearnSpec, {**spec.unlearning.model_dump(), "seed": seed}, f"{source}: {tid}")
        out.append(Trial(tid, json.loads(json.dumps(config)), sel, unl))
    return out


def trial_params(trial: Trial) -> dict[str, Any]:
    """MLflow params of a trial: the full resolved config that determines it, not only the grid axes.

    Unlearning fields by their own names (``beta`` is the effective one; none for objectives
    without β), the rule, and ``k`` / ``rho`` only for rules that use them (registry facts);
    the selection's other settings as ``selection.<field>``.
    """
    sel, unl = trial.selection, trial.unlearning
    facts = RULE_FACTS[sel.rule]
    if not facts.changes_weights:  # null: nothing is selected nor trained
        return {"rule": sel.rule, "seed": unl.seed}
    params: dict[str, Any] = {"rule": sel.rule}
    if uses_k(sel.rule):
        params["k"] = sel.k
    if facts.uses_rho:
        params["rho"] = sel.rho
    u = unl.model_dump(mode="json")
    u.pop("beta")
    params.update(u)
    if OBJECTIVE_FACTS[unl.objective].default_beta is not None:
        params["beta"] = unl.effective_beta
    s = sel.model_dump(mode="json")
    for key in ("rule", "k", "rho"):
        s.pop(key)
    params.update({f"selection.{k}": v for k, v in s.items()})
    return params


def suite_name(entry: str) -> str:
    """`forget` -> forget; `eval/gsm8k.yaml` -> gsm8k."""
    return Path(entry).stem if entry.endswith((".yaml", ".yml")) else entry


def ordered_suites(spec: SweepSpec) -> list[str]:
    """Suite entries, the scheduler's metric suite (forget by default) first."""
    entries = list(spec.evaluation.suites)
    first = spec.scheduler.metric.split("/", 1)[0]
    return sorted(entries, key=lambda e: suite_name(e) != first)


def check_spec(spec: SweepSpec, source: str = "spec") -> None:
    """Cross-field checks the pydantic model cannot do alone (one InputError line each)."""
    if not _NAME_RE.match(spec.name):
        raise InputError(f"{source}: name: {spec.name!r} must be letters, digits, '.', '_' or '-'")
    if not spec.evaluation.suites:
        raise InputError(f"{source}: evaluation.suites: at least one suite is needed")
    names = [suite_name(s) for s in spec.evaluation.suites]
    if len(set(names)) != len(names):
        raise InputError(f"{source}: evaluation.suites: duplicate suite names {names}")
    unknown = sorted(set(spec.evaluation.limits) - set(names) - set(VAL_SUITES))
    if unknown:
        raise InputError(f"{source}: evaluation.limits: {unknown[0]!r} is not one of the suites {names} "
                         f"nor a validation suite {list(VAL_SUITES)}")
    if spec.scheduler.kind == "asha":
        suite = spec.scheduler.metric.split("/", 1)[0]
        if suite not in names or "/" not in spec.scheduler.metric:
            raise InputError(f"{source}: scheduler.metric: {spec.scheduler.metric!r} must be '<suite>/<metric>' "
                             f"with a suite of evaluation.suites {names}")
    val = spec.evaluation.validation
    if spec.models.toy is None and "forget_val" in val:
        raise InputError(f"{source}: evaluation.validation: MATH sweeps have no forget_val (the forget set is "
                         "trained on and evaluated itself); use retain_val")
    if spec.models.toy is None and "retain_val" in val and spec.data.retain_val_size == 0:
        raise InputError(f"{source}: evaluation.validation: retain_val needs data.retain_val_size > 0")
    if spec.evaluation.backend == "vllm" and spec.resources.gpu <= 0 and not vllm_cpu_build():
        # vLLM's CPU build (vllm-cpu, docs/vllm.md) evaluates on the trial's CPUs: no GPU needed
        raise InputError(f"{source}: resources.gpu: the vllm backend needs a GPU per trial (gpu > 0)")


def spec_hash(spec: SweepSpec) -> str:
    """What a resume must match: the spec minus where it writes and where data is read from."""
    d = spec.model_dump(mode="json")
    d.pop("output_dir", None)
    d["data"].pop("data_dir", None)
    return stable_hash(d)


def grid_rhos(spec: SweepSpec) -> list[float]:
    """Every rho the grid's trials select with (the spectra prepare computes once)."""
    return sorted({float(r) for r in spec.grid.get("rho", [spec.selection.rho])})


def needs_generated_texts(spec: SweepSpec) -> bool:
    """Some trial unlearns on the target's own generations (``texts: generated``)."""
    return spec.unlearning.texts == "generated" or "generated" in spec.grid.get("texts", [])
