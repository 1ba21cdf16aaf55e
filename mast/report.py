"""`mast report`: the paper's tables and the plots researchers look at, from a sweep folder or MLflow.

Inputs (the sweep folder of the brief): ``trials.jsonl`` (required), ``sweep.json``, ``spec.yaml``,
and, when present, ``trials/<id>/selection.json`` (for the selection-signal heatmap). The seed-level
table is recomputed from trials.jsonl with :func:`mast.stats.seed_level_table` (suite=None: Holm over
every suite's comparisons), so the report and ``mast stats seeds`` agree.

Output (``SWEEP/report`` by default, written atomically): ``report.md`` (PNG links beside it),
``report.html`` (self-contained: PNGs embedded as base64), the PNGs, and ``report.json`` (the
numbers of every table).

Tables: headline per condition in the paper's form (forget correct before -> after, exact McNemar p,
other suites' deltas in points with CIs, seed count); seed-level significance (mean delta with a
t-interval, paired tests vs full and random, raw and Holm p); every trial; failed trials.
Plots: forget drop vs retain change with the Pareto front; deltas vs k with seed spread;
prefix-recovery curves; which layers / projections each rule selects; MAST signals of one selection.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import re
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path

from mast import stats
from mast.files import InputError, atomic_dir, read_json, write_json

RULE_COLORS = {"mast": "#d62728", "full": "#1f77b4", "random": "#7f7f7f", "attention": "#9467bd",
               "off_principal": "#ff7f0e", "magnitude": "#2ca02c", "coupling": "#8c564b"}
_EXTRA_COLORS = ["#e377c2", "#bcbd22", "#17becf", "#393b79", "#637939"]
OBJECTIVE_MARKERS = {"ga": "o", "npo": "s", "simnpo": "^"}
_EXTRA_MARKERS = ["D", "v", "P", "X", "*"]
PROJ_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj")
_TENSOR = re.compile(r"layers\.(\d+)\..*?(\w+_proj)\b")


# --------------------------------------------------------------------------- pure helpers


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated when maximising both coordinates, sorted by x.

    i is dominated when some j has x_j >= x_i and y_j >= y_i with one strict.
    """
    front = []
    for i, (x, y) in enumerate(points):
        if any((xj >= x and yj >= y) and (xj > x or yj > y) for xj, yj in points):
            continue
        front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def parse_tensor_name(name: str) -> tuple[int, str] | None:
    """'model.layers.3.self_attn.q_proj.weight' -> (3, 'q_proj'); None when it is not a layer projection."""
    m = _TENSOR.search(name)
    return (int(m.group(1)), m.group(2)) if m else None


def selection_frequency(selected_lists: Sequence[Sequence[str]]) -> tuple[list[int], list[str], list[list[float]], int]:
    """Fraction of selections containing each (layer, projection): (layers, projections, freq[layer][proj], n_other)."""
    counts: dict[tuple[int, str], int] = {}
    other = 0
    for names in selected_lists:
        for name in set(names):
            lp = parse_tensor_name(name)
            if lp is None:
                other += 1
            else:
                counts[lp] = counts.get(lp, 0) + 1
    layers = sorted({lp[0] for lp in counts})
    projs = sorted({lp[1] for lp in counts}, key=lambda p: (PROJ_ORDER.index(p) if p in PROJ_ORDER else 9, p))
    n = max(len(selected_lists), 1)
    freq = [[counts.get((L, p), 0) / n for p in projs] for L in layers]
    return layers, projs, freq, other


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
            row["suites"][s] = entry
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- formatting


def fmt_pp(x: float | None, signed: bool = True) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    v = 100.0 * x
    if abs(v) < 0.05:
        v = 0.0
    return f"{v:+.1f}" if signed else f"{v:.1f}"


def fmt_p(p: float | None) -> str:
    if p is None:
        return "–"
    if p == 0:
        return "0"
    return f"{p:.1e}" if p < 0.001 else f"{p:.4f}".rstrip("0").rstrip(".") if p < 1 else "1"


def fmt_ci(lo: float | None, hi: float | None) -> str:
    return "–" if lo is None or hi is None else f"[{fmt_pp(lo)}, {fmt_pp(hi)}]"


def _fmt_count(vals: list[int | None], n: int) -> str:
    """'37/150' for one value (or equal values); '37.3/150 (36–39)' for the mean and range over seeds."""
    vals = [v for v in vals if v is not None]
    if not vals:
        return "–"
    if len(set(vals)) == 1:
        return f"{vals[0]}/{n}"
    return f"{statistics.mean(vals):.1f}/{n} ({min(vals)}–{max(vals)})"


def _fmt_pvals(ps: list[float]) -> str:
    if len(ps) == 1:
        return fmt_p(ps[0])
    sig = sum(p < 0.05 for p in ps)
    return f"{fmt_p(statistics.median(ps))} (median; {sig}/{len(ps)} < 0.05)"


# --------------------------------------------------------------------------- document model


class Doc:
    """A tiny document (headings, paragraphs, tables, images, code) rendered to Markdown and HTML."""

    def __init__(self) -> None:
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, headers: list[str], rows: list[list[str]], bold: set[tuple[int, int]] | None = None) -> None:
        self.blocks.append(("table", headers, rows, bold or set()))

    def img(self, path: Path, alt: str) -> None:
        self.blocks.append(("img", path, alt))

    def code(self, text: str, summary: str | None = None) -> None:
        self.blocks.append(("code", text, summary))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "table":
                _, headers, rows, bold = b

                def cell(t: str) -> str:
                    return str(t).replace("|", "\\|").replace("\n", " ")

                out.append("| " + " | ".join(cell(h) for h in headers) + " |")
                out.append("|" + "|".join("---" for _ in headers) + "|")
                for i, r in enumerate(rows):
                    out.append("| " + " | ".join(f"**{cell(c)}**" if (i, j) in bold and c else cell(c)
                                                 for j, c in enumerate(r)) + " |")
            elif b[0] == "img":
                out.append(f"![{b[2]}]({b[1].name})")
            elif b[0] == "code":
                fence = "```"
                out.append((f"{b[2]}:\n\n" if b[2] else "") + f"{fence}\n{b[1].rstrip()}\n{fence}")
            out.append("")
        return "\n".join(out)

    def html(self, title: str) -> str:
        e = html.escape
        out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title>", f"<style>{_CSS}</style>",
               "</head><body>"]
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                out.append(f"<p>{_inline(b[1])}</p>")
            elif b[0] == "table":
                _, headers, rows, bold = b
                out.append("<table><thead><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in headers) + "</tr></thead><tbody>")
                for i, r in enumerate(rows):
                    cells = "".join(f"<td class='hit'>{e(str(c))}</td>" if (i, j) in bold else f"<td>{e(str(c))}</td>"
                                    for j, c in enumerate(r))
                    out.append(f"<tr>{cells}</tr>")
                out.append("</tbody></table>")
            elif b[0] == "img":
                data = base64.b64encode(b[1].read_bytes()).decode("ascii")
                out.append(f"<figure><img alt='{e(b[2])}' src='data:image/png;base64,{data}'>"
                           f"<figcaption>{e(b[2])}</figcaption></figure>")
            elif b[0] == "code":
                pre = f"<pre>{e(b[1])}</pre>"
                out.append(f"<details><summary>{e(b[2])}</summary>{pre}</details>" if b[2] else pre)
        out.append("</body></html>")
        return "\n".join(out)


def _inline(text: str) -> str:
    """Markdown **bold** and `code` in a paragraph -> HTML (everything else escaped)."""
    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222}table{border-collapse:collapse;margin:1em 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;font-variant-numeric:tabular-nums}
th{background:#f3f3f3}td.hit{font-weight:bold;background:#eaf6ea}img{max-width:100%}
figure{margin:1em 0}figcaption{color:#555;font-size:0.9em}pre{background:#f7f7f7;padding:0.8em;overflow:auto}
code{background:#f3f3f3;padding:0 3px}"""


# --------------------------------------------------------------------------- plots


def _style(rules: Sequence[str], objectives: Sequence[str]) -> tuple[dict, dict]:
    colors = dict(RULE_COLORS)
    extra = iter(_EXTRA_COLORS * 4)
    for r in rules:
        colors.setdefault(r, next(extra))
    markers = dict(OBJECTIVE_MARKERS)
    extra_m = iter(_EXTRA_MARKERS * 4)
    for o in objectives:
        markers.setdefault(o, next(extra_m))
    return colors, markers


def _figure(w: float, h: float):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=110, layout="constrained")


def _ordered(values, order) -> list:
    vals = list(dict.fromkeys(values))
    return sorted(vals, key=lambda v: (order.index(v) if v in order else len(order), str(v)))


def plot_tradeoff(trials: list[dict], suites: list[str], out: Path) -> Path | None:
    """Forget accuracy drop (x, pp) vs each other suite's change (y, pp): one point per trial, Pareto front."""
    ok = [t for t in trials if t["status"] == "ok" and "forget" in t["suites"]]
    others = [s for s in suites if s != "forget"]
    if not ok or not others:
        return None
    rules = _ordered([t["config"]["rule"] for t in ok], stats._RULE_ORDER)
    objs = _ordered([t["config"].get("objective") for t in ok], stats._OBJ_ORDER)
    colors, markers = _style(rules, objs)
    ncol = min(len(others), 3)
    nrow = math.ceil(len(others) / ncol)
    fig = _figure(4.6 * ncol + 1.8, 4.2 * nrow + 0.3)
    grid = fig.subplots(nrow, ncol, squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[len(others):]:
        ax.set_visible(False)
    axes = axes[:len(others)]
    for ax, s in zip(axes, others):
        pts, meta = [], []
        for t in ok:
            if s in t["suites"]:
                pts.append((-100 * t["suites"]["forget"]["delta"], 100 * t["suites"][s]["delta"]))
                meta.append(t)
        for (x, y), t in zip(pts, meta):
            ax.scatter(x, y, color=colors[t["config"]["rule"]], marker=markers[t["config"].get("objective")],
                       s=42, alpha=0.8, edgecolors="white", linewidths=0.5, zorder=3)
        front = pareto_front(pts)
        if front:
            fx, fy = [pts[i][0] for i in front], [pts[i][1] for i in front]
            ax.plot(fx, fy, color="black", lw=1.2, ls="--", zorder=2)
            ax.scatter(fx, fy, s=110, facecolors="none", edgecolors="black", linewidths=1.0, zorder=4)
        ax.axhline(0, color="#999", lw=0.8, zorder=1)
        ax.axvline(0, color="#999", lw=0.8, zorder=1)
        ax.set_xlabel("forget accuracy drop (points; right = more forgetting)")
        ax.set_ylabel(f"{s} accuracy change (points; up = better)")
        ax.set_title(f"forget vs {s}")
        ax.grid(alpha=0.25)
    from matplotlib.lines import Line2D

    h_rule = [Line2D([], [], color=colors[r], marker="o", ls="", label=r) for r in rules]
    h_obj = [Line2D([], [], color="#444", marker=markers[o], ls="", label=str(o)) for o in objs]
    h_front = [Line2D([], [], color="black", ls="--", marker="o", mfc="none", label="Pareto front")]
    anchor = axes[ncol - 1]  # right-most axes of the first row
    leg1 = anchor.legend(handles=h_rule, title="rule", loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    anchor.add_artist(leg1)
    anchor.legend(handles=h_obj + h_front, title="objective", loc="lower left", bbox_to_anchor=(1.02, 0.0),
                  frameon=False)
    fig.suptitle("Forgetting vs retention, one point per trial")
    fig.savefig(out)
    return out


def plot_deltas_vs_k(table: dict, out: Path) -> Path | None:
    """Per suite (rows) and objective (columns): per-seed deltas vs k for each rule, mean line; k-free rules as bands."""
    conds = table["conditions"]
    if not conds:
        return None
    suites = table["suites"]
    objs = _ordered([c["config"].get("objective") for c in conds], stats._OBJ_ORDER)
    rules = _ordered([c["config"]["rule"] for c in conds], stats._RULE_ORDER)
    colors, _ = _style(rules, objs)
    ks = sorted({c["config"]["k"] for c in conds if isinstance(c["config"].get("k"), (int, float))})
    fig = _figure(4.2 * len(objs) + 1.8, 3.0 * len(suites) + 0.6)
    axes = fig.subplots(len(suites), len(objs), squeeze=False, sharex=True, sharey="row")
    logx = bool(ks) and min(ks) > 0 and max(ks) / min(ks) >= 8
    span = (min(ks), max(ks)) if ks else (0, 1)
    for i, s in enumerate(suites):
        for j, o in enumerate(objs):
            ax = axes[i][j]
            for r in rules:
                cs = [c for c in conds if c["suite"] == s and c["config"].get("objective") == o
                      and c["config"]["rule"] == r]
                if not cs:
                    continue
                with_k = [c for c in cs if isinstance(c["config"].get("k"), (int, float))]
                if with_k:
                    with_k.sort(key=lambda c: c["config"]["k"])
                    for c in with_k:
                        kk = c["config"]["k"]
                        jitter = [kk * (1 + 0.04 * (n - (len(c["deltas"]) - 1) / 2)) if logx
                                  else kk + 0.06 * (span[1] - span[0] or 1) * (n - (len(c["deltas"]) - 1) / 2) / 3
                                  for n in range(len(c["deltas"]))]
                        ax.scatter(jitter, [100 * d for d in c["deltas"]], color=colors[r], s=14, alpha=0.55, zorder=3)
                    ax.plot([c["config"]["k"] for c in with_k], [100 * c["mean_delta"] for c in with_k],
                            color=colors[r], lw=1.6, marker="o", ms=4, label=r, zorder=4)
                else:  # k-free rule (full, attention): its mean as a line, seed range as a band
                    c = cs[0]
                    ys = [100 * d for d in c["deltas"]]
                    ax.axhline(100 * c["mean_delta"], color=colors[r], lw=1.4, ls="--", label=f"{r} (all k)")
                    if len(ys) > 1:
                        ax.axhspan(min(ys), max(ys), color=colors[r], alpha=0.12, lw=0)
            ax.axhline(0, color="#999", lw=0.8)
            if logx:
                ax.set_xscale("log", base=2)
            if ks:
                ax.set_xticks(ks)
                ax.set_xticklabels([str(k) for k in ks])
                ax.minorticks_off()
            ax.grid(alpha=0.25)
            if i == 0:
                ax.set_title(f"objective: {o}")
            if i == len(suites) - 1:
                ax.set_xlabel("k (tensors updated)")
            if j == 0:
                ax.set_ylabel(f"{s} Δ accuracy (points)")
    handles, labels = [], []
    for row in axes:
        for ax in row:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
    fig.legend(handles, labels, title="rule", loc="outside right center", frameon=False)
    fig.suptitle("Accuracy change vs k\n(dots: seeds, line: their mean; dashed line + band: k-free baseline, seed range)")
    fig.savefig(out)
    return out


def _probe_curves(probe: dict) -> tuple[list[float], list[float] | None, list[float] | None]:
    def acc(v):
        if isinstance(v, dict):
            return v.get("accuracy")
        return v

    return list(probe.get("fractions") or []), acc(probe.get("before")), acc(probe.get("after"))


def plot_probe(trials: list[dict], out: Path) -> Path | None:
    """Prefix-recovery: accuracy vs fraction of the reference solution given, per objective, a line per rule."""
    ok = [t for t in trials if t["status"] == "ok" and t.get("probe")]
    if not ok:
        return None
    objs = _ordered([t["config"].get("objective") for t in ok], stats._OBJ_ORDER)
    rules = _ordered([t["config"]["rule"] for t in ok], stats._RULE_ORDER)
    colors, _ = _style(rules, objs)
    fig = _figure(4.2 * len(objs) + 1.8, 3.8)
    axes = fig.subplots(1, len(objs), squeeze=False, sharey=True)[0]
    for ax, o in zip(axes, objs):
        befores = []
        for r in rules:
            curves = []
            for t in ok:
                if t["config"]["rule"] != r or t["config"].get("objective") != o:
                    continue
                fr, before, after = _probe_curves(t["probe"])
                if before:
                    befores.append((fr, before))
                if after:
                    curves.append((fr, after))
            if not curves:
                continue
            fr = curves[0][0]
            same = [c for f, c in curves if f == fr]
            mean = [100 * statistics.mean(v) for v in zip(*same)]
            ax.plot(fr, mean, color=colors[r], marker="o", ms=4, lw=1.6, label=f"{r} ({len(same)})")
            if len(same) > 1:
                ax.fill_between(fr, [100 * min(v) for v in zip(*same)], [100 * max(v) for v in zip(*same)],
                                color=colors[r], alpha=0.12, lw=0)
        if befores:
            fr = befores[0][0]
            b = [100 * statistics.mean(v) for v in zip(*[c for f, c in befores if f == fr])]
            ax.plot(fr, b, color="black", ls="--", marker="x", lw=1.4, label="target (before)")
        ax.set_title(f"objective: {o}")
        ax.set_xlabel("fraction of the reference solution given as prefix")
        ax.set_xticks(fr)
        ax.set_xticklabels([f"{100 * f:.0f}%" for f in fr])
        ax.grid(alpha=0.25)
    axes[0].set_ylabel("forget-set accuracy (%)")
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, title="rule (trials; all k pooled)", loc="outside right center", frameon=False)
    fig.suptitle("Prefix recovery on the forget set (mean over trials; band: range)")
    fig.savefig(out)
    return out


def plot_selection(trials: list[dict], out: Path) -> tuple[Path | None, list[str]]:
    """Heatmap layer x projection of how often each rule selects each tensor (rules that select a subset)."""
    ok = [t for t in trials if t["status"] == "ok" and t.get("selected")]
    rules = _ordered([t["config"]["rule"] for t in ok if t["config"]["rule"] not in stats.K_FREE_RULES],
                     stats._RULE_ORDER)
    if not rules:
        return None, []
    data = {}
    layers_all, projs_all = set(), set()
    notes = []
    for r in rules:
        sel = [t["selected"] for t in ok if t["config"]["rule"] == r]
        layers, projs, freq, other = selection_frequency(sel)
        data[r] = (layers, projs, freq, len(sel))
        layers_all |= set(layers)
        projs_all |= set(projs)
        if other:
            notes.append(f"{r}: {other} selected tensor(s) are not layer projections and are not drawn")
    if not layers_all:
        return None, notes
    L = list(range(min(layers_all), max(layers_all) + 1))
    P = sorted(projs_all, key=lambda p: (PROJ_ORDER.index(p) if p in PROJ_ORDER else 9, p))
    import numpy as np

    fig = _figure(min(2.0 + 1.9 * len(rules), 16), max(3.0, 0.26 * len(L) + 1.6))
    axes = fig.subplots(1, len(rules), squeeze=False, sharey=True)[0]
    im = None
    for ax, r in zip(axes, rules):
        layers, projs, freq, n = data[r]
        grid = np.zeros((len(L), len(P)))
        for li, layer in enumerate(layers):
            for pi, proj in enumerate(projs):
                grid[L.index(layer), P.index(proj)] = freq[li][pi]
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower",
                       extent=(-0.5, len(P) - 0.5, L[0] - 0.5, L[-1] + 0.5))
        ax.set_xticks(range(len(P)))
        ax.set_xticklabels([p.replace("_proj", "") for p in P])
        ax.set_title(f"{r} ({n} trials)")
        ax.set_xlabel("projection")
        if len(L) <= 32:
            for li, layer in enumerate(L):
                for pi in range(len(P)):
                    v = grid[li, pi]
                    if v > 0:
                        ax.text(pi, layer, f"{v:.2f}".lstrip("0") if v < 1 else "1", ha="center", va="center",
                                fontsize=7, color="black" if v > 0.6 else "white")
    axes[0].set_ylabel("layer")
    step = max(1, math.ceil(len(L) / 16))
    axes[0].set_yticks(L[::step])
    fig.colorbar(im, ax=list(axes), label="fraction of trials selecting the tensor", shrink=0.9)
    fig.suptitle("Which tensors each rule updates")
    fig.savefig(out)
    return out, notes


def plot_signals(selection: dict, out: Path, title: str) -> Path | None:
    """The MAST score and its three signals (layer x projection) of one selection; selected tensors boxed."""
    cands = [c for c in selection.get("candidates") or [] if parse_tensor_name(c.get("name", ""))]
    signals = [s for s in ("score", "update_magnitude", "off_principal_energy", "coupling")
               if any(isinstance(c.get(s), (int, float)) for c in cands)]
    if not cands or not signals:
        return None
    import numpy as np
    from matplotlib.patches import Rectangle

    lp = [parse_tensor_name(c["name"]) for c in cands]
    L = list(range(min(x[0] for x in lp), max(x[0] for x in lp) + 1))
    P = sorted({x[1] for x in lp}, key=lambda p: (PROJ_ORDER.index(p) if p in PROJ_ORDER else 9, p))
    fig = _figure(min(2.2 + 2.3 * len(signals), 16), max(3.0, 0.26 * len(L) + 1.8))
    axes = fig.subplots(1, len(signals), squeeze=False, sharey=True)[0]
    for ax, s in zip(axes, signals):
        grid = np.full((len(L), len(P)), np.nan)
        for c, (layer, proj) in zip(cands, lp):
            v = c.get(s)
            if isinstance(v, (int, float)):
                grid[L.index(layer), P.index(proj)] = v
        im = ax.imshow(grid, aspect="auto", cmap="magma", origin="lower",
                       extent=(-0.5, len(P) - 0.5, L[0] - 0.5, L[-1] + 0.5))
        for c, (layer, proj) in zip(cands, lp):
            if c.get("selected"):
                ax.add_patch(Rectangle((P.index(proj) - 0.5, layer - 0.5), 1, 1, fill=False, ec="#00e5ff", lw=1.8))
        ax.set_xticks(range(len(P)))
        ax.set_xticklabels([p.replace("_proj", "") for p in P])
        ax.set_xlabel("projection")
        ax.set_title(s.replace("_", " "), fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.85, pad=0.02)
    axes[0].set_ylabel("layer")
    step = max(1, math.ceil(len(L) / 16))
    axes[0].set_yticks(L[::step])
    fig.suptitle(title + " (cyan boxes: selected)")
    fig.savefig(out)
    return out


# --------------------------------------------------------------------------- the report


def _load_sweep(sweep_dir: Path) -> tuple[list[dict], dict, str | None]:
    if not sweep_dir.is_dir():
        raise InputError(f"{sweep_dir}: not a folder")
    trials = stats.load_trials(sweep_dir)
    info = read_json(sweep_dir / "sweep.json") if (sweep_dir / "sweep.json").is_file() else {}
    if not isinstance(info, dict):
        raise InputError(f"{sweep_dir / 'sweep.json'}: expected an object")
    spec = (sweep_dir / "spec.yaml").read_text(encoding="utf-8") if (sweep_dir / "spec.yaml").is_file() else None
    return trials, info, spec


def _representative_selection(sweep_dir: Path, trials: list[dict]) -> tuple[dict | None, str | None]:
    """selection.json of a mast trial (largest k, smallest seed) when the sweep folder has it."""
    cands = [t for t in trials if t["status"] == "ok" and t["config"].get("rule") == "mast"]
    cands.sort(key=lambda t: (-(t["config"].get("k") or 0), str(t["config"].get("seed"))))
    for t in cands:
        p = sweep_dir / "trials" / str(t.get("trial_id")) / "selection.json"
        if p.is_file():
            return read_json(p), str(t.get("trial_id"))
    return None, None


def build_report(sweep_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Write report.md, report.html (self-contained), PNGs and report.json; return the report folder.

    Default folder: SWEEP_DIR/report. Built in a temporary sibling and renamed into place.
    """
    sweep_dir = Path(sweep_dir)
    trials, info, spec = _load_sweep(sweep_dir)
    out = Path(out_dir) if out_dir else sweep_dir / "report"
    ok = [t for t in trials if t["status"] == "ok"]
    failed = [t for t in trials if t["status"] != "ok"]
    if not ok:
        table = None
    else:
        table = stats.seed_level_table(trials, suite=None)
    selection, sel_trial = _representative_selection(sweep_dir, trials)
    name = info.get("name") or sweep_dir.resolve().name
    with atomic_dir(out) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private; a report is meant to be shared
        doc = Doc()
        data = _compose(doc, name, trials, ok, failed, table, info, spec, selection, sel_trial, tmp)
        (tmp / "report.md").write_text(doc.markdown(), encoding="utf-8")
        (tmp / "report.html").write_text(doc.html(f"MAST sweep report: {name}"), encoding="utf-8")
        write_json(tmp / "report.json", data)
        (tmp / "report.json").chmod(0o644)
    return out


def _compose(doc: Doc, name: str, trials, ok, failed, table, info, spec, selection, sel_trial, tmp: Path) -> dict:
    doc.h(1, f"MAST sweep report: {name}")
    sha = info.get("code_version")
    doc.p(f"{len(trials)} trials: {len(ok)} ok, {len(failed)} failed. Code version `{sha or 'unknown'}`, "
          f"spec hash `{info.get('spec_hash', 'unknown')}`, started {info.get('started', '?')}, "
          f"finished {info.get('finished', '?')}.")
    data: dict = {"name": name, "sweep": info, "n_trials": len(trials), "n_ok": len(ok), "n_failed": len(failed)}
    plots: dict[str, str] = {}
    if table is None:
        doc.p("**No trial finished**: there are no results to tabulate.")
    else:
        suites = table["suites"]
        head = headline_rows(trials, table)
        data["headline"] = head
        data["seed_table"] = table
        _headline(doc, head, suites)
        _significance(doc, table)
        doc.h(2, "Plots")
        for key, fn in (("tradeoff", lambda p: plot_tradeoff(trials, suites, p)),
                        ("deltas_vs_k", lambda p: plot_deltas_vs_k(table, p)),
                        ("prefix_recovery", lambda p: plot_probe(trials, p))):
            path = fn(tmp / f"{key}.png")
            if path:
                plots[key] = path.name
        sel_path, sel_notes = plot_selection(trials, tmp / "selection.png")
        if sel_path:
            plots["selection"] = sel_path.name
        if selection is not None:
            sp = plot_signals(selection, tmp / "signals.png",
                              f"MAST signals of trial {sel_trial} (rule {selection.get('rule')}, k={selection.get('k')})")
            if sp:
                plots["signals"] = sp.name
        captions = {
            "tradeoff": "Forget accuracy drop vs change on each other suite, one point per trial (colour: rule, "
                        "marker: objective). Dashed: the Pareto front (more forgetting and better retention).",
            "deltas_vs_k": "Accuracy change vs the number of updated tensors k, per suite and objective; dots are "
                           "seeds, lines their mean; k-free baselines (full, attention) as dashed lines with "
                           "their seed range shaded.",
            "prefix_recovery": "Prefix-recovery probe on the forget set: accuracy when the first part of the "
                               "reference solution is given (mean over trials, band: range).",
            "selection": "Selection frequency of each layer x projection per rule, over that rule's trials.",
            "signals": "The MAST score and the three signals of every candidate tensor, for one trial's selection.",
        }
        for key, fname in plots.items():
            doc.h(3, key.replace("_", " "))
            doc.img(tmp / fname, captions[key])
        for n in sel_notes:
            doc.p(n)
        if "prefix_recovery" not in plots:
            doc.p("No prefix-recovery probe ran in this sweep.")
        _per_trial(doc, ok, suites)
    data["plots"] = plots
    _failed(doc, failed)
    data["failed"] = [{"trial_id": t.get("trial_id"), "config": t.get("config"), "error": t.get("error")} for t in failed]
    doc.h(2, "Provenance")
    rows = [[k, json.dumps(v) if isinstance(v, (dict, list)) else str(v)] for k, v in info.items()]
    if rows:
        doc.table(["field", "value"], rows)
    else:
        doc.p("No sweep.json found.")
    if spec:
        doc.code(spec, "Sweep spec as run (spec.yaml)")
    return data


def _headline(doc: Doc, head: list[dict], suites: list[str]) -> None:
    first = suites[0]
    others = suites[1:]
    doc.h(2, "Headline")
    doc.p(f"Per condition, in the paper's form: {first} problems correct before → after, exact McNemar p "
          "(two-sided binomial on the discordant pairs), and the accuracy change in points on every suite. "
          "With one seed the interval is the trial's paired bootstrap (95%); with several seeds, counts "
          "are means (range) and the interval is the Student-t interval of the per-seed deltas.")
    headers = ["condition", "seeds", f"{first}: correct before → after", "McNemar p", f"{first} Δ (pp) [CI]"]
    headers += [f"{s} Δ (pp) [CI]" for s in others]
    rows = []
    for r in head:
        f = r["suites"].get(first)
        row = [r["condition"], str(r["n_seeds"])]
        if f:
            row += [f"{_fmt_count(f['correct_before'], f['n'])} → {_fmt_count(f['correct_after'], f['n'])}",
                    _fmt_pvals(f["p_values"]), f"{fmt_pp(f['mean_delta'])} {fmt_ci(f['ci_low'], f['ci_high'])}"]
        else:
            row += ["–", "–", "–"]
        for s in others:
            e = r["suites"].get(s)
            row.append(f"{fmt_pp(e['mean_delta'])} {fmt_ci(e['ci_low'], e['ci_high'])}" if e else "–")
        rows.append(row)
    doc.table(headers, rows)


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


def _per_trial(doc: Doc, ok: list[dict], suites: list[str]) -> None:
    doc.h(2, "Every trial")
    doc.p("Each trial against the target's per-problem results: correct before → after on each suite, "
          "exact McNemar p, and Δ in points with the paired bootstrap interval.")
    rows = []
    order = sorted(ok, key=lambda t: (stats._sort_key(stats.condition_config(t["config"])),
                                      stats._seed_sort(t["config"].get("seed"))))
    extra = stats.varying_keys(ok)
    for t in order:
        c = t["config"]
        row = [str(t.get("trial_id")), stats.condition_label(c, extra), str(c.get("seed"))]
        for s in suites:
            m = t["suites"].get(s)
            if not m:
                row.append("–")
                continue
            row.append(f"{_count(m['acc_before'], m['n'])}/{m['n']} → {_count(m['acc_after'], m['n'])}/{m['n']}; "
                       f"p={fmt_p(m['p_value'])}; {fmt_pp(m['delta'])} {fmt_ci(m['ci_low'], m['ci_high'])}")
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
        rows.append([str(t.get("trial_id")), stats.condition_label(t.get("config") or {}),
                     str((t.get("config") or {}).get("seed")), err if len(err) <= 400 else err[:400] + " …"])
    doc.table(["trial", "condition", "seed", "error"], rows)


# --------------------------------------------------------------------------- from MLflow


PARENT_ARTIFACTS = ("trials.jsonl", "seed_table.json", "spec.yaml", "sweep.json")


def fetch_from_mlflow(experiment: str, tracking_uri: str, dest: str | os.PathLike) -> Path:
    """Rebuild a minimal sweep folder in `dest` from the experiment's latest parent run's artifacts.

    The parent run carries tag ``mast.role = parent`` (mast.tracking); its artifacts trials.jsonl
    (required), seed_table.json, spec.yaml and sweep.json are downloaded; without sweep.json the run's
    tags and params stand in. The representative MAST trial's selection.json comes from its child run.
    """
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    from mast import tracking

    c = MlflowClient(tracking_uri=tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise InputError(f"--experiment {experiment}: no such experiment at {tracking_uri}")
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.TAG_ROLE}` = 'parent'",
                         order_by=["attributes.start_time DESC"], max_results=10)
    if not runs:
        raise InputError(f"--experiment {experiment}: no sweep parent run (tag {tracking.TAG_ROLE}=parent)")
    parent = runs[0]
    run_id = parent.info.run_id
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    have = {f.path for f in c.list_artifacts(run_id)}
    if "trials.jsonl" not in have:
        raise InputError(f"--experiment {experiment}: parent run {run_id} has no trials.jsonl artifact "
                         f"(has: {', '.join(sorted(have)) or 'none'}); the sweep has not finished?")
    for name in PARENT_ARTIFACTS:
        if name in have:
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=str(dest),
                                                tracking_uri=tracking_uri)
    if not (dest / "sweep.json").is_file():
        tags, params = parent.data.tags, parent.data.params
        info = {"name": tags.get("mast.sweep") or parent.info.run_name, "experiment": experiment,
                "tracking_uri": tracking_uri, "parent_run_id": run_id,
                "sweep_id": tags.get(tracking.TAG_SWEEP)}
        for k in ("spec_hash", "code_version", "n_trials"):
            if k in params or f"mast.{k}" in tags:
                info[k] = params.get(k, tags.get(f"mast.{k}"))
        write_json(dest / "sweep.json", info)
    if len(runs) > 1:
        info = read_json(dest / "sweep.json")
        info["note"] = f"{len(runs)} parent runs in the experiment; the latest ({run_id}) is reported"
        write_json(dest / "sweep.json", info)
    # the representative MAST trial's selection, for the signal plot
    trials = stats.load_trials(dest)
    cands = sorted((t for t in trials if t["status"] == "ok" and t["config"].get("rule") == "mast"),
                   key=lambda t: (-(t["config"].get("k") or 0), str(t["config"].get("seed"))))
    for t in cands[:1]:
        flt = (f"tags.`{tracking.TAG_TRIAL}` = '{t.get('trial_id')}' and "
               f"tags.`{tracking.TAG_PARENT}` = '{run_id}'")
        child = t.get("mlflow_run_id") or next((r.info.run_id for r in c.search_runs(
            [exp.experiment_id], filter_string=flt, max_results=1)), None)
        if child and "selection.json" in {f.path for f in c.list_artifacts(child)}:
            tdir = dest / "trials" / str(t.get("trial_id"))
            tdir.mkdir(parents=True, exist_ok=True)
            mlflow.artifacts.download_artifacts(run_id=child, artifact_path="selection.json", dst_path=str(tdir),
                                                tracking_uri=tracking_uri)
    return dest


def build_report_from_mlflow(experiment: str, tracking_uri: str, out_dir: str | os.PathLike) -> Path:
    """`mast report --experiment NAME`: fetch the parent run's artifacts, then :func:`build_report`."""
    with tempfile.TemporaryDirectory(prefix="mast-report-") as tmp:
        sweep = fetch_from_mlflow(experiment, tracking_uri, Path(tmp) / "sweep")
        return build_report(sweep, out_dir)


# --------------------------------------------------------------------------- CLI


def cli_report(args: argparse.Namespace) -> int:
    """`mast report SWEEP_DIR [--out DIR]` or `mast report --experiment NAME [--tracking-uri URI] [--out DIR]`."""
    if args.experiment:
        uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri and args.sweep_dir:
            from mast.tracking import default_uri

            if not (Path(args.sweep_dir) / "mlflow.db").is_file():
                raise InputError(f"{args.sweep_dir}: no mlflow.db here; give --tracking-uri")
            uri = default_uri(args.sweep_dir)
        if not uri:
            raise InputError("--experiment needs --tracking-uri (or $MLFLOW_TRACKING_URI, or a SWEEP_DIR with mlflow.db)")
        out = args.out or (Path(args.sweep_dir) / "report" if args.sweep_dir else Path(f"{args.experiment}-report"))
        path = build_report_from_mlflow(args.experiment, uri, out)
    elif args.sweep_dir:
        path = build_report(args.sweep_dir, args.out)
    else:
        raise InputError("give a SWEEP_DIR or --experiment NAME")
    print(f"report: {path / 'report.md'}, {path / 'report.html'}")
    return 0
