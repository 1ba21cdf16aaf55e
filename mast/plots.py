"""The report's plots (matplotlib, Agg) and the pure helpers behind them.

Forget drop vs retain change with the Pareto front; deltas vs k with seed spread;
prefix-recovery curves; which layers / projections each rule selects; MAST signals of one
selection; each rule's forgetting curve along an lr/steps axis. Each returns the PNG written, or
None when the sweep has nothing to draw.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mast import seeds
from mast.registry import uses_k

RULE_COLORS = {"mast": "#d62728", "full": "#1f77b4", "random": "#7f7f7f", "attention": "#9467bd",
               "off_principal": "#ff7f0e", "magnitude": "#2ca02c", "coupling": "#8c564b"}
_EXTRA_COLORS = ["#e377c2", "#bcbd22", "#17becf", "#393b79", "#637939"]
OBJECTIVE_MARKERS = {"ga": "o", "npo": "s", "simnpo": "^"}
_EXTRA_MARKERS = ["D", "v", "P", "X", "*"]
PROJ_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj")
_TENSOR = re.compile(r"layers\.(\d+)\..*?(\w+_proj)\b")


# --------------------------------------------------------------------------- pure helpers


def _legend_entries(axes) -> tuple[list, list[str]]:
    """(handles, labels) of every axis, each label once, in first-seen order: one figure legend."""
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    return handles, labels


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
    rules = _ordered([t["config"]["rule"] for t in ok], seeds.RULE_ORDER)
    objs = _ordered([t["config"].get("objective") for t in ok], seeds.OBJ_ORDER)
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
    objs = _ordered([c["config"].get("objective") for c in conds], seeds.OBJ_ORDER)
    rules = _ordered([c["config"]["rule"] for c in conds], seeds.RULE_ORDER)
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
    handles, labels = _legend_entries([ax for row in axes for ax in row])
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


def plot_probe(trials: list[dict], out: Path, title: str = "Prefix recovery on the forget set") -> Path | None:
    """Prefix-recovery: accuracy vs fraction of the reference solution given, per objective, a line per rule."""
    ok = [t for t in trials if t["status"] == "ok" and t.get("probe")]
    if not ok:
        return None
    objs = _ordered([t["config"].get("objective") for t in ok], seeds.OBJ_ORDER)
    rules = _ordered([t["config"]["rule"] for t in ok], seeds.RULE_ORDER)
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
    handles, labels = _legend_entries(axes)
    fig.legend(handles, labels, title="rule (trials; all k pooled)", loc="outside right center", frameon=False)
    fig.suptitle(f"{title} (mean over trials; band: range)")
    fig.savefig(out)
    return out


def plot_selection(trials: list[dict], out: Path) -> tuple[Path | None, list[str]]:
    """Heatmap layer x projection of how often each rule selects each tensor (rules that select a subset)."""
    ok = [t for t in trials if t["status"] == "ok" and t.get("selected")]
    rules = _ordered([t["config"]["rule"] for t in ok if uses_k(t["config"]["rule"])],
                     seeds.RULE_ORDER)
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


def plot_forgetting_curves(trials: list[dict], axes_keys: Sequence[str], retain_suite: str, out: Path,
                           level_drop: float | None = None) -> Path | None:
    """Each rule's forget-vs-retain curve along the lr/steps axis (test suites; mean over seeds and k
    pooled per (rule, objective, k)); points labelled by the axis value. A dotted vertical line marks
    the forget drop at the matched level when given."""
    ok = [t for t in trials if t["status"] == "ok" and "forget" in t.get("suites", {})
          and retain_suite in t.get("suites", {})]
    if not ok or not axes_keys:
        return None
    objs = _ordered([t["config"].get("objective") for t in ok], seeds.OBJ_ORDER)
    rules = _ordered([t["config"]["rule"] for t in ok], seeds.RULE_ORDER)
    colors, markers = _style(rules, objs)
    fig = _figure(4.4 * len(objs) + 1.8, 4.0)
    axs = fig.subplots(1, len(objs), squeeze=False)[0]
    for ax, o in zip(axs, objs):
        lines: dict[tuple, dict[tuple, list[tuple[float, float]]]] = {}
        for t in ok:
            c = t["config"]
            if c.get("objective") != o:
                continue
            key = (c["rule"], c.get("k") if uses_k(c["rule"]) else None)
            at = tuple(c.get(a) for a in axes_keys)
            lines.setdefault(key, {}).setdefault(at, []).append(
                (-100 * t["suites"]["forget"]["delta"], 100 * t["suites"][retain_suite]["delta"]))
        for (rule, k), pts in sorted(lines.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
            order = sorted(pts, key=lambda a: tuple(float(x or 0) for x in a))
            xs = [statistics.mean(p[0] for p in pts[a]) for a in order]
            ys = [statistics.mean(p[1] for p in pts[a]) for a in order]
            ax.plot(xs, ys, color=colors[rule], marker=markers[o], lw=1.4, ms=5,
                    label=rule if k is None else f"{rule} k={k}")
            for a, x, y in zip(order, xs, ys):
                ax.annotate("/".join(f"{v:g}" if isinstance(v, float) else str(v) for v in a), (x, y),
                            fontsize=6, xytext=(3, 3), textcoords="offset points", color=colors[rule])
        if level_drop is not None:
            ax.axvline(100 * level_drop, color="black", ls=":", lw=1.0)
        ax.axhline(0, color="#999", lw=0.8)
        ax.set_title(f"objective: {o}")
        ax.set_xlabel("forget accuracy drop (points, test)")
        ax.set_ylabel(f"{retain_suite} accuracy change (points, test)")
        ax.grid(alpha=0.25)
        ax.legend(fontsize=7, frameon=False)
    fig.suptitle(f"Forgetting curves along {', '.join(axes_keys)} (mean over seeds)")
    fig.savefig(out)
    return out
