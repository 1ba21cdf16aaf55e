"""A sweep's evaluation suites, resolved to typed settings and problems.

- ``forget`` / ``retain`` score the sweep's own splits (:mod:`mast.sources`); their settings
  come from the toy's ``suites/<name>.yaml`` or ``eval/math_<name>.yaml`` (else defaults).
- any other suite name is a suite YAML (a path, or ``eval/<name>.yaml``); one with
  ``split_role`` scores a split too (named by its role).
- validation suites (``evaluation.validation``: ``forget_val`` / ``retain_val``; the toy's
  ``data/*_val.jsonl``, MATH's ``data.retain_val_size`` draw) are evaluated on the target and by
  every trial, for choices only (:mod:`mast.matched`), never reported.
- ``unlearning.stop``'s check scores forget_val (toy) or the forget problems themselves (MATH):
  the ``stop`` suite (:func:`stop_suite`).

Every suite carries the sweep's overrides (``evaluation.template``, ``evaluation.decoding``,
``evaluation.limits``) as typed values: the settings are copied, never dumped and re-validated.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mast.config import SuiteSpec, SweepSpec, load_suite
from mast.evaluation import load_suite_problems
from mast.files import InputError
from mast.grid import OWN_SUITES, ordered_suites, suite_name
from mast.layout import REPO_ROOT
from mast.sources import Sources


@dataclasses.dataclass
class Suite:
    spec: SuiteSpec
    problems: list[dict]


def with_overrides(suite: SuiteSpec, name: str, spec: SweepSpec) -> SuiteSpec:
    """`suite` named `name`, with the sweep's template, decoding and problem limit where it sets them."""
    ev = spec.evaluation
    update: dict = {"name": name}
    if ev.template:
        update["template"] = ev.template
    if ev.decoding is not None:
        update["decoding"] = ev.decoding.model_copy()  # its own copy: suites never share a mutable spec
    if name in ev.limits:
        update["limit"] = ev.limits[name]
    return suite.model_copy(update=update)


def find_suite_yaml(entry: str, spec_dir: Path | None, toy_dir: Path | None) -> Path | None:
    """The suite file of an ``evaluation.suites`` entry: a path (absolute, or relative to the spec's
    folder, the CWD or the repository), else ``eval/<name>.yaml`` (CWD, repository) or the toy's suite."""
    name = suite_name(entry)
    cands: list[Path] = []
    if entry.endswith((".yaml", ".yml")):
        cands += [Path(entry)] if Path(entry).is_absolute() else (
            ([spec_dir / entry] if spec_dir else []) + [Path.cwd() / entry, REPO_ROOT / entry])
    else:
        cands += [Path.cwd() / "eval" / f"{name}.yaml", REPO_ROOT / "eval" / f"{name}.yaml"]
        if toy_dir:
            cands.append(toy_dir / "suites" / f"{name}.yaml")
    return next((c for c in cands if c.is_file()), None)


def suite_entry(entry: str, spec: SweepSpec, own_yaml: dict[str, Path], own_template: str,
                spec_dir: Path | None, toy_dir: Path | None) -> tuple[str, str | None, SuiteSpec]:
    """(name, split role or None, settings with the sweep's overrides) of one evaluation.suites entry."""
    name = suite_name(entry)
    if name in OWN_SUITES and not entry.endswith((".yaml", ".yml")):
        yaml_path = own_yaml.get(name)
        if yaml_path and Path(yaml_path).is_file():
            suite = load_suite(yaml_path)
        else:
            suite = SuiteSpec(name=name, benchmark="jsonl", split_role=name, grader="math", template=own_template)
        return name, name, with_overrides(suite, name, spec)
    path = find_suite_yaml(entry, spec_dir, toy_dir)
    if path is None:
        raise InputError(f"evaluation.suites: unknown suite {entry!r} (not forget/retain, not a suite "
                         f"file, not in eval/)")
    suite = load_suite(path)
    role = suite.split_role
    name = role or name
    return name, role, with_overrides(suite, name, spec)


def resolve_suites(spec: SweepSpec, src: Sources, spec_dir: Path | None, data_dir: str | None) -> dict[str, Suite]:
    """Every evaluation suite with its problems, in run order.

    `forget` / `retain` score the sweep's own splits: their settings come from the toy's
    ``suites/<name>.yaml`` or ``eval/math_<name>.yaml`` (else defaults), their problems from
    the sweep. A suite YAML with ``split_role`` is one of them too (named by its role).
    """
    toy_dir = Path(src.toy_dir) if src.toy_dir else None
    out: dict[str, Suite] = {}
    for entry in ordered_suites(spec):
        name, role, suite = suite_entry(entry, spec, src.own_yaml, src.own_template, spec_dir, toy_dir)
        if name in out:
            raise InputError(f"evaluation.suites: two suites are named {name!r}")
        if role:
            problems = src.own[role]
            problems = problems[: suite.limit] if suite.limit else problems
        else:
            problems = load_suite_problems(suite, data_dir)
        out[name] = Suite(suite, problems)
    return out


def own_suite(src: Sources, name: str, spec: SweepSpec) -> SuiteSpec:
    """The settings of one of the sweep's own (or validation) suites, without a probe: the toy's
    ``suites/<name>.yaml`` or ``eval/math_*.yaml`` (else defaults), with the sweep's overrides."""
    yaml_path = src.own_yaml.get(name)
    if yaml_path and Path(yaml_path).is_file():
        suite = load_suite(yaml_path)
    else:
        suite = SuiteSpec(name=name, benchmark="jsonl", split_role="forget" if name.startswith("forget") else "retain",
                          grader="math", template=src.own_template)
    return with_overrides(suite, name, spec).model_copy(update={"probe": None, "limit": None})


def resolve_validation(spec: SweepSpec, src: Sources) -> dict[str, Suite]:
    """The validation suites of ``evaluation.validation`` (forget_val, retain_val) with their problems.

    They exist for choices (the matched-forgetting level, lr/steps): disjoint from the reported
    suites, scored by every trial, never reported as results. The toy has both; MATH has
    ``retain_val`` with ``data.retain_val_size`` > 0 (its forget set is both trained on and
    evaluated, as in the paper, so it has no forget_val).
    """
    out: dict[str, Suite] = {}
    for name in spec.evaluation.validation:
        if name not in src.own:
            how = ("set data.retain_val_size > 0" if name == "retain_val" and src.kind == "math"
                   else "the MATH forget set is trained on and evaluated itself" if src.kind == "math"
                   else "rebuild the toy (format >= 3 writes validation sets)")
            raise InputError(f"evaluation.validation: no {name!r} problems for this sweep ({how})")
        out[name] = Suite(own_suite(src, name, spec), spec.evaluation.limited(src.own[name], name))
    return out


def stop_suite(spec: SweepSpec, src: Sources) -> Suite | None:
    """What ``unlearning.stop``'s check scores: the forget-VALIDATION problems (toy), else the forget
    problems themselves (MATH, where forgetting those exact problems is the goal); None without stop."""
    if spec.unlearning.stop is None and not any(spec.grid.get("stop") or []):
        return None
    if "forget_val" in src.own:
        return Suite(own_suite(src, "forget_val", spec).model_copy(update={"name": "stop"}),
                     spec.evaluation.limited(src.own["forget_val"], "forget_val"))
    return Suite(own_suite(src, "forget", spec).model_copy(update={"name": "stop"}), src.forget_texts)
