"""Matched forgetting (pure): compare rules where they forget equally, not at equal lr and steps.

Full-parameter unlearning moves every weight and forgets far more than top-k at the same lr and
steps, so a worse retain score for ``full`` is expected whatever the selection does. The
report therefore reads every rule at the SAME forgetting level, chosen on VALIDATION suites and
read on the TEST suites:

- a *curve* is one rule's trials that differ only in the matching axis (``lr`` and/or ``steps``
  in the grid; without such an axis a curve is one trial), keyed by (objective, rule, k, seed
  and any other grid field);
- ``unlearning.stop`` (each trial stops when its forget-validation criterion is met): the
  curve's matched point is its first trial (smallest lr/steps) that reached the target;
  ``reached = False`` when none did within the cap (its largest-axis trial is read then:
  reported, never hidden);
- an lr/steps axis without stop: the level L is ``evaluation.matched_level`` (a forget_val
  accuracy) or, unset, the strongest forgetting every curve reaches on validation
  (max over curves of the curve's min forget_val accuracy); the matched point is the curve's
  first trial with forget_val accuracy <= L. No interpolation: the reading is a real trial's
  per-problem test results, so the paired tests below stay exact;
- per retain suite (every reported suite but ``forget``; never a validation suite): the change vs the target with its
  Newcombe interval and a TOST against ``evaluation.equivalence_margin``
  (:func:`mast.equivalence.retention_summary`): "preserved" only when equivalence holds, else
  "not shown"; and ``p_vs_full``: exact McNemar between the rule's and ``full``'s matched
  unlearned models (same objective, seed and other fields) on the same problems, Holm-adjusted
  over the family (every rule x retain suite x condition).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

from mast.equivalence import retention_summary
from mast.registry import NULL_RULES, uses_k
from mast.stats import holm, mcnemar_test

AXES = ("lr", "steps")  # grid fields a forgetting curve runs along
FORGET = "forget"
FORGET_VAL = "forget_val"
FULL = "full"
NOT_RETAIN = (FORGET, FORGET_VAL, "retain_val")  # the forget suite and validation suites are never retain readings
RecordsFn = Callable[[str, str], "list[dict] | None"]  # (trial_id, suite) -> per-problem records (None: absent)


def axis_keys(trials: Sequence[dict]) -> list[str]:
    """The grid fields among :data:`AXES` that vary between the trials."""
    return [a for a in AXES if len({repr((t.get("config") or {}).get(a)) for t in trials}) > 1]


def curve_key(config: dict, axes: Sequence[str]) -> tuple:
    """A curve: the trial's config without the axis fields (k dropped for k-free rules)."""
    c = {k: v for k, v in config.items() if k not in axes}
    if not uses_k(c.get("rule")):
        c.pop("k", None)
    return tuple(sorted((k, repr(v)) for k, v in c.items()))


def validation_forget(trial: dict) -> float | None:
    """The forget-validation accuracy of a trial: the last stop check when it measured accuracy
    (the stop history's values then ARE forget_val accuracies), else its forget_val suite."""
    v = (trial.get("validation") or {}).get(FORGET_VAL)
    if v is not None:
        return float(v["acc_after"])
    hist = trial.get("stop_history") or []
    if hist and trial.get("stop_metric") == "forget_val_accuracy":
        return float(hist[-1]["value"])
    return None


def _axis_order(trial: dict, axes: Sequence[str]) -> tuple:
    return tuple(float((trial.get("config") or {}).get(a) or 0) for a in axes)


def curves(trials: Sequence[dict]) -> tuple[list[str], dict[tuple, list[dict]]]:
    """(axis fields, curve key -> its ok unlearned trials sorted along the axis)."""
    ok = [t for t in trials if t.get("status") == "ok" and (t.get("config") or {}).get("rule") not in NULL_RULES]
    axes = axis_keys(ok)
    out: dict[tuple, list[dict]] = {}
    for t in ok:
        out.setdefault(curve_key(t["config"], axes), []).append(t)
    for v in out.values():
        v.sort(key=lambda t: _axis_order(t, axes))
    return axes, out


def matched_level(groups: dict[tuple, list[dict]], level: float | None = None) -> float | None:
    """The forget_val level to match: `level` when given, else the strongest forgetting every curve
    reaches (max over curves of its min forget_val accuracy); None without validation values."""
    if level is not None:
        return float(level)
    mins = []
    for ts in groups.values():
        vals = [v for v in (validation_forget(t) for t in ts) if v is not None]
        if not vals:
            return None
        mins.append(min(vals))
    return max(mins) if mins else None


def matched_point(curve: Sequence[dict], level: float | None) -> tuple[dict, bool | None]:
    """(the curve's trial read at matched forgetting, reached?) -- rules in the module docstring."""
    if any(t.get("stop_reached") is not None for t in curve):
        hit = [t for t in curve if t.get("stop_reached")]
        return (hit[0], True) if hit else (curve[-1], False)
    if level is None:
        return curve[-1], None
    scored = [(t, validation_forget(t)) for t in curve]
    hit = [t for t, v in scored if v is not None and v <= level + 1e-12]
    if hit:
        return hit[0], True
    best = min(scored, key=lambda tv: float("inf") if tv[1] is None else tv[1])
    return best[0], False


def _drop(trial: dict, suite: str) -> float | None:
    m = (trial.get("suites") or {}).get(suite)
    return -float(m["delta"]) if m else None


def _steps(trial: dict) -> int | None:
    if trial.get("steps_run") is not None:
        return int(trial["steps_run"])
    s = (trial.get("config") or {}).get("steps")
    return int(s) if s is not None else None


def matched_rows(trials: Sequence[dict], records: RecordsFn, margin: float, level: float | None = None,
                 alpha: float = 0.05, confidence: float = 0.95) -> dict:
    """report.json ``matched_forgetting``: ``{"mode", "axes", "level", "margin", "rows": [...]}``.

    One row per curve: objective, k (None for k-free rules), rule, seed, trial_id, steps, the axis
    values, reached, val_forget, forget_drop and retain_drop (test; drop = before - after),
    per retain suite ``retain[suite]`` (retention_summary + drop, p_vs_full raw and Holm) and
    ``p_vs_full`` (Holm-adjusted, on ``retain`` or the first retain suite; None for full or
    without a full trial to compare with).
    """
    axes, groups = curves(trials)
    stop_mode = any(t.get("stop_reached") is not None for ts in groups.values() for t in ts)
    lvl = None if stop_mode else matched_level(groups, level)
    chosen = {key: matched_point(ts, lvl) for key, ts in groups.items()}
    suites = sorted({s for t, _ in chosen.values() for s in (t.get("suites") or {}) if s not in NOT_RETAIN},
                    key=lambda s: (s != "retain", s))
    primary = suites[0] if suites else None

    def full_key(cfg: dict) -> tuple:
        return curve_key({**{k: v for k, v in cfg.items() if k != "k"}, "rule": FULL}, axes)

    rows, tests = [], []  # tests: (row index, suite, raw p)
    for t, reached in chosen.values():
        cfg = t["config"]
        row = {"objective": cfg.get("objective"), "k": cfg.get("k") if uses_k(cfg["rule"]) else None,
               "rule": cfg["rule"], "seed": cfg.get("seed"), "trial_id": t.get("trial_id"), "steps": _steps(t),
               **{a: cfg.get(a) for a in axes}, "reached": reached, "val_forget": validation_forget(t),
               "forget_drop": _drop(t, FORGET), "retain_drop": _drop(t, primary) if primary else None,
               "p_vs_full": None, "retain": {}}
        full = chosen.get(full_key(cfg)) if cfg["rule"] != FULL else None
        for s in suites:
            m = (t.get("suites") or {}).get(s)
            if not m:
                continue
            e = {**retention_summary(int(m["n"]), int(m["right_to_wrong"]), int(m["wrong_to_right"]),
                                     int(m["both_correct"]), margin, alpha, confidence), "drop": -float(m["delta"]),
                 "p_vs_full_raw": None, "p_vs_full": None}
            pair = (records(full[0]["trial_id"], s), records(t["trial_id"], s)) if full is not None else (None, None)
            if pair[0] and pair[1]:
                mf = mcnemar_test(pair[0], pair[1], n_bootstrap=1, names=(FULL, cfg["rule"]))
                e["p_vs_full_raw"], e["delta_vs_full"] = mf["p_value"], mf["delta"]
                e["full_trial_id"] = full[0]["trial_id"]
                tests.append((len(rows), s, mf["p_value"]))
            row["retain"][s] = e
        rows.append(row)
    for (i, s, _), p in zip(tests, holm([p for _, _, p in tests]) if tests else []):
        rows[i]["retain"][s]["p_vs_full"] = p
        if s == primary:
            rows[i]["p_vs_full"] = p
    rows.sort(key=lambda r: (str(r["objective"]), r["rule"] != "mast", r["rule"], r["k"] or 0, str(r["seed"])))
    return {"mode": "stop" if stop_mode else ("axis" if axes else "single"), "axes": axes, "level": lvl,
            "margin": margin, "primary_retain": primary, "holm_family": len(tests), "rows": rows}


def summarize(matched: dict) -> list[dict]:
    """The headline: per (objective, rule, k) the mean over seeds of forget_drop, retain_drop and
    steps, how many seeds reached the level, the verdicts and how many p_vs_full < 0.05 (Holm)."""
    groups: dict[tuple, list[dict]] = {}
    for r in matched["rows"]:
        groups.setdefault((r["objective"], r["rule"], r["k"]), []).append(r)

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return statistics.mean(xs) if xs else None

    out = []
    primary = matched.get("primary_retain")
    for (obj, rule, k), rs in groups.items():
        verdicts = [r["retain"].get(primary, {}).get("verdict") for r in rs] if primary else []
        ps = [r["p_vs_full"] for r in rs if r["p_vs_full"] is not None]
        out.append({"objective": obj, "rule": rule, "k": k, "seeds": len(rs),
                    "reached": sum(bool(r["reached"]) for r in rs), "forget_drop": mean(r["forget_drop"] for r in rs),
                    "retain_drop": mean(r["retain_drop"] for r in rs), "steps": mean(r["steps"] for r in rs),
                    "val_forget": mean(r["val_forget"] for r in rs),
                    "preserved": sum(v == "preserved" for v in verdicts),
                    "vs_full_significant": sum(p < 0.05 for p in ps), "vs_full_tested": len(ps)})
    return out
