"""Builders shared by the tests: simulated per-problem records and the trials.jsonl rows a sweep writes
from them (suite dicts are real :func:`mast.stats.mcnemar_test` outputs), a validated sweep spec and a
spec file."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import yaml
from scipy import stats as st

from mast import stats
from mast.config import SweepSpec, validate


def records_from_counts(both_correct, right_to_wrong, wrong_to_right, both_wrong, seed=0, prefix="q"):
    """Per-problem before/after result records with the given 2x2 table, in shuffled id order."""
    cells = [(True, True)] * both_correct + [(True, False)] * right_to_wrong + \
        [(False, True)] * wrong_to_right + [(False, False)] * both_wrong
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(cells))
    before, after = [], []
    for i, j in enumerate(order):
        b, a = cells[j]
        pid = f"{prefix}{i:04d}"
        before.append({"id": pid, "correct": b, "response": "...", "extracted": "1" if b else "2"})
        after.append({"id": pid, "correct": a, "response": "...", "extracted": "1" if a else "2"})
    after = [after[i] for i in rng.permutation(len(after))]  # matching must be by id, not position
    return before, after


def simulate_baseline(n, acc, seed, prefix):
    rng = np.random.default_rng(seed)
    correct = rng.random(n) < acc
    return [{"id": f"{prefix}{i:04d}", "correct": bool(c), "response": "", "extracted": None}
            for i, c in enumerate(correct)]


def simulate_after(baseline, p_forget, p_recover, rng):
    """Flip baseline-correct problems to wrong with prob p_forget, wrong ones to right with p_recover."""
    out = []
    for r in baseline:
        u = rng.random()
        c = (u >= p_forget) if r["correct"] else (u < p_recover)
        out.append({**r, "correct": bool(c)})
    return out


# per (rule, objective): (forget flip rate, retain flip rate); k scales the selective rules
RATES = {
    ("mast", "npo"): (0.35, 0.02), ("mast", "ga"): (0.45, 0.04),
    ("full", "npo"): (0.40, 0.30), ("full", "ga"): (0.55, 0.45),
    ("random", "npo"): (0.05, 0.03), ("random", "ga"): (0.08, 0.05),
}


def _candidates(n_layers=8):
    """A selection's candidate list with signals; later layers' q/v moved most (as RLVR tends to)."""
    rng = np.random.default_rng(11)
    out = []
    for layer in range(n_layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            bump = (layer / n_layers) * (1.0 if proj in ("q_proj", "v_proj") else 0.4)
            out.append({"name": f"model.layers.{layer}.self_attn.{proj}.weight", "shape": [64, 64],
                        "update_magnitude": float(0.01 + 0.02 * bump + 0.003 * rng.random()),
                        "off_principal_energy": float(0.6 + 0.3 * bump + 0.05 * rng.random()),
                        "coupling": float(0.1 * bump + 0.02 * rng.random()),
                        "coupling_cosine": float(0.05 * rng.random())})
    for key in ("update_magnitude", "off_principal_energy", "coupling"):
        ranks = st.rankdata([c[key] for c in out]) / len(out)
        for c, r in zip(out, ranks):
            c.setdefault("_pct", []).append(float(r))
    for c in out:
        c["score"] = float(np.mean(c.pop("_pct")))
    return out


CANDIDATES = _candidates()


def make_trials(n_seeds=3, ks=(2, 4), objectives=("npo", "ga"), rules=("mast", "full", "random"),
                suites=(("forget", 150, 0.3), ("retain", 150, 0.6), ("gsm8k", 120, 0.7)), with_failed=True,
                with_probe=False):
    """trials.jsonl rows whose suite dicts are real mcnemar_test outputs on simulated per-problem records.

    Returns (trials, baselines, per_trial_records) so callers can write a sweep folder.
    """
    baselines = {name: simulate_baseline(n, acc, 100 + i, name[:1]) for i, (name, n, acc) in enumerate(suites)}
    trials, records = [], {}
    for rule in rules:
        for obj in objectives:
            for k in ([None] if rule == "full" else ks):
                for seed in range(n_seeds):
                    cfg = {"rule": rule, "objective": obj, "k": k if k is not None else ks[-1], "seed": seed}
                    tid = f"{rule}_{obj}_k{cfg['k']}_s{seed}"
                    rng = np.random.default_rng(zlib.crc32(f"{rule}/{obj}/{k}/{seed}".encode()))
                    scale = 1.0 if k is None else (0.6 + 0.2 * k)
                    seed_shift = 0.05 * (seed - 1)  # the same seed moves every condition alike
                    f_rate, r_rate = RATES[(rule, obj)]
                    row_suites, recs = {}, {}
                    for name, base in baselines.items():
                        if name == "forget":
                            p = min(0.95, max(0.0, f_rate * scale + seed_shift))
                        else:
                            p = min(0.95, max(0.0, r_rate * scale + seed_shift / 2))
                        after = simulate_after(base, p, 0.02, rng)
                        recs[name] = after
                        row_suites[name] = stats.mcnemar_test(base, after, n_bootstrap=500, seed=seed)
                    names = [c["name"] for c in CANDIDATES]
                    if rule == "full":
                        selected = names
                    elif rule == "mast":
                        selected = [c["name"] for c in sorted(CANDIDATES, key=lambda c: -c["score"])[:cfg["k"]]]
                    else:
                        selected = [names[i] for i in rng.choice(len(names), cfg["k"], replace=False)]
                    probe = None
                    if with_probe:  # prefix recovery on the forget problems: more prefix, more recovered
                        fr = [0.0, 0.25, 0.5, 0.75]
                        base_acc = sum(r["correct"] for r in baselines["forget"]) / len(baselines["forget"])
                        after_acc = row_suites["forget"]["acc_after"]
                        probe = {"fractions": fr,
                                 "before": [min(1.0, base_acc + 0.5 * f * (1 - base_acc)) for f in fr],
                                 "after": [min(1.0, after_acc + (0.9 if rule == "random" else 0.4) * f
                                               * (base_acc - after_acc) + 0.3 * f * (1 - base_acc)) for f in fr]}
                    trials.append({"trial_id": tid, "status": "ok", "error": None, "config": cfg,
                                   "suites": row_suites, "probe": probe, "selected": selected,
                                   "mlflow_run_id": None})
                    records[tid] = recs
    if with_failed:
        trials.append({"trial_id": "mast_simnpo_k2_s0", "status": "failed",
                       "error": "UnlearnDiverged: loss is nan at step 3",
                       "config": {"rule": "mast", "objective": "simnpo", "k": 2, "seed": 0},
                       "suites": {}, "probe": None, "selected": [], "mlflow_run_id": None})
    return trials, baselines, records


def sweep_spec(**over) -> SweepSpec:
    """A minimal valid toy sweep spec (one `mast` rule), with top-level fields replaced by `over`."""
    d = {"name": "t", "models": {"toy": {"seed": 0}}, "grid": {"rule": ["mast"]}}
    d.update(over)
    return validate(SweepSpec, d, "spec.yaml")


def write_yaml(tmp_path: Path, data: dict, name: str = "s.yaml") -> Path:
    """`data` written as the YAML file `tmp_path / name`."""
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p
