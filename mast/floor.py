"""Two floors every result is read against: the SFT floor (how much of what RLVR added was removed)
and the noise floor (how much answers change with no weight change). Pure functions; torch-free.

SFT floor. prepare evaluates the reference (SFT) model on every suite beside the target (RLVR).
Per suite, with accuracies t (target), r (reference), u (unlearned):

- the RLVR change, t - r, counts as **established** when the exact McNemar test of the
  reference's against the target's per-problem results (paired on the same problems) is
  significant at ``GAIN_ALPHA`` = 0.05 (:func:`rl_gain`). Otherwise the two models differ by
  less than their noise (as on retain, where RL changed nothing) and no share is defined.
- **gain removed** = (t - u) / (t - r): 0 = nothing removed, 1 = back to the SFT level,
  > 1 = below it (:func:`gain_removed`); None (empty) where the change is not established.
- **below reference**: u < r, the unlearned model scores under the SFT model: it removed more
  than RL added (:func:`below_reference`). Flagged on every suite; on a suite where RL added
  nothing it means the unlearning lost skills the SFT model had. Beside it, the exact McNemar p
  of the unlearned model against the reference on the same problems (``vs_reference_p``).

Noise floor. A ``null`` trial selects nothing and trains nothing: the target is evaluated again,
exactly like a trial's checkpoint (fresh backend, same decoding, the evaluation cache bypassed),
once per seed, and paired with the cached baseline like any trial. Per suite
(:func:`noise_floor`), pooled over the null trials (seeds): flip rate = discordant pairs /
paired problems = sum(b + c) / sum(n), and the exact McNemar p of the pooled counts (sum b,
sum c); the per-seed values are listed beside them. Greedy decoding on the CPU hf backend is
deterministic: flip rate 0, p = 1. vLLM batching and sampling make it > 0; a trial's effect
should be read against it.
"""

from __future__ import annotations

from collections.abc import Sequence

from mast.registry import NULL_RULES
from mast.stats import exact_mcnemar_p, mcnemar_test

GAIN_ALPHA = 0.05


def rl_gain(reference: Sequence[dict], target: Sequence[dict], alpha: float = GAIN_ALPHA) -> dict:
    """What RLVR changed on one suite: reference vs target per-problem records, paired by id.

    {"n", "reference_acc", "target_acc", "gain" (t - r), "mcnemar_p", "established" (p < alpha)}.
    """
    m = mcnemar_test(reference, target, n_bootstrap=1, names=("reference", "target"))
    return {"n": m["n"], "reference_acc": m["acc_before"], "target_acc": m["acc_after"], "gain": m["delta"],
            "mcnemar_p": m["p_value"], "established": bool(m["p_value"] < alpha and m["delta"] != 0)}


def gain_removed(target_acc: float, unlearned_acc: float, reference_acc: float, established: bool) -> float | None:
    """Share of the RLVR change undone: (t - u) / (t - r); None where t - r is not established (or 0)."""
    if not established or target_acc == reference_acc:
        return None
    return (target_acc - unlearned_acc) / (target_acc - reference_acc)


def below_reference(unlearned_acc: float, reference_acc: float) -> bool:
    """The unlearned model scores under the SFT model (u < r): it removed more than RL added."""
    return unlearned_acc < reference_acc


def sft_floor_entry(gain: dict, unlearned_acc: float, vs_reference_p: float) -> dict:
    """A trial's SFT-floor fields on one suite (`gain` from :func:`rl_gain`)."""
    return {"reference_acc": gain["reference_acc"], "target_acc": gain["target_acc"], "gain": gain["gain"],
            "gain_p": gain["mcnemar_p"], "gain_established": gain["established"],
            "gain_removed": gain_removed(gain["target_acc"], unlearned_acc, gain["reference_acc"],
                                         gain["established"]),
            "below_reference": below_reference(unlearned_acc, gain["reference_acc"]),
            "vs_reference_p": vs_reference_p}


def is_null(trial: dict) -> bool:
    """A null (noise-floor) trial row: its rule changes no weight."""
    return (trial.get("config") or {}).get("rule") in NULL_RULES


def noise_floor(trials: Sequence[dict]) -> dict:
    """Per suite, from the ok null trials' McNemar dicts (trials.jsonl rows):
    {"flip_rate", "mcnemar_p", "n" (paired problems per run), "seeds", "flips", "right_to_wrong",
    "wrong_to_right", "per_seed": [{"seed", "flip_rate", "mcnemar_p"}]}. Empty without null trials."""
    rows = [t for t in trials if is_null(t) and t.get("status") == "ok"]
    out: dict[str, dict] = {}
    for t in rows:
        for suite, m in (t.get("suites") or {}).items():
            e = out.setdefault(suite, {"n": m["n"], "seeds": [], "right_to_wrong": 0, "wrong_to_right": 0,
                                       "total": 0, "per_seed": []})
            b, c = int(m["right_to_wrong"]), int(m["wrong_to_right"])
            e["seeds"].append(t["config"].get("seed"))
            e["right_to_wrong"] += b
            e["wrong_to_right"] += c
            e["total"] += int(m["n"])
            e["per_seed"].append({"seed": t["config"].get("seed"), "flip_rate": (b + c) / m["n"],
                                  "mcnemar_p": float(m["p_value"])})
    for e in out.values():
        total = e.pop("total")
        e["flips"] = e["right_to_wrong"] + e["wrong_to_right"]
        e["flip_rate"] = e["flips"] / total if total else 0.0
        e["mcnemar_p"] = exact_mcnemar_p(e["right_to_wrong"], e["wrong_to_right"])
    return out


def condition_floor(trials: Sequence[dict], suite: str) -> dict:
    """A condition's SFT floor on `suite` over its trials (seeds): the mean gain removed (None when no
    trial has one), the per-seed values, and how many seeds went below the reference."""
    entries = [(t.get("sft_floor") or {}).get(suite) for t in trials]
    entries = [e for e in entries if e]
    shares = [e["gain_removed"] for e in entries]
    defined = [s for s in shares if s is not None]
    return {"gain_removed": sum(defined) / len(defined) if defined else None, "gain_removed_per_seed": shares,
            "below_reference": sum(bool(e["below_reference"]) for e in entries), "n_seeds": len(entries)}
