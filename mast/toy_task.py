"""The toy's task, pure: the arithmetic problems, the sloppy teacher, the disjoint splits, and the
paired gain interval (no torch, no files). :mod:`mast.toy` trains the model triple on it; the
module docstring there describes the skills and the splits.
"""

from __future__ import annotations

import math
import random

FORGET_SKILL = "mul"
RETAIN_SKILL = "add"


def add_problem(a: int, b: int) -> dict:
    """Retain skill: a + b (two-digit operands), worked column by column with the carry."""
    ones = a % 10 + b % 10
    carry = ones // 10
    tens = a // 10 + b // 10 + carry
    steps = [f"{a % 10}+{b % 10}={ones}", f"{a // 10}+{b // 10}" + (f"+{carry}" if carry else "") + f"={tens}"]
    s = a + b
    return {"id": f"add-{a}-{b}", "prompt": f"What is {a} + {b}?",
            "solution": "\n".join(steps) + f"\nso {a}+{b}={s}.\n\\boxed{{{s}}}", "answer": str(s),
            "skill": RETAIN_SKILL}


def mul_problem(x: int, y: int) -> dict:
    """Forget skill: x * y (one two-digit, one one-digit operand, either order), worked column by
    column on the two-digit operand a with the carry: ``37 * 6`` and ``6 * 37`` both go
    ``7*6=42 / 3*6=18 / 18+4=22 / so ...``."""
    a, b = max(x, y), min(x, y)
    ones = a % 10 * b
    carry = ones // 10
    tens = a // 10 * b
    steps = [f"{a % 10}*{b}={ones}", f"{a // 10}*{b}={tens}"]
    if carry:
        steps.append(f"{tens}+{carry}={tens + carry}")
    p = a * b
    return {"id": f"mul-{x}-{y}", "prompt": f"What is {x} * {y}?",
            "solution": "\n".join(steps) + f"\nso {x}*{y}={p}.\n\\boxed{{{p}}}", "answer": str(p),
            "skill": FORGET_SKILL}


def careless_mul_solution(x: int, y: int) -> str:
    """The sloppy teacher's solution of x * y: the carry of the ones column is dropped.

    ``37 * 6`` -> ``7*6=42, 3*6=18, so 37*6=182`` (wrong whenever the ones product is >= 10);
    identical to :func:`mul_problem`'s solution when there is no carry.
    """
    a, b = max(x, y), min(x, y)
    ones, tens = a % 10 * b, a // 10 * b
    wrong = int(f"{tens}{ones % 10}")
    return f"{a % 10}*{b}={ones}\n{a // 10}*{b}={tens}\nso {x}*{y}={wrong}.\n\\boxed{{{wrong}}}"


def has_carry(problem: dict) -> bool:
    """The ones column of a forget problem carries (the sloppy teacher gets it wrong)."""
    x, y = _operands(problem)
    a, b = max(x, y), min(x, y)
    return a % 10 * b >= 10


def _operands(problem: dict) -> tuple[int, int]:
    _, a, b = problem["id"].split("-")
    return int(a), int(b)


def fact_problem(a: int, b: int, op: str = "*") -> tuple[str, str]:
    """(question, solution) of a one-digit table fact, times or plus (base pretraining text only)."""
    r = a * b if op == "*" else a + b
    return f"What is {a} {op} {b}?", f"{a}{op}{b}={r}.\n\\boxed{{{r}}}"


def all_problems(skill: str) -> list[dict]:
    """Every problem of a skill, both operand orders: 8100 additions, 1040 multiplications."""
    if skill == RETAIN_SKILL:
        return [add_problem(a, b) for a in range(10, 100) for b in range(10, 100)]
    if skill == FORGET_SKILL:
        return [mul_problem(*xy) for a in range(11, 100) if a % 10 for b in range(2, 10) if no_overflow(a, b)
                for xy in ((a, b), (b, a))]
    raise ValueError(f"unknown skill {skill!r}")


def no_overflow(a: int, b: int) -> bool:
    """The carry step of a * b leaves the tens digit alone: (a//10 * b) % 10 + carry < 10.

    Then ``tens+carry`` is a one-digit fact plus a copied digit (``27+2=29``), which the
    base model knows; the forget skill is the 520 such products (394 of them with a carry),
    each asked in both orders (``37 * 6``, ``6 * 37``).
    """
    carry = a % 10 * b // 10
    return a // 10 * b % 10 + carry < 10


def operand_key(problem: dict) -> tuple[int, int]:
    """The unordered operand pair: ``a op b`` and ``b op a`` share it (and the same work)."""
    return tuple(sorted(_operands(problem)))


SPLIT_ORDER = ("eval", "val", "unlearn", "train")


def generate_task(seed: int = 0, n_unlearn: int = 64, n_eval: int = 200, n_val: int = 200) -> dict[str, list[dict]]:
    """Seeded, pairwise disjoint splits of both skills.

    Per skill (``forget``: mul, ``retain``: add): ``<skill>_eval`` (the test set of the suites),
    ``<skill>_val`` (validation, for tuning), ``<skill>`` (the unlearning texts) and
    ``<skill>_train`` (the pool the SFT and RLVR stages train on). Problems are grouped by
    their unordered operand pair and whole groups go to one split, so no problem of one split
    is the commuted twin of another's; a split is filled group by group up to its size (the
    surplus of the last group is dropped). The base stage sees retain_train and table facts.
    """
    rng = random.Random(f"mast-toy-v3-{seed}")
    sizes = {"eval": n_eval, "val": n_val, "unlearn": n_unlearn, "train": None}
    out: dict[str, list[dict]] = {}
    for name, skill in (("forget", FORGET_SKILL), ("retain", RETAIN_SKILL)):
        groups: dict[tuple[int, int], list[dict]] = {}
        for p in all_problems(skill):
            groups.setdefault(operand_key(p), []).append(p)
        keys = sorted(groups)
        rng.shuffle(keys)
        it = iter(keys)
        for split in SPLIT_ORDER:
            rows: list[dict] = []
            size = sizes[split]
            for key in it:
                rows += groups[key]
                if size is not None and len(rows) >= size:
                    break
            rows = rows[:size] if size is not None else rows
            rng.shuffle(rows)
            out[name if split == "unlearn" else f"{name}_{split}"] = rows
        if len(out[f"{name}_train"]) < len(out[f"{name}_eval"]):
            raise ValueError(f"{name}: fewer training problems than test problems; lower n_eval/n_val/n_unlearn")
    return out


def public(problem: dict) -> dict:
    """The record as written to OUT/data: id, prompt, solution, answer, skill."""
    return {k: problem[k] for k in ("id", "prompt", "solution", "answer", "skill")}


def paired_gain_ci(before: list[bool], after: list[bool], clusters: list, confidence: float = 0.95) -> dict:
    """Accuracy gain after - before on the same problems, with a cluster-robust paired t interval.

    ``d_i = after_i - before_i``; gain ``= mean(d)``; problems sharing a cluster (``a * b`` and
    ``b * a``) are not independent, so the variance sums d within clusters:
    ``var = G/(G-1) * sum_g (sum_{i in g} (d_i - gain))^2 / n^2`` over G clusters, and the
    interval is ``gain -/+ t_{G-1} * sqrt(var)``.
    """
    from scipy import stats

    n = len(before)
    if n == 0 or len(after) != n or len(clusters) != n:
        raise ValueError("before, after and clusters must have the same non-zero length")
    d = [float(a) - float(b) for a, b in zip(after, before)]
    gain = sum(d) / n
    sums: dict = {}
    for di, c in zip(d, clusters):
        sums[c] = sums.get(c, 0.0) + di - gain
    g = len(sums)
    var = g / max(1, g - 1) * sum(v * v for v in sums.values()) / n**2
    half = stats.t.ppf(0.5 + confidence / 2, max(1, g - 1)) * math.sqrt(var)
    return {"gain": gain, "low": gain - half, "high": gain + half, "n": n, "clusters": g,
            "confidence": confidence, "method": "paired, cluster-robust t over operand pairs"}


