"""The seed-level table: conditions across seeds, paired tests against the baselines, Holm.

Across seeds (`seed_level_table`), per condition = the trial config minus the seed:
mean of the per-seed deltas with a Student-t interval, and paired comparisons matched by seed
against the `full` baseline (same config apart from rule and k) and the `random` baseline (same
config apart from the rule). Primary test: paired t-test on the per-seed deltas (each delta is a
mean over n problems, so close to normal); exact Wilcoxon signed-rank and exact sign test are
recorded beside it. Holm over the whole family of primary comparisons in the sweep (every
suite x condition x baseline: one sweep supports claims about forgetting AND retention), raw and
adjusted p side by side.

The per-trial and across-seed test math (McNemar, paired t / Wilcoxon / sign tests, Holm) is
:mod:`mast.stats`; this module groups trials.jsonl rows into conditions, matches them by seed,
builds the table (:func:`seed_level_table`) and renders it (:func:`format_seed_table`). The
`mast stats` handler (:func:`cli_stats`, both tests) lives here, beside the table it prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from mast.doc import fmt_ci, fmt_p, fmt_pp
from mast.files import InputError, read_jsonl, write_json
from mast.registry import NULL_RULES, RHO_RULES, uses_k
from mast.results import check_trials, load_trials
from mast.stats import holm_reject, mcnemar_test, paired_tests, t_interval

PRIMARY_TESTS = ("ttest", "wilcoxon", "sign")
PRIMARY_REASON = {
    "ttest": ("paired t-test is primary: each per-seed delta is a mean over the suite's problems, so the "
              "paired differences are close to normal, and with 3-5 seeds the exact rank/sign tests cannot "
              "reach p < 0.05 at all (two-sided floor 2/2^n: n=3 0.25, n=4 0.125, n=5 0.0625), so they "
              "are reported as distribution-free checks, not as the decision"),
    "wilcoxon": "exact Wilcoxon signed-rank is primary (distribution-free; floor 2/2^n on its p-value)",
    "sign": "exact sign test is primary (distribution-free; floor 2/2^n on its p-value)",
}


# --------------------------------------------------------------------------- conditions


def condition_key(config: dict) -> tuple:
    """Hashable key of :func:`condition_config`."""
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in condition_config(config).items()))


def condition_label(config: dict, extra_keys: Iterable[str] | None = None) -> str:
    """Readable name of a condition, e.g. 'mast/npo/k=8' or 'full/npo', plus `extra_keys` (default: every
    other config field) as 'lr=1e-05'."""
    parts = [str(config.get("rule", "?"))]
    if config.get("objective") is not None:
        parts.append(str(config["objective"]))
    if uses_k(config.get("rule")) and config.get("k") is not None:
        parts.append(f"k={config['k']}")
    config = condition_config(config) | ({"seed": config["seed"]} if "seed" in config else {})
    keys = sorted(config) if extra_keys is None else sorted(set(extra_keys) & set(config))
    extra = [f"{k}={config[k]}" for k in keys if k not in ("rule", "objective", "k", "seed")]
    return "/".join(parts + extra)


def varying_keys(trials: Sequence[dict]) -> list[str]:
    """Config fields besides rule/objective/k/seed that take more than one value across the trials."""
    values: dict[str, set] = {}
    for t in trials:
        for k, v in (t.get("config") or {}).items():
            values.setdefault(k, set()).add(json.dumps(v, sort_keys=True))
    return sorted(k for k, v in values.items() if len(v) > 1 and k not in ("rule", "objective", "k", "seed"))


def condition_config(config: dict) -> dict:
    """Condition = the trial config without the seed, and without the fields its rule ignores
    (k for rules without k, rho for rules without rho: mast.registry), so baselines match across them."""
    cfg = {k: v for k, v in config.items() if k != "seed"}
    if not uses_k(cfg.get("rule")):
        cfg.pop("k", None)
    if cfg.get("rule") not in RHO_RULES:
        cfg.pop("rho", None)
    return cfg


def _baseline_key(config: dict, baseline: str) -> tuple:
    cfg = dict(config)
    cfg["rule"] = baseline
    return condition_key(cfg)


def suites_of(trials: Sequence[dict]) -> list[str]:
    """Suites present in the ok trials, forget first, then retain, then the rest in first-seen order."""
    seen: list[str] = []
    for t in trials:
        if t.get("status") == "ok":
            for s in t.get("suites") or {}:
                if s not in seen:
                    seen.append(s)
    return sorted(seen, key=lambda s: (s != "forget", s != "retain", seen.index(s)))


RULE_ORDER = ("mast", "full", "random", "attention", "off_principal", "magnitude", "coupling")  # display order
OBJ_ORDER = ("ga", "npo", "simnpo")


def _order(value, order) -> tuple:
    return (order.index(value), "") if value in order else (len(order), str(value))


def seed_sort(s) -> tuple:
    """Sort key of seeds: numbers first (by value), then the rest by name."""
    return (0, s, "") if isinstance(s, (int, float)) else (1, 0, str(s))


def sort_key(cfg: dict) -> tuple:
    """Display order of conditions: by objective, then rule (mast beside its baselines), then k."""
    k = cfg.get("k")
    return (_order(cfg.get("objective"), OBJ_ORDER), _order(cfg.get("rule"), RULE_ORDER),
            (0, k) if isinstance(k, (int, float)) else (1, 0),
            json.dumps({x: v for x, v in cfg.items() if x not in ("rule", "objective", "k")}, sort_keys=True))


# --------------------------------------------------------------------------- the table


@dataclass
class SeedResult:
    """One trial's result on one suite, as a condition's entry for its seed."""

    delta: float
    trial_id: str | None
    metrics: dict  # the trial's McNemar dict on the suite
    config: dict  # the trial's full config


@dataclass
class ConditionGroup:
    """The trials of one condition on one suite, by seed."""

    config: dict  # the condition's config (condition_config: no seed, no field its rule ignores)
    by_seed: dict = field(default_factory=dict)  # seed -> SeedResult

    @property
    def seeds(self) -> list:
        return sorted(self.by_seed, key=seed_sort)


def group_by_condition(ok: Sequence[dict], suite: str, label) -> tuple[dict[tuple, ConditionGroup], list[str]]:
    """Ok trials of `suite` grouped by condition (display order), and notes on trials left out.

    A trial repeating a seed of its condition is left out (noted) when it differs only in
    fields its rule ignores; a true duplicate (same config and seed) is an InputError.
    """
    groups: dict[tuple, ConditionGroup] = {}
    notes: list[str] = []
    for t in ok:
        if suite not in t["suites"]:
            notes.append(f"{suite}: trial {t.get('trial_id')} has no result for this suite")
            continue
        m = t["suites"][suite]
        if not isinstance(m, dict) or not isinstance(m.get("delta"), (int, float)):
            raise InputError(f"trials: {t.get('trial_id')}: suites.{suite}.delta missing or not a number")
        group = groups.setdefault(condition_key(t["config"]), ConditionGroup(condition_config(t["config"])))
        seed = t["config"]["seed"]
        prev = group.by_seed.get(seed)
        if prev is not None and prev.config != t["config"]:  # differs only in fields its rule ignores
            notes.append(f"{suite}: {t.get('trial_id')} repeats {prev.trial_id} ({label(t['config'])} "
                         f"ignores k/rho; seed {seed}): the first is used")
            continue
        if prev is not None:
            raise InputError(f"trials: {t.get('trial_id')} and {prev.trial_id}: same condition "
                             f"{label(t['config'])} and seed {seed} (suite {suite})")
        group.by_seed[seed] = SeedResult(float(m["delta"]), t.get("trial_id"), m, t["config"])
    ordered = sorted(groups, key=lambda k: sort_key(groups[k].config))
    return {k: groups[k] for k in ordered}, notes


def summarize_condition(suite: str, group: ConditionGroup, label: str, confidence: float) -> dict:
    """A condition's row: per-seed deltas, their mean and Student-t interval, the per-seed numbers."""
    seeds = group.seeds
    res = [group.by_seed[sd] for sd in seeds]
    ti = t_interval([r.delta for r in res], confidence)
    return {
        "suite": suite, "condition": label, "config": group.config,
        "seeds": seeds, "trial_ids": [r.trial_id for r in res], "deltas": [r.delta for r in res],
        "n_seeds": ti["n"], "mean_delta": ti["mean"], "sd_delta": ti["sd"],
        "ci_low": ti["ci_low"], "ci_high": ti["ci_high"], "confidence": confidence,
        "interval": "Student t over seeds",
        "acc_before": [r.metrics.get("acc_before") for r in res], "acc_after": [r.metrics.get("acc_after") for r in res],
        "n_problems": [r.metrics.get("n") for r in res], "p_values": [r.metrics.get("p_value") for r in res],
    }


def compare_to_baseline(suite: str, group: ConditionGroup, base: ConditionGroup, baseline: str, labels: tuple[str, str],
                        confidence: float, primary: str) -> dict:
    """Paired tests of a condition's per-seed deltas against its baseline's, matched by seed.

    `labels`: (condition, baseline condition). Holm fields (p_holm, reject) are filled by :func:`apply_holm`.
    """
    seeds = group.seeds
    matched = [sd for sd in seeds if sd in base.by_seed]
    x = [group.by_seed[sd].delta for sd in matched]
    y = [base.by_seed[sd].delta for sd in matched]
    tests = paired_tests(x, y, confidence)
    p_primary = tests[primary]["p_value"]
    return {
        "suite": suite, "condition": labels[0], "baseline": baseline,
        "baseline_condition": labels[1], "seeds": matched,
        "unmatched_seeds": sorted(set(seeds) ^ set(base.by_seed), key=seed_sort), "n": len(matched),
        "deltas": x, "baseline_deltas": y,
        "differences": tests["differences"], "mean_difference": tests["mean_difference"],
        "ttest": tests["ttest"], "wilcoxon": tests["wilcoxon"], "sign": tests["sign"],
        "exact_p_floor": tests["exact_p_floor"], "primary_test": primary,
        "p_raw": p_primary, "p_holm": None, "reject": None,
        "in_family": p_primary is not None,
    }


def apply_holm(comparisons: list[dict], alpha: float, tested: list[str], family: str) -> dict:
    """Holm over the family (every testable primary comparison given): fills p_holm / reject in place,
    adjusts the exact Wilcoxon p-values over the same family for reference; returns the family's facts."""
    fam = [c for c in comparisons if c["in_family"]]
    adj, rej = holm_reject([c["p_raw"] for c in fam], alpha)
    for c, pa, r in zip(fam, adj, rej):
        c["p_holm"], c["reject"] = pa, r
    adj_w, _ = holm_reject([c["wilcoxon"]["p_value"] for c in fam], alpha)
    for c, pa in zip(fam, adj_w):
        c["wilcoxon"]["p_holm"] = pa
    fam_suites = [x for x in tested if any(c["suite"] == x for c in fam)] or tested
    return {"scope": ("sweep: every suite (" if family == "sweep" else "table: suites (")
            + ", ".join(fam_suites) + ") x condition x baseline",
            "method": "holm", "implementation": "statsmodels multipletests(method='holm')", "alpha": alpha,
            "size": len(fam), "n_rejected": int(sum(rej)), "suites": fam_suites}


def _check_table_args(family: str, primary: str, confidence: float, alpha: float) -> None:
    if family not in ("sweep", "table"):
        raise InputError(f"family must be 'sweep' or 'table', got {family!r}")
    if primary not in PRIMARY_TESTS:
        raise InputError(f"primary test must be one of {PRIMARY_TESTS}, got {primary!r}")
    if not 0.0 < confidence < 1.0:
        raise InputError(f"confidence must be in (0, 1), got {confidence}")
    if not 0.0 < alpha < 1.0:
        raise InputError(f"alpha must be in (0, 1), got {alpha}")


def _wanted_suites(trials: Sequence[dict], ok: Sequence[dict], suite: str | Sequence[str] | None) -> list[str]:
    suites = suites_of(trials) if suite is None else [suite] if isinstance(suite, str) else list(suite)
    for s in suites:
        if not any(s in t["suites"] for t in ok):
            raise InputError(f"trials: no ok trial has suite {s!r} (have: {', '.join(suites_of(trials)) or 'none'})")
    return suites


def _power_notes(comparisons: list[dict], floors: list[float]) -> list[str]:
    notes = []
    if comparisons and max(c["n"] for c in comparisons) <= 5:
        notes.append("every comparison has <= 5 matched seeds: the exact Wilcoxon / sign tests cannot reach "
                     f"p < 0.05 (two-sided floor 2/2^n; floors here: {', '.join(f'{f:.4g}' for f in floors)})")
    for c in comparisons:
        if not c["in_family"]:
            notes.append(f"{c['suite']}: {c['condition']} vs {c['baseline']}: not tested ({c['ttest']['note']}); "
                         "left out of the Holm family")
    return notes


def seed_level_table(trials: Sequence[dict], suite: str | Sequence[str] | None = "forget", confidence: float = 0.95,
                     baselines: Sequence[str] = ("full", "random"), alpha: float = 0.05,
                     primary: str = "ttest", family: str = "sweep") -> dict:
    """Seed-level table of trials.jsonl rows: per condition mean delta + t-interval, paired tests vs baselines.

    `suite`: one suite, a list, or None for every suite in the trials (the rows returned).
    `family`: "sweep" (default) = Holm over every testable primary comparison of every suite in the
    trials (suites x conditions x baselines), whichever suites are returned, so adjusted p-values agree
    with the sweep's seed_table.json; "table" = only the returned suites' comparisons.
    Failed trials are listed, not used. Null trials (the noise floor, no weight change) are not
    conditions: they are left out here and reported by :func:`mast.floor.noise_floor`.
    Steps: :func:`group_by_condition` -> :func:`summarize_condition` -> :func:`compare_to_baseline`
    (matched by seed against `full` with the same config apart from rule and k, and `random` with the
    same config apart from the rule) -> :func:`apply_holm`.
    Returns {"suites", "primary_test", "primary_reason", "family", "conditions", "comparisons",
    "failed", "notes", ...}; every comparison records seeds, both sides' deltas and the differences.
    """
    _check_table_args(family, primary, confidence, alpha)
    check_trials(trials)
    nulls = [t for t in trials if t["config"].get("rule") in NULL_RULES]
    ok = [t for t in trials if t["status"] == "ok" and t["config"].get("rule") not in NULL_RULES]
    failed = [{"trial_id": t.get("trial_id"), "config": t.get("config"), "error": t.get("error")}
              for t in trials if t["status"] == "failed"]
    suites = _wanted_suites(trials, ok, suite)
    extra = varying_keys(ok)

    def label(cfg: dict) -> str:
        return condition_label(cfg, extra)

    conditions: list[dict] = []
    comparisons: list[dict] = []
    notes: list[str] = []
    tested = suites_of(trials) if family == "sweep" else suites
    for s in tested:
        groups, group_notes = group_by_condition(ok, s, label)
        notes += group_notes
        for group in groups.values():
            conditions.append(summarize_condition(s, group, label(group.config), confidence))
            for base in baselines:
                bkey = _baseline_key(group.config, base)
                if group.config.get("rule") == base or bkey not in groups:
                    continue
                comparisons.append(compare_to_baseline(s, group, groups[bkey], base,
                                                       (label(group.config), label(groups[bkey].config)),
                                                       confidence, primary))
    fam_info = apply_holm(comparisons, alpha, tested, family)
    conditions = [c for c in conditions if c["suite"] in suites]
    comparisons = [c for c in comparisons if c["suite"] in suites]
    notes = [n for n in notes if n.split(":", 1)[0] in suites]
    floors = sorted({c["exact_p_floor"] for c in comparisons})
    notes += _power_notes(comparisons, floors)
    if nulls:
        notes.append(f"{len(nulls)} null trial(s) (the noise floor: no weight change) are not conditions; "
                     "see the noise floor")
    return {
        "suites": suites, "primary_test": primary, "primary_reason": PRIMARY_REASON[primary],
        "alternative": "two-sided", "confidence": confidence, "baselines": list(baselines),
        "family": fam_info,
        "exact_p_floors": floors,
        "conditions": conditions, "comparisons": comparisons, "failed": failed,
        "condition_fields": ["rule", "objective", "k"] + extra,
        "n_trials": len(trials), "n_ok": len(ok), "notes": notes,
    }


# --------------------------------------------------------------------------- text rendering


def format_seed_table(table: dict) -> str:
    """Plain-text rendering of seed_level_table(...) (deltas in percentage points)."""
    lines = [f"seed-level table ({table['confidence']:.0%} intervals; deltas and differences in points; "
             f"two-sided tests; p Holm = the primary test ({table['primary_test']}) adjusted over "
             f"{table['family']['size']} comparisons [{table['family']['scope']}], alpha {table['family']['alpha']})"]
    for s in table["suites"]:
        lines.append("")
        lines.append(f"== suite {s}")
        lines.append(f"{'condition':<34} {'seeds':>5} {'mean delta':>10} {'CI':>17}")
        for c in (c for c in table["conditions"] if c["suite"] == s):
            ci = fmt_ci(c["ci_low"], c["ci_high"])
            lines.append(f"{c['condition']:<34} {c['n_seeds']:>5} {fmt_pp(c['mean_delta']):>10} {ci:>17}")
        comps = [c for c in table["comparisons"] if c["suite"] == s]
        if comps:
            lines.append(f"{'comparison':<46} {'n':>2} {'mean diff':>9} {'p t':>8} {'p Wilcoxon':>10} "
                         f"{'p sign':>7} {'p Holm':>8} {'reject':>6}")
            for c in comps:
                rej = "-" if c["reject"] is None else ("yes" if c["reject"] else "no")
                lines.append(f"{c['condition'] + ' vs ' + c['baseline']:<46} {c['n']:>2} "
                             f"{fmt_pp(c['mean_difference']):>9} {fmt_p(c['ttest']['p_value']):>8} "
                             f"{fmt_p(c['wilcoxon']['p_value']):>10} {fmt_p(c['sign']['p_value']):>7} "
                             f"{fmt_p(c['p_holm']):>8} {rej:>6}")
    if table["failed"]:
        lines.append("")
        lines.append(f"failed trials ({len(table['failed'])}, not used):")
        for f in table["failed"]:
            lines.append(f"  {f['trial_id']}: {f['error']}")
    lines.append("")
    lines.append("primary: " + table["primary_reason"])
    for n in table["notes"]:
        lines.append("note: " + n)
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def cli_stats(args: argparse.Namespace) -> int:
    """`mast stats mcnemar BEFORE AFTER` (JSON to stdout) and `mast stats seeds RESULTS [--suite S] [--out J]`."""
    if args.stats_command == "mcnemar":
        before = read_jsonl(args.before, required=("id", "correct"))
        after = read_jsonl(args.after, required=("id", "correct"))
        res = mcnemar_test(before, after, n_bootstrap=args.n_bootstrap, confidence=args.confidence,
                           seed=args.seed, names=(str(args.before), str(args.after)))
        res["before"], res["after"] = str(args.before), str(args.after)
        print(json.dumps(res, indent=2))
        return 0
    if args.stats_command == "seeds":
        trials = load_trials(args.results)
        suite = None if args.suite in ("all", "*") else [s.strip() for s in args.suite.split(",") if s.strip()]
        table = seed_level_table(trials, suite=suite, confidence=args.confidence, alpha=args.alpha,
                                 primary=args.primary, family=args.family)
        table["source"] = str(args.results)
        print(format_seed_table(table))
        if args.out:
            write_json(args.out, table)
            print(f"wrote {args.out}", file=sys.stderr)
        return 0
    raise InputError(f"unknown stats test {args.stats_command!r}")


