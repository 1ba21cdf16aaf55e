"""A sweep's sources, before any evaluation: the models (paths) and the problems of its splits.

- toy (``models.toy``): the triple is built (or reused) in ``models.toy.out`` or the sweep folder;
  unlearning texts are ``data/forget.jsonl`` / ``data/retain.jsonl`` (drawn from the toy's training
  problems); the ``forget`` / ``retain`` suites are the held-out ``data/forget_eval.jsonl`` /
  ``data/retain_eval.jsonl``: forgetting is measured on problems of the forgotten skill the
  unlearning never saw (capability removal, not memorisation). Its validation sets
  ``data/*_val.jsonl`` are disjoint from everything else.
- MATH (``models.reference/target``): the forget split (``data.forget_size`` problems of the
  MATH pool = MATH minus MATH-500) is both what is unlearned and the ``forget`` suite (the
  paper's 45/150 -> 37/150 is measured on the forget set itself); the ``retain`` suite is a
  disjoint draw (``data.retain_size``); the unlearning retain loss uses a third disjoint draw
  (``data.retain_train_size``), so the retain suite is scored on problems no stage trained on;
  ``data.retain_val_size`` > 0 adds a retain-validation draw.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from mast.config import SweepSpec
from mast.data import build_splits, load_math_pool
from mast.files import log, read_jsonl
from mast.grid import OWN_SUITES, VAL_SUITES
from mast.hub import resolve_model as hub_resolve_model
from mast.layout import REPO_ROOT, SweepDir
from mast.toy import build_toy

OWN_TEMPLATE = "qwen_boxed"  # the prompt of the sweep's own splits unless evaluation.template says otherwise


@dataclasses.dataclass
class Sources:
    """Models and split problems of a sweep, before any evaluation."""

    kind: str  # "toy" | "math"
    reference: str
    target: str
    base: str | None
    forget_texts: list[dict]
    retain_texts: list[dict]
    own: dict[str, list[dict]]  # forget/retain suite problems (and the validation splits there are)
    own_template: str
    own_yaml: dict[str, Path]  # where forget/retain (and validation) suite settings come from
    toy_dir: str | None = None


def resolve_model(name: str | os.PathLike, field: str) -> str:
    """A local checkpoint folder (absolute) or a Hub id resolved to its local snapshot (:mod:`mast.hub`).

    On a cluster put HF_HOME on shared storage so the snapshot path is valid on every node.
    """
    return hub_resolve_model(name, f"models.{field}")


def toy_dir_of(spec: SweepSpec, sd: SweepDir) -> Path:
    """Where the toy triple is built (or reused): ``models.toy.out``, else inside the sweep folder."""
    return Path(spec.models.toy.out).expanduser().resolve() if spec.models.toy.out else sd.default_toy


def own_suite_yamls(toy_dir: Path | None) -> dict[str, Path]:
    """Where the settings of the sweep's own suites come from: the toy's ``suites/<name>.yaml``, or
    ``eval/math_<name>.yaml`` (the MATH retain-validation draw is scored like the retain suite)."""
    if toy_dir is not None:
        return {n: toy_dir / "suites" / f"{n}.yaml" for n in OWN_SUITES + VAL_SUITES}
    yamls = {n: REPO_ROOT / "eval" / f"math_{n}.yaml" for n in OWN_SUITES}
    return {**yamls, "retain_val": yamls["retain"]}


def sources(spec: SweepSpec, sd: SweepDir, data_dir: str | None) -> Sources:
    """Models (paths) and the problems of the splits (the toy's files, or draws from the MATH pool)."""
    return toy_sources(spec, sd) if spec.models.toy is not None else math_sources(spec, data_dir)


def toy_sources(spec: SweepSpec, sd: SweepDir) -> Sources:
    """The toy triple (built if missing) and its data files."""
    toy_dir = toy_dir_of(spec, sd)
    log(f"toy models: {toy_dir} (seed {spec.models.toy.seed}; built if missing)")
    t0 = time.time()
    build_toy(toy_dir, seed=spec.models.toy.seed)
    log(f"toy ready in {time.time() - t0:.0f}s")
    data = toy_dir / "data"
    full = ("id", "prompt", "solution", "answer")
    forget = read_jsonl(data / "forget.jsonl", required=full)
    retain = read_jsonl(data / "retain.jsonl", required=full)
    own = {"forget": read_jsonl(data / "forget_eval.jsonl", required=("id", "prompt", "answer")),
           "retain": read_jsonl(data / "retain_eval.jsonl", required=("id", "prompt", "answer"))}
    for n in VAL_SUITES:  # the toy's validation sets (format >= 3), disjoint from everything else
        if (data / f"{n}.jsonl").is_file():
            own[n] = read_jsonl(data / f"{n}.jsonl", required=("id", "prompt", "answer"))
    return Sources(kind="toy", toy_dir=str(toy_dir), reference=str(toy_dir / "sft"),
                   target=str(toy_dir / "rlvr"), base=str(toy_dir / "base"),
                   forget_texts=forget[: spec.data.forget_size], retain_texts=retain[: spec.data.retain_size],
                   own=own, own_template=OWN_TEMPLATE, own_yaml=own_suite_yamls(toy_dir))


def math_sources(spec: SweepSpec, data_dir: str | None) -> Sources:
    """The given models and the seeded draws from the MATH pool."""
    reference = resolve_model(spec.models.reference, "reference")
    target = resolve_model(spec.models.target, "target")
    base = resolve_model(spec.models.base, "base") if spec.models.base else None
    pool = load_math_pool(data_dir)
    d = spec.data
    n_forget = d.forget_size * (4 if d.require_target_correct else 1)
    forget, retain_all, *val = build_splits(pool, n_forget, d.retain_size + d.retain_train_size, d.split_seed,
                                            levels=d.levels, subjects=d.subjects, n_retain_val=d.retain_val_size)
    retain, retain_train = retain_all[: d.retain_size], retain_all[d.retain_size:]
    own = {"forget": forget, "retain": retain}
    if val:  # data.retain_val_size > 0: the MATH retain-validation draw (scored like the retain suite)
        own["retain_val"] = val[0]
    return Sources(kind="math", reference=reference, target=target, base=base, forget_texts=forget,
                   retain_texts=retain_train, own=own, own_template=OWN_TEMPLATE, own_yaml=own_suite_yamls(None))
