"""The prefix-recovery probe: does a short prefix of the reference solution bring the skill back?

For each fraction p of :class:`mast.config.ProbeSpec` and each problem, the model continues
the formatted prompt + the first p of the reference solution (:func:`solution_prefix`); the
solve rate per p is the recovery curve. :func:`mast.evaluation.evaluate_many` generates the
probe inputs (:func:`probe_items`) with the suite's own evaluation and scores them with
:func:`score_probe`; :func:`prefix_recovery` runs the probe alone on a built backend.
"""

from __future__ import annotations

import os
from pathlib import Path

from mast.backends import Backend, GenerationRequest, encode_prompts
from mast.config import ProbeSpec, SuiteSpec
from mast.files import InputError
from mast.grading import grade_responses


def solution_prefix(solution: str, fraction: float) -> str:
    """The first `fraction` of a solution, by characters, cut back to a whitespace boundary.

    ``cut = floor(fraction * len(solution))``; if that falls inside a word, the cut moves back
    to the end of the previous whitespace-separated word, so no word is split. The prefix
    keeps its trailing whitespace (if any) so the continuation starts a new word.
    fraction 0 -> "".
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    cut = int(fraction * len(solution))
    if cut <= 0:
        return ""
    if cut < len(solution) and not solution[cut].isspace() and not solution[cut - 1].isspace():
        j = cut
        while j > 0 and not solution[j - 1].isspace():
            j -= 1
        cut = j
    return solution[:cut]


def probe_spec(suite: SuiteSpec) -> ProbeSpec | None:
    """The suite's probe settings: None without a probe, the defaults for ``probe: true``."""
    if suite.probe is None:
        return None
    return suite.probe if isinstance(suite.probe, ProbeSpec) else ProbeSpec()


def prefix_recovery(gen: Backend, problems: list[dict], prompts: list[str], suite: SuiteSpec,
                    probe: ProbeSpec) -> dict:
    """Solve rate when the assistant turn starts with the first p of the reference solution.

    For each fraction p and problem: input = formatted prompt + :func:`solution_prefix`
    (solution, p) (character fraction, cut back to a whitespace boundary); the model continues
    with the suite's decoding. Two scores per p, each #correct / N:

    - ``accuracy``: prefix + continuation graded as one response (the PUM prefix-gain view);
    - ``accuracy_continuation``: the continuation alone, so a prefix that already states an
      intermediate number the grader's fallback extraction picks up cannot score by itself.

    A model that only hides the skill recovers with short prefixes; one that lost it does not.
    Returns ``{"fractions", "accuracy", "accuracy_continuation", "n", "correct": {p: [ids]}, "cut"}``.
    """
    items = probe_items(problems, prompts, probe)
    [rows] = gen.generate([GenerationRequest(encode_prompts(gen.tokenizer, [it[3] for it in items]),
                                             suite.decoding)])
    return score_probe(problems, items, [row[0]["text"] for row in rows], suite, probe)


def probe_items(problems: list[dict], prompts: list[str], probe: ProbeSpec) -> list[tuple]:
    """(fraction, problem, prefix, input text) for every fraction (outer) and problem (inner)."""
    missing = [p["id"] for p in problems if not p.get("solution")]
    if missing:
        raise InputError(f"probe needs a 'solution' for every problem; missing for {missing[:5]}")
    items = []
    for p_frac in probe.fractions:
        for prob, prompt in zip(problems, prompts):
            prefix = solution_prefix(prob["solution"], p_frac)
            items.append((p_frac, prob, prefix, prompt + prefix))
    return items


def score_probe(problems: list[dict], items: list[tuple], continuations: list[str], suite: SuiteSpec,
                probe: ProbeSpec) -> dict:
    """Grade prefix + continuation and the continuation alone; per fraction, #correct / N."""
    probs = [it[1] for it in items]
    graded = grade_responses(probs + probs, [it[2] + c for it, c in zip(items, continuations)] + continuations,
                             suite.grader)
    graded, graded_cont = graded[:len(items)], graded[len(items):]
    n = len(problems)
    acc, acc_cont, correct = [], [], {}
    for j, p_frac in enumerate(probe.fractions):
        rows, rows_c = graded[j * n:(j + 1) * n], graded_cont[j * n:(j + 1) * n]
        acc.append(sum(bool(r["correct"]) for r in rows) / n if n else 0.0)
        acc_cont.append(sum(bool(r["correct"]) for r in rows_c) / n if n else 0.0)
        correct[str(p_frac)] = [r["id"] for r in rows if r["correct"]]
    return {"fractions": list(probe.fractions), "accuracy": acc, "accuracy_continuation": acc_cont, "n": n,
            "correct": correct, "cut": "character fraction, moved back to a whitespace boundary"}


def probe_output_path(out: str | os.PathLike) -> Path:
    """RESULTS.jsonl -> RESULTS.probe.json (next to the results)."""
    out = Path(out)
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(stem + ".probe.json")
