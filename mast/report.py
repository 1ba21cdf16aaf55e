"""`mast report`: the paper's tables and the plots researchers look at, from a sweep folder or MLflow.

Inputs (the sweep folder of the brief): ``trials.jsonl`` (required), ``sweep.json``, ``spec.yaml``,
and, when present, ``trials/<id>/selection.json`` (for the selection-signal heatmap). The seed-level
table is recomputed from trials.jsonl with :func:`mast.seeds.seed_level_table` (suite=None: Holm over
every suite's comparisons), so the report and ``mast stats seeds`` agree.

Output (``SWEEP/report`` by default, written atomically): ``report.md`` (PNG links beside it),
``report.html`` (self-contained: PNGs embedded as base64), the PNGs, and ``report.json`` (the
numbers of every table).

Tables: headline per condition in the paper's form (forget correct before -> after, exact McNemar p,
other suites' deltas in points with CIs, seed count, share of the RLVR gain removed, seeds below the
SFT model) with the noise floor (null trials) as its last row; the noise floor and the SFT floor
(:mod:`mast.floor`; report.json ``noise_floor`` and ``sft_floor``); seed-level significance (mean delta with a
t-interval, paired tests vs full and random, raw and Holm p); every trial; failed trials.
Plots (mast.plots): forget drop vs retain change with the Pareto front; deltas vs k with seed
spread; prefix-recovery curves; which layers / projections each rule selects; MAST signals of one
selection. Rendering and number formats: mast.doc; reading a sweep back from MLflow: mast.tracking.

Flow: :func:`read_report_input` reads the folder and recomputes the seed table and matched forgetting
(a :class:`ReportInput`); :func:`compose` writes the sections in reading order into a :class:`mast.doc.Doc`
and returns report.json's numbers; :func:`build_report` writes the files.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from mast import floor, matched, plots, seeds
from mast.config import EvaluationSpec
from mast.doc import Doc, fmt_ci, fmt_count, fmt_p, fmt_pp, fmt_pvals
from mast.files import InputError, atomic_dir, read_json, read_jsonl, write_json
from mast.layout import SweepDir
from mast.results import load_trials
from mast.tracking import default_uri, fetch_sweep

# --------------------------------------------------------------------------- numbers of the tables (pure)


def _count(acc: float | None, n: int | None) -> int | None:
    return None if acc is None or n is None else int(round(acc * n))


def headline_rows(trials: Sequence[dict], table: dict) -> list[dict]:
    """One row per condition (the seed table's conditions of the first suite), numbers only.

    forget: correct before / after per seed (acc * n), McNemar p per seed; every suite: the mean delta
    and its interval: the trial's paired bootstrap CI with one seed, the t-interval over seeds with more.
    """
    by_id = {t.get("trial_id"): t for t in trials}
    suites = table["suites"]
    first = suites[0]
    rows = []
    for cond in (c for c in table["conditions"] if c["suite"] == first):
        ts = [by_id[i] for i in cond["trial_ids"]]
        row = {"condition": cond["condition"], "config": cond["config"], "seeds": cond["seeds"],
               "n_seeds": cond["n_seeds"], "trial_ids": cond["trial_ids"], "suites": {}}
        for s in suites:
            ms = [t["suites"].get(s) for t in ts]
            ms = [m for m in ms if m]
            if not ms:
                continue
            sc = next((c for c in table["conditions"] if c["suite"] == s and c["condition"] == cond["condition"]), None)
            n = ms[0]["n"]
            entry = {"n": n, "correct_before": [_count(m["acc_before"], m["n"]) for m in ms],
                     "correct_after": [_count(m["acc_after"], m["n"]) for m in ms],
                     "p_values": [m["p_value"] for m in ms], "deltas": [m["delta"] for m in ms],
                     "mean_delta": sum(m["delta"] for m in ms) / len(ms)}
            if len(ms) == 1:
                entry.update(ci_low=ms[0]["ci_low"], ci_high=ms[0]["ci_high"], ci="paired bootstrap over problems")
            else:
                entry.update(ci_low=sc["ci_low"] if sc else None, ci_high=sc["ci_high"] if sc else None,
                             ci="Student t over seeds")
            entry.update(floor.condition_floor(ts, s))
            row["suites"][s] = entry
        rows.append(row)
    return rows



# --------------------------------------------------------------------------- what the report shows


@dataclass
class ReportInput:
    """Everything the report shows: the sweep as read from its folder, and what is recomputed from it.

    `table` (the seed-level table) and `matched` (:func:`matched_forgetting`) are None when no trial
    finished; `selection` is one MAST trial's selection.json (`selection_trial`) for the signal plot.
    """

    name: str
    trials: list[dict]
    info: dict  # sweep.json (provenance)
    spec: str | None  # spec.yaml as run
    table: dict | None
    matched: dict | None
    selection: dict | None = None
    selection_trial: str | None = None

    @property
    def ok(self) -> list[dict]:
        return [t for t in self.trials if t["status"] == "ok"]

    @property
    def failed(self) -> list[dict]:
        return [t for t in self.trials if t["status"] != "ok"]


def _load_sweep(sd: SweepDir) -> tuple[list[dict], dict, str | None]:
    if not sd.root.is_dir():
        raise InputError(f"{sd.root}: not a folder")
    trials = load_trials(sd.root)
    info = read_json(sd.manifest) if sd.manifest.is_file() else {}
    if not isinstance(info, dict):
        raise InputError(f"{sd.manifest}: expected an object")
    spec = sd.spec.read_text(encoding="utf-8") if sd.spec.is_file() else None
    return trials, info, spec


def _signal_trials(trials: list[dict]) -> list[dict]:
    """MAST trials whose selection the signal plot may show, preferred first (largest k, smallest seed)."""
    cands = [t for t in trials if t["status"] == "ok" and t["config"].get("rule") == "mast"]
    return sorted(cands, key=lambda t: (-(t["config"].get("k") or 0), str(t["config"].get("seed"))))


def _representative_selection(sd: SweepDir, trials: list[dict]) -> tuple[dict | None, str | None]:
    """selection.json of a mast trial (largest k, smallest seed) when the sweep folder has it."""
    for t in _signal_trials(trials):
        p = sd.trial(str(t.get("trial_id"))).selection
        if p.is_file():
            return read_json(p), str(t.get("trial_id"))
    return None, None


def _spec_evaluation(spec: str | None) -> EvaluationSpec:
    """The spec's evaluation settings (equivalence margin, matched level); defaults when unreadable."""
    try:
        d = yaml.safe_load(spec or "") or {}
        return EvaluationSpec.model_validate(d.get("evaluation") or {})
    except Exception:  # an old or hand-edited spec.yaml: the report still renders, with the defaults
        return EvaluationSpec()


def matched_forgetting(sd: SweepDir, trials: list[dict], spec: str | None) -> dict:
    """report.json ``matched_forgetting`` (:func:`mast.matched.matched_rows`) with the per-problem test
    records of the trial folders (a report built from MLflow without them has no p_vs_full)."""
    ev = _spec_evaluation(spec)

    def records(trial_id: str, suite: str) -> list[dict] | None:
        p = sd.trial(trial_id).results(suite)
        return read_jsonl(p) if p.is_file() else None  # a report from MLflow alone: no p_vs_full

    return matched.matched_rows(trials, records, ev.equivalence_margin, ev.matched_level, confidence=ev.confidence)


def read_report_input(sd: SweepDir) -> ReportInput:
    """A sweep folder's :class:`ReportInput`: its files read, the seed table and matched forgetting computed."""
    trials, info, spec = _load_sweep(sd)
    any_ok = any(t["status"] == "ok" for t in trials)
    selection, sel_trial = _representative_selection(sd, trials)
    return ReportInput(name=info.get("name") or sd.root.name, trials=trials, info=info, spec=spec,
                       table=seeds.seed_level_table(trials, suite=None) if any_ok else None,
                       matched=matched_forgetting(sd, trials, spec) if any_ok else None,
                       selection=selection, selection_trial=sel_trial)


# --------------------------------------------------------------------------- the report, top to bottom


def build_report(sweep_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Write report.md, report.html (self-contained), PNGs and report.json; return the report folder.

    Default folder: SWEEP_DIR/report. Built in a temporary sibling and renamed into place.
    """
    sd = SweepDir(sweep_dir)
    r = read_report_input(sd)
    out = Path(out_dir) if out_dir else sd.report
    with atomic_dir(out) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private; a report is meant to be shared
        doc = Doc()
        data = compose(doc, r, tmp)
        (tmp / "report.md").write_text(doc.markdown(), encoding="utf-8")
        (tmp / "report.html").write_text(doc.html(f"MAST sweep report: {r.name}"), encoding="utf-8")
        write_json(tmp / "report.json", data)
        (tmp / "report.json").chmod(0o644)
    return out


def compose(doc: Doc, r: ReportInput, folder: Path) -> dict:
    """The report's sections into `doc` (its PNGs drawn into `folder`); returns report.json's numbers."""
    ok, failed = r.ok, r.failed
    doc.h(1, f"MAST sweep report: {r.name}")
    doc.p(f"{len(r.trials)} trials: {len(ok)} ok, {len(failed)} failed. Code version "
          f"`{r.info.get('code_version') or 'unknown'}`, spec hash `{r.info.get('spec_hash', 'unknown')}`, "
          f"started {r.info.get('started', '?')}, finished {r.info.get('finished', '?')}.")
    data: dict = {"name": r.name, "sweep": r.info, "n_trials": len(r.trials), "n_ok": len(ok),
                  "n_failed": len(failed)}
    pngs: dict[str, str] = {}
    if r.table is None:
        doc.p("**No trial finished**: there are no results to tabulate.")
    else:
        suites = r.table["suites"]
        numbers = result_numbers(r)
        data.update(numbers)
        _matched(doc, r.matched, numbers["noise_floor"])
        _headline(doc, numbers["headline"], suites, numbers["noise_floor"])
        _floors(doc, numbers["noise_floor"], numbers["sft_floor"], suites)
        _significance(doc, r.table)
        pngs = _plots(doc, r, folder)
        _per_trial(doc, ok, suites)
    data["plots"] = pngs
    _failed(doc, failed)
    data["failed"] = [{"trial_id": t.get("trial_id"), "config": t.get("config"), "error": t.get("error")}
                      for t in failed]
    _provenance(doc, r.info, r.spec)
    return data


def result_numbers(r: ReportInput) -> dict:
    """report.json's result tables (a sweep with finished trials): headline, floors, seed table, matched."""
    head = headline_rows(r.trials, r.table)
    return {"headline": head, "noise_floor": floor.noise_floor(r.trials),
            "sft_floor": sft_floor_summary(r.info, r.trials, head, r.table["suites"]), "seed_table": r.table,
            "matched_forgetting": r.matched["rows"],
            "matched_forgetting_info": {k: v for k, v in r.matched.items() if k != "rows"}}


def sft_floor_summary(info: dict, trials: Sequence[dict], head: list[dict], suites: list[str]) -> dict:
    """report.json ``sft_floor``: per suite what RLVR changed (reference vs target: sweep.json's
    ``sft_floor``, else a trial's record of it), and per condition the gain removed / seeds below."""
    per_suite = dict(info.get("sft_floor") or {})
    for t in trials:
        for s, f in (t.get("sft_floor") or {}).items():
            per_suite.setdefault(s, {"reference_acc": f["reference_acc"], "target_acc": f["target_acc"],
                                     "gain": f["gain"], "mcnemar_p": f["gain_p"],
                                     "established": f["gain_established"]})
    conds = [{"condition": r["condition"], "suite": s,
              **{k: r["suites"][s].get(k) for k in ("gain_removed", "gain_removed_per_seed", "below_reference",
                                                    "n_seeds")}}
             for r in head for s in suites if s in r["suites"]]
    return {"suites": {s: per_suite[s] for s in suites if s in per_suite}, "conditions": conds,
            "alpha": floor.GAIN_ALPHA}


def _matched(doc: Doc, mf: dict, noise: dict) -> None:
    doc.h(2, "Headline: rules at matched forgetting")
    rows = mf["rows"]
    if not rows:
        doc.p("No matched-forgetting reading: no unlearned trial finished." + (f" ({mf['note']})" if mf.get("note")
                                                                              else ""))
        return
    how = {"stop": "each trial stopped when its forget-VALIDATION criterion reached the target (unlearning.stop); "
                   "a rule that never got there within its step cap is marked reached = no and read at the cap",
           "axis": f"along the {', '.join(mf['axes'])} axis, each curve is read at its first point whose "
                   f"forget-VALIDATION accuracy is at or below {mf['level']:.3f}" if mf["level"] is not None else "",
           "single": "one trial per rule (no stop, no lr/steps axis): forgetting is NOT matched; read the "
                     "forget drop column before comparing retain"}[mf["mode"]]
    prim = mf["primary_retain"]
    doc.p(f"Rules compared where they forget equally: {how}. The level is chosen on validation suites; every "
          "number below is read on the TEST suites. Drops are before − after (points; forget: larger = more "
          f"forgotten). Per retain suite: the change with its Newcombe 95% interval and the verdict of two "
          f"one-sided Tango tests against ±{100 * mf['margin']:.0f} points (evaluation.equivalence_margin, fixed "
          "before the run): **preserved** only when equivalence holds, else **not shown** (with a few hundred "
          "problems that is common: it means the data cannot exclude a loss of the margin, not that one "
          f"occurred). p vs full: exact McNemar between this rule's and full's unlearned models (same "
          f"objective and seed) on the same {prim} problems, Holm over the {mf['holm_family']} such tests.")
    summary = matched.summarize(mf)
    doc.table(["objective", "rule", "k", "seeds reached", "val forget acc", "forget drop (pp, test)",
               f"{prim} drop (pp, test)", "steps", f"{prim} preserved", "p vs full < 0.05 (Holm)"],
              [[str(r["objective"]), r["rule"], "–" if r["k"] is None else str(r["k"]),
                f"{r['reached']}/{r['seeds']}", "–" if r["val_forget"] is None else f"{r['val_forget']:.3f}",
                fmt_pp(r["forget_drop"], signed=False), fmt_pp(r["retain_drop"], signed=False),
                "–" if r["steps"] is None else f"{r['steps']:.0f}", f"{r['preserved']}/{r['seeds']}",
                f"{r['vs_full_significant']}/{r['vs_full_tested']}" if r["vs_full_tested"] else "–"]
               for r in summary])
    suites = sorted({s for r in rows for s in r["retain"]}, key=lambda s: (s != prim, s))
    headers = ["objective", "rule", "k", "seed", "steps", "reached", "forget drop (pp)"]
    for s in suites:
        headers += [f"{s} Δ (pp) [Newcombe CI]", f"{s} verdict", f"{s} p vs full (Holm)"]
    table = []
    for r in rows:
        row = [str(r["objective"]), r["rule"], "–" if r["k"] is None else str(r["k"]), str(r["seed"]),
               "–" if r["steps"] is None else str(r["steps"]), {True: "yes", False: "**no**", None: "–"}[r["reached"]],
               fmt_pp(r["forget_drop"], signed=False)]
        for s in suites:
            e = r["retain"].get(s)
            row += ([f"{fmt_pp(e['delta'])} {fmt_ci(e['ci_low'], e['ci_high'])}", e["verdict"], fmt_p(e["p_vs_full"])]
                    if e else ["–"] * 3)
        table.append(row)
    doc.table(headers, table)
    if noise:
        doc.p("Read these against the noise floor below: " + "; ".join(
            f"{s}: flip rate {100 * e['flip_rate']:.1f}%" for s, e in noise.items()) + ".")


def _share(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def _headline(doc: Doc, head: list[dict], suites: list[str], noise: dict) -> None:
    first = suites[0]
    others = suites[1:]
    doc.h(2, "Headline")
    doc.p(f"Per condition, in the paper's form: {first} problems correct before → after, exact McNemar p "
          "(two-sided binomial on the discordant pairs), and the accuracy change in points on every suite. "
          "With one seed the interval is the trial's paired bootstrap (95%); with several seeds, counts "
          "are means (range) and the interval is the Student-t interval of the per-seed deltas. "
          f"'{first} RL gain removed': (target − unlearned)/(target − reference), mean over seeds, empty where "
          "RLVR did not significantly change the suite; 'below SFT': seeds whose unlearned accuracy is under "
          "the reference (SFT) model's (removed more than RL added). Last row: the noise floor, null trials "
          "(no weight change) evaluated like a trial: discordant answers and pooled McNemar p.")
    headers = ["condition", "seeds", f"{first}: correct before → after", "McNemar p", f"{first} Δ (pp) [CI]",
               f"{first} RL gain removed", f"{first} below SFT"]
    headers += [f"{s} Δ (pp) [CI]" for s in others]
    rows = []
    for r in head:
        f = r["suites"].get(first)
        row = [r["condition"], str(r["n_seeds"])]
        if f:
            row += [f"{fmt_count(f['correct_before'], f['n'])} → {fmt_count(f['correct_after'], f['n'])}",
                    fmt_pvals(f["p_values"]), f"{fmt_pp(f['mean_delta'])} {fmt_ci(f['ci_low'], f['ci_high'])}",
                    _share(f.get("gain_removed")),
                    f"{f['below_reference']}/{f['n_seeds']}" if f.get("n_seeds") else "–"]
        else:
            row += ["–"] * 5
        for s in others:
            e = r["suites"].get(s)
            row.append(f"{fmt_pp(e['mean_delta'])} {fmt_ci(e['ci_low'], e['ci_high'])}" if e else "–")
        rows.append(row)
    if noise:
        f = noise.get(first)
        row = ["null (noise floor)", str(len(f["seeds"]) if f else "–")]
        row += ([f"{f['flips']} flip(s) in {f['n']} × {len(f['seeds'])}", fmt_p(f["mcnemar_p"]),
                 f"flip rate {100 * f['flip_rate']:.1f}%", "–", "–"] if f else ["–"] * 5)
        row += [f"flip rate {100 * noise[s]['flip_rate']:.1f}% (p={fmt_p(noise[s]['mcnemar_p'])})"
                if s in noise else "–" for s in others]
        rows.append(row)
    doc.table(headers, rows)


def _floors(doc: Doc, noise: dict, sft: dict, suites: list[str]) -> None:
    doc.h(2, "Noise floor")
    if not noise:
        doc.p("No null trial ran (evaluation.noise_floor: false): answer flips without any weight change are "
              "not measured in this sweep.")
    else:
        doc.p("Null trials select nothing and train nothing: the target is evaluated again exactly like a "
              "trial (fresh backend, same decoding, evaluation cache bypassed), once per seed, and paired with "
              "the baseline. Flip rate = discordant answers / paired problems (pooled over seeds); McNemar p "
              "of the pooled counts. A trial's effect should be read against it.")
        doc.table(["suite", "n", "seeds", "flips (right→wrong, wrong→right)", "flip rate", "McNemar p",
                   "per seed (flip rate, p)"],
                  [[s, str(e["n"]), ", ".join(map(str, e["seeds"])),
                    f"{e['flips']} ({e['right_to_wrong']}, {e['wrong_to_right']})", f"{100 * e['flip_rate']:.1f}%",
                    fmt_p(e["mcnemar_p"]),
                    "; ".join(f"s{x['seed']}: {100 * x['flip_rate']:.1f}%, {fmt_p(x['mcnemar_p'])}"
                              for x in e["per_seed"])] for s, e in noise.items()])
    doc.h(2, "SFT floor")
    if not sft["suites"]:
        doc.p("The reference (SFT) model was not evaluated in this sweep.")
        return
    doc.p(f"What RLVR changed on each suite (reference → target, exact McNemar p); the share of that change a "
          f"trial removed, (target − unlearned)/(target − reference), is defined only where p < {sft['alpha']} "
          "(else the two models differ by less than their noise, and the cell is empty). 100% = back to the "
          "SFT level; above 100% = below it.")
    doc.table(["suite", "reference (SFT)", "target (RLVR)", "RL change (pp)", "McNemar p", "share defined"],
              [[s, f"{g['reference_acc']:.3f}", f"{g['target_acc']:.3f}", fmt_pp(g["gain"]), fmt_p(g["mcnemar_p"]),
                "yes" if g["established"] else "no"] for s, g in sft["suites"].items()])
    cells: dict[str, dict[str, str]] = {}
    for c in sft["conditions"]:
        cells.setdefault(c["condition"], {})[c["suite"]] = (
            f"{_share(c['gain_removed'])} [" + ", ".join(_share(x) for x in c["gain_removed_per_seed"])
            + f"]; below SFT {c['below_reference']}/{c['n_seeds']}" if c["n_seeds"] else "–")
    doc.table(["condition"] + [f"{s}: gain removed [per seed]; seeds below SFT" for s in suites],
              [[cond] + [by.get(s, "–") for s in suites] for cond, by in cells.items()])


def _significance(doc: Doc, table: dict) -> None:
    fam = table["family"]
    doc.h(2, "Seed-level significance")
    doc.p(f"Per condition, the per-seed deltas' mean and {table['confidence']:.0%} t-interval; paired comparisons "
          f"matched by seed against `full` (same objective) and `random` (same objective and k), on the "
          f"difference of deltas. Primary test: **{_PRIMARY_NAME.get(table['primary_test'], table['primary_test'])}** "
          f"({table['primary_reason']}). "
          f"Holm correction over the whole family of {fam['size']} primary comparisons ({fam['scope']}) at "
          f"alpha {fam['alpha']}; {fam['n_rejected']} survive. Positive differences mean the condition's "
          "accuracy changed upward relative to the baseline (on the forget suite, negative = forgets more).")
    for s in table["suites"]:
        doc.h(3, f"suite: {s}")
        conds = [c for c in table["conditions"] if c["suite"] == s]
        doc.table(["condition", "seeds", "mean Δ (pp)", f"{table['confidence']:.0%} CI (pp)", "per-seed Δ (pp)"],
                  [[c["condition"], str(c["n_seeds"]), fmt_pp(c["mean_delta"]), fmt_ci(c["ci_low"], c["ci_high"]),
                    ", ".join(fmt_pp(d) for d in c["deltas"])] for c in conds])
        comps = [c for c in table["comparisons"] if c["suite"] == s]
        if comps:
            rows, bold = [], set()
            for i, c in enumerate(comps):
                surv = "–" if c["reject"] is None else ("yes" if c["reject"] else "no")
                rows.append([c["condition"], c["baseline"], str(c["n"]), fmt_pp(c["mean_difference"]),
                             fmt_p(c["ttest"]["p_value"]), fmt_p(c["wilcoxon"]["p_value"]), fmt_p(c["sign"]["p_value"]),
                             fmt_p(c["p_raw"]), fmt_p(c["p_holm"]), surv])
                if c["reject"]:
                    bold.update({(i, 8), (i, 9)})
            doc.table(["condition", "vs", "seeds", "mean diff (pp)", "p t-test", "p Wilcoxon (exact)", "p sign (exact)",
                       "p raw (primary)", "p Holm", "survives"], rows, bold)
    for n in table["notes"]:
        doc.p("Note: " + n)


_PRIMARY_NAME = {"ttest": "paired t-test", "wilcoxon": "exact Wilcoxon signed-rank", "sign": "exact sign test"}


CAPTIONS = {
    "tradeoff": "Forget accuracy drop vs change on each other suite, one point per trial (colour: rule, "
                "marker: objective). Dashed: the Pareto front (more forgetting and better retention).",
    "deltas_vs_k": "Accuracy change vs the number of updated tensors k, per suite and objective; dots are "
                   "seeds, lines their mean; k-free baselines (full, attention) as dashed lines with "
                   "their seed range shaded.",
    "prefix_recovery": "Prefix-recovery probe on the forget set: accuracy when the first part of the "
                       "reference solution is given (mean over trials, band: range).",
    "forgetting_curves": "Each rule's forget drop vs retain change along the lr/steps axis (test "
                         "suites, mean over seeds; labels: axis values). Dotted: the mean forget drop "
                         "of the matched points (level chosen on validation).",
    "prefix_recovery_matched": "Prefix recovery of the trials read AT MATCHED FORGETTING (one per rule, "
                               "objective, k and seed): a rule whose curve climbs back with a short "
                               "prefix forgot only at the surface.",
    "selection": "Selection frequency of each layer x projection per rule, over that rule's trials.",
    "signals": "The MAST score and the three signals of every candidate tensor, for one trial's selection.",
}


def _plots(doc: Doc, r: ReportInput, folder: Path) -> dict[str, str]:
    """The Plots section: each figure that could be drawn, with its caption; returns {key: PNG name}."""
    doc.h(2, "Plots")
    pngs, notes = _draw_plots(r, folder)
    for key, fname in pngs.items():
        doc.h(3, key.replace("_", " "))
        doc.img(folder / fname, CAPTIONS[key])
    for n in notes:
        doc.p(n)
    if "prefix_recovery" not in pngs:
        doc.p("No prefix-recovery probe ran in this sweep.")
    return pngs


def _draw_plots(r: ReportInput, folder: Path) -> tuple[dict[str, str], list[str]]:
    """Draw the figures into `folder`: ({key: PNG name} of those drawn, in report order; notes)."""
    suites, mf = r.table["suites"], r.matched
    unlearned = [t for t in r.trials if not floor.is_null(t)]
    at_match = [t for t in unlearned if t.get("trial_id") in {row["trial_id"] for row in mf["rows"]}]
    level_drop = _level_drop(mf)
    pngs: dict[str, str] = {}
    for key, fn in (("tradeoff", lambda p: plots.plot_tradeoff(unlearned, suites, p)),
                    ("forgetting_curves", lambda p: plots.plot_forgetting_curves(
                        unlearned, mf["axes"], mf["primary_retain"] or "", p, level_drop)),
                    ("deltas_vs_k", lambda p: plots.plot_deltas_vs_k(r.table, p)),
                    ("prefix_recovery", lambda p: plots.plot_probe(unlearned, p)),
                    ("prefix_recovery_matched", lambda p: plots.plot_probe(
                        at_match, p, "Prefix recovery at matched forgetting"))):
        path = fn(folder / f"{key}.png")
        if path:
            pngs[key] = path.name
    sel_path, notes = plots.plot_selection(unlearned, folder / "selection.png")
    if sel_path:
        pngs["selection"] = sel_path.name
    if r.selection is not None:
        title = (f"MAST signals of trial {r.selection_trial} (rule {r.selection.get('rule')}, "
                 f"k={r.selection.get('k')})")
        sp = plots.plot_signals(r.selection, folder / "signals.png", title)
        if sp:
            pngs["signals"] = sp.name
    return pngs, notes


def _level_drop(mf: dict) -> float | None:
    drops = [r["forget_drop"] for r in mf["rows"] if r["forget_drop"] is not None and r["reached"]]
    return sum(drops) / len(drops) if drops and mf["axes"] else None


def _per_trial(doc: Doc, ok: list[dict], suites: list[str]) -> None:
    doc.h(2, "Every trial")
    doc.p("Each trial against the target's per-problem results: correct before → after on each suite, "
          "exact McNemar p, and Δ in points with the paired bootstrap interval; with several samples per "
          "problem also the avg@n delta and its paired permutation p (primary), and the share of answers "
          "cut at the token limit when any were.")
    rows = []
    order = sorted(ok, key=lambda t: (seeds.sort_key(seeds.condition_config(t["config"])),
                                      seeds.seed_sort(t["config"].get("seed"))))
    extra = seeds.varying_keys(ok)
    for t in order:
        c = t["config"]
        row = [str(t.get("trial_id")), seeds.condition_label(c, extra), str(c.get("seed"))]
        for s in suites:
            m = t["suites"].get(s)
            if not m:
                row.append("–")
                continue
            cell = (f"{_count(m['acc_before'], m['n'])}/{m['n']} → {_count(m['acc_after'], m['n'])}/{m['n']}; "
                    f"p={fmt_p(m['p_value'])}; {fmt_pp(m['delta'])} {fmt_ci(m['ci_low'], m['ci_high'])}")
            if m.get("samples_test"):
                st = m["samples_test"]
                cell += f"; avg@{st['n_samples']} {fmt_pp(st['delta'])} p={fmt_p(st['p_value'])}"
            if m.get("truncated_rate"):
                cell += f"; truncated {100 * m['truncated_rate']:.1f}%"
            row.append(cell)
        rows.append(row)
    doc.table(["trial", "condition", "seed"] + suites, rows)


def _failed(doc: Doc, failed: list[dict]) -> None:
    doc.h(2, "Failed trials")
    if not failed:
        doc.p("None.")
        return
    rows = []
    for t in failed:
        err = str(t.get("error") or "(no error recorded)")
        rows.append([str(t.get("trial_id")), seeds.condition_label(t.get("config") or {}),
                     str((t.get("config") or {}).get("seed")), err if len(err) <= 400 else err[:400] + " …"])
    doc.table(["trial", "condition", "seed", "error"], rows)


def _provenance(doc: Doc, info: dict, spec: str | None) -> None:
    doc.h(2, "Provenance")
    rows = [[k, json.dumps(v) if isinstance(v, (dict, list)) else str(v)] for k, v in info.items()]
    if rows:
        doc.table(["field", "value"], rows)
    else:
        doc.p("No sweep.json found.")
    if spec:
        doc.code(spec, "Sweep spec as run (spec.yaml)")


# --------------------------------------------------------------------------- from MLflow


def build_report_from_mlflow(experiment: str, tracking_uri: str, out_dir: str | os.PathLike) -> Path:
    """`mast report --experiment NAME`: the latest parent run's artifacts (and the representative MAST
    trial's selection.json, for the signal plot) rebuilt into a sweep folder, then :func:`build_report`."""
    with tempfile.TemporaryDirectory(prefix="mast-report-") as tmp:
        fetched = fetch_sweep(experiment, tracking_uri, Path(tmp) / "sweep")
        for t in _signal_trials(load_trials(fetched.sweep.root))[:1]:
            tid = str(t.get("trial_id"))
            fetched.fetch_trial_file(tid, fetched.sweep.trial(tid).selection.name, t.get("mlflow_run_id"))
        return build_report(fetched.sweep.root, out_dir)


# --------------------------------------------------------------------------- CLI


def cli_report(args: argparse.Namespace) -> int:
    """`mast report SWEEP_DIR [--out DIR]` or `mast report --experiment NAME [--tracking-uri URI] [--out DIR]`."""
    if args.experiment:
        uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri and args.sweep_dir:
            if not SweepDir(args.sweep_dir).mlflow_db.is_file():
                raise InputError(f"{args.sweep_dir}: no mlflow.db here; give --tracking-uri")
            uri = default_uri(args.sweep_dir)
        if not uri:
            raise InputError("--experiment needs --tracking-uri (or $MLFLOW_TRACKING_URI, or a SWEEP_DIR with mlflow.db)")
        out = args.out or (SweepDir(args.sweep_dir).report if args.sweep_dir else Path(f"{args.experiment}-report"))
        path = build_report_from_mlflow(args.experiment, uri, out)
    elif args.sweep_dir:
        path = build_report(args.sweep_dir, args.out)
    else:
        raise InputError("give a SWEEP_DIR or --experiment NAME")
    print(f"report: {path / 'report.md'}, {path / 'report.html'}")
    return 0
