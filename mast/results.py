"""Per-trial result rows (one per trial, as in a sweep's trials.jsonl): reading and checking them.

Sources: a sweep folder (its trials.jsonl, via mast.layout.SweepDir), a trials JSONL file, or a
wide CSV (e.g. exported from MLflow). Torch-free; no statistics here (mast.stats uses these rows).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from pathlib import Path

from mast.files import InputError, read_jsonl
from mast.layout import SweepDir

MCNEMAR_KEYS = ("n", "both_correct", "right_to_wrong", "wrong_to_right", "both_wrong",
                "acc_before", "acc_after", "delta", "ci_low", "ci_high", "p_value")


def check_trials(trials: Sequence[dict]) -> None:
    """Every row an object with status ok/failed and a config with rule and seed; ok rows have suites."""
    for i, t in enumerate(trials):
        tid = t.get("trial_id", f"row {i}") if isinstance(t, dict) else f"row {i}"
        if not isinstance(t, dict):
            raise InputError(f"trials: row {i}: expected an object")
        if t.get("status") not in ("ok", "failed"):
            raise InputError(f"trials: {tid}: status must be 'ok' or 'failed', got {t.get('status')!r}")
        cfg = t.get("config")
        if not isinstance(cfg, dict) or "rule" not in cfg or "seed" not in cfg:
            raise InputError(f"trials: {tid}: config must be an object with at least 'rule' and 'seed'")
        if t["status"] == "ok" and not isinstance(t.get("suites"), dict):
            raise InputError(f"trials: {tid}: an ok trial needs 'suites' (suite -> McNemar dict)")


def _coerce(v: str):
    s = v.strip()
    if s in ("", "None", "null", "nan", "NaN"):
        return None
    if s.lower() in ("true", "false"):
        return s.lower() == "true"
    for f in (int, float):
        try:
            return f(s)
        except ValueError:
            pass
    return s


_MCN_COL = re.compile(r"^(?P<suite>.+?)[/.](?P<field>" + "|".join(MCNEMAR_KEYS) + r")$")


def _trials_from_csv(path: Path) -> list[dict]:
    """Wide CSV: one row per trial; columns `<suite>/<field>` or `<suite>.<field>` (McNemar fields),
    `trial_id`, `status`, `error`, and config columns (prefixes `params.`/`metrics.`/`config.` ignored)."""
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for i, r in enumerate(rows, 2):
        t: dict = {"trial_id": None, "status": "ok", "error": None, "config": {}, "suites": {}}
        for col, val in r.items():
            if col is None:
                raise InputError(f"{path}:{i}: more fields than the header")
            name = re.sub(r"^(params|metrics|config)\.", "", col.strip())
            m = _MCN_COL.match(name)
            if m:
                v = _coerce(val or "")
                if v is not None:
                    t["suites"].setdefault(m["suite"], {})[m["field"]] = v
            elif name in ("trial_id", "status", "error"):
                t[name] = (val or "").strip() or None
            elif name in ("run_id", "mlflow_run_id"):
                continue
            else:
                t["config"][name] = _coerce(val or "")
        t["status"] = t["status"] or "ok"
        t["trial_id"] = t["trial_id"] or f"row{i}"
        out.append(t)
    if not out:
        raise InputError(f"{path}: no rows")
    return out


def load_trials(results: str | Path) -> list[dict]:
    """Per-trial rows from a sweep folder (its trials.jsonl), a trials JSONL file, or a wide CSV."""
    p = Path(results)
    if p.is_dir():
        p = SweepDir(p).trials_jsonl
        if not p.is_file():
            raise InputError(f"{Path(results)}: no trials.jsonl in this folder (not a sweep folder?)")
    if not p.exists():
        raise InputError(f"{p}: file not found")
    if p.suffix.lower() == ".csv":
        trials = _trials_from_csv(p)
    else:
        trials = read_jsonl(p, required=("status", "config"))
    if not trials:
        raise InputError(f"{p}: no trials")
    try:
        check_trials(trials)
    except InputError as e:
        raise InputError(f"{p}: {e}") from None
    return trials
